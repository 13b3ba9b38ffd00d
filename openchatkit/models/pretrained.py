"""Base models for fine-tuning: download from the HF hub and convert to the layer-sharded format.

One function, `prepare_pretrained`, behind every `pretrained/<Model>/prepare.py`; the
`tools/convert_from_hf_*.py` scripts use `resolve_hf_source` + `convert_hf_to_sharded` the same way.
Downloads go through `huggingface_hub.snapshot_download` (resumes partial files, shows progress,
reuses the HF cache); only configs, tokenizer files and one weight format are fetched.

Pinned (security review finding 17): a hub id's revision (default `main`) is resolved to one
commit, which is what gets downloaded; each file the hub keeps in LFS (the weights) is checked
against the hub's sha256 for that commit, and `prepare_pretrained` records
`{repo, commit, files: {name: sha256}}` of the snapshot in `<out>/openchatkit-source.json`. A
later `--overwrite` run downloads the recorded commit again unless another revision is asked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from openchatkit.errors import UserError
from openchatkit.paths import REPO_ROOT

_COMMIT = re.compile(r"[0-9a-f]{40}")
EMBEDDED = "embedded"  # repo id standing for the bundled SmolLM2 (converted from GGUF offline)
_META_PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class PretrainedModel:
    """One base model offered under `pretrained/<folder>/`."""

    folder: str  # pretrained/<folder>/
    repo_id: str
    architecture: str
    dtype: str  # default --dtype


PRETRAINED_MODELS = {
    m.folder: m
    for m in (
        PretrainedModel("GPT-NeoX-20B", "EleutherAI/gpt-neox-20b", "gptneox", "float16"),
        PretrainedModel(
            "Pythia-6.9B-deduped", "EleutherAI/pythia-6.9b-deduped", "gptneox", "float16"
        ),
        PretrainedModel(
            "RedPajama-3B", "togethercomputer/RedPajama-INCITE-Base-3B-v1", "gptneox", "float16"
        ),
        PretrainedModel(
            "RedPajama-7B", "togethercomputer/RedPajama-INCITE-7B-Base", "gptneox", "float16"
        ),
        PretrainedModel(
            "Llama-2-7B-32K-beta", "togethercomputer/LLaMA-2-7B-32K", "llama", "float16"
        ),
        PretrainedModel("GPT-J-6B", "EleutherAI/gpt-j-6b", "gptj", "float16"),
        # Trained in bf16, whose range fp16 lacks.
        PretrainedModel("Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "bfloat16"),
        # Small enough for a CPU: kept in float32, exactly as the embedded conversion yields it.
        PretrainedModel("SmolLM2-135M-Instruct", EMBEDDED, "llama", "float32"),
    )
}


def output_name(model_name: str) -> str:
    """`org/name` -> `org_name`; a local path -> its folder name; the embedded model ->
    `HuggingFaceTB_SmolLM2-135M-Instruct`."""
    if model_name == EMBEDDED:
        return "HuggingFaceTB_SmolLM2-135M-Instruct"
    path = Path(model_name)
    if path.exists():
        return path.resolve().name
    return model_name.strip("/").replace("/", "_")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def model_commit(repo_id: str, revision: str | None = None) -> tuple[str, dict[str, str]]:
    """The commit `revision` (default main) names now and the hub's sha256 of each of its LFS
    files (path -> sha256) (network)."""
    from huggingface_hub import HfApi

    from openchatkit.hub import PROBE_TIMEOUT_S

    info = HfApi().model_info(
        repo_id, revision=revision, files_metadata=True, timeout=PROBE_TIMEOUT_S
    )
    hashes = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
    return info.sha, hashes


def _resolve_commit(repo_id: str, revision: str | None) -> tuple[str | None, dict[str, str]]:
    """(commit, hub sha256s) for a download; (None or the given commit, {}) when the hub cannot
    be asked but the model is cached (it then loads as before, with its hashes recorded)."""
    from openchatkit.hub import hub_error_message, hub_offline, is_cached, is_network_error

    cached = is_cached(repo_id)
    if hub_offline():
        if not cached:
            raise UserError(
                f"--model-name: '{repo_id}' is not cached and HF_HUB_OFFLINE is set; "
                "download it while online or give a local folder"
            )
        return (revision if revision and _COMMIT.fullmatch(revision) else None), {}
    try:
        return model_commit(repo_id, revision)
    except Exception as err:  # gated, missing, connection refused, DNS, timeout, HTTP 5xx
        if cached and is_network_error(err):
            logger.warning("cannot reach the hub to pin {}; using the cached copy", repo_id)
            return (revision if revision and _COMMIT.fullmatch(revision) else None), {}
        raise UserError(f"--model-name: {hub_error_message(err, repo_id)}") from err


def pinned_download(repo_id: str, revision: str | None = None) -> tuple[Path, dict]:
    """Download one commit of `repo_id` (see `download_hf_model`), check its LFS files against
    the hub's sha256, and return (folder, record) with record = {repo, commit, files: {name:
    sha256}} for `openchatkit.hub.write_source_record`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from openchatkit.hub import check_hub_sha256, hub_error_message

    commit, hashes = _resolve_commit(repo_id, revision)
    want = commit or revision

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=want, allow_patterns=patterns))
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise UserError(f"--model-name: {hub_error_message(err, repo_id)}") from None
        except LocalEntryNotFoundError:
            raise UserError(
                f"cannot download {repo_id}: offline (HF_HUB_OFFLINE set or no network) and it is "
                "not in the HF cache; connect and rerun (partial downloads resume)"
            ) from None
        except OSError as err:  # connection errors, disk full
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot download {repo_id}: {first}") from None

    folder = fetch(_META_PATTERNS + ["*.safetensors"])
    if not _has_weights(folder):  # older repos (GPT-J-6B, RedPajama-INCITE) ship .bin only
        folder = fetch(_META_PATTERNS + ["pytorch_model*.bin"])
    if not _has_weights(folder):
        raise UserError(f"{repo_id} has no safetensors or pytorch_model*.bin weights")
    # The HF cache names a snapshot folder after its commit.
    commit = commit or folder.name
    where = f"{repo_id}@{commit[:12]}"
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        files[name] = check_hub_sha256(path, name, hashes.get(name), where)
    return folder, {"repo": repo_id, "commit": commit, "files": files}


