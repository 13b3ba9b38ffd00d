"""Argument parsing and `main` bodies shared by the converters and `pretrained/<Model>/prepare.py`,
so each script is a few lines.

`tools/convert_to_hf.py` and `tools/convert_from_hf.py` pass no architecture: it is read from the
input (the layer-sharded folder's manifest, a LoRA checkpoint's base, the HF config's model_type)
and looked up in the registry, so a new architecture needs no script. The upstream-named
`tools/convert_{to,from}_hf_<arch>.py` pass theirs, and the input is checked to match it.

Nothing heavy is imported at module level: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openchatkit.errors import UserError

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def from_hf_parser(arch: str | None, doc: str | None = None) -> argparse.ArgumentParser:
    """Flags of `tools/convert_from_hf[_<arch>].py` (`arch` None: any registered one)."""
    what = f"an HF {arch}" if arch else "an HF"
    p = argparse.ArgumentParser(
        description=doc or f"Convert {what} model into the layer-sharded format.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-name", required=True, help="hub id (org/name) or local HF folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--save-dir", help="write DIR/<org>_<name> (a local path uses its folder name)"
    )
    where.add_argument("--save-path", help="write exactly this folder")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="cast weights (default: keep the source's)"
    )
    p.add_argument(
        "--chat-format",
        choices=("openchatkit",),
        help="record that the model was "
        "fine-tuned on <human>/<bot> turns (convert_to_hf then sets that chat template)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def run_from_hf(args: argparse.Namespace, arch: str | None) -> int:
    """Convert --model-name to a layer-sharded folder; `arch` None: read from its config."""
    _check_paths_early(
        None, args.save_path or args.save_dir, "--save-path" if args.save_path else "--save-dir"
    )
    from openchatkit.models.pretrained import output_name, resolve_hf_source

    out = (
        Path(args.save_path)
        if args.save_path
        else Path(args.save_dir) / output_name(args.model_name)
    )
    from openchatkit.fileio import check_output_folder

    check_output_folder(out, args.overwrite)  # before a long download
    source = resolve_hf_source(args.model_name)  # before torch is imported
    if arch is None:
        arch = _hf_architecture(args.model_name, source)
    from openchatkit.models.convert import convert_hf_to_sharded

    convert_hf_to_sharded(
        source,
        out,
        arch,
        dtype=args.dtype,
        overwrite=args.overwrite,
        chat_format=args.chat_format,
        source_name=args.model_name,
    )
    print(out)
    return 0


def _hf_architecture(model_name: str, source: Path) -> str:
    """Our architecture name for an HF folder, from its config's model_type (plain JSON)."""
    from openchatkit.models.registry import (
        name_for_model_type,
        read_model_type,
        supported_model_types,
    )

    model_type = read_model_type(source)
    name = name_for_model_type(model_type)
    if name is None:
        raise UserError(
            f"--model-name {model_name} is a {model_type!r} model; the converter knows "
            f"{', '.join(supported_model_types())}"
        )
    return name


