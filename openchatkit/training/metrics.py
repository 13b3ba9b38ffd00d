"""Step logs: one fixed step line through print | loguru | wandb, and `metrics.jsonl` always;
`read_metrics` reads that file back (tools/plot_metrics.py).

Only the process that owns the logger (rank 0) writes. A no-op tracker stands in when wandb is
off, so call sites never branch. wandb reads WANDB_MODE (e.g. offline), WANDB_NAME and
WANDB_DIR from the environment itself; the project comes from `--project-name`. Nothing here
prints or records an API key.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from openchatkit.errors import UserError

# Peak dense bf16/fp16 tensor FLOP/s per device (NVIDIA datasheets, without sparsity), for MFU,
# by the exact name `torch.cuda.get_device_name()` reports: a substring would give an H100 PCIe
# (756 TFLOP/s) or NVL (835) the SXM part's 989. An unknown name logs no MFU rather than a wrong one.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 SXM5 80GB": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H800": 989e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A10G": 125e12,
    "NVIDIA L4": 121e12,
}


class NullTracker:
    """Stands in for wandb when it is off."""

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, project: str, config: dict[str, Any], folder: Path):
        import wandb

        kwargs: dict[str, Any] = {"project": project, "config": config}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(folder)
        # name=None lets wandb take WANDB_NAME from the environment.
        self.run = wandb.init(**kwargs)

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self) -> None:
        self.run.finish()


def format_step_line(r: dict[str, Any]) -> str:
    """The one step-line format: step, loss, lr, grad norm, tokens/s (and MFU on GPU)."""
    parts = [
        f"step {r['step']}/{r['total_steps']}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.3e}",
        f"grad norm {r['grad_norm']:.4f}",
        f"tokens/s {r['tokens_per_s']:.1f}",
    ]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("skipped"):
        parts.append(f"skipped (overflow, loss scale {r['loss_scale']:g})")
    return " | ".join(parts)


# fp32 runs compute their matmuls on TF32 tensor cores (the trainer sets matmul precision
# "high"), whose dense peak is half the bf16/fp16 one on every device above (Ampere, Ada and
# Hopper datasheets: e.g. H100 SXM 494.7 vs 989.4 TFLOP/s, A100 156 vs 312).
TF32_FRACTION = 0.5


def peak_flops(device: str, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of the CUDA device for the run's precision, or None on CPU / unknown
    devices."""
    if device != "cuda":
        return None
    import torch

    return peak_flops_of(torch.cuda.get_device_name(), precision)


def peak_flops_of(device_name: str, precision: str = "bf16") -> float | None:
    """The PEAK_FLOPS entry for exactly this device name (surrounding spaces ignored); for
    fp32 (TF32 tensor cores) half of it."""
    peak = PEAK_FLOPS.get(device_name.strip())
    if peak is None or precision in ("bf16", "fp16"):
        return peak
    if precision == "fp32":
        return peak * TF32_FRACTION
    raise ValueError(f"unknown precision {precision!r}")


def matmul_params(num_params: int, vocab: int, hidden: int, tied: bool) -> int:
    """The N of 6N: parameters that take part in matmuls. An untied input embedding is a
    lookup (no FLOPs) and is left out; a tied one is also the LM head, so it stays."""
    return num_params if tied else num_params - vocab * hidden


def model_flops_per_token(
    num_params: int,
    num_layers: int,
    hidden: int,
    seq_length: int,
    trainable_params: int | None = None,
) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·H·S for attention (PaLM, App. B).
    `num_params` is N without the input embedding (see `matmul_params`).

    With a frozen base (LoRA/QLoRA, `trainable_params` = the adapters and other trained
    parameters, all of them in N) a frozen weight does its forward (2 FLOPs per token) and the
    input gradient of the backward (2), but no weight gradient: 4 per frozen parameter, 6 per
    trained one. Attention has no weights, so its 12·L·H·S stays. None: everything trains."""
    trainable = num_params if trainable_params is None else trainable_params
    if not 0 <= trainable <= num_params:
        raise ValueError(f"trainable_params {trainable} is not within [0, {num_params}]")
    frozen = num_params - trainable
    return 6.0 * trainable + 4.0 * frozen + 12.0 * num_layers * hidden * seq_length


class MetricsLogger:
    """Writes step records: JSON lines always, plus the chosen backend (rank 0 only)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        backend: str = "print",
        project: str = "openchatkit",
        config: dict[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.backend = backend
        self.path = Path(folder) / "metrics.jsonl"
        self.tracker: NullTracker | WandbTracker = NullTracker()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if backend == "wandb":
            self.tracker = WandbTracker(project, config or {}, Path(folder))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if record.get("kind", "train") == "train":
            line = format_step_line(record)
        else:
            line = " | ".join(f"{k} {v}" for k, v in record.items() if k != "kind")
        if self.backend == "print":
            print(line, file=sys.stdout, flush=True)
        elif self.backend == "loguru":
            logger.info(line)
        self.tracker.log(clean, step=int(record["step"]))

    def close(self) -> None:
        if self.enabled:
            self.tracker.finish()


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval records; for a step logged twice (a resumed run) the last one wins."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
            raise UserError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int):
            raise UserError(f"{path}:{n}: not a metrics record (a JSON object with a step)")
        if rec.get("kind", "train") == "train" and "loss" in rec:
            if any(k not in rec for k in ("step", "lr", "tokens_per_s")):
                raise UserError(f"{path}:{n}: a train record without step, lr or tokens_per_s")
            train[int(rec["step"])] = rec
        elif rec.get("kind") == "eval" and "step" in rec and "eval_loss" in rec:
            evals[int(rec["step"])] = rec
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]
