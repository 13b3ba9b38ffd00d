"""The distributed launch path, tested alone: the rank layout, the rendezvous merge of flags and
torchrun's environment, the launcher's node plan and its process handling (one dead rank or
Ctrl-C stops every child), and the recipes' environment overrides."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from openchatkit.distributed.env import resolve_rendezvous
from openchatkit.distributed.launcher import child_env, plan_node
from openchatkit.distributed.layout import ParallelLayout, check_layout
from openchatkit.errors import UserError


def test_rank_layout_is_upstreams():
    # pp=2, dp=2: ranks 0,1 are replica 0; ranks 2,3 replica 1.
    coords = [(r.pp_rank, r.dp_rank) for r in (ParallelLayout(2, 2, k) for k in range(4))]
    assert coords == [(0, 0), (1, 0), (0, 1), (1, 1)]
    lay = ParallelLayout(4, 2, 6)
    assert (lay.pp_rank, lay.dp_rank) == (2, 1)
    assert lay.pp_peers == [4, 5, 6, 7] and lay.dp_peers == [2, 6]
    assert not lay.is_first_stage and not lay.is_last_stage
    assert ParallelLayout(4, 2, 7).is_last_stage and ParallelLayout(4, 2, 4).is_first_stage
    assert ParallelLayout(1, 1, 0).is_first_stage and ParallelLayout(1, 1, 0).is_last_stage


def test_layout_mismatch_names_the_flags():
    with pytest.raises(UserError, match="--pipeline-group-size.*--data-group-size"):
        check_layout(2, 2, 3)
    with pytest.raises(UserError, match="--rank"):
        ParallelLayout(2, 1, 2)


def test_rendezvous_falls_back_to_torchrun_env_and_checks_it():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "7",
    }
    rdv = resolve_rendezvous(None, None, None, 2, 2, env)
    assert (rdv.rank, rdv.world_size, rdv.local_rank, rdv.init_method) == (3, 4, 1, "tcp://h:7")
    assert resolve_rendezvous(3, 4, "tcp://h:7", 2, 2, env).rank == 3
    assert resolve_rendezvous(None, None, None, 1, 1, {}).init_method.startswith("tcp://")
    for kwargs, word in (
        (dict(rank=2), "--rank"),
        (dict(world_size=8), "--world-size"),
        (dict(dist_url="tcp://other:7"), "MASTER_ADDR"),
    ):
        with pytest.raises(UserError, match=word):
            resolve_rendezvous(
                kwargs.get("rank"), kwargs.get("world_size"), kwargs.get("dist_url"), 2, 2, env
            )
    with pytest.raises(UserError, match="world size"):
        resolve_rendezvous(None, None, None, 2, 1, env)


def test_plan_refuses_too_few_gpus_and_reads_multi_node_env():
    with pytest.raises(UserError, match="only 4 GPUs"):
        plan_node(8, "cuda", env={}, gpus=4)
    with pytest.raises(UserError, match="no CUDA GPU"):
        plan_node(None, "cuda", env={}, gpus=0)
    plan = plan_node(8, "cuda", env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "n0"}, gpus=8)
    assert plan.world_size == 16 and plan.rank(0) == 8 and plan.master_port == 29500
    env = child_env(plan, 3, {})
    assert env["RANK"] == "11" and env["LOCAL_RANK"] == "3" and env["MASTER_ADDR"] == "n0"
    with pytest.raises(UserError, match="NODE_RANK"):
        plan_node(2, "cpu", env={"NNODES": "2", "NODE_RANK": "2"})


CHILD = """
import os, sys, time
rank = int(os.environ["RANK"])
if rank == int(sys.argv[1]):
    time.sleep(0.5)
    sys.exit(3)
time.sleep(60)
"""


def test_launcher_stops_everyone_when_one_rank_dies(tmp_path, tt):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(tt.LAUNCH), "--nproc", "3", "--device", "cpu", "--", str(script), "1"],
        env=tt.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3
    assert "rank 1" in r.stderr and "exited with code 3" in r.stderr
    assert time.monotonic() - t0 < 30  # not the 60 s the survivors would sleep


def test_launcher_ctrl_c_stops_every_child(tmp_path, tt):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    pidfile = tmp_path / "pids"
    script.write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, str(tt.LAUNCH), "--nproc", "2", "--device", "cpu", "--", str(script)],
        env=tt.clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        not pidfile.exists() or len(pidfile.read_text().split()) < 2
    ):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    for pid in map(int, pidfile.read_text().split()):
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)


def test_recipes_honour_finetune_env(tt):
    """Dry run of every GPU recipe: the FINETUNE_* variables reach the trainer's flags."""
    recipes = sorted((tt.REPO / "training").glob("*.sh"))
    gpu = [p for p in recipes if "cpu" not in p.name]
    assert len(gpu) >= 5
    for path in gpu:
        r = subprocess.run(
            ["bash", str(path)],
            env=tt.clean_env(
                LAUNCH_DRY_RUN="1",
                FINETUNE_TOTAL_STEPS="7",
                FINETUNE_CHECKPOINT_STEPS="3",
                FINETUNE_CHECKPOINT_PATH="/x/ckpt",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (path.name, r.stderr)
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 8 and lines[7].startswith("RANK=7 WORLD_SIZE=8"), path.name
        assert "--total-steps 7" in lines[0] and "--checkpoint-steps 3" in lines[0]
        assert "--checkpoint-path /x/ckpt" in lines[0]
    text = (tt.REPO / "training" / "train-gpt-neox-chat-base-20b.sh").read_text()
    assert "--pipeline-group-size 8" in text and "--num-layers 6" in text
