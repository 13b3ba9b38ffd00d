"""Hostile data files (security review findings 8 and 10): a line nested 100,000 deep or a line
far longer than the cap is skipped and counted (fatal with --strict-data) by the training
readers, and refused in one line by the evaluation, corpus and metrics readers, never a
traceback; a full disk while decompressing a download keeps the download and says so."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from openchatkit.data import download as hub
from openchatkit.data.sources import FileSource
from openchatkit.data.tasks import TaskEntry
from openchatkit.errors import UserError

NESTED = "[" * 100_000  # json.loads raises RecursionError on it
GOOD = [{"text": f"<human>: q{i}\n<bot>: a{i}"} for i in range(3)]
REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path, middle: str, gz: bool = False) -> Path:
    body = "\n".join([json.dumps(GOOD[0]), middle, json.dumps(GOOD[1]), json.dumps(GOOD[2])])
    data = (body + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _read_all(path: Path, strict: bool = False) -> tuple[list[str], int]:
    src = FileSource(TaskEntry(name=str(path), weight=1.0, files=(path,)), strict, cycle=False)
    texts = []
    while (doc := src.next_document()) is not None:
        texts.append(doc.text)
    return texts, sum(src.malformed.values())


@pytest.mark.parametrize("gz", [False, True])
def test_a_deeply_nested_line_is_skipped_or_fatal_with_strict_data(tmp_path, gz):
    path = _lines(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), NESTED, gz)
    texts, malformed = _read_all(path)
    assert texts == [g["text"] for g in GOOD] and malformed == 1
    with pytest.raises(UserError, match=r"d\.jsonl(\.gz)?:2: not valid JSON.*--strict-data"):
        _read_all(path, strict=True)


@pytest.mark.parametrize("gz", [False, True])
def test_an_over_long_line_is_skipped_without_reading_it_whole(tmp_path, monkeypatch, gz):
    """The cap (OPENCHATKIT_MAX_LINE_BYTES, 64 MiB by default) set to 4 kB here: a 3 MB line
    stands for a multi-GB one; the lines after it are read where they are."""
    monkeypatch.setenv("OPENCHATKIT_MAX_LINE_BYTES", "4096")
    long = json.dumps({"text": "x" * 3_000_000})
    path = _lines(tmp_path / ("l.jsonl.gz" if gz else "l.jsonl"), long, gz)
    texts, malformed = _read_all(path)
    assert texts == [g["text"] for g in GOOD] and malformed == 1
    with pytest.raises(UserError, match=r":2: line longer than 4096 bytes"):
        _read_all(path, strict=True)
    # A file that is one huge line without a newline: nothing usable, one line of error.
    (tmp_path / "one.jsonl").write_bytes(b"x" * 3_000_000)
    with pytest.raises(UserError, match="no usable documents"):
        _read_all(tmp_path / "one.jsonl")


def test_the_resume_position_after_an_over_long_line_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENCHATKIT_MAX_LINE_BYTES", "4096")
    path = _lines(tmp_path / "r.jsonl", json.dumps({"text": "y" * 50_000}))
    entry = TaskEntry(name=str(path), weight=1.0, files=(path,))
    first = FileSource(entry, cycle=False)
    assert first.next_document().text == GOOD[0]["text"]
    assert first.next_document().text == GOOD[1]["text"]  # past the long line
    resumed = FileSource(entry, cycle=False)
    resumed.load_state_dict(first.state_dict())
    assert resumed.next_document().text == GOOD[2]["text"]


def test_evaluation_and_corpus_readers_refuse_a_nested_line_in_one_line(tmp_path):
    from openchatkit.evaluation.perplexity import read_records
    from openchatkit.evaluation.runner import read_chat_prompts
    from openchatkit.retrieval.corpus import file_passages

    path = _lines(tmp_path / "e.jsonl", NESTED)
    with pytest.raises(UserError, match="line 2"):
        read_records([path])
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"id": "a", "turns": ["hi"]}) + "\n" + NESTED + "\n")
    with pytest.raises(UserError, match="line 2 is not a chat prompt record"):
        read_chat_prompts(prompts)
    with pytest.raises(UserError, match=r"e\.jsonl:2: JSON nested too deep"):
        list(file_passages(path))


def test_plot_metrics_refuses_a_nested_line_in_one_line(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools/plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 1, "loss": 1.0, "lr": 1, "tokens_per_s": 1}) + "\n" + NESTED
    )
    with pytest.raises(UserError, match="metrics.jsonl:2: not a JSON line"):
        module.read_metrics(path)


# -- a full disk while decompressing (finding 8) ------------------------------------------------


def test_a_full_disk_while_decompressing_keeps_the_download(small_disk, monkeypatch):
    payload = gzip.compress(b'{"text": "<human>: a\\n<bot>: b"}\n' * 200_000)  # 7 MB unpacked
    assert len(payload) < 200_000
    monkeypatch.setattr(hub, "probe_hub", lambda repo_id, timeout_s=10.0: None)
    monkeypatch.setattr(hub, "list_dataset_files", lambda repo_id, revision=None: ["big.jsonl.gz"])
    monkeypatch.setattr(hub, "dataset_commit", lambda repo_id, revision=None: ("0" * 40, {}))

    def download(repo_id, filename, repo_type=None, revision=None, local_dir=None):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(UserError) as err:
        hub.download_dataset("laion/OIG", small_disk, "big*")
    message = str(err.value)
    assert "No space left on device" in message and "kept" in message, message
    assert "not a valid .gz" not in message
    assert (small_disk / hub.DOWNLOAD_SUBDIR / "big.jsonl.gz").read_bytes() == payload
    assert not (small_disk / "big.jsonl").exists()
    assert [p.name for p in small_disk.rglob("*") if ".tmp-" in p.name] == []
