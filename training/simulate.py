"""Simulate a training run at full size on a CPU: every rank of the recipe runs the real
`TrainEngine` for two optimizer steps on fake tensors over torch's fake process group, and each
pipeline stage's device peak is printed next to the memory planner's (training/plan.py), with
the phase of the peak and its parts (openchatkit/training/simulate.py says how).

Takes the trainer's own flags or a recipe's, as plan.py does; the model folder need not exist
for the shipped models (their published configs are built in). Exits 0 when every stage fits
--gpu-memory (or none is given), 1 with the table and the planner's advice when one does not,
2 on bad input.

    python training/simulate.py --recipe training/finetune_RedPajama-INCITE-Chat-3B-v1.sh \
        --gpu-memory 80
    python training/simulate.py --recipe training/train-gpt-neox-chat-base-20b.sh --json
    python training/simulate.py --model-name <tiny model folder> --seq-length 64 \
        --batch-size 4 --micro-batch-size 1 --pipeline-group-size 2 --data-group-size 2 --bf16

    python training/simulate.py --recipe training/lora/finetune-redpajama-incite-chat-3b-lora.sh \
        --load-in-4bit --optimizer paged-8bit-adam --gpu-memory 24

LoRA is simulated as is. 8-bit Adam and QLoRA's NF4 base run bitsandbytes kernels that fake
tensors cannot: the run simulates an unquantized base and torch's AdamW, then counts the NF4
weights and the 8-bit state from their documented layout, and says so in its output
(`"counted_from_layout"` in --json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plan.py beside this file

from plan import parse_args as plan_args  # noqa: E402

from openchatkit.cli import run_main  # noqa: E402
from openchatkit.errors import UserError  # noqa: E402


def hf_config_for(model_name: str):
    """The model's transformers config: its config.json, else the published one
    (openchatkit/models/published.py; read_shape has refused unknown names already)."""
    from transformers import AutoConfig

    from openchatkit.models.published import published_config

    folder = Path(model_name)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    known = dict(published_config(folder.name))
    return AutoConfig.for_model(known.pop("model_type"), **known)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--json", action="store_true")
    pre.add_argument("--steps", type=int, default=2)
    known, rest = pre.parse_known_args(argv)
    if known.steps < 1:
        raise UserError(f"--steps must be >= 1, got {known.steps}")
    args = plan_args(rest)
    from openchatkit.training.config import TrainConfig
    from openchatkit.training.memory import (
        GIB,
        RUNTIME_BYTES,
        TrainSetup,
        plan_memory,
        read_shape,
        refusal,
    )
    from openchatkit.training.simulate import (
        format_reports,
        layout_counted,
        reports_json,
        simulate_config,
    )

    shape, _ = read_shape(args.model_name)
    args.device = "cuda"  # the simulation is of the CUDA run, whatever this machine has
    config = TrainConfig.from_flags(args, shape, cuda_available=lambda: True, check_files=False)
    setup = TrainSetup.from_config(config)
    plans = plan_memory(shape, setup)
    gpu = args.gpu_memory * GIB if args.gpu_memory is not None else None
    reports, seconds = simulate_config(
        config, hf_config_for(args.model_name), plans, RUNTIME_BYTES, known.steps
    )
    fits = gpu is None or all(r.simulated_bytes <= gpu for r in reports)
    counted = layout_counted(config)
    if known.json:
        print(json.dumps(reports_json(reports, gpu, seconds) | {"counted_from_layout": counted}))
    else:
        print(format_reports(reports, gpu))
        if counted:
            # bitsandbytes' kernels have no fake implementation (openchatkit/training/simulate.py).
            print("counted from the documented layout, not simulated: " + "; ".join(counted))
        print(f"{config.pp * config.dp} ranks simulated in {seconds:.1f} s")
    if not fits:
        advice = refusal(shape, setup, gpu)
        print(
            "will not fit: "
            + (advice or "the planner says it fits; the simulation's peak is the one to trust"),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
