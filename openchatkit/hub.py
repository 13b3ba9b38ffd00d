"""Talking to the Hugging Face hub: one quick reachability probe and one-line errors.

huggingface_hub retries a failed connection for ~45 s with a warning per try; a user who is
offline deserves one line within seconds. So before a download or `from_pretrained` of a hub id
that is not cached, `check_hub_repo` asks the hub once with a short timeout and turns every
failure into a `UserError` that says what to do.
"""

from __future__ import annotations

import os

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


def check_hub_repo(repo_id: str, repo_type: str = "model", what: str = "--model") -> None:
    """Raise a one-line UserError unless the hub can serve `repo_id` right now."""
    if hub_offline():
        raise UserError(
            f"{what}: '{repo_id}' is not cached and HF_HUB_OFFLINE is set; "
            "download it while online or give a local folder"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError as err:
        raise UserError(
            f"{what}: '{repo_id}' is gated: accept its terms on huggingface.co and set HF_TOKEN"
        ) from err
    except RepositoryNotFoundError as err:
        raise UserError(
            f"{what}: no {repo_type} '{repo_id}' on the hub (or it is private: set HF_TOKEN)"
        ) from err
    except Exception as err:  # connection refused, DNS failure, timeout, proxy, HTTP 5xx
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what}: cannot reach the Hugging Face hub for '{repo_id}' ({reason}); "
            "check the network or set HF_HUB_OFFLINE=1 and use local files"
        ) from err
