"""Hub downloads against a local fake (never the network): decompress, skip complete files,
continue after a failure, nothing half-written under a final name; and the scripts' one-line
errors offline (HF_HUB_OFFLINE=1) or with an unreachable endpoint."""

from __future__ import annotations

import gzip
import hashlib
import socket
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import errors as hf_errors

from openchatkit.data import download as hub
from openchatkit.errors import UserError

SCRIPTS = ["data/OIG/prepare.py", "data/OIG-moderation/prepare.py", "data/OIG-chip2/prepare.py"]
REMOTE = {
    "README.md": b"# readme\n",
    "unified_a.jsonl.gz": gzip.compress(b'{"text": "<human>: a\\n<bot>: A"}\n' * 1000),
    "unified_b.jsonl": b'{"text": "<human>: b\\n<bot>: B"}\n',
    "other.jsonl.gz": gzip.compress(b'{"text": "o"}\n'),
}


COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    """Stands in for the hub: `main` names `commit`; lists REMOTE, gives the sha256 of its `.gz`
    files (as the hub does for LFS files) and 'downloads' into local_dir like hf_hub_download."""

    def __init__(self, monkeypatch, files=None, fail=None, commit=COMMIT, hashes=None):
        self.files = dict(REMOTE if files is None else files)
        self.fail = dict(fail or {})  # file name -> exception to raise once
        self.calls: list[tuple[str, Path, str]] = []
        self.commit = commit
        self.resolved: list[str | None] = []  # the revisions asked to resolve
        self.hashes = (
            {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items() if n.endswith(".gz")}
            if hashes is None
            else hashes
        )
        monkeypatch.setattr(hub, "probe_hub", lambda repo_id, timeout_s=10.0: None)
        monkeypatch.setattr(hub, "dataset_commit", self.dataset_commit)
        monkeypatch.setattr(hub, "list_dataset_files", self.list_files)
        monkeypatch.setattr("huggingface_hub.hf_hub_download", self.download)

    def dataset_commit(self, repo_id, revision=None):
        self.resolved.append(revision)
        return (revision if revision and len(revision) == 40 else self.commit), dict(self.hashes)

    def list_files(self, repo_id, revision=None):
        assert revision is not None and len(revision) == 40  # always a commit
        return sorted(self.files)

    def download(self, repo_id, filename, repo_type=None, revision=None, local_dir=None):
        assert repo_type == "dataset"
        assert revision is not None and len(revision) == 40  # always a commit, never `main`
        self.calls.append((filename, Path(local_dir), revision))
        if filename in self.fail:
            raise self.fail.pop(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)


def leftovers(dest: Path) -> list[str]:
    """Temporary names left in dest (there must be none)."""
    return [p.name for p in dest.rglob("*") if ".tmp-" in p.name]


def test_download_decompress_and_skip(monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch)
    dest = tmp_path / "files"
    paths = hub.download_dataset("laion/OIG", dest, "unified_*")
    assert paths == [dest / "unified_a.jsonl", dest / "unified_b.jsonl"]
    assert (dest / "unified_a.jsonl").read_bytes() == gzip.decompress(REMOTE["unified_a.jsonl.gz"])
    assert (dest / "unified_b.jsonl").read_bytes() == REMOTE["unified_b.jsonl"]
    assert sorted(p.name for p in dest.iterdir()) == [
        hub.SOURCE_FILE,
        "unified_a.jsonl",
        "unified_b.jsonl",
    ]
    assert [c[0] for c in fake.calls] == ["unified_a.jsonl.gz", "unified_b.jsonl"]
    # A rerun finds both complete and downloads nothing.
    assert hub.download_dataset("laion/OIG", dest, "unified_*") == paths
    assert len(fake.calls) == 2


def test_keep_gz(monkeypatch, tmp_path):
    FakeHub(monkeypatch)
    hub.download_dataset("laion/OIG", tmp_path, "unified_a*", keep_compressed=True)
    assert (tmp_path / hub.DOWNLOAD_SUBDIR / "unified_a.jsonl.gz").is_file()
    assert (tmp_path / "unified_a.jsonl").is_file()


def test_failure_midway_then_rerun_continues(monkeypatch, tmp_path):
    boom = httpx2.ConnectError("connection reset")
    fake = FakeHub(monkeypatch, fail={"unified_b.jsonl": boom})
    with pytest.raises(
        UserError, match="cannot download unified_b.jsonl: cannot reach the Hugging Face hub"
    ):
        hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert (tmp_path / "unified_a.jsonl").is_file()
    assert not (tmp_path / "unified_b.jsonl").exists()
    # The rerun skips the complete file and fetches the other into the same download folder,
    # where huggingface_hub keeps (and resumes) its partial `.incomplete` files.
    hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert [c[0] for c in fake.calls] == [
        "unified_a.jsonl.gz",
        "unified_b.jsonl",
        "unified_b.jsonl",
    ]
    assert {c[1] for c in fake.calls} == {tmp_path / hub.DOWNLOAD_SUBDIR}
    assert (tmp_path / "unified_b.jsonl").read_bytes() == REMOTE["unified_b.jsonl"]


