"""Write the bundled chat sample, data/OIG-sample/{train,valid}.jsonl, in OIG's format.

    python data/OIG-sample/generate.py                 # rewrite the two files here
    python data/OIG-sample/generate.py --out /tmp/s    # somewhere else

Each line is `{"text": "<human>: ...\\n<bot>: ...", "metadata": {"source": ...}}`. The content is
templated (capitals, arithmetic, unit conversions, letters) or hand-written (definitions, facts,
multi-turn dialogues), checked by hand, and the output is the same on every run (fixed seed):
a test regenerates it and compares. valid.jsonl holds different items from train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.conversation import BOT_PREFIX, HUMAN_PREFIX
from openchatkit.fileio import atomic_file

HERE = Path(__file__).resolve().parent
SEED = 20240310
VALID_FRACTION = 0.15

# (country as written in a sentence, capital). Only countries whose capital is undisputed.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"),
    ("Slovakia", "Bratislava"), ("Hungary", "Budapest"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Greece", "Athens"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"),
    ("Slovenia", "Ljubljana"), ("Denmark", "Copenhagen"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Ukraine", "Kyiv"),
    ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Senegal", "Dakar"),
    ("Uganda", "Kampala"), ("Rwanda", "Kigali"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"),
    ("Angola", "Luanda"), ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"),
    ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Mongolia", "Ulaanbaatar"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Jordan", "Amman"),
    ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Afghanistan", "Kabul"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Fiji", "Suva"),
    ("Canada", "Ottawa"), ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Guatemala", "Guatemala City"),
    ("Costa Rica", "San José"), ("Panama", "Panama City"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Uruguay", "Montevideo"), ("Paraguay", "Asunción"),
    ("Brazil", "Brasília"), ("Qatar", "Doha"), ("Kuwait", "Kuwait City"), ("Oman", "Muscat"),
    ("the United Arab Emirates", "Abu Dhabi"), ("Armenia", "Yerevan"), ("Georgia", "Tbilisi"),
    ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"), ("Kazakhstan", "Astana"),
    ("Belarus", "Minsk"), ("Albania", "Tirana"), ("North Macedonia", "Skopje"),
    ("Bosnia and Herzegovina", "Sarajevo"), ("Montenegro", "Podgorica"), ("Malta", "Valletta"),
    ("Cyprus", "Nicosia"),
]  # fmt: skip

# Other ways to ask; most questions use the plain "What is the capital of X?".
CAPITAL_QUESTIONS = [
    "Which city is the capital of {c}?",
    "What's the capital city of {c}?",
    "Can you tell me the capital of {c}?",
]

# (unit, smaller unit, factor, plural forms) for "How many B are in N A?".
CONVERSIONS = [
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("centimeter", "centimeters", "millimeter", "millimeters", 10),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
    ("foot", "feet", "inch", "inches", 12),
    ("yard", "yards", "foot", "feet", 3),
]

# Celsius values whose Fahrenheit value (C * 9/5 + 32) is exact to one decimal.
CELSIUS = [-40, -10, 0, 5, 10, 15, 20, 25, 30, 35, 37, 40, 100]

DEFINITIONS = [
    ("photosynthesis", "the process by which plants, algae and some bacteria use sunlight, water and carbon dioxide to make sugar and release oxygen"),
    ("gravity", "the force by which masses attract one another; on Earth it pulls objects toward the ground"),
    ("a noun", "a word that names a person, place, thing or idea, such as \"teacher\", \"city\" or \"happiness\""),
    ("a verb", "a word that describes an action or a state, such as \"run\", \"think\" or \"be\""),
    ("an adjective", "a word that describes a noun, such as \"red\", \"tall\" or \"quiet\""),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7"),
    ("an even number", "a whole number that can be divided by 2 without a remainder, such as 4 or 10"),
    ("evaporation", "the change of a liquid into a gas, as when water dries in the sun"),
    ("a mammal", "a warm-blooded animal with hair or fur that feeds its young with milk, such as a dog, a whale or a human"),
    ("an island", "a piece of land completely surrounded by water"),
    ("a peninsula", "a piece of land surrounded by water on three sides and connected to a larger land mass"),
    ("a democracy", "a system of government in which citizens choose their leaders by voting"),
    ("inflation", "a general rise in prices over time, which means the same money buys less"),
    ("an algorithm", "a finite list of precise steps for solving a problem or doing a task"),
    ("a synonym", "a word with the same or nearly the same meaning as another word, like \"big\" and \"large\""),
    ("an antonym", "a word with the opposite meaning of another word, like \"hot\" and \"cold\""),
    ("a fraction", "a number that represents part of a whole, written like 3/4"),
    ("the equator", "the imaginary line around the middle of the Earth, halfway between the North and South Poles"),
    ("an atom", "the smallest unit of a chemical element, made of a nucleus of protons and neutrons with electrons around it"),
    ("a volcano", "an opening in the Earth's crust through which molten rock, ash and gas erupt"),
    ("a haiku", "a short Japanese poem of three lines with five, seven and five syllables"),
    ("a metaphor", "a figure of speech that describes something by saying it is something else, as in \"time is a thief\""),
    ("recycling", "turning used materials such as paper, glass or plastic into new products"),
    ("a budget", "a plan for how much money you will earn and spend over a period of time"),
    ("a habitat", "the natural home of an animal or plant, where it finds food, water and shelter"),
    ("erosion", "the slow wearing away of rock and soil by water, wind or ice"),
    ("a thermometer", "an instrument that measures temperature"),
    ("a continent", "one of the Earth's seven large land masses, such as Africa or Asia"),
    ("a password", "a secret word or string of characters used to prove who you are to a computer or service"),
    ("a verb tense", "the form of a verb that shows when an action happens: in the past, the present or the future"),
]  # fmt: skip
DEFINITION_QUESTIONS = ["What is {w}?", "Can you define {w}?", "Explain what {w} is."]

FACTS = [
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many months are there in a year?", "There are twelve months in a year."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("At what temperature does water boil at sea level?", "At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O: two hydrogen atoms and one oxygen atom."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air and release oxygen."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many degrees are in a right angle?", "A right angle measures 90 degrees."),
    ("What do the angles of a triangle add up to?", "The angles of a triangle always add up to 180 degrees."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get by mixing red and white?", "Mixing red and white gives pink."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("What is the longest river in South America?", "The Amazon is the longest river in South America."),
]  # fmt: skip

DIALOGUES = [
    [("Hello!", "Hello! How can I help you today?"),
     ("What is the capital of France?", "The capital of France is Paris."),
     ("And Germany?", "The capital of Germany is Berlin.")],
    [("Hi, can you help me with some math?", "Of course. What would you like to work out?"),
     ("What is 12 times 4?", "12 times 4 is 48."),
     ("And half of that?", "Half of 48 is 24.")],
    [("I have 3 apples and buy 5 more. How many do I have?", "You have 8 apples."),
     ("Then I eat 2. How many are left?", "You have 6 apples left.")],
    [("Thank you for your help!", "You're welcome! Let me know if you need anything else.")],
    [("Good morning!", "Good morning! What can I do for you?"),
     ("Can you suggest a name for a goldfish?", "How about Bubbles, Goldie or Captain Fin?")],
    [("How do I boil an egg?", "Put the egg in a pot of cold water, bring it to a boil, then let it cook for about 9 minutes for a hard-boiled egg. Cool it in cold water before peeling."),
     ("And for a soft-boiled egg?", "Cook it for about 6 minutes after the water boils, then cool it briefly in cold water.")],
    [("Can you give me three tips for better sleep?", "1. Go to bed at the same time every night. 2. Avoid screens for an hour before bed. 3. Keep your bedroom cool, dark and quiet.")],
    [("What is the capital of Japan?", "The capital of Japan is Tokyo."),
     ("How do you say thank you in Japanese?", "\"Thank you\" in Japanese is \"arigatou\".")],
    [("Translate 'good night' into Spanish.", "\"Good night\" in Spanish is \"buenas noches\"."),
     ("And into French?", "\"Good night\" in French is \"bonne nuit\".")],
    [("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and sleeps.")],
    [("Is 17 a prime number?", "Yes, 17 is a prime number: its only divisors are 1 and 17."),
     ("What about 21?", "No, 21 is not prime: it equals 3 times 7.")],
    [("What is 15 percent of 200?", "15 percent of 200 is 30.")],
    [("I'm feeling a bit stressed about an exam tomorrow.", "That's understandable. Try reviewing your notes in short sessions, get a good night's sleep, and eat a proper breakfast. You have prepared, and that counts."),
     ("Thanks, that helps.", "Good luck tomorrow! You can do it.")],
    [("Can you write a Python function that adds two numbers?", "Sure:\n\ndef add(a, b):\n    return a + b"),
     ("How do I call it?", "Call it with two numbers, for example add(2, 3), which returns 5.")],
    [("What is the plural of mouse?", "The plural of mouse is mice."),
     ("And the plural of goose?", "The plural of goose is geese.")],
    [("Who are you?", "I am a chat assistant. I can answer questions, explain things and help with writing and math.")],
    [("What's the weather like today?", "I don't have access to live weather data. A weather website or app will have today's forecast for your area.")],
    [("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
     ("Another one?", "Bat also rhymes with cat.")],
    [("Convert 2 hours into minutes.", "2 hours is 120 minutes."),
     ("And into seconds?", "2 hours is 7,200 seconds.")],
    [("What is the capital of Italy?", "The capital of Italy is Rome."),
     ("Which river runs through it?", "The Tiber runs through Rome.")],
    [("Summarize the story of Cinderella in one sentence.", "A kind young woman mistreated by her stepfamily attends a royal ball with help from her fairy godmother, loses a glass slipper, and is found and married by the prince.")],
    [("Can you recommend a good habit for learning a language?", "Practice a little every day: even fifteen minutes of reading, listening or speaking builds up quickly."),
     ("How many new words should I learn each day?", "Around ten new words a day is a good, steady pace for most learners.")],
    [("What is 100 divided by 4?", "100 divided by 4 is 25."),
     ("And 100 divided by 8?", "100 divided by 8 is 12.5.")],
    [("Tell me a fun fact.", "Octopuses have three hearts and blue blood.")],
    [("What is the boiling point of water in Fahrenheit?", "Water boils at 212 degrees Fahrenheit at sea level."),
     ("And in Celsius?", "That is 100 degrees Celsius.")],
]  # fmt: skip

WORDS_TO_SPELL = [
    "apple", "river", "planet", "garden", "window", "orange", "pencil", "summer", "bridge",
    "castle", "forest", "silver", "market", "rocket", "yellow", "butter", "candle", "dragon",
]  # fmt: skip


def turns(*pairs: tuple[str, str]) -> str:
    """An OIG text from (human, bot) pairs."""
    return "\n".join(f"{HUMAN_PREFIX} {h}\n{BOT_PREFIX} {b}" for h, b in pairs)


def record(source: str, *pairs: tuple[str, str]) -> dict:
    return {"text": turns(*pairs), "metadata": {"source": f"openchatkit-sample/{source}"}}


def number(n: float) -> str:
    """12345 -> '12,345'; 12.5 -> '12.5'."""
    return f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"


def capital_items(rng: random.Random) -> list[list[dict]]:
    """One group per country, so a held-out country is absent from train.jsonl."""
    groups = []
    for country, capital in CAPITALS:
        answer = f"The capital of {country} is {capital}."
        group = [record("capitals", (f"What is the capital of {country}?", answer))]
        if rng.random() < 0.35:
            question = rng.choice(CAPITAL_QUESTIONS).format(c=country)
            group.append(record("capitals", (question, answer)))
        groups.append(group)
    return groups


def arithmetic_items(rng: random.Random, count: int) -> list[dict]:
    items = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        if op == "minus" and b > a:
            a, b = b, a
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        question = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b}?"])
        items.append(
            record(
                "arithmetic",
                (question.format(a=a, op=op, b=b), f"{a} {op} {b} is {number(value)}."),
            )
        )
    return items


def conversion_items(rng: random.Random, count: int) -> list[dict]:
    items = []
    for _ in range(count):
        one, many, small_one, small_many, factor = rng.choice(CONVERSIONS)
        n = rng.randint(1, 12)
        big = one if n == 1 else many
        small = small_one if n * factor == 1 else small_many
        question = rng.choice(
            ["How many {s} are in {n} {b}?", "Convert {n} {b} to {s}.", "{n} {b} is how many {s}?"]
        ).format(s=small_many, n=n, b=big)
        items.append(
            record("conversions", (question, f"{n} {big} is {number(n * factor)} {small}."))
        )
    for c in CELSIUS:
        f = c * 9 / 5 + 32
        items.append(
            record(
                "conversions",
                (
                    f"What is {c} degrees Celsius in Fahrenheit?",
                    f"{c} degrees Celsius is {number(f)} degrees Fahrenheit.",
                ),
            )
        )
    return items


def definition_items(rng: random.Random) -> list[dict]:
    items = []
    for word, meaning in DEFINITIONS:
        question = rng.choice(DEFINITION_QUESTIONS).format(w=word)
        subject = word[0].upper() + word[1:]
        items.append(record("definitions", (question, f"{subject} is {meaning}.")))
    return items


def letter_items(rng: random.Random) -> list[dict]:
    items = []
    for word in WORDS_TO_SPELL:
        if rng.random() < 0.5:
            items.append(
                record(
                    "letters",
                    (f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."),
                )
            )
        else:
            n = len(word)
            items.append(
                record(
                    "letters",
                    (
                        f"How many letters are in the word '{word}'?",
                        f"The word '{word}' has {n} letters.",
                    ),
                )
            )
    return items


def multi_turn_math(rng: random.Random, count: int) -> list[dict]:
    items = []
    for _ in range(count):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        total = a + b
        items.append(
            record(
                "dialogues",
                (f"What is {a} plus {b}?", f"{a} plus {b} is {total}."),
                ("And if you double that?", f"Double {total} is {2 * total}."),
            )
        )
    return items


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, valid) records; the same for the same seed."""
    rng = random.Random(seed)

    def singles(records: list[dict]) -> list[list[dict]]:
        return [[r] for r in records]

    # Each kind is a list of groups; a group (one country's questions, one item) is held out
    # whole, so valid.jsonl has the same mix as train.jsonl but other content.
    kinds = [
        capital_items(rng),
        singles(arithmetic_items(rng, 90)),
        singles(conversion_items(rng, 60)),
        singles(definition_items(rng)),
        singles([record("facts", pair) for pair in FACTS]),
        singles(letter_items(rng)),
        singles(multi_turn_math(rng, 30)),
        singles([record("dialogues", *d) for d in DIALOGUES]),
    ]
    train, valid = [], []
    for groups in kinds:
        order = list(range(len(groups)))
        rng.shuffle(order)
        held = set(order[: max(1, round(len(groups) * VALID_FRACTION))])
        for i, group in enumerate(groups):
            (valid if i in held else train).extend(group)
    # A dialogue a trainer sees twice in one batch teaches nothing new: dedupe by text.
    train = _dedupe(train)
    seen = {r["text"] for r in train}
    valid = [r for r in _dedupe(valid) if r["text"] not in seen]
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def _dedupe(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append(r)
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="folder for train.jsonl and valid.jsonl (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openchatkit.fileio import check_writable_dir

    check_writable_dir(args.out, "--out")  # both files or neither
    train, valid = build()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    print(f"wrote {len(train)} conversations to {args.out / 'train.jsonl'}")
    print(f"wrote {len(valid)} conversations to {args.out / 'valid.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
