"""Write the bundled moderation sample: data/moderation-sample/{train,valid}.jsonl.

User messages over the five labels of the original GPT-JT-Moderation format, written for this
project from the intent families in `families.py` (what each label means there). Each family is
one intent written several ways; slots, pronouns and surface noise (typos, lower case, dropped
punctuation, a lead-in from another topic, a trailing remark) multiply it. The unsafe ones are
mild and non-operational: they state feelings, insults, an intent or a request, and never contain
instructions for harm. One JSON object per line:

    {"text": "Can you recommend a good podcast for a rainy weekend?", "label": "casual",
     "metadata": {"source": "openchatkit-moderation-sample/casual-recommend"}}

The split is by intent family, not by row: the families marked held out in `families.py` go
wholly to valid.jsonl and the others wholly to train.jsonl, so the two share no template and no
intent family, and valid accuracy measures messages of a kind the model never trained on. Each
label has TRAIN_PER_LABEL train and VALID_PER_LABEL valid messages. `check.jsonl` beside it is
hand-written, not made here. Deterministic:

    python data/moderation-sample/generate.py            # rewrites train.jsonl and valid.jsonl
    python data/moderation-sample/generate.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from families import FAMILIES, SLOTS  # noqa: E402

TRAIN_PER_LABEL = 320
VALID_PER_LABEL = 80  # 5 x 400 = 2,000 messages
SEED = 26
PRONOUNS = (
    {"he": "he", "him": "him", "his": "his", "himself": "himself"},
    {"he": "she", "him": "her", "his": "her", "himself": "herself"},
)
# Lead-ins from other topics (mixed messages) and trailing remarks, for every label alike.
LEADINS = [
    "I just got back from the gym. ", "Sorry, random question. ", "So about my weekend: ",
    "Thanks for the pasta recipe earlier. ", "It's raining here again. ", "Long day at work. ",
    "ok so ", "hey, ", "Honestly, ", "Quick question. ", "Not sure how to say this but ",
    "My cat is sitting on my keyboard haha. Anyway, ", "Can I ask you something? ",
]  # fmt: skip
SUFFIXES = [
    " lol", " any advice?", " thanks", " :(", " idk", " Please be honest.", " What do you think?",
    " sorry for the long message", " ...", "!!",
]  # fmt: skip


def expand(template: str, rng: random.Random, limit: int) -> list[str]:
    """Up to `limit` distinct fillings of `template`'s slots (pronouns chosen per filling)."""
    names = [n for n in dict.fromkeys(re.findall(r"\{(\w+)\}", template)) if n in SLOTS]
    combos = list(itertools.product(*(SLOTS[n] for n in names)))
    rng.shuffle(combos)
    out = []
    for combo in combos[:limit]:
        fill = dict(zip(names, combo, strict=True)) | rng.choice(PRONOUNS)
        out.append(capitalise(template.format(**fill)))
    return out


def capitalise(text: str) -> str:
    """Upper-case the first letter of the text and of each sentence after `. ? !`."""
    text = text[:1].upper() + text[1:]
    return re.sub(r"([.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def typo(text: str, rng: random.Random) -> str:
    """One or two keyboard slips in words of four or more letters: swap, drop or double."""
    words = text.split(" ")
    long_ = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    for i in rng.sample(long_, min(len(long_), rng.choice((1, 2)))):
        w, k = words[i], rng.randrange(1, len(words[i]) - 1)
        kind = rng.randrange(3)
        if kind == 0:
            words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2 :]
        elif kind == 1:
            words[i] = w[:k] + w[k + 1 :]
        else:
            words[i] = w[:k] + w[k] + w[k:]
    return " ".join(words)


def noise(text: str, rng: random.Random) -> str:
    """A surface variant: each kind of noise with its own probability (often none)."""
    if rng.random() < 0.2:
        lead = rng.choice(LEADINS)
        text = lead + (text[0].lower() + text[1:] if lead[-2] not in ".?" else text)
    if rng.random() < 0.15:
        text = text.rstrip(".") + rng.choice(SUFFIXES)
    if rng.random() < 0.25:
        text = typo(text, rng)
    if rng.random() < 0.2:
        text = text.lower()
    if rng.random() < 0.2:
        text = text.rstrip(".!")
    return text


def family_messages(templates: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` distinct messages of one family: its templates in turn, fillings, then noise."""
    per_template = [expand(t, rng, 4 * count) for t in templates]
    seen, out = set(), []
    for round_ in itertools.count():
        if len(out) == count or round_ > 50 * count:
            break
        for fillings in per_template:
            base = fillings[round_ % len(fillings)]
            text = base if round_ < len(fillings) and rng.random() < 0.5 else noise(base, rng)
            if text not in seen and len(out) < count:
                seen.add(text)
                out.append(text)
    assert len(out) == count, (templates[0], len(out))
    return out


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, valid) records, split by family: held-out families make up valid.jsonl."""
    rng = random.Random(seed)
    splits: dict[bool, list[dict]] = {False: [], True: []}
    labels = list(dict.fromkeys(label for label, *_ in FAMILIES))
    for label in labels:
        for held_out, total in ((False, TRAIN_PER_LABEL), (True, VALID_PER_LABEL)):
            fams = [(n, t) for lab, n, h, t in FAMILIES if lab == label and h == held_out]
            for i, (name, templates) in enumerate(fams):
                count = total // len(fams) + (i < total % len(fams))
                source = f"openchatkit-moderation-sample/{label.replace(' ', '-')}-{name}"
                for text in family_messages(templates, count, rng):
                    splits[held_out].append(
                        {"text": text, "label": label, "metadata": {"source": source}}
                    )
    train, valid = splits[False], splits[True]
    # A text made by two families (possible only by chance) stays in valid only.
    valid_texts = {r["text"] for r in valid}
    assert not any(r["text"] in valid_texts for r in train)
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
