"""Fault injection: runs of a tiny model killed with SIGKILL at random moments (during steps,
during checkpoint writes), each rerun to the end, finish with the uninterrupted run's weights
bit for bit, and no rerun ever reads a half-written checkpoint.

Slow (about 40 trainer starts): `make test-slow`. OPENCHATKIT_FAULT_RUNS sets the number of
killed runs (default 20)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

NUM_RUNS = int(os.environ.get("OPENCHATKIT_FAULT_RUNS", "20"))
STEPS = 6


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny, tt, tmp_path):
    flags = {"total_steps": STEPS, "checkpoint_steps": 1, "num_checkpoints": 2}
    reference = tmp_path / "reference"
    t0 = time.monotonic()
    r = tt.run_train(tt.train_args(tiny, "llama", reference, **flags))
    assert r.returncode == 0, r.stderr[-3000:]
    duration = time.monotonic() - t0
    rng = random.Random(15)
    survived = 0
    for i in range(NUM_RUNS):
        run = tmp_path / f"run{i}"
        args = tt.train_args(tiny, "llama", run, **flags)
        if i % 2:  # inside a checkpoint write: after this rank wrote its files, before publish
            env = {"OPENCHATKIT_FAULT": f"save:{rng.randint(1, STEPS)}"}
            proc = subprocess.Popen(
                [sys.executable, str(tt.TRAIN), *args], cwd=tt.REPO,
                env=tt.clean_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            proc.wait(timeout=600)
        else:  # at a random moment of the run (start-up, a step, a write)
            proc = subprocess.Popen(
                [sys.executable, str(tt.TRAIN), *args], cwd=tt.REPO,
                env=tt.clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(rng.uniform(0.2, duration))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        r = tt.run_train(args)
        assert r.returncode == 0, (i, r.stderr[-3000:])
        assert "skipping damaged" not in r.stderr and "incomplete" not in r.stderr, r.stderr
        final = run / f"checkpoint_{STEPS}"
        assert tt.max_weight_diff(final, reference / f"checkpoint_{STEPS}") == 0.0, i
        survived += killed
    assert survived >= NUM_RUNS // 2  # most runs were really killed mid-way
