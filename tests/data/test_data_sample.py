"""The bundled sample: regenerated bit for bit by its script, in OIG format, and correct."""

from __future__ import annotations

import json
import re
from pathlib import Path

from openchatkit.data.sources import parse_record

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "OIG-sample"
TURN = re.compile(r"<human>: (.*?)\n<bot>: (.*?)(?=\n<human>: |\Z)", re.S)


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / name).read_text().splitlines()]


def test_generator_reproduces_the_committed_files(tmp_path, cli):
    proc = cli.run("data/OIG-sample/generate.py", "--out", tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_format_size_and_split():
    train, valid = load("train.jsonl"), load("valid.jsonl")
    assert 300 <= len(train) <= 600 and 40 <= len(valid) <= 120
    for rec in train + valid:
        assert parse_record(rec).text == rec["text"]
        assert rec["metadata"]["source"].startswith("openchatkit-sample/")
        turns = TURN.findall(rec["text"])
        assert turns and rec["text"].startswith("<human>: ") and "\n<bot>: " in rec["text"]
        assert all(h.strip() and b.strip() for h, b in turns)
    multi = [r for r in train if r["text"].count("<human>:") > 1]
    assert len(multi) >= 30
    assert not {r["text"] for r in train} & {r["text"] for r in valid}


def test_templated_answers_are_correct():
    records = load("train.jsonl") + load("valid.jsonl")
    checked = {"capitals": 0, "arithmetic": 0, "conversions": 0}
    known = {"France": "Paris", "Japan": "Tokyo", "Australia": "Canberra", "Canada": "Ottawa",
             "Brazil": "Brasília", "Turkey": "Ankara", "Nigeria": "Abuja", "Switzerland": "Bern"}  # fmt: skip
    factors = {("kilometer", "meter"): 1000, ("meter", "centimeter"): 100, ("hour", "minute"): 60,
               ("day", "hour"): 24, ("week", "day"): 7, ("foot", "inch"): 12, ("yard", "foot"): 3}  # fmt: skip
    singular = {"feet": "foot", "inches": "inch"}
    for rec in records:
        source = rec["metadata"]["source"].split("/")[1]
        for human, bot in TURN.findall(rec["text"]):
            if source == "capitals":
                m = re.fullmatch(r"The capital of (.+) is (.+)\.", bot)
                assert m and m.group(1) in human, rec
                if m.group(1) in known:
                    assert m.group(2) == known[m.group(1)]
                checked["capitals"] += 1
            elif source == "arithmetic":
                a, op, b, value = re.fullmatch(
                    r"(\d+) (plus|minus|times) (\d+) is ([\d,]+)\.", bot
                ).groups()
                expect = {
                    "plus": int(a) + int(b),
                    "minus": int(a) - int(b),
                    "times": int(a) * int(b),
                }[op]
                assert int(value.replace(",", "")) == expect, rec
                checked["arithmetic"] += 1
            elif source == "conversions" and "Celsius" in bot:
                c, f = re.fullmatch(
                    r"(-?\d+) degrees Celsius is (-?[\d.]+) degrees Fahrenheit\.", bot
                ).groups()
                assert abs(int(c) * 9 / 5 + 32 - float(f)) < 1e-9
                checked["conversions"] += 1
            elif source == "conversions":
                n, big, value, small = re.fullmatch(
                    r"(\d+) (\w+) is ([\d,]+) (\w+)\.", bot
                ).groups()
                key = (singular.get(big, big.rstrip("s")), singular.get(small, small.rstrip("s")))
                if key in factors:
                    assert int(value.replace(",", "")) == int(n) * factors[key], rec
                    checked["conversions"] += 1
    assert (
        checked["capitals"] >= 80 and checked["arithmetic"] >= 60 and checked["conversions"] >= 30
    )
    questions = [
        r["text"] for r in records if r["text"].startswith("<human>: What is the capital of")
    ]
    assert len(questions) >= 80
