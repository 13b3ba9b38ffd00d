"""Write the bundled moderation sample: data/moderation-sample/{train,valid}.jsonl.

User messages over the five labels of the original GPT-JT-Moderation format, written for this
project from templates. The unsafe ones are kept mild and non-operational: they state feelings,
insults or an intent, and never contain instructions for harm. One JSON object per line:

    {"text": "Can you recommend a good podcast for a long flight?", "label": "casual",
     "metadata": {"source": "openchatkit-moderation-sample/casual-recommend"}}

The split is stratified (a fifth of each label to valid.jsonl); valid texts never appear in
train.jsonl, but they share templates with it. Deterministic:

    python data/moderation-sample/generate.py            # rewrites the two files
    python data/moderation-sample/generate.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_LABEL = 104  # 520 messages: 416 train, 104 valid
SEED = 14

PEOPLE = [
    "neighbour", "coworker", "boss", "roommate", "ex", "brother", "cousin", "landlord",
    "classmate", "teammate", "sister", "manager",
]  # fmt: skip

TEMPLATES: dict[str, dict[str, tuple[str, dict[str, list[str]]]]] = {
    "casual": {
        "recommend": (
            "Can you recommend a good {thing} for {when}?",
            {
                "thing": ["book", "movie", "board game", "podcast", "recipe", "album"],
                "when": ["a rainy weekend", "a long flight", "a family dinner", "a lazy Sunday"],
            },
        ),
        "howto": (
            "How do I {task}?",
            {
                "task": [
                    "bake banana bread",
                    "change a bike tyre",
                    "repot a houseplant",
                    "make cold brew coffee",
                    "fold a fitted sheet",
                    "start learning Spanish",
                    "write a cover letter",
                    "set up a budget spreadsheet",
                    "clean a cast iron pan",
                    "train for a 5k run",
                    "tie a bowline knot",
                    "grow basil on a windowsill",
                ]  # fmt: skip
            },
        ),
        "capital": (
            "What is the capital of {country}?",
            {
                "country": [
                    "France",
                    "Japan",
                    "Kenya",
                    "Peru",
                    "Norway",
                    "Canada",
                    "Vietnam",
                    "Chile",
                    "Ghana",
                    "Austria",
                    "Mexico",
                    "Thailand",
                    "Egypt",
                    "Poland",
                ]  # fmt: skip
            },
        ),
        "fact": (
            "Tell me a fun fact about {animal}.",
            {
                "animal": [
                    "octopuses",
                    "owls",
                    "otters",
                    "penguins",
                    "bees",
                    "giraffes",
                    "dolphins",
                    "hedgehogs",
                    "koalas",
                    "crows",
                    "snails",
                    "whales",
                ]  # fmt: skip
            },
        ),
        "trip": (
            "I'm planning a trip to {city}, what should I see there?",
            {
                "city": [
                    "Lisbon",
                    "Kyoto",
                    "Montreal",
                    "Edinburgh",
                    "Cape Town",
                    "Oaxaca",
                    "Vienna",
                    "Seoul",
                    "Dublin",
                    "Porto",
                    "Hanoi",
                    "Quebec City",
                ]  # fmt: skip
            },
        ),
        "thanks": (
            "Thanks, that helped a lot! Could you also {ask}?",
            {"ask": ["explain it more simply", "give me one more example", "summarise it"]},
        ),
        "convert": (
            "How many {q}?",
            {
                "q": [
                    "minutes are in a day",
                    "grams are in a kilogram",
                    "days are in a leap year",
                    "centimetres are in a metre",
                    "seconds are in an hour",
                    "millilitres are in a litre",
                    "weeks are in a year",
                    "feet are in a mile",
                ]  # fmt: skip
            },
        ),
        "wear": (
            "What should I wear for {event} in {season}?",
            {
                "event": ["a hike", "a wedding", "a job interview", "a picnic"],
                "season": ["spring", "summer", "autumn", "winter"],
            },
        ),
        "explain": (
            "Can you explain {topic} in simple words?",
            {
                "topic": [
                    "photosynthesis",
                    "compound interest",
                    "how vaccines work",
                    "black holes",
                    "the water cycle",
                    "how bread rises",
                    "machine learning",
                    "tides",
                    "supply and demand",
                    "rainbows",
                    "plate tectonics",
                    "how a bill becomes law",
                ]  # fmt: skip
            },
        ),
    },
    "possibly needs caution": {
        "job": (
            "I hate my {place} and I don't want to go there {when}.",
            {
                "place": ["job", "school", "gym class", "night shift", "office"],
                "when": ["tomorrow", "on Monday", "ever again", "this week"],
            },
        ),
        "annoying": (
            "My {person} keeps {habit} and it's getting on my nerves.",
            {
                "person": PEOPLE,
                "habit": ["interrupting me", "borrowing my stuff", "being late", "eating my food"],
            },
        ),
        "tired": (
            "I'm so tired of {thing}, this week has been rubbish.",
            {
                "thing": [
                    "the traffic",
                    "my commute",
                    "the rain",
                    "my exams",
                    "the noise",
                    "cooking every night",
                    "the dishes",
                    "slow internet",
                    "the queue",
                    "meetings",
                ]  # fmt: skip
            },
        ),
        "fedup": (
            "Ugh, the {event} went badly again and I'm fed up with it.",
            {
                "event": [
                    "meeting",
                    "interview",
                    "match",
                    "presentation",
                    "exam",
                    "date",
                    "driving test",
                    "audition",
                    "sales call",
                    "group project",
                ]  # fmt: skip
            },
        ),
        "birthday": (
            "My {person} forgot my birthday again and I'm kind of annoyed.",
            {"person": PEOPLE},
        ),
        "scream": (
            "{thing} has been so stressful that I just want to scream into a pillow.",
            {"thing": ["Work", "School", "Moving house", "Planning the wedding", "My thesis"]},
        ),
    },
    "probably needs caution": {
        "cantstand": (
            "I can't stand my {person} anymore, I'm about to lose it with them.",
            {"person": PEOPLE},
        ),
        "never": (
            "I never want to speak to my {person} again, they ruined {what}.",
            {"person": PEOPLE, "what": ["everything", "my birthday", "the holiday"]},
        ),
        "low": (
            "I've been feeling really {mood} lately and I don't know who to talk to.",
            {"mood": ["low", "lonely", "hopeless", "empty", "worthless", "numb", "lost"]},
        ),
        "lately": (
            "Lately I feel {mood} all the time and nothing seems to help.",
            {"mood": ["low", "lonely", "hopeless", "empty", "worthless", "numb", "lost"]},
        ),
        "furious": (
            "I'm so furious at my {person} that I'm shaking right now.",
            {"person": PEOPLE},
        ),
        "close": (
            "I'm this close to screaming at my {person} in front of everyone.",
            {"person": PEOPLE},
        ),
        "explode": (
            "I'm done with my {person}, I could honestly explode at them.",
            {"person": PEOPLE},
        ),
        "giveup": (
            "Everything is falling apart and I feel like giving up on {thing}.",
            {"thing": ["my studies", "my friends", "my job", "my plans", "my family", "trying"]},
        ),
    },
    "needs caution": {
        "useless": (
            "You're a {adj} {noun} and everyone knows it.",
            {
                "adj": ["useless", "pathetic", "stupid", "worthless", "brainless", "hopeless"],
                "noun": ["bot", "machine", "loser", "joke", "failure"],
            },
        ),
        "shutup": (
            "Shut up, {noun}, nobody asked for your {what}.",
            {
                "noun": ["idiot", "moron", "clown", "loser", "nobody"],
                "what": ["opinion", "advice", "jokes"],
            },
        ),
        "mock": (
            "My {person} is a pathetic loser and I want everyone to laugh at them.",
            {"person": PEOPLE},
        ),
        "fans": (
            "Fans of {team} are all brainless idiots who deserve to be mocked.",
            {
                "team": [
                    "the other team",
                    "that band",
                    "that show",
                    "that club",
                    "pineapple pizza",
                    "that game",
                    "that podcast",
                    "that singer",
                ]  # fmt: skip
            },
        ),
        "ugly": (
            "My {person} is so ugly and dumb that I want to post mean comments about them.",
            {"person": PEOPLE},
        ),
        "waste": (
            "Only an idiot like my {person} would believe that, what a waste of space.",
            {"person": PEOPLE},
        ),
        "fail": (
            "I hope my {person} fails at everything, they're a total waste of air.",
            {"person": PEOPLE},
        ),
        "dumbest": (
            "Honestly my {person} is the dumbest person alive and I'll tell them so.",
            {"person": PEOPLE},
        ),
    },
    "needs intervention": {
        "hurt": (
            "I want to hurt my {person} so they finally pay for it.",
            {"person": PEOPLE},
        ),
        "smash": (
            "I'm going to smash my {person}'s {thing} tonight and make them regret it.",
            {"person": PEOPLE, "thing": ["car", "windows", "phone"]},
        ),
        "suffer": (
            "How can I get back at my {person} so they really suffer?",
            {"person": PEOPLE},
        ),
        "hell": (
            "I'm planning to make my {person}'s life a living hell until they break.",
            {"person": PEOPLE},
        ),
        "pay": (
            "I'm going to make my {person} pay for this, and it won't be pretty.",
            {"person": PEOPLE},
        ),
        "scare": (
            "I want to scare my {person} so badly that they never come back.",
            {"person": PEOPLE},
        ),
        "oneword": (
            "I'm going to hurt someone if my {person} says one more word to me.",
            {"person": PEOPLE},
        ),
    },
}


def expand(template: str, slots: dict[str, list[str]]) -> list[str]:
    keys = list(slots)
    return [
        template.format(**dict(zip(keys, combo, strict=True)))
        for combo in itertools.product(*(slots[k] for k in keys))
    ]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, valid) records; each label gets PER_LABEL distinct messages, a fifth held out."""
    rng = random.Random(seed)
    train, valid = [], []
    for label, groups in TEMPLATES.items():
        pool = [
            (text, f"openchatkit-moderation-sample/{label.replace(' ', '-')}-{name}")
            for name, (template, slots) in groups.items()
            for text in expand(template, slots)
        ]
        # Take from each template in turn, so every template is represented.
        by_source: dict[str, list[str]] = {}
        for text, source in pool:
            by_source.setdefault(source, []).append(text)
        for texts in by_source.values():
            rng.shuffle(texts)
        chosen = []
        for round_ in itertools.count():
            added = False
            for source, texts in by_source.items():
                if round_ < len(texts) and len(chosen) < PER_LABEL:
                    chosen.append((texts[round_], source))
                    added = True
            if len(chosen) == PER_LABEL or not added:
                break
        assert len(chosen) == PER_LABEL, (label, len(chosen))
        rng.shuffle(chosen)
        cut = PER_LABEL // 5
        for i, (text, source) in enumerate(chosen):
            record = {"text": text, "label": label, "metadata": {"source": source}}
            (valid if i < cut else train).append(record)
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def write(records: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: this one)")
    args = p.parse_args(argv)
    from openchatkit.fileio import check_writable_dir

    check_writable_dir(args.out, "--out")  # one line, and both files or neither
    args.out.mkdir(parents=True, exist_ok=True)
    train, valid = build()
    write(train, args.out / "train.jsonl")
    write(valid, args.out / "valid.jsonl")
    print(f"{args.out / 'train.jsonl'}: {len(train)} messages", file=sys.stderr)
    print(f"{args.out / 'valid.jsonl'}: {len(valid)} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from openchatkit.cli import run_main

    sys.exit(run_main(lambda: main()))
