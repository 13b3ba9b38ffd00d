"""Start one process per rank (per GPU, or --nproc CPU processes) and keep them together.

If one rank dies the others are stopped and the dead one is named; Ctrl-C stops all of them.
Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (shared file system
for --checkpoint-path).

CPU (2 processes on gloo):
    python training/launch.py --nproc 2 --device cpu -- training/dist_clm_train.py \
        --pipeline-group-size 2 --device cpu ...
One node, every GPU:
    python training/launch.py -- training/dist_clm_train.py --pipeline-group-size 8 ...
Two nodes of 8 GPUs (run on each node, NODE_RANK 0 and 1):
    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
        python training/launch.py -- training/dist_clm_train.py --pipeline-group-size 8 \
        --data-group-size 2 ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from openchatkit.cli import run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="processes on this node (default: GPUs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("LAUNCH_DRY_RUN") == "1",
        help="print each rank's command and environment instead of running (LAUNCH_DRY_RUN=1)",
    )
    p.add_argument("script", help="the Python script to run per rank")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.script == "--":
        if not args.script_args:
            p.error("missing the script to run")
        args.script, args.script_args = args.script_args[0], args.script_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    from openchatkit.distributed.launcher import child_env, count_gpus, launch, plan_node
    from openchatkit.errors import UserError

    args = parse_args(argv)
    device = args.device or ("cuda" if count_gpus() > 0 else "cpu")
    if device == "cpu" and args.nproc is None:
        raise UserError("--nproc is required with --device cpu")
    plan = plan_node(args.nproc, device, check_gpus=not args.dry_run)
    if not Path(args.script).is_file():
        raise UserError(f"script {args.script} not found")
    command = [sys.executable, args.script, *args.script_args]
    if args.dry_run:
        for local in range(plan.nproc):
            env = child_env(plan, local, {})
            pairs = " ".join(f"{k}={v}" for k, v in env.items() if k != "OMP_NUM_THREADS")
            print(f"{pairs} {shlex.join(command)}")
        return 0
    print(
        f"launch: node {plan.node_rank}/{plan.nnodes}, ranks {plan.rank(0)}..{plan.rank(plan.nproc - 1)}"
        f" of {plan.world_size}, rendezvous {plan.master_addr}:{plan.master_port}",
        file=sys.stderr,
        flush=True,
    )
    return launch(command, plan)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
