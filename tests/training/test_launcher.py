"""Pure pieces of the trainer, tested alone: the layout, the rendezvous merge, the LR schedule, the
loss scale, the loss normalisation, state by name, checkpoint discovery, trace tidying, and the
launcher's process handling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from openchatkit.distributed.env import resolve_rendezvous
from openchatkit.distributed.launcher import child_env, plan_node
from openchatkit.distributed.layout import ParallelLayout, check_layout
from openchatkit.errors import UserError
from openchatkit.training import checkpoint as ckpt
from openchatkit.training.engine import TokenMeanLoss, count_target_tokens
from openchatkit.training.optim import (
    build_optimizer,
    load_optimizer_state_by_name,
    lr_factor,
    optimizer_state_by_name,
)
from openchatkit.training.precision import LossScaler
from openchatkit.training.profiling import categorize, tidy_trace


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


def test_stage_layer_ranges_are_strict_except_upstreams_remainder():
    from openchatkit.training.config import stage_layer_ranges

    # GPT-NeoX-20B: 44 layers as 8 stages x 6, the last stage takes the remaining 2.
    ranges = stage_layer_ranges(44, 8, 6)
    assert [len(r) for r in ranges] == [6] * 7 + [2] and ranges[-1] == range(42, 44)
    assert stage_layer_ranges(30, 4, None) == [
        range(0, 8),
        range(8, 16),
        range(16, 23),
        range(23, 30),
    ]
    assert stage_layer_ranges(32, 4, 8) == [range(i * 8, i * 8 + 8) for i in range(4)]
    cases = (
        ((44, 8, 5), "use --num-layers 6 \\(the last stage takes the other 2\\)"),
        ((44, 8, 7), "use --num-layers 6"),
        ((32, 4, 9), "use --num-layers 8 or leave it out"),  # 36 layers' worth: no slack
        ((4, 2, 4), "use --num-layers 2"),
        ((9, 4, 3), "leave --num-layers out"),  # 3+3+3 leaves the 4th stage empty
        ((4, 5, None), "exceeds"),
    )
    for args, words in cases:
        with pytest.raises(UserError, match=words):
            stage_layer_ranges(*args)


def test_lr_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 2, 6) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(0, 0, 4) == 1.0 and lr_factor(4, 0, 4) == 0.0
    assert [lr_factor(s, 2, 6, "constant") for s in range(7)] == [0.0, 0.5] + [1.0] * 5


def test_loss_scale_halves_on_overflow_and_grows_after_a_window():
    s = LossScaler(True, 1024.0, window=2)
    s.update(overflow=True)
    assert s.scale == 512.0 and s.skipped_steps == 1
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    t = LossScaler(True, 1.0, window=2)  # the window comes from the flag, not the checkpoint
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert LossScaler(False).scale == 1.0


def test_loss_is_normalised_by_the_global_token_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    n = count_target_tokens(labels)
    assert n == 7  # 2 x 4 shifted targets, one masked
    fn = TokenMeanLoss()
    fn.normalizer = float(n)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(fn(logits, labels), ref)
    # Two halves, each divided by the whole count, sum to the mean over the whole batch.
    halves = fn(logits[:1], labels[:1]) + fn(logits[1:], labels[1:])
    assert torch.allclose(halves, ref)
    fn.scale = 8.0
    assert torch.allclose(fn(logits, labels), 8 * ref)


def test_optimizer_state_by_name_maps_a_tied_copy_to_the_embedding():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.full((3,), 0.5), torch.full((2,), 2.0)
    opt.step()
    saved = optimizer_state_by_name(opt, ["embed.w", "head.lm"], skip={"head.lm"})
    assert set(saved) == {"embed.w"}
    # Another layout: a stage holding only the head copy takes the embedding's state.
    c = torch.nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([c], lr=0.1)
    missing = load_optimizer_state_by_name(opt2, ["head.lm"], saved, {"head.lm": "embed.w"})
    assert missing == []
    assert torch.equal(opt2.state[c]["exp_avg"], opt.state[a]["exp_avg"])


def test_paged_8bit_adam_is_8bit_adam_on_cpu_and_keeps_its_state_on_resume():
    """On CPU there is no paging: paged-8bit-adam builds bitsandbytes' AdamW8bit (not its
    paged class, which would warn on every run) and makes the same update bit for bit; state
    saved under one name loads under the other."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init = torch.randn(64, 128)  # 8192 elements: above bitsandbytes' 8-bit size (4096)
    grads = [torch.randn(64, 128) for _ in range(3)]
    runs = {}
    for name in ("8bit-adam", "paged-8bit-adam"):
        w = torch.nn.Parameter(init.clone())
        opt = build_optimizer([w], name, 1e-2, 0.0)
        assert type(opt) is bnb.optim.AdamW8bit and not getattr(opt, "is_paged", False)
        for g in grads[:2]:
            w.grad = g.clone()
            opt.step()
        runs[name] = (w, opt)
    assert torch.equal(runs["8bit-adam"][0], runs["paged-8bit-adam"][0])
    assert runs["8bit-adam"][1].state[runs["8bit-adam"][0]]["state1"].dtype == torch.uint8
    # Resume the 8-bit run's state under the paged name: the third step matches.
    saved = optimizer_state_by_name(runs["8bit-adam"][1], ["w"], skip=set())
    w2 = torch.nn.Parameter(runs["8bit-adam"][0].detach().clone())
    opt2 = build_optimizer([w2], "paged-8bit-adam", 1e-2, 0.0)
    assert load_optimizer_state_by_name(opt2, ["w"], saved, {}) == []
    for w, opt in ((runs["8bit-adam"][0], runs["8bit-adam"][1]), (w2, opt2)):
        w.grad = grads[2].clone()
        opt.step()
    assert torch.equal(w2, runs["8bit-adam"][0])


