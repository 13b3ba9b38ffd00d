"""Multi-process runs (gloo, CPU) against the single-process reference on the same global batch.

Two layouts through the command line, one per architecture: gpt_neox (untied) as pp=2 x dp=2
with GPipe under torchrun, and llama (tied) as pp=2 x dp=2 with 1F1B under training/launch.py,
profiled. Both use the same `--batch-size 4` as the reference (it is global); losses per step
and final weights must agree within 1e-5 (fp32). They prove the launchers, the environment and
the checkpoint plumbing; schedule x layout x tied/untied is proved in-process by
tests/training/test_training_engine.py (full fine-tuning at pp=2 x dp=2 and pp=2, LoRA also at
pp=4 with one layer per stage, QLoRA, the head on target rows only). The same
runs also serve the resume tests: a pp=2 x dp=2 checkpoint resumed by one process, and a
pp=2 x dp=2 run killed while checkpointing and restarted.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

# (architecture, pp, dp, schedule)
LAYOUTS = [("gpt_neox", 2, 2, "gpipe"), ("llama", 2, 2, "1f1b")]
TORCHRUN = ("gpt_neox", 2, 2, "gpipe")  # its environment instead of our launcher's
PROFILED = ("llama", 2, 2, "1f1b")
TOL = 1e-5


@pytest.fixture(scope="module")
def parallel_runs(tiny, tt, tmp_path_factory):
    """Run a layout once per module (cached): {layout: checkpoint folder}."""
    root = tmp_path_factory.mktemp("parallel")
    cache = {}

    def run(arch, pp, dp, mode, profile=False):
        key = (arch, pp, dp, mode)
        if key not in cache:
            ckpt = root / f"{arch}-{pp}x{dp}-{mode}"
            flags = dict(
                pipeline_group_size=pp,
                data_group_size=dp,
                pp_mode=mode,
                batch_size=4,  # global: each of the dp replicas takes 4 / dp of it
            )
            if profile:
                flags["profiling"] = "tidy_profiling"
            torchrun = key == TORCHRUN
            r = tt.run_train(
                tt.train_args(tiny, arch, ckpt, **flags), nproc=pp * dp, torchrun=torchrun
            )
            assert r.returncode == 0, r.stderr[-4000:]
            cache[key] = ckpt
        return cache[key]

    return run


@pytest.mark.parametrize("layout", LAYOUTS, ids=["-".join(map(str, x)) for x in LAYOUTS])
def test_layout_matches_single_process(layout, parallel_runs, reference, tt):
    arch = layout[0]
    ckpt = parallel_runs(*layout, profile=layout == PROFILED)
    ref = tt.train_losses(reference[arch])
    got = tt.train_losses(ckpt)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) < TOL, (step, got[step], ref[step])
    # The model learns something: the loss moves.
    assert got[4] < got[1]
    assert tt.max_weight_diff(ckpt / "checkpoint_4", reference[arch] / "checkpoint_4") < TOL
    meta = json.loads((ckpt / "checkpoint_4" / "meta.json").read_text())
    assert meta["layout"] == {"pp": layout[1], "dp": layout[2]}
    assert (ckpt / "latest").read_text().strip() == "checkpoint_4"


def test_trace_has_forward_backward_and_communication(parallel_runs):
    ckpt = parallel_runs(*PROFILED, profile=True)
    for rank in range(4):
        trace = json.loads((ckpt / "profiles" / f"trace_rank{rank}.json").read_text())
        cats = {e.get("cat") for e in trace["traceEvents"]}
        assert {"forward", "backward", "send", "recv", "all-reduce", "optimizer"} <= cats, cats
        for e in trace["traceEvents"]:
            if e["ph"] == "X":
                assert e["dur"] >= 0 and e["pid"] == rank


def test_checkpoint_resumes_under_another_layout(
    parallel_runs, reference, tiny, tt, tmp_path, train_here
):
    """A checkpoint written by pp=2 x dp=2 continues in one process on the same trajectory. The
    one process is the trainer's main called here (`train_here`); a real process resuming
    another layout's checkpoint: test_training_lora.py (pp=2 -> one process)."""
    src = parallel_runs("gpt_neox", 2, 2, "gpipe")
    ckpt = tmp_path / "resumed"
    ckpt.mkdir()
    shutil.copytree(src / "checkpoint_2", ckpt / "checkpoint_2")
    (ckpt / "latest").write_text("checkpoint_2\n")
    r = train_here(tt.train_args(tiny, "gpt_neox", ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    got, ref = tt.train_losses(ckpt), tt.train_losses(reference["gpt_neox"])
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) < TOL
    assert tt.max_weight_diff(ckpt / "checkpoint_4", reference["gpt_neox"] / "checkpoint_4") < TOL


def test_kill_while_checkpointing_then_resume_is_exact(parallel_runs, tiny, tt, tmp_path):
    """Rank 3 is SIGKILLed while writing checkpoint 4: the launcher names it and stops the others,
    no complete-looking checkpoint_4 is left, and the restart continues bit for bit."""
    uninterrupted = parallel_runs(*PROFILED, profile=True)
    ckpt = tmp_path / "killed"
    args = tt.train_args(
        tiny, "llama", ckpt, pipeline_group_size=2, data_group_size=2, pp_mode="1f1b"
    )
    t0 = time.monotonic()
    r = tt.run_train(args, nproc=4, OPENCHATKIT_FAULT="save:4@3")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "rank 3" in r.stderr and "stopping the other ranks" in r.stderr
    assert not (ckpt / "checkpoint_4").exists()
    assert (ckpt / "latest").read_text().strip() == "checkpoint_2"
    assert not (ckpt / ".checkpoint_4.tmp" / "meta.json").exists()

    r = tt.run_train(args, nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = tt.train_losses(ckpt), tt.train_losses(uninterrupted)
    assert [got[s] for s in (1, 2, 3, 4)] == [ref[s] for s in (1, 2, 3, 4)]  # bit for bit
    assert tt.max_weight_diff(ckpt / "checkpoint_4", uninterrupted / "checkpoint_4") == 0.0
