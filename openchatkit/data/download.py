"""Hub downloads for the `data/*/prepare.py` scripts: list a dataset repo's files, download the
ones matching a glob (resumable, with a progress bar), decompress `.gz`, and put each file under
its final name only when it is whole.

Layout under `dest`: the final files (`unified_chip2.jsonl`, ...) and `.download/`, where
`huggingface_hub` keeps partial downloads (`*.incomplete`) so an interrupted run resumes. A final
file that exists is complete (it appeared by rename), so a rerun skips it without asking the hub.
An offline or unreachable hub fails within `HUB_TIMEOUT_S` with one line, and a gated repo says
that its terms must be accepted and a token set.

Pinned: the revision (default `main`, or the commit an earlier run recorded; `--revision`
overrides) is resolved to one commit, which every file is downloaded from. A file the hub keeps
in LFS is checked against the hub's sha256 before it is placed (a mismatch is deleted and
refused). `openchatkit-source.json` in `dest` records `{repo, commit, files: {name: sha256}}`
of the final files; a rerun skips a recorded file only when its sha256 still matches, refuses a
changed one, and re-downloads a file recorded for another commit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import logging
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from loguru import logger

from openchatkit.checkpoints import file_sha256
from openchatkit.errors import UserError
from openchatkit.fileio import OutputError, atomic_file
from openchatkit.hub import (
    SOURCE_FILE,
    check_hub_sha256,
    is_network_error,
    read_source_record,
    write_source_record,
)
from openchatkit.hub import hub_error_message as _hub_error_message
from openchatkit.hub import hub_offline as hub_is_offline

# The hub's HTTP client waits forever by default; a metadata call gets this long.
HUB_TIMEOUT_S = 30.0
DOWNLOAD_SUBDIR = ".download"
_COPY_BLOCK = 16 << 20  # bytes per read while decompressing

T = TypeVar("T")


def hub_error_message(err: BaseException, repo_id: str | None = None) -> str:
    """One line saying what went wrong with hub dataset `repo_id` and what to do about it."""
    return _hub_error_message(err, repo_id, repo_type="dataset")


def _is_hub_failure(err: BaseException) -> bool:
    from huggingface_hub import errors

    return isinstance(
        err, (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, OSError)
    ) or is_network_error(err)


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Run `fn` in a daemon thread; UserError if it has not answered after `seconds`.

    The hub client has no timeout of its own, so a black-holed connection would hang forever.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise UserError(
            f"cannot reach the Hugging Face hub: no answer within {seconds:.0f} s while {what}; "
            "check the network (or set HF_HUB_OFFLINE=1 to work offline)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def list_dataset_files(repo_id: str, revision: str | None = None) -> list[str]:
    """All file paths of a hub dataset repo (network)."""
    from huggingface_hub import HfApi

    return sorted(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision))


def dataset_commit(repo_id: str, revision: str | None = None) -> tuple[str, dict[str, str]]:
    """The commit `revision` (default main) names now, and the hub's sha256 of each of its LFS
    files (path -> sha256; the hub keeps no sha256 for small non-LFS files) (network)."""
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(repo_id, revision=revision, files_metadata=True)
    hashes = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
    return info.sha, hashes


def probe_hub(repo_id: str, timeout_s: float = 10.0) -> None:
    """One request to the hub without retries; raises the client's error when unreachable.

    The answer's status does not matter here (a gated repo answers too); listing reports it.
    """
    from huggingface_hub import constants, get_session

    get_session().get(f"{constants.ENDPOINT}/api/datasets/{repo_id}", timeout=timeout_s)


def final_name(repo_path: str) -> str:
    """Where a repo file lands under `dest`: its path with any `.gz` dropped."""
    return repo_path[: -len(".gz")] if repo_path.endswith(".gz") else repo_path


def decompress_gz(src: Path, dest: Path) -> None:
    """Decompress `src` into `dest` atomically, with a progress bar over compressed bytes."""
    from tqdm.auto import tqdm

    total = src.stat().st_size
    with (
        open(src, "rb") as raw,
        gzip.GzipFile(fileobj=raw) as gz,
        atomic_file(dest, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"decompress {src.name}") as bar,
    ):
        done = 0
        while block := gz.read(_COPY_BLOCK):
            out.write(block)
            bar.update(raw.tell() - done)
            done = raw.tell()


def place_gz(local: Path, target: Path, name: str) -> None:
    """Decompress the download `local` of repo file `name` into `target`. Only a corrupt .gz
    is deleted (so the next run fetches it again); when the disk is full or cannot be written
    or read, the download is kept and the message says why."""
    try:
        decompress_gz(local, target)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        local.unlink(missing_ok=True)
        raise UserError(
            f"{name} is not a valid .gz file ({err}); run again to re-download"
        ) from None
    except OutputError as err:  # writing `target` failed: a full disk, a quota, a read-only dir
        raise UserError(
            f"decompressing {name}: {err}; the download is kept in {local}: free some space "
            "(or fix the folder) and run again"
        ) from None
    except OSError as err:
        raise UserError(
            f"decompressing {name}: {err.strerror or err}; the download is kept in {local}"
        ) from None


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Hide huggingface_hub's per-retry warnings, so a failure reads as our one line."""
    # Importing these (re)sets the library's log level, so import them before changing it.
    import huggingface_hub.file_download  # noqa: F401
    import huggingface_hub.hf_api  # noqa: F401

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "huggingface_hub.utils._http")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def download_dataset(
    repo_id: str,
    dest: str | os.PathLike,
    pattern: str = "*",
    revision: str | None = None,
    keep_compressed: bool = False,
    timeout_s: float = HUB_TIMEOUT_S,
) -> list[Path]:
    """Download the files of hub dataset `repo_id` matching `pattern` into `dest`.

    `.gz` files are decompressed (the compressed copy is deleted unless `keep_compressed`).
    Files already complete under `dest` are skipped. Returns the final paths, in repo order.
    Every hub failure becomes a one-line UserError.
    """
    with quiet_hub_logs():
        return _download_dataset(repo_id, Path(dest), pattern, revision, keep_compressed, timeout_s)


