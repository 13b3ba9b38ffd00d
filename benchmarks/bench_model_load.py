"""Time loading a model four ways and print a table: the layer-sharded safetensors folder (whole
model, and one pipeline stage), HF `from_pretrained`, and pickled per-layer `.pt` files (the
format upstream OpenChatKit's trainer used). (It was tools/model_load_benchmark.py.)

The sharded and `.pt` copies are written once into --work-dir (default: a temporary folder);
every figure is the median of --repeats runs with the files in the page cache.

    # the embedded SmolLM2-135M-Instruct on CPU (no network)
    python benchmarks/bench_model_load.py
    # a bigger model, onto one GPU, 4 stages
    python benchmarks/bench_model_load.py --model-name EleutherAI/pythia-1b-deduped --device cuda --n-stages 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openchatkit.cli import run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-name",
        default="embedded",
        help="HF folder or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--work-dir", help="where the sharded and .pt copies go (default: a temp dir)")
    p.add_argument("--n-stages", type=int, default=4, help="stages for the one-stage figure")
    p.add_argument("--repeats", type=int, default=3, help="runs per method (median reported)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.n_stages < 1:
        p.error("--n-stages must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work_dir:
        from openchatkit.fileio import check_writable_dir

        check_writable_dir(args.work_dir, "--work-dir")  # before torch is imported
    import json

    from openchatkit.errors import UserError
    from openchatkit.models.pretrained import resolve_hf_source

    source = resolve_hf_source(args.model_name)
    config = json.loads((Path(source) / "config.json").read_text())
    total_layers = config.get("num_hidden_layers", config.get("n_layer", 0))
    if args.n_stages > total_layers:  # before anything is written
        raise UserError(f"--n-stages {args.n_stages} exceeds the {total_layers} layers")
    import statistics
    import tempfile
    import time

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from openchatkit.models import sharded
    from openchatkit.models.convert import convert_hf_to_sharded
    from openchatkit.models.registry import name_for_model_type, read_model_type
    from openchatkit.models.stage import StageModel, split_layers

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model_type = read_model_type(source)
    arch = name_for_model_type(model_type)
    if arch is None:
        raise UserError(f"--model-name {args.model_name}: unsupported model type {model_type!r}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="load-bench-"))
    folder = work / "sharded"
    if not sharded.is_sharded_folder(folder):
        convert_hf_to_sharded(source, folder, arch, overwrite=True)
    manifest = sharded.read_manifest(folder)
    num_layers = manifest.num_layers
    if args.n_stages > num_layers:
        raise UserError(f"--n-stages {args.n_stages} exceeds the {num_layers} layers")
    stage0 = split_layers(num_layers, args.n_stages)[0]

    # Upstream's layout: pytorch_embs.pt, pytorch_<i>.pt, pytorch_lm_head.pt (pickled dicts).
    pt_dir = work / "pt"
    pt_names = {
        sharded.EMBEDDINGS_FILE: "pytorch_embs.pt",
        sharded.HEAD_FILE: "pytorch_lm_head.pt",
    } | {sharded.layer_file(i): f"pytorch_{i}.pt" for i in range(num_layers)}
    if not (pt_dir / "pytorch_lm_head.pt").is_file():
        pt_dir.mkdir(parents=True, exist_ok=True)
        for name, pt_name in pt_names.items():
            torch.save(sharded.load_tensors(folder / name), pt_dir / pt_name)

    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def load_hf():
        return AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map=device)

    def load_sharded_whole():
        return StageModel.from_sharded(folder, range(num_layers), True, True, device=device)

    def load_sharded_stage():
        return StageModel.from_sharded(folder, stage0, True, args.n_stages == 1, device=device)

    def load_pt():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        model = StageModel(config, range(num_layers), True, True, device="meta", init_weights=False)
        state = {}
        for name, pt_name in pt_names.items():
            part = torch.load(pt_dir / pt_name, map_location=device, weights_only=True)
            prefix = (
                "embed."
                if name == sharded.EMBEDDINGS_FILE
                else "head."
                if name == sharded.HEAD_FILE
                else f"layers.{int(name[6:11])}."
            )
            state.update({prefix + k: v for k, v in part.items()})
        model.load_state_dict(state, strict=False, assign=True)
        model._tie()
        model._materialize_buffers(device)
        return model

    methods = [
        ("layer-sharded safetensors, whole model", load_sharded_whole),
        (
            f"layer-sharded safetensors, one stage (layers {stage0.start}-{stage0.stop - 1} "
            f"of {num_layers} + embeddings)",
            load_sharded_stage,
        ),
        ("HF from_pretrained (safetensors)", load_hf),
        ("pickled .pt per layer (upstream format)", load_pt),
    ]
    results = []
    for label, fn in methods:
        fn()  # warm the page cache and the imports
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model = fn()
            sync()
            times.append(time.perf_counter() - start)
            del model
        results.append((label, statistics.median(times)))

    hf_time = results[2][1]
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    print(
        f"model {source.name} ({manifest.architecture}, {num_layers} layers, "
        f"{manifest.dtype}, {size_mb:.0f} MB), device {device}, median of {args.repeats}"
    )
    print(f"| {'method':<72} | {'seconds':>7} | {'vs HF':>6} |")
    print(f"|{'-' * 74}|{'-' * 9}|{'-' * 8}|")
    for label, seconds in results:
        print(f"| {label:<72} | {seconds:7.3f} | {seconds / hf_time:5.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
