"""Pinned dataset downloads (security review finding 17), against the FakeHub of
test_data_hub.py: one commit per folder, recorded with the files' sha256 and kept by later runs;
a changed file or a download that differs from the hub's sha256 is refused in one line, and
nothing is left under a final name."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from openchatkit.data import download as hub
from openchatkit.errors import UserError
from tests.data.test_data_hub import COMMIT, REMOTE, FakeHub, leftovers

NEWER = "beef" + "1" * 36


def record(dest):
    return json.loads((dest / hub.SOURCE_FILE).read_text())


def test_first_run_records_commit_and_hashes(monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch)
    hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert fake.resolved == [None]  # `main`, resolved once
    assert {c[2] for c in fake.calls} == {COMMIT}
    got = record(tmp_path)
    assert got["repo"] == "laion/OIG" and got["commit"] == COMMIT
    assert got["files"] == {
        "unified_a.jsonl": hashlib.sha256(
            gzip.decompress(REMOTE["unified_a.jsonl.gz"])
        ).hexdigest(),
        "unified_b.jsonl": hashlib.sha256(REMOTE["unified_b.jsonl"]).hexdigest(),
    }


def test_recorded_commit_is_reused_and_revision_overrides(monkeypatch, tmp_path):
    FakeHub(monkeypatch)
    hub.download_dataset("laion/OIG", tmp_path, "unified_a*")
    # Upstream `main` moves on; a later run (another file of the same dataset) keeps the commit.
    fake = FakeHub(monkeypatch, commit=NEWER)
    hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert fake.resolved == [COMMIT]
    assert [(c[0], c[2]) for c in fake.calls] == [("unified_b.jsonl", COMMIT)]
    assert record(tmp_path)["commit"] == COMMIT
    assert set(record(tmp_path)["files"]) == {"unified_a.jsonl", "unified_b.jsonl"}
    # --revision names another commit: its files are fetched again and the record replaced.
    fake = FakeHub(monkeypatch, commit=NEWER)
    hub.download_dataset("laion/OIG", tmp_path, "unified_*", revision="main")
    assert fake.resolved == ["main"]
    assert [(c[0], c[2]) for c in fake.calls] == [
        ("unified_a.jsonl.gz", NEWER),
        ("unified_b.jsonl", NEWER),
    ]
    assert record(tmp_path)["commit"] == NEWER


def test_a_changed_file_is_refused(monkeypatch, tmp_path):
    FakeHub(monkeypatch)
    hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    (tmp_path / "unified_b.jsonl").write_bytes(b'{"text": "<human>: x\\n<bot>: tampered"}\n')
    fake = FakeHub(monkeypatch)
    with pytest.raises(UserError) as err:
        hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    msg = str(err.value)
    assert "unified_b.jsonl has changed since it was downloaded" in msg and "\n" not in msg
    assert fake.calls == []


def test_hash_mismatch_during_download_is_refused(monkeypatch, tmp_path):
    # The hub's record says one thing, the bytes that arrive another (a swapped LFS object).
    fake = FakeHub(monkeypatch, hashes={"unified_a.jsonl.gz": "0" * 64})
    with pytest.raises(UserError) as err:
        hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    msg = str(err.value)
    assert "unified_a.jsonl.gz: sha256" in msg and "differs from the hub's 0000" in msg
    assert "\n" not in msg
    assert [c[0] for c in fake.calls] == ["unified_a.jsonl.gz"]  # stopped at the first file
    assert not (tmp_path / "unified_a.jsonl").exists()
    assert not (tmp_path / hub.DOWNLOAD_SUBDIR / "unified_a.jsonl.gz").exists()
    assert not (tmp_path / hub.SOURCE_FILE).exists()
    assert leftovers(tmp_path) == []


def test_another_repos_folder_is_refused(monkeypatch, tmp_path):
    FakeHub(monkeypatch)
    hub.download_dataset("laion/OIG", tmp_path, "unified_b*")
    with pytest.raises(UserError, match="holds a download of laion/OIG, not other/repo"):
        hub.download_dataset("other/repo", tmp_path, "unified_b*")