def _download_dataset(
    repo_id: str,
    dest: Path,
    pattern: str,
    revision: str | None,
    keep_compressed: bool,
    timeout_s: float,
) -> list[Path]:
    import huggingface_hub

    if hub_is_offline():
        raise UserError(
            f"cannot download dataset {repo_id}: HF_HUB_OFFLINE=1 is set; unset it to download"
        )
    record = read_source_record(dest) if dest.is_dir() else None
    if record is not None and record.get("repo") != repo_id:
        raise UserError(
            f"{dest} holds a download of {record.get('repo')}, not {repo_id}; use another --dest"
        )
    # One commit, resolved once: a later run never moves to a newer upstream silently.
    wanted = revision or (record or {}).get("commit")
    try:
        # One plain request first: the hub client retries a refused connection for ~25 s.
        call_with_deadline(lambda: probe_hub(repo_id), timeout_s, "contacting the hub")
        commit, hashes = call_with_deadline(
            lambda: dataset_commit(repo_id, wanted), timeout_s, f"resolving dataset {repo_id}"
        )
        names = call_with_deadline(
            lambda: list_dataset_files(repo_id, commit),
            timeout_s,
            f"listing dataset {repo_id}",
        )
    except UserError:
        raise
    except Exception as err:
        if not _is_hub_failure(err):
            raise
        raise UserError(
            f"cannot list dataset {repo_id}: {hub_error_message(err, repo_id)}"
        ) from None
    # Files recorded for another commit are downloaded again (and their record replaced).
    same = record is not None and record.get("commit") == commit
    files: dict[str, str] = dict(record["files"]) if same else {}
    where = f"{repo_id}@{commit[:12]}"
    # The glob matches the file name or its path in the repo (`unified_chip2*`, `data/*.gz`).
    chosen = [
        n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(Path(n).name, pattern)
    ]
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(f"--files {pattern!r} matches no file of dataset {repo_id} ({shown})")
    done: list[Path] = []
    download_dir = dest / DOWNLOAD_SUBDIR
    for name in chosen:
        target = dest / final_name(name)
        if target.is_file() and final_name(name) in files:
            if file_sha256(target) != files[final_name(name)]:
                raise UserError(
                    f"{target} has changed since it was downloaded from {where} (sha256 differs "
                    f"from {dest / SOURCE_FILE}); delete it and run again"
                )
            logger.info(f"{target} is already complete; skipping")
            done.append(target)
            continue
        try:
            # Resumes a partial `.incomplete` file under download_dir/.cache and shows progress.
            local = Path(
                huggingface_hub.hf_hub_download(
                    repo_id,
                    name,
                    repo_type="dataset",
                    revision=commit,
                    local_dir=download_dir,
                )
            )
        except Exception as err:
            if not _is_hub_failure(err):
                raise
            raise UserError(f"cannot download {name}: {hub_error_message(err, repo_id)}") from None
        digest = check_hub_sha256(local, name, hashes.get(name), where)
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            place_gz(local, target, name)
            if not keep_compressed:
                local.unlink(missing_ok=True)
        else:
            os.replace(local, target)  # same filesystem: an atomic rename
        files[final_name(name)] = file_sha256(target) if name.endswith(".gz") else digest
        write_source_record(dest, repo_id, commit, files)  # after each file: a rerun resumes
        logger.info(f"wrote {target}")
        done.append(target)
    if not keep_compressed:
        # Every chosen file is in place, so what is left there is only hub metadata.
        shutil.rmtree(download_dir, ignore_errors=True)
    return done