def test_latest_names_only_complete_checkpoints(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    for step in (2, 4):
        tmp = ckpt.prepare_temp(tmp_path, step)
        (tmp / "x").write_text("weights")
        (tmp / "manifest.json").write_text("{}")  # a checkpoint is a layer-sharded folder
        ckpt.publish(tmp_path, step, {"step": step}, keep=0)
    # A half-written temp folder and a folder without meta.json never count.
    ckpt.prepare_temp(tmp_path, 6)
    (tmp_path / "checkpoint_8").mkdir()
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint_4"
    (tmp_path / "latest").write_text("checkpoint_8\n")  # names an incomplete one
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint_4"
    ckpt.prepare_temp(tmp_path, 6)
    ckpt.publish(tmp_path, 6, {"step": 6}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert ckpt.read_meta(tmp_path / "checkpoint_6")["step"] == 6


def test_trace_is_tidied_to_the_named_categories():
    raw = {
        "traceEvents": [
            {"ph": "X", "name": "Forward 0", "ts": 1, "dur": 5, "tid": 1},
            {"ph": "X", "name": "backward_chunk 0", "ts": 7, "dur": 5, "tid": 1},
            {"ph": "X", "name": "gloo:send", "ts": 2, "dur": 1},
            {"ph": "X", "name": "c10d::recv_", "ts": 3, "dur": 1},
            {"ph": "X", "name": "c10d::allreduce_", "ts": 13, "dur": 1},
            {"ph": "X", "name": "Optimizer.step#AdamW.step", "ts": 14, "dur": 1},
            {"ph": "X", "name": "aten::mm", "ts": 2, "dur": 1},
            {"ph": "i", "name": "Forward 1", "ts": 2},
        ]
    }
    out = tidy_trace(raw, rank=3)
    json.dumps(out)
    cats = [e["cat"] for e in out["traceEvents"] if e["ph"] == "X"]
    assert cats == ["forward", "send", "recv", "backward", "all-reduce", "optimizer"]
    assert categorize("aten::mm") is None
    # On a GPU: device kernels are kept (NCCL's by their collective), CPU-side aten ops are not.
    gpu = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32", "ts": 1},
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16", "ts": 2},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 3},
        ]
    }
    cats = [e["cat"] for e in tidy_trace(gpu, rank=0)["traceEvents"] if e["ph"] == "X"]
    assert cats == ["all-reduce", "gpu"]


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


def test_train_config_derives_once_and_is_frozen(tiny):
    import dataclasses
    import json

    from openchatkit.cli.train import build_parser, config_with_defaults
    from openchatkit.training.config import TrainConfig, read_model_shape

    flags = build_parser().parse_args(
        [
            "--model-name",
            str(tiny["llama"]),
            "--task-name",
            f"{tiny['train']}:2",
            "--pipeline-group-size",
            "2",
            "--data-group-size",
            "2",
            "--batch-size",
            "8",
            "--micro-batch-size",
            "2",
            "--gradient-accumulate-step",
            "3",
            "--seq-length",
            "16",
            "--bf16",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    config = TrainConfig.from_flags(flags, read_model_shape(tiny["llama"]), lambda: False)
    assert config.layer_ranges == (range(0, 2), range(2, 4))
    assert (config.replica_batch_sequences, config.num_microbatches) == (4, 2)
    assert (config.global_batch_sequences, config.tokens_per_step) == (24, 24 * 16)
    assert (config.precision, config.dp_backend, config.tokenizer_name) == (
        "bf16",
        "gloo",
        str(tiny["llama"]),
    )
    assert [t.name for t in config.tasks] == [str(tiny["train"])] and config.eval_tasks is None
    assert config.summary()["layers_per_stage"] == [2, 2]
    json.dumps(config.flags())  # meta.json and the tracker take it as it is
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    # The in-process constructor checks the same way.
    with pytest.raises(UserError, match="--micro-batch-size 3"):
        config_with_defaults(config.model, batch_size=8, micro_batch_size=3)
