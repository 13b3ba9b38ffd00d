"""Memory plan of a training run: per pipeline stage, the bytes it needs on its GPU, and whether
the run fits (see openchatkit/training/memory.py for what is counted and how it was measured).

Takes the trainer's own flags (`training/dist_clm_train.py`), or a recipe's. Exits 0 when every
stage fits, 2 with one line naming the stage, the shortfall and the cheapest fix when one does
not. The model folder need not exist for the shipped models (their published configs are built
in); --device defaults to cuda (the plan is for GPUs, whatever this machine has).

    python training/plan.py --recipe training/train-gpt-neox-chat-base-20b.sh --gpu-memory 80
    python training/plan.py --model-name pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b \
        --seq-length 2048 --batch-size 64 --pipeline-group-size 8 --fp16 --pp-mode 1f1b \
        --gpu-memory 80
    python training/plan.py --recipe training/finetune_llama-2-7b-32k-mqa.sh --markdown

The same check runs at the start of every CUDA training run, before anything is allocated
(`--gpu-memory` there defaults to the device's memory).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.train import build_parser
from openchatkit.errors import UserError
from openchatkit.training.config import TrainConfig
from openchatkit.training.memory import (
    GIB,
    TrainSetup,
    format_table,
    plan_memory,
    read_shape,
    refusal,
)

TRAINER = "dist_clm_train.py"


def recipe_flags(recipe: str | Path) -> list[str]:
    """The trainer flags a recipe passes: run it with PYTHON pointing at a stub that prints
    its arguments (nothing is launched)."""
    recipe = Path(recipe)
    if not recipe.is_file():
        raise UserError(f"--recipe {recipe}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "python"
        stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
        env = {**os.environ, "PYTHON": str(stub)}
        done = subprocess.run(
            ["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=60
        )
    if done.returncode != 0 or not done.stdout.strip():
        raise UserError(f"--recipe {recipe}: did not run ({done.stderr.strip()[:200]})")
    argv = json.loads(done.stdout.strip().splitlines()[-1])
    trainer = next((i for i, a in enumerate(argv) if a.endswith(TRAINER)), None)
    if trainer is None:
        raise UserError(f"--recipe {recipe}: it does not run {TRAINER}")
    return argv[trainer + 1 :]


def parse_args(argv: list[str]):
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.recipe:
        # The recipe's flags first, then the ones given here (which win).
        argv = recipe_flags(known.recipe) + rest
    parser = build_parser()
    parser.prog = "plan.py"
    parser.description = __doc__.split("\n\n")[0]
    for action in parser._actions:
        if action.dest == "task_name":
            action.required = False  # no data is read
    parser.add_argument("--recipe", default=None, help="take the trainer flags from this .sh")
    parser.add_argument("--markdown", action="store_true", help="print the table for README")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    shape, source = read_shape(args.model_name)
    if args.device is None:
        args.device = "cuda"  # the plan is for GPUs, whatever this machine has
    # check_files=False: no model weights, manifest or data are needed for a plan.
    config = TrainConfig.from_flags(args, shape, cuda_available=lambda: True, check_files=False)
    setup = TrainSetup.from_config(config)
    gpu = args.gpu_memory * GIB if args.gpu_memory is not None else _detected_bytes()
    plans = plan_memory(shape, setup)
    table = format_table(plans, gpu)
    lora = ""
    if setup.lora is not None:
        lora = f", LoRA r={setup.lora.r} on {','.join(setup.lora.target_modules)}"
        lora += " over an NF4 base" if setup.load_in_4bit else ""
    title = (
        f"{Path(args.model_name).name}: pp={setup.pp} dp={setup.dp}, {setup.num_microbatches} "
        f"micro-batches of {setup.micro_batch_size} x {setup.seq_length} tokens, "
        f"{setup.pp_mode}, {setup.precision}, {setup.optimizer}, checkpointing "
        f"{setup.activation_checkpointing}{lora} (dims from {source})"
    )
    if args.markdown:
        print(f"{title}\n\n```\n{table}\n```")
    else:
        print(f"{title}\n{table}")
    if gpu is None:
        print("no GPU detected here: pass --gpu-memory GiB for a verdict")
    else:
        message = refusal(shape, setup, gpu)
        if message is not None:
            raise UserError(f"will not fit: {message}")
    return 0


def _detected_bytes() -> float | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
