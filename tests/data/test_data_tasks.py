"""Task specs: weights, normalisation, file kinds, and every bad-input case."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from openchatkit.data import parse_task_spec
from openchatkit.errors import UserError


@pytest.fixture
def files(tmp_path: Path, write_jsonl) -> dict[str, Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "aa"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "bb"}])
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "x.jsonl", [{"text": "x"}])
    with gzip.open(folder / "sub" / "y.jsonl.gz", "wt") as f:
        f.write('{"text": "y"}\n')
    (folder / "notes.txt").write_text("ignored")
    return {"a": a, "b": b, "folder": folder}


def test_weights_default_and_normalise(files):
    entries = parse_task_spec(f"{files['a']}:3, {files['b']}")
    assert [e.weight for e in entries] == [3.0, 1.0]
    assert [e.probability for e in entries] == [0.75, 0.25]
    assert entries[0].files == (files["a"],)
    assert all(e.kind == "files" for e in entries)


def test_folder_and_glob(files, tmp_path):
    (entry,) = parse_task_spec(str(files["folder"]))
    assert [p.name for p in entry.files] == ["y.jsonl.gz", "x.jsonl"]  # sorted paths, recursive
    (entry,) = parse_task_spec(f"{tmp_path}/*.jsonl:2")
    assert [p.name for p in entry.files] == ["a.jsonl", "b.jsonl"] and entry.probability == 1.0


def test_zero_weight_entry_allowed_when_sum_positive(files):
    entries = parse_task_spec(f"{files['a']}:0,{files['b']}:2")
    assert [e.probability for e in entries] == [0.0, 1.0]


def test_hub_id_is_recognised_without_network(files):
    (entry,) = parse_task_spec("laion/OIG:0.5")
    assert entry.kind == "hub" and entry.name == "laion/OIG" and entry.weight == 0.5


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{a}:-1", "weight must be a finite number >= 0"),
        ("{a}:abc", "weight 'abc' is not a number"),
        ("{a}:nan", "finite"),
        ("{a}:0,{b}:0", "sum to zero"),
        ("{a},,{b}", "empty entry"),
        ("", "empty"),
        (":2", "no file"),
        ("{missing}", "no such file or folder"),
        ("data/no-such-dataset", "no such file or folder"),  # local-looking, not a hub id
        ("{empty}", "is empty"),
        ("{txt}", "not a .jsonl"),
        ("{emptydir}", "holds no .jsonl"),
        ("{nomatch}", "no .jsonl, .jsonl.gz or .parquet file matches"),
    ],
)
def test_bad_specs_name_the_entry(files, tmp_path, monkeypatch, spec, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # so `data/no-such-dataset` reads as a local path
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "t.txt").write_text("x")
    (tmp_path / "emptydir").mkdir()
    spec = spec.format(
        a=files["a"],
        b=files["b"],
        missing=tmp_path / "missing.jsonl",
        empty=tmp_path / "empty.jsonl",
        txt=tmp_path / "t.txt",
        emptydir=tmp_path / "emptydir",
        nomatch=tmp_path / "*.parquet",
    )
    with pytest.raises(UserError, match="--task-name") as err:
        parse_task_spec(spec)
    assert needle in str(err.value)
