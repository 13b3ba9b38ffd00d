"""After a pipelined step no receive buffer keeps its input gradient (engine.py clears the
stage's runtime state right after the schedule), so stages 1..pp-1 do not hold m micro-batches
of activation gradients through the optimizer step.

torch 2.13's `stage_backward` already drops each input's `.grad` once it is handed to the send;
torch revisions without that line keep them until the next step's `clear_runtime_states()`. The
test emulates those (a `.grad` left on every receive buffer by the schedule) so that it checks
the engine's clear on any torch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from openchatkit.cli.train import config_with_defaults
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.models.stage import StageModel
from openchatkit.training.config import read_model_shape
from openchatkit.training.engine import TrainEngine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _retained(stage) -> int:
    """Receive buffers of the pipeline stage that still hold a `.grad`."""
    return sum(
        1
        for infos in stage.args_recv_info.values()
        for a in infos
        if not a.is_root_arg and a.buffer is not None and a.buffer.grad is not None
    )


def _worker(rank: int, folder: str, port: int, out: str, clear: bool) -> None:
    torch.set_num_threads(1)
    shape = read_model_shape(folder)
    config = config_with_defaults(
        shape, batch_size=4, micro_batch_size=1, pipeline_group_size=2, total_steps=4
    )
    layout = ParallelLayout(2, 1, rank)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    layout.init_groups("cpu", tied=shape.tie_word_embeddings)
    stage = StageModel.from_sharded(
        folder, config.layer_ranges[rank], layout.is_first_stage, layout.is_last_stage
    )
    engine = TrainEngine(stage, layout, config, device=torch.device("cpu"))
    if not clear:  # the behaviour before the fix, to show the check can fail
        engine.stage.clear_runtime_states = lambda: None
    step = engine.schedule.step

    def step_keeping_input_grads(*args, **kwargs):
        out = step(*args, **kwargs)
        for infos in engine.stage.args_recv_info.values():
            for a in infos:
                if not a.is_root_arg and a.buffer is not None:
                    a.buffer.grad = torch.ones_like(a.buffer)  # what older torch leaves here
        return out

    engine.schedule.step = step_keeping_input_grads
    ids = torch.randint(0, shape.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(8).expand(4, 8)}
    engine.train_step([batch])
    Path(out, f"rank{rank}.txt").write_text(str(_retained(engine.stage)))
    torch.distributed.destroy_process_group()


def _retained_per_rank(folder: Path, tmp: Path, clear: bool) -> list[int]:
    tmp.mkdir()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.start_processes(
        _worker,
        args=(str(folder), _free_port(), str(tmp), clear),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    return [int((tmp / f"rank{r}.txt").read_text()) for r in range(2)]


def test_no_receive_buffer_keeps_its_gradient_after_the_step(tiny, tmp_path):
    assert _retained_per_rank(tiny["gpt_neox"], tmp_path / "fixed", clear=True) == [0, 0]
    # Without the clear, stage 1 keeps one input gradient per micro-batch.
    assert _retained_per_rank(tiny["gpt_neox"], tmp_path / "before", clear=False) == [0, 4]
