"""Single-process trainer runs checking one feature each: fp16 loss scale, 8-bit Adam, the log
backends (print, loguru, wandb offline), evaluation, tidy profiling, retention, resume, gradient
accumulation.

The wandb run (and its resume) runs as a user runs it, as a subprocess: wandb starts its own
service and reads its variables at start. The others call the trainer's main in this process
(`train_here`, tests/training/conftest.py): what they check is what the run writes and logs.
"""

from __future__ import annotations

import json

import torch


def _records(ckpt, kind="train"):
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny, tt, tmp_path, train_here):
    ckpt = tmp_path / "ckpt"
    args = tt.train_args(
        tiny, "llama", ckpt, fp16=True, initial_loss_scale=1e30, total_steps=2, checkpoint_steps=0
    )
    r = train_here(args)
    assert r.returncode == 0, r.stderr[-3000:]
    records = _records(ckpt)
    assert [x["skipped"] for x in records] == [True, True]
    assert [x["loss_scale"] for x in records] == [5e29, 2.5e29]
    assert "skipped (overflow" in r.stdout  # the print backend's step line
    meta = json.loads((ckpt / "checkpoint_2" / "meta.json").read_text())
    assert meta["loss_scale"]["scale"] == 2.5e29 and meta["precision"] == "fp16"
    # Skipped steps leave the weights alone (saved in fp16: the initial weights, rounded).
    before = tt.checkpoint_tensors(tiny["llama"])
    after = tt.checkpoint_tensors(ckpt / "checkpoint_2")
    for k, v in after.items():
        assert v.dtype == torch.float16
        assert torch.equal(v, before[k].half()), k


def test_8bit_adam_fp16_wandb_eval_profile_retention_and_resume(tiny, tt, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = dict(
        optimizer="8bit-adam",
        fp16=True,
        train_log_backend="wandb",
        project_name="octest",
        evaluation_steps=2,
        evaluation_data=tiny["valid"],
        num_checkpoints=1,
        profiling="tidy_profiling",
        profile_steps=2,
    )
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, **flags), WANDB_NAME="octest-wandb-run")
    assert r.returncode == 0, r.stderr[-3000:]
    records = _records(ckpt)
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert not any(x["skipped"] for x in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert [x["step"] for x in _records(ckpt, "eval")] == [2, 4]
    assert sorted(p.name for p in ckpt.glob("checkpoint_*")) == ["checkpoint_4"]  # retention
    # 8-bit state: bitsandbytes keeps uint8 moments for the (>= 4096 element) embedding.
    saved = torch.load(ckpt / "checkpoint_4" / "optimizer" / "stage_000.pt", weights_only=True)
    embed_state = saved["state"]["embed.embed_tokens.weight"]["__bnb_optimizer_quant_state__"]
    assert embed_state["state1"].dtype == torch.uint8
    assert saved["master"]["embed.embed_tokens.weight"].dtype == torch.float32
    # wandb, offline: a local run folder under the checkpoint path, named from WANDB_NAME.
    runs = list((ckpt / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert b"octest-wandb-run" in b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert "step 1/4 | loss" not in r.stdout  # the wandb backend does not print step lines
    # Tidy trace: valid JSON with forward and backward spans.
    trace = json.loads((ckpt / "profiles" / "trace_rank0.json").read_text())
    cats = [e.get("cat") for e in trace["traceEvents"]]
    assert cats.count("forward") == 2 * 4 and cats.count("backward") == 2 * 4  # 2 steps x 4 mb
    assert "optimizer" in cats
    # Resume with more steps: the 8-bit optimizer state and the loss scale load back.
    r = tt.run_train(
        tt.train_args(tiny, "llama", ckpt, **{**flags, "total_steps": 6, "profiling": None})
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert [x["step"] for x in _records(ckpt)][-2:] == [5, 6]


def test_loguru_backend_bf16(tiny, tt, tmp_path, train_here):
    ckpt = tmp_path / "ckpt"
    args = tt.train_args(
        tiny, "gpt_neox", ckpt, train_log_backend="loguru", bf16=True, total_steps=2
    )
    r = train_here(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1/2 | loss" in r.stderr and "step 1/2" not in r.stdout
    assert len(_records(ckpt)) == 2
    weights = tt.checkpoint_tensors(ckpt / "checkpoint_2")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())


def test_gradient_accumulation_equals_one_big_batch(tiny, tt, reference, tmp_path, train_here):
    """2 accumulation passes of 2 sequences == 1 pass of 4: losses are averaged over tokens of
    the whole step, not summed per pass."""
    ckpt = tmp_path / "ckpt"
    args = tt.train_args(tiny, "llama", ckpt, batch_size=2, gradient_accumulate_step=2)
    r = train_here(args)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = tt.train_losses(ckpt), tt.train_losses(reference["llama"])
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-5
    assert tt.max_weight_diff(ckpt / "checkpoint_4", reference["llama"] / "checkpoint_4") < 1e-5