def download_hf_model(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) one commit of a model's config, tokenizer and weights;
    safetensors when the repo has them, else the `.bin` shards. Offline or unreachable ->
    one-line UserError; a file that differs from the hub's sha256 -> UserError (and deleted)."""
    return pinned_download(repo_id, revision)[0]


def resolve_hf_source(model_name: str, revision: str | None = None) -> Path:
    """A local HF folder for `model_name`: an existing path, the embedded model, or a hub id
    (downloaded at `revision`, pinned to a commit)."""
    if model_name == EMBEDDED or model_name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from openchatkit.models.embedded import ensure_embedded_model

        return ensure_embedded_model()
    path = Path(model_name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model-name {path} has no config.json (not an HF model folder)")
        return path
    if model_name.count("/") != 1 or model_name.startswith(("/", ".")):
        raise UserError(f"--model-name {model_name}: no such folder, and not an org/name hub id")
    return download_hf_model(model_name, revision)


def _is_hub_id(model_name: str) -> bool:
    return (
        model_name != EMBEDDED
        and not Path(model_name).expanduser().exists()
        and model_name.count("/") == 1
        and not model_name.startswith(("/", "."))
    )


def prepare_pretrained(
    folder: str,
    save_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
) -> Path:
    """Download `PRETRAINED_MODELS[folder]` (or `model_name`) and write its layer-sharded form to
    `<save_dir>/<org>_<name>/` (default `pretrained/<folder>/`). An already complete output is
    kept unless `overwrite`. A hub id is downloaded at `revision`, else at the commit an earlier
    run recorded in the output, else at main's commit; the commit and file hashes are recorded
    in `<out>/openchatkit-source.json`. Returns the output folder."""
    spec = PRETRAINED_MODELS[folder]
    name = model_name or spec.repo_id
    base = Path(save_dir) if save_dir is not None else REPO_ROOT / "pretrained" / folder
    out = base / output_name(name)
    if (out / "manifest.json").is_file() and not overwrite:  # written last: complete
        logger.info("{} is already prepared (pass --overwrite to redo it)", out)
        return out
    from openchatkit.fileio import check_writable_dir

    check_writable_dir(out, "--save-dir")  # before a download of many GB
    from openchatkit.hub import read_source_record, write_source_record

    record = None
    if _is_hub_id(name):  # before torch is imported
        earlier = read_source_record(out) if out.is_dir() else None
        if revision is None and earlier is not None and earlier.get("repo") == name:
            revision = earlier.get("commit")  # keep the commit an earlier run pinned
        source, record = pinned_download(name, revision)
    else:
        source = resolve_hf_source(name)
    from openchatkit.models.convert import convert_hf_to_sharded

    logger.info("converting {} to the layer-sharded format in {}", source, out)
    result = convert_hf_to_sharded(
        source,
        out,
        spec.architecture,
        dtype=dtype or spec.dtype,
        overwrite=overwrite,
        source_name=name if name != EMBEDDED else output_name(name).replace("_", "/", 1),
    )
    if record is not None:
        write_source_record(result, record["repo"], record["commit"], record["files"])
    return result
