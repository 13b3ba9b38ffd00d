"""Plot a training run's metrics.jsonl: loss (and eval loss), learning rate and throughput.

    python tools/plot_metrics.py model_ckpts/smollm2-135m-oig-demo
    python tools/plot_metrics.py model_ckpts/run/metrics.jsonl --output run.png

The input is the `metrics.jsonl` that `training/dist_clm_train.py` appends to in its
--checkpoint-path (or that folder). Writes a PNG (default: metrics.png beside the input) and
prints its path. Needs no display (matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.errors import UserError
from openchatkit.training.metrics import read_metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="plot_metrics.py", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="metrics.jsonl, or the checkpoint folder holding it")
    p.add_argument("--output", default=None, help="PNG path (default: metrics.png beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{args.metrics}: no metrics.jsonl there")
    train, evals = read_metrics(path)
    if not train:
        raise UserError(f"{path}: no training steps recorded")
    out = Path(args.output) if args.output else path.with_name("metrics.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--output {out}: must end in .png")
    from openchatkit.fileio import check_writable_dir

    # Before matplotlib's import (about a second): an output that cannot be written is told at once.
    check_writable_dir(out.parent, "--output")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openchatkit.fileio import atomic_file

    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_ylabel("learning rate")
    axes[2].plot(steps, [r["tokens_per_s"] for r in train])
    axes[2].set_ylabel("tokens/s")
    axes[2].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(path.parent.name))
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