def test_corrupt_gz_leaves_nothing_looking_complete(monkeypatch, tmp_path):
    good = gzip.compress(b"x" * 100_000)
    files = {"unified_c.jsonl.gz": good[: len(good) // 2]}  # truncated download
    FakeHub(monkeypatch, files=files)
    with pytest.raises(UserError, match="not a valid .gz file"):
        hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert not (tmp_path / "unified_c.jsonl").exists()
    assert not (
        tmp_path / hub.DOWNLOAD_SUBDIR / "unified_c.jsonl.gz"
    ).exists()  # refetched next time
    assert leftovers(tmp_path) == []


def _http_error(cls, status):
    request = httpx2.Request("GET", "https://huggingface.co/datasets/x/y/resolve/main/f")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


def test_gated_dataset_says_accept_terms_and_set_token(monkeypatch, tmp_path):
    gated = _http_error(hf_errors.GatedRepoError, 403)
    FakeHub(monkeypatch, files={"OIG_safety.jsonl": b"{}"}, fail={"OIG_safety.jsonl": gated})
    with pytest.raises(UserError) as err:
        hub.download_dataset("ontocord/OIG-moderation", tmp_path, "*.jsonl*")
    msg = str(err.value)
    assert "gated" in msg and "accept its terms" in msg and "token" in msg and "\n" not in msg
    assert not (tmp_path / "OIG_safety.jsonl").exists()


def test_missing_repo_and_unmatched_glob(monkeypatch, tmp_path):
    FakeHub(monkeypatch)
    with pytest.raises(
        UserError, match=r"--files 'nothing\*' matches no file of dataset laion/OIG"
    ):
        hub.download_dataset("laion/OIG", tmp_path, "nothing*")

    def not_found(repo_id, revision=None):
        raise _http_error(hf_errors.RepositoryNotFoundError, 404)

    monkeypatch.setattr(hub, "dataset_commit", not_found)
    with pytest.raises(UserError, match="was not found on the hub"):
        hub.download_dataset("no/such", tmp_path, "*")


def test_offline_env_fails_before_any_request(monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        hub.download_dataset("laion/OIG", tmp_path, "unified_*")
    assert fake.calls == []


def test_deadline_turns_a_hang_into_one_line(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no answer within 0 s while listing"):
        hub.call_with_deadline(lambda: time.sleep(5), 0.2, "listing")
    assert time.monotonic() - start < 2


def run_script(cli, script, *args, env_extra):
    """(proc, seconds) of a script run with none of this shell's HF_* variables."""
    env = {k: v for k, v in cli.user_env().items() if not k.startswith("HF_")} | env_extra
    start = time.monotonic()
    proc = cli.run(script, *args, env=env, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_offline_one_line_error(script, tmp_path, cli):
    proc, seconds = run_script(
        cli, script, "--dest", str(tmp_path / "out"), env_extra={"HF_HUB_OFFLINE": "1"}
    )
    cli.assert_one_line_error(proc, "HF_HUB_OFFLINE=1 is set")
    assert seconds < 60
    assert not (tmp_path / "out").exists()


def test_script_unreachable_hub_one_line_error(tmp_path, cli):
    with socket.socket() as s:  # a local port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = run_script(
        cli, "data/OIG-chip2/prepare.py", "--dest", str(tmp_path / "out"),
        env_extra={"HF_ENDPOINT": f"http://127.0.0.1:{port}"},
    )  # fmt: skip
    cli.assert_one_line_error(proc, "cannot reach the Hugging Face hub")
    assert seconds < 60
    assert not (tmp_path / "out").exists()


def test_script_help_is_fast(cli):
    proc, seconds = run_script(cli, "data/OIG/prepare.py", "--help", env_extra={})
    assert proc.returncode == 0 and "--files GLOB" in proc.stdout and "--dest" in proc.stdout
    assert seconds < 10


def test_silent_hub_fails_at_the_deadline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with socket.socket() as server:  # accepts connections (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setattr(
            huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}"
        )
        start = time.monotonic()
        with pytest.raises(UserError, match="no answer within 2 s while contacting the hub"):
            hub.download_dataset("laion/OIG", tmp_path / "out", "unified_*", timeout_s=1.5)
        assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()
