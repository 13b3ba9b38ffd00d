"""Fixtures for the trainer tests: tiny random models in layer-sharded form, a tiny BPE tokenizer,
chat data, and helpers to run the trainer as a user does (subprocesses, `training/launch.py`),
or a script's main(argv) in this process where the process itself is not what a test checks
(`main_in_this_process`, `train_here`: no interpreter start, ~8 CPU-s less a run).
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "training" / "dist_clm_train.py"
LAUNCH = REPO / "training" / "launch.py"
WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree sun moon".split()


def chat_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        human = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        bot = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        out.append(f"<human>: {human}\n<bot>: {bot}")
    return out


def _tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(chat_texts(200, 0), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(fast)


def _model(folder: Path, arch: str, vocab: int, tokenizer: Path) -> Path:
    import torch
    from transformers import GPTNeoXConfig, LlamaConfig

    from openchatkit.models.stage import StageModel, save_stage

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    if arch == "llama":  # tied embeddings, like SmolLM2
        config = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    else:
        config = GPTNeoXConfig(rotary_pct=0.25, tie_word_embeddings=False, **common)
    torch.manual_seed(0)
    stage = StageModel(config, range(4), True, True)
    save_stage(stage, folder, write_metadata=True, tokenizer_from=tokenizer)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """{"llama": model folder, "gpt_neox": model folder, "train": jsonl, "valid": jsonl}."""
    root = tmp_path_factory.mktemp("tiny")
    for name, n, seed in (("train", 200, 1), ("valid", 20, 2)):
        with open(root / f"{name}.jsonl", "w") as f:
            for text in chat_texts(n, seed):
                f.write(json.dumps({"text": text}) + "\n")
    vocab = _tokenizer(root / "tokenizer")
    return {
        "llama": _model(root / "llama", "llama", vocab, root / "tokenizer"),
        "gpt_neox": _model(root / "gpt_neox", "gpt_neox", vocab, root / "tokenizer"),
        "train": root / "train.jsonl",
        "valid": root / "valid.jsonl",
    }


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no torchrun variables, one BLAS thread, wandb offline."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    env.update(extra)
    return env


def train_args(tiny: dict, arch: str, ckpt: Path, **flags) -> list[str]:
    """Flags of a tiny run (4 steps, global batch 4 x 32 tokens); `flags` override/add."""
    base = {
        "model-name": tiny[arch],
        "task-name": tiny["train"],
        "seq-length": 32,
        "batch-size": 4,
        "micro-batch-size": 1,
        "total-steps": 4,
        "checkpoint-steps": 2,
        "lr": 1e-3,
        "warmup-steps": 1,
        "checkpoint-path": ckpt,
        "device": "cpu",
    }
    base.update({k.replace("_", "-"): v for k, v in flags.items()})
    out = []
    for k, v in base.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out


def run_train(
    args: list[str], nproc: int = 1, timeout: float = 300, torchrun: bool = False, **env
) -> subprocess.CompletedProcess:
    """Run the trainer like a user: directly for one process, through launch.py (or torchrun)
    for several."""
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    elif torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(_free_port()), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(LAUNCH), "--nproc", str(nproc), "--device", "cpu", "--"]
        cmd += [str(TRAIN), *args]
    return subprocess.run(
        cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_losses(ckpt: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (Path(ckpt) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            out[record["step"]] = record["loss"]
    return out


def checkpoint_tensors(folder: Path) -> dict[str, object]:
    """Every weight tensor of a checkpoint folder, by file and key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.name}:{k}"] = v
    return out


def max_weight_diff(a: Path, b: Path) -> float:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


class _OnFirstUse(dict):
    """{key: make(key)}, each made on its first lookup."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = self._make(key)
        return self[key]


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory, train_here) -> dict[str, Path]:
    """Single-process (pp=1 x dp=1) runs of the tiny models, {"llama"|"gpt_neox": checkpoint
    folder}: the ground truth. Each is run on first use (a test session that needs only one
    pays for one), in this process (`train_here`: a single-process run; the same weights and
    losses as the script started by a user)."""
    root = tmp_path_factory.mktemp("reference")

    def make(arch: str) -> Path:
        ckpt = root / arch
        r = train_here(train_args(tiny, arch, ckpt))
        assert r.returncode == 0, r.stderr[-3000:]
        return ckpt

    return _OnFirstUse(make)


def main_in_this_process(cli, script: str | Path, *args: object, env=None):
    """`script`'s main(argv) in this process (`cli.run_here`, tests/conftest.py) in the
    environment `run_train` gives a process: `env`, default `clean_env()` (no torchrun
    variables, one BLAS thread, wandb offline). A single-process trainer run starts no process
    group, and its losses and weights equal a subprocess run's bit for bit."""
    return cli.run_here(script, *args, base_env=clean_env() if env is None else env)


@pytest.fixture(scope="session")
def train_here(cli):
    """train_here(args): the trainer's main(argv) in this process, as `run_train(args)` runs it
    in one process (`main_in_this_process`)."""
    return lambda args: main_in_this_process(cli, TRAIN, *args)


@pytest.fixture(scope="session")
def tt(cli):
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(
        REPO=REPO,
        TRAIN=TRAIN,
        LAUNCH=LAUNCH,
        clean_env=clean_env,
        train_args=train_args,
        run_train=run_train,
        train_losses=train_losses,
        checkpoint_tensors=checkpoint_tensors,
        max_weight_diff=max_weight_diff,
        free_port=_free_port,
        main_here=functools.partial(main_in_this_process, cli),
    )
