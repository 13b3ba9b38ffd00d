"""The bundled moderation sample: reproducible by its generator, balanced, disjoint splits."""

from __future__ import annotations

import collections
import json

from openchatkit.moderation import LABELS, read_labelled


def test_generator_reproduces_the_committed_files(cli, tmp_path):
    proc = cli.run("data/moderation-sample/generate.py", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("train.jsonl", "valid.jsonl"):
        committed = (cli.REPO / "data/moderation-sample" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, name


def test_balanced_disjoint_and_readable(cli):
    folder = cli.REPO / "data/moderation-sample"
    train, valid = read_labelled(folder / "train.jsonl"), read_labelled(folder / "valid.jsonl")
    assert len(train) + len(valid) >= 400
    for split in (train, valid):
        counts = collections.Counter(label for _, label in split)
        assert set(counts) == set(LABELS) and len(set(counts.values())) == 1
    assert not {t for t, _ in train} & {t for t, _ in valid}
    first = json.loads((folder / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label", "metadata"}
