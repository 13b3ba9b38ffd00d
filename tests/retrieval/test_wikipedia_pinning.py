"""The Wikipedia index download is pinned (security review findings 12 and 17): the first run
resolves the revision to a commit, checks knn.index and the parquet against the hub's sha256 for
that commit, and records both; later runs keep the commit; loading refuses files that changed.
The hub is a local fake (never the network)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import types
from pathlib import Path

import pytest

from openchatkit.errors import UserError
from openchatkit.retrieval import wikipedia

PREPARE = (
    Path(__file__).resolve().parents[2]
    / "data/wikipedia-3sentence-level-retrieval-index/prepare.py"
)
FILES = {"knn.index": b"index bytes" * 100, "wikipedia-en-sentences.parquet": b"rows" * 50}
COMMITS = {None: "a" * 40, "main": "a" * 40, "b" * 40: "b" * 40, "a" * 40: "a" * 40}


class FakeApi:
    calls: list = []
    served = dict(FILES)  # what snapshot_download writes (may differ from the hub's record)

    def dataset_info(self, repo, revision=None):
        FakeApi.calls.append(("dataset_info", revision))
        return types.SimpleNamespace(sha=COMMITS[revision])

    def get_paths_info(self, repo, paths, revision=None, repo_type=None):
        return [
            types.SimpleNamespace(
                path=p, lfs=types.SimpleNamespace(sha256=hashlib.sha256(FILES[p]).hexdigest())
            )
            for p in paths
        ]

    def model_info(self, repo):
        return types.SimpleNamespace(sha="e" * 40)


def fake_snapshot_download(repo, repo_type=None, revision=None, local_dir=None, **_):
    FakeApi.calls.append(("snapshot", revision))
    folder = Path(local_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in FakeApi.served.items():
        (folder / name).write_bytes(data)
    return str(folder)


@pytest.fixture
def prepare(monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    FakeApi.calls = []
    FakeApi.served = dict(FILES)
    spec = importlib.util.spec_from_file_location("wiki_prepare", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_download_is_pinned_to_a_commit_and_hashes(tmp_path, prepare):
    out = tmp_path / "files"
    assert prepare(["--output", str(out), "--skip-embedder"]) == 0
    record = json.loads((out / wikipedia.SOURCE_FILE).read_text())
    assert record["revision"] == "a" * 40
    for name, data in FILES.items():
        assert record["files"][name] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    assert ("snapshot", "a" * 40) in FakeApi.calls  # the commit, not a moving branch
    # A later run keeps the recorded commit instead of following main.
    FakeApi.calls = []
    assert prepare(["--output", str(out), "--skip-embedder"]) == 0
    assert FakeApi.calls[0] == ("dataset_info", "a" * 40)
    wikipedia.check_source(out)  # intact


def test_a_file_that_differs_from_the_hubs_hash_is_refused(tmp_path, prepare):
    FakeApi.served = {**FILES, "knn.index": b"tampered!!!" * 100}  # same size, other bytes
    with pytest.raises(UserError, match="differs from the hub's"):
        prepare(["--output", str(tmp_path / "files"), "--skip-embedder"])
    assert not (tmp_path / "files" / wikipedia.SOURCE_FILE).exists()


def test_loading_refuses_files_changed_since_the_download(tmp_path, prepare):
    out = tmp_path / "files"
    assert prepare(["--output", str(out), "--skip-embedder"]) == 0
    (out / "knn.index").write_bytes(b"x")
    with pytest.raises(UserError, match="changed since prepare.py checked it"):
        wikipedia.load(out)
