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

8-bit Adam and QLoRA's NF4 base run bitsandbytes kernels that fake tensors cannot, and peft's
adapter placement swaps fake parameters, which torch refuses: those runs (8-bit Adam, QLoRA,
LoRA) are refused with one line; plan.py counts them from their documented layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plan.py beside this file

from plan import parse_args as plan_args  # noqa: E402

from openchatkit.cli import run_main  # noqa: E402
from openchatkit.errors import UserError  # noqa: E402

# Published activations of the built-in configs (memory.KNOWN_CONFIGS has the dims only): the
# activation decides what a layer keeps (GPT-NeoX-20B's gelu_fast keeps about six MLP-width
# tensors, plain gelu one).
PUBLISHED_ACT = {
    "EleutherAI_gpt-neox-20b": "gelu_fast",
    "EleutherAI_gpt-j-6b": "gelu_new",
    "togethercomputer_GPT-JT-6B-v1": "gelu_new",
}


def hf_config_for(model_name: str):
    """The model's transformers config: its config.json, else the built-in published one."""
    from transformers import AutoConfig

    from openchatkit.training.memory import KNOWN_CONFIGS

    folder = Path(model_name)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    known = dict(KNOWN_CONFIGS[folder.name])  # read_dims has refused unknown names already
    known.setdefault("hidden_act", PUBLISHED_ACT.get(folder.name, "gelu"))
    if known["model_type"] == "llama":
        known["hidden_act"] = "silu"
    return AutoConfig.for_model(**known)


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
    from openchatkit.training.config import ModelShape, TrainConfig
    from openchatkit.training.memory import (
        GIB,
        RUNTIME_BYTES,
        plan_memory,
        read_dims,
        refusal,
        setup_from_config,
    )
    from openchatkit.training.simulate import format_reports, reports_json, simulate_config

    dims, _ = read_dims(args.model_name)
    shape = ModelShape(dims.model_type, dims.num_layers, dims.hidden, dims.vocab, dims.tied)
    args.device = "cuda"  # the simulation is of the CUDA run, whatever this machine has
    config = TrainConfig.from_flags(args, shape, cuda_available=lambda: True, check_files=False)
    if config.optimizer != "adam" or config.load_in_4bit:
        flag = "--load-in-4bit" if config.load_in_4bit else f"--optimizer {config.optimizer}"
        raise UserError(
            f"{flag}: bitsandbytes kernels cannot run on fake tensors; "
            "training/plan.py counts this run from its documented layout"
        )
    if config.lora is not None:
        raise UserError(
            f"--lora-r {config.lora.r}: not simulated yet (peft moves its adapters with "
            "Module.to, which swaps fake parameters and torch refuses); use training/plan.py"
        )
    setup = setup_from_config(config)
    plans = plan_memory(dims, setup)
    gpu = args.gpu_memory * GIB if args.gpu_memory is not None else None
    reports, seconds = simulate_config(
        config, hf_config_for(args.model_name), plans, RUNTIME_BYTES, known.steps
    )
    fits = gpu is None or all(r.simulated_bytes <= gpu for r in reports)
    if known.json:
        print(json.dumps(reports_json(reports, gpu, seconds)))
    else:
        print(format_reports(reports, gpu))
        print(f"{config.pp * config.dp} ranks simulated in {seconds:.1f} s")
    if not fits:
        advice = refusal(dims, setup, gpu)
        print(
            "will not fit: "
            + (advice or "the planner says it fits; the simulation's peak is the one to trust"),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