def to_hf_parser(arch: str | None, doc: str | None = None) -> argparse.ArgumentParser:
    """Flags of `tools/convert_to_hf[_<arch>].py` (`arch` None: any registered one)."""
    what = f"a layer-sharded {arch}" if arch else "a layer-sharded"
    p = argparse.ArgumentParser(
        description=doc or f"Convert {what} model or trainer checkpoint to HF.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt-path",
        required=True,
        help="layer-sharded folder, trainer checkpoint_<step>/, "
        "or a checkpoint folder holding `latest`",
    )
    p.add_argument("--save-path", required=True, help="output HF folder")
    p.add_argument("--n-stages", type=int, help="pipeline stages P (inferred; checked when given)")
    p.add_argument(
        "--n-layer-per-stage",
        type=int,
        help="layers per stage L (inferred; checked: P x L = layers)",
    )
    p.add_argument(
        "--config-name",
        help="HF config (hub id or folder) when CKPT has no config.json, or to override it",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="output dtype (default: the checkpoint's)"
    )
    group.add_argument("--fp16", action="store_true", help="same as --dtype float16")
    p.add_argument(
        "--chat-format",
        choices=("openchatkit",),
        help="set the <human>/<bot> chat template "
        "even if the checkpoint does not record that format",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="CKPT is a LoRA checkpoint: write its base model with the adapters merged in",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def _check_paths_early(ckpt: str | None, out: str, out_flag: str) -> None:
    """Cheap checks before torch is imported, so a typo costs a fraction of a second."""
    from openchatkit.errors import UserError
    from openchatkit.fileio import check_writable_dir

    if ckpt is not None and not Path(ckpt).is_dir():
        what = "is a file, not a folder" if Path(ckpt).exists() else "does not exist"
        raise UserError(f"--ckpt-path {ckpt} {what}")
    check_writable_dir(out, out_flag)


def _sharded_architecture(ckpt: str, manifest_architecture: str) -> str:
    """Our architecture name for a layer-sharded folder, from its manifest (or, without one,
    from its config's model_type), refused unless the registry knows it."""
    from openchatkit.models.registry import ARCHITECTURES, architecture_names

    if manifest_architecture not in ARCHITECTURES:
        what = repr(manifest_architecture)
        if manifest_architecture == "?":  # no manifest, and config.json's model_type unknown
            what = "(config.json's model_type)"
        raise UserError(
            f"--ckpt-path {ckpt}: unsupported architecture {what}; the converter knows "
            f"{', '.join(architecture_names())}"
        )
    return manifest_architecture


def run_to_hf(args: argparse.Namespace, arch: str | None) -> int:
    """Convert --ckpt-path to an HF folder; `arch` None: read from the checkpoint."""
    _check_paths_early(args.ckpt_path, args.save_path, "--save-path")
    from openchatkit.models.convert import (
        check_output_dir,
        check_stage_layout,
        convert_sharded_to_hf,
        read_sharded_source,
        resolve_checkpoint,
        trained_stage_sizes,
    )
    from openchatkit.models.lora.checkpoint import read_adapter_meta

    is_lora = read_adapter_meta(resolve_checkpoint(args.ckpt_path)) is not None
    if is_lora and not args.merge_lora:
        raise UserError(
            f"--ckpt-path {args.ckpt_path} is a LoRA checkpoint (adapters only): add --merge-lora "
            "for a full HF model, or export the adapter with tools/export_lora.py"
        )
    if args.merge_lora and not is_lora:
        raise UserError(f"--merge-lora: --ckpt-path {args.ckpt_path} is not a LoRA checkpoint")
    if is_lora:
        from openchatkit.models.lora.merge import merge_checkpoint_to_hf

        check_output_dir(Path(args.save_path), args.overwrite)
        out, said = merge_checkpoint_to_hf(
            args.ckpt_path, args.save_path, arch, args.config_name, args.chat_format
        )
        print(said, file=sys.stderr)
        print(out)
        return 0
    # Output first, as convert_sharded_to_hf checks it (the same error wins either way).
    check_output_dir(Path(args.save_path), args.overwrite)
    folder, manifest = read_sharded_source(args.ckpt_path, args.config_name)
    if arch is None:
        arch = _sharded_architecture(args.ckpt_path, manifest.architecture)
    out = convert_sharded_to_hf(
        args.ckpt_path,
        args.save_path,
        arch,
        num_stages=args.n_stages,
        layers_per_stage=args.n_layer_per_stage,
        config_name=args.config_name,
        dtype="float16" if args.fp16 else args.dtype,
        overwrite=args.overwrite,
        chat_format=args.chat_format,
    )
    stages, per_stage = check_stage_layout(
        manifest.num_layers, args.n_stages, args.n_layer_per_stage
    )
    layout = f"{stages} stages x {per_stage} layers"
    trained = trained_stage_sizes(folder)
    if args.n_stages is None and args.n_layer_per_stage is None and trained:
        # A trainer checkpoint: say how it was trained, not the trivial inferred split.
        layout = f"trained as {len(trained)} stages: {' + '.join(map(str, trained))} layers"
    print(f"{manifest.num_layers} layers ({layout}) -> HF", file=sys.stderr)
    print(out)
    return 0


def pretrained_parser(folder: str, doc: str | None = None) -> argparse.ArgumentParser:
    from openchatkit.models.pretrained import PRETRAINED_MODELS

    spec = PRETRAINED_MODELS[folder]
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-name",
        default=spec.repo_id,
        help=f"hub id or local HF folder (default {spec.repo_id})",
    )
    p.add_argument("--save-dir", help=f"parent of the output folder (default pretrained/{folder}/)")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=spec.dtype, help=f"default {spec.dtype}"
    )
    p.add_argument("--overwrite", action="store_true", help="redo an already prepared folder")
    p.add_argument(
        "--revision",
        help="hub branch, tag or commit to download (default: the commit recorded in the output "
        "folder's openchatkit-source.json, else main's, resolved to a commit and recorded)",
    )
    return p


def run_prepare_pretrained(args: argparse.Namespace, folder: str, script_dir: Path) -> int:
    if args.save_dir is not None:
        _check_paths_early(None, args.save_dir, "--save-dir")
    from openchatkit.models.pretrained import prepare_pretrained

    out = prepare_pretrained(
        folder,
        save_dir=args.save_dir or script_dir,
        model_name=args.model_name,
        dtype=args.dtype,
        overwrite=args.overwrite,
        revision=args.revision,
    )
    print(out)
    return 0
