"""TrainEngine's collectives tested in process: ranks spawned by torch.multiprocessing in one test,
each building its stage and engine from a `TrainConfig`, against the same steps in one process.

The end-to-end comparisons (`test_training_parity.py`) go through the CLI, the data stream and
checkpoints; these isolate the engine: pipeline sends, the data-parallel all-reduce, the tied
embedding's two copies, the token-count normalisation and the grad norm over the pp group.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from openchatkit.cli.train import config_with_defaults
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.models.lora import apply_lora
from openchatkit.models.stage import StageModel
from openchatkit.training import loss as loss_module
from openchatkit.training.config import read_model_shape
from openchatkit.training.engine import TrainEngine

STEPS = 3
BATCH, SEQ = 8, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of BATCH random rows, a few labels masked as -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[torch.rand(BATCH, SEQ, generator=g) < 0.2] = -100
        pos = torch.arange(SEQ).expand(BATCH, SEQ).clone()
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def _train(rank: int, folder: str, flags: dict, port: int, out: str) -> None:
    """One rank: build its stage and engine, run STEPS steps on its rows, save what it saw."""
    torch.set_num_threads(1)
    shape = read_model_shape(folder)
    config = config_with_defaults(shape, **flags)
    layout = ParallelLayout(config.pp, config.dp, rank)
    if layout.is_distributed:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=layout.world_size
        )
        layout.init_groups("cpu", tied=shape.tie_word_embeddings)
    stage = StageModel.from_sharded(
        folder,
        config.layer_ranges[layout.pp_rank],
        layout.is_first_stage,
        layout.is_last_stage,
        dtype=torch.float32,
    )
    if config.load_in_4bit:
        from openchatkit.models.quantize import quantize_linear_4bit

        quantize_linear_4bit(stage, torch.float32)
    if config.lora is not None:
        apply_lora(stage, config.lora, seed=config.seed)
    initial = {n: p.detach().clone() for n, p in stage.named_parameters()}
    engine = TrainEngine(stage, layout, config, device=torch.device("cpu"))
    rows = config.replica_batch_sequences  # replica r takes rows [r*rows, (r+1)*rows)
    rows_seen = []  # (rows the LM head ran on, rows of the micro-batch)
    fused = loss_module.linear_cross_entropy  # the LM head fused into the loss
    if getattr(engine.loss_fn, "select_rows", False):
        micro = config.micro_batch_size * SEQ

        def counting(rows, *args):
            rows_seen.append((rows.shape[0], micro))
            return fused(rows, *args)

        loss_module.linear_cross_entropy = counting
    results, early = [], []
    try:
        for batch in _batches(shape.vocab_size, seed=7):
            mine = {
                k: v[layout.dp_rank * rows : (layout.dp_rank + 1) * rows] for k, v in batch.items()
            }
            r = engine.train_step([mine])
            results.append((r.loss, r.grad_norm, r.num_tokens))
            early.append((engine.grads.started_early, len(engine.grads.buckets)))
    finally:  # one process runs in pytest's own: leave the module as it was
        loss_module.linear_cross_entropy = fused
    params = {n: p.detach().clone() for n, p in stage.named_parameters()}
    trainable = sorted(n for n, p in stage.named_parameters() if p.requires_grad)
    torch.save(
        {
            "steps": results,
            "params": params,
            "initial": initial,
            "trainable": trainable,
            "early": early,
            "rows_seen": rows_seen,
        },
        Path(out) / f"rank{rank}.pt",
    )
    if layout.is_distributed:
        torch.distributed.destroy_process_group()


def _run(folder: Path, flags: dict, tmp: Path) -> list[dict]:
    tmp.mkdir()
    world = flags.get("pipeline_group_size", 1) * flags.get("data_group_size", 1)
    if world == 1:
        _train(0, str(folder), flags, 0, str(tmp))
    else:
        os.environ["OMP_NUM_THREADS"] = "1"
        # fork: the children inherit this module as it is, so nothing has to be importable by
        # name (pytest imports test modules under --import-mode=importlib).
        torch.multiprocessing.start_processes(
            _train,
            args=(str(folder), flags, _free_port(), str(tmp)),
            nprocs=world,
            join=True,
            start_method="fork",
        )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _assert_ranks_match(ref: dict, ranks: list[dict], atol: float = 1e-6) -> None:
    """Every rank reports the same global loss, grad norm and token count as one process, and
    each stage's parameters (every replica, both tied copies) equal the single process's
    parameter of the same name."""
    for got in ranks:
        for (loss, norm, n), (ref_loss, ref_norm, ref_n) in zip(
            got["steps"], ref["steps"], strict=True
        ):
            assert n == ref_n
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            assert norm == pytest.approx(ref_norm, rel=1e-5)
    checked = set()
    for got in ranks:
        for name, value in got["params"].items():
            ref_name = name
            if name not in ref["params"] and name == "head.lm_head.weight":
                ref_name = "embed.embed_tokens.weight"  # the last stage's tied copy
            torch.testing.assert_close(value, ref["params"][ref_name], rtol=1e-5, atol=atol)
            checked.add(ref_name)
    assert checked == set(ref["params"])


COMMON = dict(batch_size=BATCH, micro_batch_size=2, lr=1e-3, total_steps=10, seed=1)


@pytest.mark.parametrize(
    "arch,pp,dp,mode",
    [("llama", 2, 2, "gpipe"), ("gpt_neox", 2, 1, "1f1b")],
    ids=["llama-tied-pp2dp2-gpipe", "neox-pp2-1f1b"],
)
def test_engine_ranks_equal_one_process(tiny, tmp_path, monkeypatch, arch, pp, dp, mode):
    # Small buckets: many dp all-reduces, most started from hooks during the backward (the
    # forked ranks inherit the patched module).
    monkeypatch.setattr("openchatkit.training.engine.BUCKET_NUMEL", 3000)
    folder = tiny[arch]
    ref = _run(folder, COMMON, tmp_path / "ref")[0]
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode)
    ranks = _run(folder, dict(COMMON, **layout), tmp_path / "par")
    _assert_ranks_match(ref, ranks)
    for got in ranks:
        # Every bucket's sum started from a hook during the last backward.
        assert all(early == n > 1 for early, n in got["early"]), got["early"]


@pytest.mark.parametrize(
    "arch,pp,dp,mode",
    [
        ("llama", 2, 2, "gpipe"),
        ("gpt_neox", 2, 2, "1f1b"),
        ("gpt_neox", 4, 1, "1f1b"),
        ("llama", 4, 1, "gpipe"),
    ],
    ids=["llama-tied-pp2dp2-gpipe", "neox-pp2dp2-1f1b", "neox-pp4-1f1b", "llama-tied-pp4-gpipe"],
)
def test_lora_ranks_equal_one_process_and_leave_the_base_alone(tiny, tmp_path, arch, pp, dp, mode):
    folder = tiny[arch]
    lora = dict(COMMON, lora_r=4, lora_dropout=0.0)
    ref = _run(folder, lora, tmp_path / "ref")[0]
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode)
    ranks = _run(folder, dict(lora, **layout), tmp_path / "par")
    _assert_ranks_match(ref, ranks)
    for got in [ref, *ranks]:
        assert got["trainable"] and all(".lora_" in n for n in got["trainable"])
        for name, value in got["params"].items():
            if name in got["trainable"]:
                assert not torch.equal(value, got["initial"][name]), name  # it trained
            else:
                assert torch.equal(value, got["initial"][name]), name  # bit-identical base
    # B starts at zero, so the first step's loss is the base model's.
    full = _run(folder, COMMON, tmp_path / "full")[0]
    assert ref["steps"][0][0] == pytest.approx(full["steps"][0][0], rel=1e-6)


@pytest.mark.parametrize("arch,pp,dp,mode", [("gpt_neox", 2, 2, "1f1b"), ("llama", 2, 1, "gpipe")])
def test_head_on_target_rows_only_equals_every_row(tiny, tmp_path, arch, pp, dp, mode):
    """--loss-on bot runs the LM head and cross-entropy only on the rows whose label is not
    -100 (here 20 % are masked, plus each row's last position): the same losses and weights as
    the head on every row, in one process and across a layout."""
    folder = tiny[arch]
    every = _run(folder, COMMON, tmp_path / "every")[0]
    rows = _run(folder, dict(COMMON, loss_on="bot"), tmp_path / "rows")[0]
    # The head's weight gradient sums over fewer rows (the masked ones add exact zeros in the
    # full version), so BLAS rounds differently: 1e-6 absolute on weights of ~1e-1 after 3 steps.
    _assert_ranks_match(every, [rows], atol=5e-6)
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode, loss_on="bot")
    _assert_ranks_match(every, _run(folder, dict(COMMON, **layout), tmp_path / "par"), atol=5e-6)
    # Not vacuous: the rows version really ran on fewer rows.
    assert rows["rows_seen"] and all(m < n for m, n in rows["rows_seen"])


@pytest.mark.parametrize(
    "arch,pp,dp,mode,bias", [("llama", 2, 2, "1f1b", "none"), ("gpt_neox", 2, 1, "gpipe", "all")]
)
def test_qlora_on_cpu_ranks_equal_one_process(tiny, tmp_path, arch, pp, dp, mode, bias):
    """QLoRA (NF4 base, bitsandbytes' CPU path): quantization is per linear and deterministic,
    so every layout equals one process; the packed 4-bit base stays bit-identical. With
    `--lora-bias all` the (unquantized) biases of the 4-bit linears train too."""
    folder = tiny[arch]
    qlora = dict(COMMON, lora_r=4, lora_dropout=0.0, load_in_4bit=True, lora_bias=bias)
    ref = _run(folder, qlora, tmp_path / "ref")[0]
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode)
    ranks = _run(folder, dict(qlora, **layout), tmp_path / "par")
    _assert_ranks_match(ref, ranks)
    packed = [n for n, v in ref["params"].items() if v.dtype == torch.uint8]
    assert packed, "no NF4 weights"
    biases = [n for n in ref["trainable"] if n.endswith(".bias")]
    assert bool(biases) == (bias == "all"), biases
    for name in biases:  # trained, so moved
        assert not torch.equal(ref["params"][name], ref["initial"][name]), name
    for got in [ref, *ranks]:
        for name, value in got["params"].items():
            if name not in got["trainable"]:
                assert torch.equal(value, got["initial"][name]), name
    # The 4-bit model differs from the full-precision one (it is quantized) but not by much.
    lora = _run(folder, dict(COMMON, lora_r=4, lora_dropout=0.0), tmp_path / "lora")[0]
    q_loss, f_loss = ref["steps"][0][0], lora["steps"][0][0]
    assert q_loss != f_loss and abs(q_loss - f_loss) < 0.05 * f_loss


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_bf16_matches_cpu_fp32(tiny, tmp_path):
    """The engine's CUDA path: bf16 weights with fp32 masters on one GPU follow the fp32 CPU run
    (bf16's 8-bit mantissa bounds the agreement)."""
    folder = tiny["gpt_neox"]
    shape = read_model_shape(folder)
    losses = {}
    for device, precision in (("cpu", {}), ("cuda", {"bf16": True})):
        config = config_with_defaults(
            shape, batch_size=BATCH, micro_batch_size=2, lr=1e-3, total_steps=10, **precision
        )
        dtype = torch.bfloat16 if precision else torch.float32
        stage = StageModel.from_sharded(folder, range(shape.num_layers), True, True, dtype=dtype)
        stage.to(device)
        engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=torch.device(device))
        losses[device] = [engine.train_step([b]).loss for b in _batches(shape.vocab_size, 7)]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-2)
