"""Talking to the Hugging Face hub: one quick reachability probe and one-line errors.

huggingface_hub retries a failed connection for ~45 s with a warning per try; a user who is
offline deserves one line within seconds. So before a download or `from_pretrained` of a hub id
that is not cached, `check_hub_repo` asks the hub once with a short timeout and turns every
failure into a `UserError` that says what to do. `hub_error_message` words those failures, for
models here and for datasets in `openchatkit.data.download`.

Pinning (security review finding 17): a download resolves its revision (default `main`) to one
commit, downloads that commit, checks each file against the hub's sha256 where the hub keeps one
(LFS files), and records `{repo, commit, files: {name: sha256}}` in `SOURCE_FILE` in the
destination; a later run keeps the recorded commit and refuses a file that no longer matches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from openchatkit.errors import UserError

PROBE_TIMEOUT_S = 10.0


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks the hub libraries not to use the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_cached(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """True when `filename` of `repo_id` is in the local HF cache (so no network is needed)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return isinstance(found, str)


def is_network_error(err: BaseException) -> bool:
    """True when `err` means the hub could not be reached (refused, DNS, timeout, proxy), as
    opposed to an answer from it."""
    from huggingface_hub import errors

    return isinstance(err, (ConnectionError, TimeoutError, errors.LocalEntryNotFoundError)) or type(
        err
    ).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests"}


def hub_error_message(
    err: BaseException, repo_id: str | None = None, repo_type: str = "model"
) -> str:
    """One line saying what went wrong with hub repo `repo_id` and what to do about it.

    `repo_type` ("model" or "dataset") words the message and names the repo's page; without
    `repo_id` the message says "the model" / "the dataset".
    """
    from huggingface_hub import errors

    name = f"{repo_type} {repo_id}" if repo_id else f"the {repo_type}"
    token = "set a token (`hf auth login` or HF_TOKEN)"
    if isinstance(err, errors.GatedRepoError):
        page = "https://huggingface.co/" + ("datasets/" if repo_type == "dataset" else "")
        where = f"at {page}{repo_id}" if repo_id else "on its page"
        return f"{name} is gated: accept its terms {where} and {token}"
    if isinstance(err, errors.RepositoryNotFoundError):
        return (
            f"{name} was not found on the hub (check the name; a private or gated {repo_type} "
            "needs a token: `hf auth login` or HF_TOKEN)"
        )
    if isinstance(err, errors.OfflineModeIsEnabled) or hub_offline():
        return "HF_HUB_OFFLINE=1 is set; unset it to download"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"the hub refused access to {name} (HTTP {status}): accept its terms on the "
            f"{repo_type} page and {token}"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(status, int) and status >= 500:
        return f"the Hugging Face hub failed to answer for {name} ({first}); try again later"
    if is_network_error(err):
        # A model that is cached loads with HF_HUB_OFFLINE=1; a dataset download cannot.
        offline = "" if repo_type == "dataset" else " or set HF_HUB_OFFLINE=1 and use local files"
        return (
            f"cannot reach the Hugging Face hub ({type(err).__name__}: {first}); "
            f"check the network{offline}"
        )
    return f"{type(err).__name__}: {first}"


def check_hub_repo(repo_id: str, repo_type: str = "model", what: str = "--model") -> None:
    """Raise a one-line UserError unless the hub can serve `repo_id` right now."""
    if hub_offline():
        raise UserError(
            f"{what}: '{repo_id}' is not cached and HF_HUB_OFFLINE is set; "
            "download it while online or give a local folder"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # gated, missing, connection refused, DNS, timeout, HTTP 5xx
        raise UserError(f"{what}: {hub_error_message(err, repo_id, repo_type)}") from err


# --- Pinned downloads: one commit per download folder, recorded with the files' sha256 ---

SOURCE_FILE = "openchatkit-source.json"


def read_source_record(folder: Path) -> dict[str, Any] | None:
    """The download record (`SOURCE_FILE`) an earlier run left in `folder`, or None."""
    from openchatkit.checkpoints import load_json

    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = load_json(path)
    except ValueError:
        raise UserError(f"{path}: unreadable; delete it and run again") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise UserError(f"{path}: not a download record; delete it and run again")
    return record


def write_source_record(folder: Path, repo: str, commit: str, files: dict[str, str]) -> None:
    """Record (atomically) that `folder` holds `files` (name -> sha256) of `repo` at `commit`."""
    from openchatkit.fileio import write_json

    write_json(Path(folder) / SOURCE_FILE, {"repo": repo, "commit": commit, "files": files})


def check_hub_sha256(path: Path, name: str, want: str | None, where: str) -> str:
    """sha256 of the downloaded `path` (repo file `name`); when the hub gave one (`want`, its LFS
    sha256) and it differs, `path` is deleted and a one-line UserError raised."""
    from openchatkit.checkpoints import file_sha256

    digest = file_sha256(path)
    if want is not None and digest != want:
        # In the HF cache `path` links to a blob: delete that too, or the next run reuses it.
        Path(os.path.realpath(path)).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise UserError(
            f"{name}: sha256 {digest[:16]}... differs from the hub's {want[:16]}... for {where}; "
            "the download was deleted, run again"
        )
    return digest
