"""Atomic writes: what they produce honours the umask, they refuse targets that are not regular
files, they fail in one line on an unwritable place, and they clean what a killed writer left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from openchatkit.fileio import (
    OutputError,
    atomic_dir,
    atomic_file,
    check_writable_dir,
    remove_stale_temps,
    temp_prefix,
    write_json,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    write_json(tmp_path / "meta.json", {"a": 1})
    assert mode(tmp_path / "meta.json") == 0o644
    with atomic_dir(tmp_path / "model") as tmp:
        import tempfile

        fd, inner = tempfile.mkstemp(dir=tmp)  # 0600, as safetensors writers make them
        os.close(fd)
        (tmp / "sub").mkdir()
    assert mode(tmp_path / "model") == 0o755
    assert mode(tmp_path / "model" / os.path.basename(inner)) == 0o644
    os.umask(0o077)
    write_json(tmp_path / "private.json", {})
    assert mode(tmp_path / "private.json") == 0o600


@pytest.mark.parametrize("kind", ["device", "symlink", "folder"])
def test_atomic_file_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    real = tmp_path / "real"
    real.write_text("keep")
    target = {"device": "/dev/null", "symlink": tmp_path / "link", "folder": tmp_path}[kind]
    if kind == "symlink":
        target.symlink_to(real)
    with pytest.raises(OutputError, match="cannot write"), atomic_file(target) as f:
        f.write("x")
    assert real.read_text() == "keep"
    assert not stat.S_ISREG(os.lstat(target).st_mode)


def test_missing_parent_and_file_in_the_way_are_one_line_errors(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        with atomic_file(tmp_path / "no" / "x.json", create_parent=False):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        with atomic_dir(tmp_path / "file" / "out"):
            pass
    with pytest.raises(OutputError, match="--out .* not a folder"):
        check_writable_dir(tmp_path / "file" / "deeper", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "model"
    # A writer that died: its pid is no longer running.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / temp_prefix(dest).replace(str(os.getpid()), dead)
    stale = stale.with_name(stale.name + "abc")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    # A writer still running (this process) keeps its own.
    live = tmp_path / (temp_prefix(dest) + "xyz")
    live.mkdir()
    assert remove_stale_temps(dest) == [stale]
    assert not stale.exists() and live.exists()
    with atomic_dir(dest) as tmp:
        (tmp / "x").write_text("1")
    assert (dest / "x").read_text() == "1"
