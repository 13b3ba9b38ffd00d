"""Pinned model downloads (security review finding 17) for pretrained/*/prepare.py, against a
fake hub (never the network): the snapshot is fetched at one commit, its LFS files are checked
against the hub's sha256, `<out>/openchatkit-source.json` records the commit and file hashes, and
an --overwrite rerun keeps the recorded commit unless another revision is asked for."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from openchatkit.errors import UserError
from openchatkit.hub import SOURCE_FILE
from openchatkit.models import pretrained

COMMIT = "a1" * 20
NEWER = "b2" * 20
REPO = "org/tiny"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeModelHub:
    """`main` names `commit`; the hub's sha256 is given for *.safetensors (its LFS files)."""

    def __init__(self, monkeypatch, source: Path, cache: Path, commit=COMMIT, hashes=None):
        self.source, self.cache, self.commit = source, cache, commit
        self.hashes = (
            {p.name: sha(p) for p in source.glob("*.safetensors")} if hashes is None else hashes
        )
        self.resolved: list[str | None] = []
        self.fetched: list[str] = []
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("openchatkit.hub.is_cached", lambda *a, **k: False)
        monkeypatch.setattr(pretrained, "model_commit", self.model_commit)
        monkeypatch.setattr("huggingface_hub.snapshot_download", self.snapshot_download)

    def model_commit(self, repo_id, revision=None):
        assert repo_id == REPO
        self.resolved.append(revision)
        commit = revision if revision and len(revision) == 40 else self.commit
        return commit, dict(self.hashes)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None):
        assert revision is not None and len(revision) == 40  # always a commit, never `main`
        self.fetched.append(revision)
        folder = self.cache / "snapshots" / revision
        folder.mkdir(parents=True, exist_ok=True)
        for path in self.source.iterdir():
            if any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copyfile(path, folder / path.name)
        return str(folder)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from tests.models.conftest import save_tiny_model, save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder, "gpt_neox", num_layers=2)
    save_tiny_tokenizer(folder)
    return folder


def prepare(tmp_path, **kw):
    return pretrained.prepare_pretrained(
        "RedPajama-3B", tmp_path / "out", model_name=REPO, dtype="float32", **kw
    )


def test_first_run_records_commit_and_hashes(monkeypatch, tmp_path, tiny_source):
    hub = FakeModelHub(monkeypatch, tiny_source, tmp_path / "cache")
    out = prepare(tmp_path)
    assert hub.resolved == [None] and set(hub.fetched) == {COMMIT}
    record = json.loads((out / SOURCE_FILE).read_text())
    assert record["repo"] == REPO and record["commit"] == COMMIT
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    assert record["files"] == {p.name: sha(p) for p in snapshot.iterdir()}
    assert "model.safetensors" in record["files"] and "config.json" in record["files"]
    assert (out / "manifest.json").is_file()


def test_overwrite_keeps_the_recorded_commit(monkeypatch, tmp_path, tiny_source):
    FakeModelHub(monkeypatch, tiny_source, tmp_path / "cache")
    prepare(tmp_path)
    hub = FakeModelHub(monkeypatch, tiny_source, tmp_path / "cache", commit=NEWER)  # main moved
    out = prepare(tmp_path, overwrite=True)
    assert hub.resolved == [COMMIT] and set(hub.fetched) == {COMMIT}
    assert json.loads((out / SOURCE_FILE).read_text())["commit"] == COMMIT
    hub = FakeModelHub(monkeypatch, tiny_source, tmp_path / "cache", commit=NEWER)
    out = prepare(tmp_path, overwrite=True, revision="main")
    assert hub.resolved == ["main"] and set(hub.fetched) == {NEWER}
    assert json.loads((out / SOURCE_FILE).read_text())["commit"] == NEWER


def test_hash_mismatch_is_refused_and_deleted(monkeypatch, tmp_path, tiny_source):
    hub = FakeModelHub(
        monkeypatch, tiny_source, tmp_path / "cache", hashes={"model.safetensors": "0" * 64}
    )
    with pytest.raises(UserError) as err:
        prepare(tmp_path)
    msg = str(err.value)
    assert "model.safetensors: sha256" in msg and "differs from the hub's 0000" in msg
    assert "\n" not in msg
    assert (
        hub.fetched
        and not (tmp_path / "cache" / "snapshots" / COMMIT / "model.safetensors").exists()
    )
    assert not (tmp_path / "out" / "org_tiny").exists()
