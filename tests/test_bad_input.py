"""Every script refuses bad input the way the README promises: exit code 2, exactly one line on
stderr, no traceback, and nothing new (or changed) at the output location.

One table, `CASES`, covers every script under data/, pretrained/, tools/, training/,
inference/, retrieval/ and evaluation/ (once it exists). To cover a new script, append rows: `Case(script, args, needles)`; `{w}` in an argument is the case's own empty work folder
(outputs go there, and it must be unchanged afterwards), `{name}` a fixture path from
`FIXTURE_PATHS` (inputs, shared read-only). `files` pre-creates paths in the work folder.

The cases run as real subprocesses, a few at a time in a thread pool (most fail before torch
is imported, in well under a second), once per session; each parametrized test then checks
one result, so a failure names its case.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = 3  # subprocesses at a time: most are I/O and import bound


@dataclass(frozen=True)
class Case:
    script: str
    args: tuple[str, ...]
    needles: tuple[str, ...] = ()  # words the one stderr line must contain
    env: tuple[tuple[str, str], ...] = ()
    stdin: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (path in {w}, content; "/" = a folder)
    code: int = 2

    def id(self, index: int) -> str:
        short = "/".join(self.script.split("/")[-2:]).removesuffix(".py")
        if self.script == TRAIN:  # the shared tiny-run flags say nothing about the case
            args = self.args[len(T) :] if self.args[: len(T)] == T else self.args
        else:
            args = self.args
        text = " ".join((short, *args)).replace("{", "").replace("}", "")
        return f"{index:03d} {text[:70]}"


def C(script: str, *args: str, needles=(), env=None, stdin=None, files=None, code=2) -> Case:
    return Case(
        script,
        tuple(args),
        tuple([needles] if isinstance(needles, str) else needles),
        tuple((env or {}).items()),
        stdin,
        tuple((files or {}).items()),
        code,
    )


TRAIN = "training/dist_clm_train.py"
BOT = "inference/bot.py"
BUILD = "retrieval/build_index.py"
SEARCH = "retrieval/search.py"


def _converters(direction: str) -> list[str]:
    """Every architecture's conversion CLI for `direction`: the upstream per-architecture
    aliases that exist (registry order: [0] gptneox, [2] llama), then the generic script, which
    reads the architecture from its input and so converts every registered one."""
    from openchatkit.models.registry import architecture_names

    aliases = [f"tools/convert_{direction}_{a}.py" for a in architecture_names()]
    return [s for s in aliases if (REPO / s).is_file()] + [f"tools/convert_{direction}.py"]


TO_HF = _converters("to_hf")
FROM_HF = _converters("from_hf")
# The cases below pick the gptneox alias as TO_HF[0] / FROM_HF[0] (the wrong one for the llama
# fixture) and the llama alias as [2].
# A layer-sharded manifest of an architecture the registry does not know.
BERT_MANIFEST = json.dumps(
    {"format": "openchatkit-layer-sharded", "version": 1, "architecture": "bert",
     "num_layers": 1, "dtype": "float32", "tie_word_embeddings": False}
)  # fmt: skip
assert [s.rsplit("_", 1)[-1] for s in TO_HF[:3] + FROM_HF[:3]] == ["gptneox.py", "gptj.py",
                                                                  "llama.py"] * 2  # fmt: skip
PREPARE = sorted(str(p.relative_to(REPO)) for p in REPO.glob("pretrained/*/prepare.py"))
DOWNLOADS = ["data/OIG/prepare.py", "data/OIG-chip2/prepare.py", "data/OIG-moderation/prepare.py"]
WIKI = "data/wikipedia-3sentence-level-retrieval-index/prepare.py"
GENERATE = "data/OIG-sample/generate.py"
MOD_SAMPLE = "data/moderation-sample/generate.py"
PLOT = "tools/plot_metrics.py"
EXPORT = "tools/export_lora.py"
MERGE = "tools/merge_lora.py"
BENCH = "benchmarks/bench_model_load.py"
LAUNCH = "training/launch.py"
PLAN = "training/plan.py"
MODERATE = "inference/moderate.py"
MOD_TRAIN = "training/train_moderation_classifier.py"
EVAL = "evaluation/eval.py"
COMPARE = "evaluation/compare.py"

# The trainer's required flags on the tiny model, and a tiny valid run's shape.
T = ("--model-name", "{sharded}", "--task-name", "{train}", "--device", "cpu", "--seq-length")
T = (*T, "32", "--batch-size", "4", "--total-steps", "2", "--checkpoint-path", "{w}/ck")


def train(*extra: str, **kw) -> Case:
    return C(TRAIN, *T, *extra, **kw)


LOCK_HELD = json.dumps(
    {"host": os.uname().nodename, "pid": os.getpid(), "start_time": time.time(), "started": "now"}
)

CASES: list[Case] = [
    # -- training/dist_clm_train.py: flags, data specs, outputs, tokenizer, lock --------------
    # More of the trainer's flag checks run in-process in tests/training/test_training_bad_input.py
    # (the same assertions through main(argv)); the rows here prove the contract for the script.
    # Found mid-stream, after the start-up lines (INFO logs, which WARNING level leaves out).
    train(
        "--strict-data",
        "--task-name",
        "{notjson}",
        needles=("notjson.jsonl:1", "--strict-data"),
        env={"OPENCHATKIT_LOG_LEVEL": "WARNING"},
    ),
    train("--bogus", needles="unrecognized arguments: --bogus"),
    train("--seq-length", "x", needles="--seq-length"),
    train("--evaluation-steps", "1", needles="--evaluation-data"),
    train(
        "--evaluation-steps",
        "1",
        "--evaluation-data",
        "{w}/missing.jsonl",
        needles=("--evaluation-data", "missing.jsonl"),
    ),
    train(
        "--evaluation-steps",
        "1",
        "--evaluation-data",
        "{empty}",
        needles=("--evaluation-data", "empty"),
    ),
    train("--evaluation-steps", "1", "--evaluation-data", "{train}:x", needles="--evaluation-data"),
    train("--task-name", "{w}/nope.jsonl", needles=("--task-name", "nope.jsonl")),
    train("--task-name", "{empty}", needles=("--task-name", "empty")),
    train("--task-name", "{train}:-1", needles="weight"),
    train("--task-name", "{train},", needles="empty entry"),
    train("--task-name", "{text_file}", needles=".jsonl"),
    train("--task-name", "{train}:0", needles="sum to zero"),
    train("--checkpoint-path", "{w}/file", files={"file": "x"}, needles="not a folder"),
    train("--checkpoint-path", "{w}/file/sub", files={"file": "x"}, needles="not a folder"),
    train("--tokenizer-name", "{w}/no-tokenizer", needles=("--tokenizer-name", "no such folder")),
    train("--tokenizer-name", "{w}", needles=("--tokenizer-name", "no tokenizer files")),
    train("--tokenizer-name", "nobody/no-such-tokenizer", needles=("--tokenizer-name", "cached")),
    train(
        "--checkpoint-path",
        "{w}/held",
        files={"held/.lock": LOCK_HELD},
        needles=("in use by another run", f"pid {os.getpid()}"),
    ),
    C(TRAIN, "--model-name", "{w}", "--task-name", "{train}", needles="config.json"),
    C(TRAIN, "--task-name", "{train}", needles="--model-name"),
    train("--pipeline-group-size", "9", needles="4 layers"),
    train("--load-pretrained-model", "maybe", needles="--load-pretrained-model"),
    train("--lora-r", "-1", needles="--lora-r"),
    train("--lora-r", "4", "--lora-dropout", "1", needles="--lora-dropout"),
    train("--checkpoint-path", "/sys/openchatkit-bad-input/ck", needles="cannot write"),
    # -- training/plan.py ------------------------------------------------------------------------
    C(PLAN, "--recipe", "{w}/nope.sh", needles=("--recipe", "no such file")),
    C(PLAN, "--model-name", "{w}/nope", "--task-name", "x", needles="--model-name"),
    C(
        PLAN,
        "--model-name",
        "{sharded}",
        "--task-name",
        "x",
        "--gpu-memory",
        "-1",
        needles="--gpu-memory",
    ),  # fmt: skip
    C(PLAN, "--model-name", "{sharded}", "--task-name", "x", "--bogus", needles="--bogus"),
    # -- training/launch.py ------------------------------------------------------------------
    C(LAUNCH, "--nproc", "0", "--device", "cpu", "--", TRAIN, needles="--nproc"),
    C(LAUNCH, "--nproc", "1", "--device", "cpu", "--", "{w}/none.py", needles="none.py"),
    C(LAUNCH, "--nproc", "1", "--device", "tpu", "--", TRAIN, needles="--device"),
    C(LAUNCH, "--nproc", "1", "--device", "cpu", "--", needles="script"),
    # -- tools/convert_to_hf_*.py ------------------------------------------------------------
    *[
        C(s, "--ckpt-path", "{w}/nope", "--save-path", "{w}/out", needles="does not exist")
        for s in TO_HF
    ],  # fmt: skip
    *[
        C(
            s,
            "--ckpt-path",
            "{sharded}",
            "--save-path",
            "{w}/f/out",
            files={"f": "x"},
            needles="not a folder",
        )
        for s in TO_HF
    ],  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "{w}/f",
        files={"f": "x"},
        needles="not a folder",
    ),  # fmt: skip
    C(TO_HF[0], "--ckpt-path", "{sharded}", "--save-path", "{w}/out", needles="llama"),
    C(
        TO_HF[-1],
        "--ckpt-path",
        "{w}/s",
        "--save-path",
        "{w}/out",
        files={"s/manifest.json": BERT_MANIFEST},
        needles=("--ckpt-path", "'bert'"),
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "/sys/openchatkit-bad-input/o",
        needles="cannot write",
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{ckpt_no_manifest}",
        "--save-path",
        "{w}/out",
        needles="manifest.json is missing",
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{ckpt_truncated}",
        "--save-path",
        "{w}/out",
        needles=("layer_00001.safetensors", "bytes"),
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "{w}/out",
        "--n-stages",
        "3",
        needles="--n-stages 3",
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "{w}/out",
        "--n-stages",
        "0",
        needles="--n-stages",
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "{w}/out",
        "--fp16",
        "--dtype",
        "bf16",
        needles="not allowed with",
    ),  # fmt: skip
    C(
        TO_HF[2],
        "--ckpt-path",
        "{sharded}",
        "--save-path",
        "{w}/out",
        files={"out/x": "1"},
        needles="--overwrite",
    ),  # fmt: skip
    C(TO_HF[2], "--ckpt-path", "{sharded}", needles="--save-path"),
    # -- tools/export_lora.py, tools/merge_lora.py ------------------------------------------
    C(EXPORT, "--ckpt-path", "{w}/nope", "--save-path", "{w}/out", needles="not a folder"),
    C(EXPORT, "--ckpt-path", "{ckpt_root}", "--save-path", "{w}/out", needles="adapter.json"),
    C(
        MERGE, "--base", "{w}/nope", "--adapter", "{w}", "--save-path", "{w}/out", needles="--base"
    ),  # fmt: skip
    C(
        MERGE,
        "--base",
        "{hf}",
        "--adapter",
        "{w}",
        "--save-path",
        "{w}/out",
        needles=("--adapter", "adapter_config.json"),
    ),  # fmt: skip
    C(
        MERGE,
        "--base",
        "{hf}",
        "--adapter",
        "{hf}",
        "--save-path",
        "{w}/f/o",
        files={"f": "x"},
        needles="not a folder",
    ),  # fmt: skip
    # -- tools/convert_from_hf_*.py ----------------------------------------------------------
    *[
        C(s, "--model-name", "{w}/nope", "--save-path", "{w}/out", needles="--model-name")
        for s in FROM_HF
    ],  # fmt: skip
    C(
        FROM_HF[2],
        "--model-name",
        "{hf}",
        "--save-path",
        "{w}/f/out",
        files={"f": "x"},
        needles="not a folder",
    ),  # fmt: skip
    C(FROM_HF[0], "--model-name", "{hf}", "--save-path", "{w}/out", needles="llama"),
    C(
        FROM_HF[-1],
        "--model-name",
        "{w}/m",
        "--save-path",
        "{w}/out",
        files={"m/config.json": '{"model_type": "bert"}'},
        needles=("--model-name", "'bert'"),
    ),  # fmt: skip
    C(
        FROM_HF[2],
        "--model-name",
        "{sharded}",
        "--save-path",
        "{w}/out",
        "--dtype",
        "int4",
        needles="--dtype",
    ),  # fmt: skip
    C(
        FROM_HF[2],
        "--model-name",
        "{hf}",
        "--save-path",
        "{w}/a",
        "--save-dir",
        "{w}/b",
        needles="not allowed with",
    ),  # fmt: skip
    C(
        FROM_HF[2],
        "--model-name",
        "nobody/no-such-model",
        "--save-path",
        "{w}/out",
        needles="nobody/no-such-model",
    ),  # fmt: skip
    # -- pretrained/*/prepare.py -------------------------------------------------------------
    *[C(s, "--save-dir", "{w}/f", files={"f": "x"}, needles="not a folder") for s in PREPARE],
    C(PREPARE[0], "--dtype", "int4", needles="--dtype"),
    C(PREPARE[-1], "--save-dir", "/sys/openchatkit-bad-input", needles="cannot write"),
    C(PLOT, "{metrics}", "--output", "/sys/openchatkit-bad-input.png", needles="cannot write"),
    C(PREPARE[0], "--model-name", "{w}/nope", "--save-dir", "{w}/out", needles="--model-name"),
    # -- tools/plot_metrics.py, benchmarks/bench_model_load.py --------------------------------
    C(PLOT, "{w}", needles="no metrics.jsonl"),
    C(PLOT, "{w}", files={"metrics.jsonl": "\udcff\udcfe binary"}, needles="not a text file"),
    C(PLOT, "{w}", files={"metrics.jsonl": "{not json\n"}, needles="not a JSON line"),
    C(PLOT, "{w}", files={"metrics.jsonl": "[1, 2]\n"}, needles="not a metrics record"),
    C(PLOT, "{w}", files={"metrics.jsonl": '{"step": 1, "loss": 2}\n'}, needles="lr"),
    C(PLOT, "{w}", files={"metrics.jsonl": ""}, needles="no training steps"),
    C(PLOT, "{metrics}", "--output", "{w}/plot.txt", needles=".png"),
    C(PLOT, "{metrics}", "--output", "{w}/f/plot.png", files={"f": "x"}, needles="not a folder"),
    C(BENCH, "--repeats", "0", needles="--repeats"),
    C(BENCH, "--n-stages", "0", needles="--n-stages"),
    C(
        BENCH,
        "--model-name",
        "{hf}",
        "--n-stages",
        "9",
        "--work-dir",
        "{w}/work",
        needles="--n-stages 9",
    ),  # fmt: skip
    C(BENCH, "--work-dir", "{w}/f", files={"f": "x"}, needles="--work-dir"),
    # -- data/ ---------------------------------------------------------------------------------
    C(GENERATE, "--out", "{w}/f", files={"f": "x"}, needles=("--out", "not a folder")),
    C(GENERATE, "--out", "{w}/f/sub", files={"f": "x"}, needles=("--out", "not a folder")),
    C(GENERATE, "--bogus", needles="--bogus"),
    C(MOD_SAMPLE, "--out", "{w}/f", files={"f": "x"}, needles=("--out", "not a folder")),
    C(MOD_SAMPLE, "--out", "{w}/f/sub", files={"f": "x"}, needles=("--out", "not a folder")),
    C(MOD_SAMPLE, "--bogus", needles="--bogus"),
    C(GENERATE, "--out", "/sys/openchatkit-bad-input", needles=("--out", "cannot write")),
    *[C(s, "--dest", "{w}/out", needles="HF_HUB_OFFLINE") for s in DOWNLOADS],
    C(DOWNLOADS[0], "--dest", "{w}/out", "--files", "", needles="--files"),
    C(WIKI, "--output", "{w}/out", "--skip-embedder", needles="offline"),
    C(WIKI, "--bogus", needles="--bogus"),
    # -- retrieval/ ------------------------------------------------------------------------------
    C(BUILD, "--input", "{w}/nope", "--output", "{w}/idx", needles="nope"),
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "/sys/openchatkit-bad-input/idx",
        needles=("--output", "cannot write"),
    ),  # fmt: skip
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "{w}/f/idx",
        files={"f": "x"},
        needles="not a folder",
    ),  # fmt: skip
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "{w}/idx",
        files={"idx/x": "1"},
        needles="--overwrite",
    ),  # fmt: skip
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "{w}/idx",
        "--chunk-sentences",
        "0",
        needles="--chunk-sentences",
    ),  # fmt: skip
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "{w}/idx",
        "--batch-size",
        "0",
        needles="--batch-size",
    ),  # fmt: skip
    C(
        BUILD,
        "--input",
        "{corpus}",
        "--output",
        "{w}/idx",
        "--index-type",
        "ivfpq",
        needles="ivfpq",
    ),  # fmt: skip
    C(BUILD, "--input", "{empty}", "--output", "{w}/idx", needles="empty"),
    C(SEARCH, "{w}/nope", "query", needles="no such index folder"),
    C(SEARCH, "{w}", "  ", needles="query is empty"),
    C(SEARCH, "{w}", "query", "-k", "0", needles="-k"),
    C(SEARCH, "{w}", "query", needles="{w}"),
    C(SEARCH, "{w}", "query", "--merge-window", "-1", needles="--merge-window"),
    # -- evaluation/ ----------------------------------------------------------------------------
    C(EVAL, "--bogus", needles="--bogus"),
    C(EVAL, "--model", "{w}/nope", needles=("--model", "does not exist")),
    C(
        EVAL,
        "--model",
        "{hf}",
        "--tasks",
        "nosuchtask",
        "--output",
        "{w}/out",
        needles=("--tasks", "nosuchtask"),
    ),  # fmt: skip
    C(EVAL, "--model", "{hf}", "--output", "{w}/f/x", files={"f": "x"}, needles="--output"),
    C(COMPARE, "{w}/nope.json", needles="does not exist"),
    C(COMPARE, "{w}/r.json", files={"r.json": "\udcff\udcfe"}, needles="cannot read"),
    C(COMPARE, "{w}/r.json", files={"r.json": "{not json"}, needles="cannot read"),
    # -- inference/moderate.py ----------------------------------------------------------------
    C(MODERATE, needles="exactly one of"),
    C(MODERATE, "hi", "--model", "{w}/nope", needles=("--model", "does not exist")),
    C(MODERATE, "hi", "--model", "{w}/f", files={"f": "x"}, needles="is a file"),
    C(MODERATE, "--input", "{w}/nope.jsonl", "--model", "{hf}", needles=("--input", "no such")),
    C(MODERATE, "hi", "--batch-size", "0", needles="--batch-size"),
    C(
        MODERATE,
        "hi",
        "--model",
        "{w}/m",
        "--examples",
        "{w}/m/moderation_classifier.json",
        files={"m/moderation_classifier.json": "{}"},
        needles=("--examples", "encoder"),
    ),
    C(
        MODERATE,
        "hi",
        "--model",
        "{w}/m",
        files={"m/moderation_classifier.json": "{not json"},
        needles=("moderation_classifier.json", "cannot read"),
    ),
    # -- training/train_moderation_classifier.py (the encoder moderation kind) ------------------
    C(MOD_TRAIN, needles="--output"),
    C(
        MOD_TRAIN,
        "--output",
        "{w}/out",
        "--train",
        "{w}/nope.jsonl",
        needles=("--train", "no such"),
    ),
    C(MOD_TRAIN, "--output", "{w}/out", "--valid", "{notjson}", needles=("--valid", "bad line")),
    C(MOD_TRAIN, "--output", "{w}/out", "--c", "0", needles="--c"),
    C(MOD_TRAIN, "--output", "{w}/f", files={"f": "x"}, needles=("output", "not a folder")),
    # -- inference/bot.py ------------------------------------------------------------------------
    C(BOT, "--max-tokens", "0", needles="--max-tokens"),
    C(BOT, "--temperature", "-1", needles="--temperature"),
    C(BOT, "--top-p", "2", needles="--top-p"),
    C(BOT, "--top-k", "-1", needles="--top-k"),
    C(BOT, "--retrieval-k", "0", needles="--retrieval-k"),
    C(BOT, "--model", "{w}/nope", needles="does not exist"),
    C(BOT, "--model", "{w}/f", files={"f": "x"}, needles="is a file"),
    C(BOT, "--model", "{w}", needles="config.json"),
    # A layer-sharded folder or trainer checkpoint loads in memory (tests/inference/
    # test_bot_any_model.py); a damaged one, or one with a flag that needs HF files, is refused.
    C(BOT, "--model", "{ckpt_truncated}", needles="incomplete trainer checkpoint"),
    C(BOT, "--model", "{ckpt_root}", "-g", "0:10", needles=("-g/--gpu-vram", "convert_to_hf")),
    C(BOT, "--model", "{hf_truncated}", "--prompt", "hi", needles="truncated"),
    C(BOT, "--model", "not a hub id!", needles="--model"),
    C(BOT, "--model", "nobody/no-such-model", needles="HF_HUB_OFFLINE"),
    C(BOT, "--model", "{hf}", "--retrieval", "{w}/nope", needles="--retrieval"),
    C(BOT, "--model", "{hf}", "-g", "0:10", needles="GPU"),
    C(BOT, "--model", "{hf}", "--load-in-8bit", needles="--load-in-8bit"),
    C(BOT, "--model", "{hf}", "--device", "cuda", needles="--device cuda"),
    C(BOT, "--model", "{hf}", "--adapter", "{w}", needles=("--adapter", "adapter_config.json")),
    # -- inference/serve.py, tools/export_gguf.py, training/simulate.py ------------------------
    C("inference/serve.py", "--port", "99999", needles="--port"),
    C("inference/serve.py", "--model", "{w}/nope", needles="--model"),
    C("inference/serve.py", "--model", "{hf}", "--moderation", "{w}/nope", needles="--moderation"),
    C("inference/serve.py", "--model", "{hf}", "--retrieval", "{w}/nope", needles="--retrieval"),
    C(
        "tools/export_gguf.py",
        "--model",
        "{hf}",
        "--out",
        "{w}/x.gguf",
        "--outtype",
        "q9_9",
        needles="--outtype",
    ),
    C("tools/export_gguf.py", "--model", "{w}/nope", "--out", "{w}/x.gguf", needles="--model"),
    C("training/simulate.py", "--recipe", "{w}/nope.sh", needles="--recipe"),
]

# Scripts the table must cover: every script under these folders.
COVERED_FOLDERS = (
    "data",
    "pretrained",
    "tools",
    "training",
    "inference",
    "retrieval",
    "evaluation",
)


def _fixtures(root: Path) -> dict[str, Path]:
    """Tiny inputs every case may read: a tiny HF llama (char tokenizer), its layer-sharded
    form, damaged copies, trainer-like checkpoints, data files, a metrics file."""
    import shutil

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from openchatkit.models.convert import convert_hf_to_sharded

    chars = "abcdefghijklmnopqrstuvwxyz :<>\n"
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    hf = root / "hf"
    LlamaForCausalLM(config).save_pretrained(hf)
    fast.save_pretrained(hf)
    sharded = root / "sharded"
    convert_hf_to_sharded(hf, sharded, "llama")
    truncated = root / "hf_truncated"
    shutil.copytree(hf, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    # Trainer-like checkpoints: a layer-sharded folder with meta.json listing file sizes.
    ckpt_root = root / "ckpt"
    good = ckpt_root / "checkpoint_2"
    shutil.copytree(sharded, good)
    files = {p.name: {"size": p.stat().st_size} for p in good.iterdir() if p.is_file()}
    (good / "meta.json").write_text(json.dumps({"format_version": 1, "step": 2, "files": files}))
    (ckpt_root / "latest").write_text("checkpoint_2\n")
    no_manifest = root / "ckpt_no_manifest"
    shutil.copytree(good, no_manifest)
    (no_manifest / "manifest.json").unlink()
    ckpt_truncated = root / "ckpt_truncated"
    shutil.copytree(good, ckpt_truncated)
    with open(ckpt_truncated / "layer_00001.safetensors", "r+b") as f:
        f.truncate(64)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"<human>: hi {i}\n<bot>: yes"}) + "\n" for i in range(20))
    )
    (data / "notjson.jsonl").write_text("not json\n" + (data / "train.jsonl").read_text())
    (data / "empty.jsonl").write_text("")
    (data / "notes.txt").write_text("plain text")
    (root / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 5.0})
        + "\n"
    )
    return {
        "hf": hf,
        "sharded": sharded,
        "hf_truncated": truncated,
        "ckpt_root": ckpt_root,
        "ckpt_no_manifest": no_manifest,
        "ckpt_truncated": ckpt_truncated,
        "train": data / "train.jsonl",
        "notjson": data / "notjson.jsonl",
        "empty": data / "empty.jsonl",
        "text_file": data / "notes.txt",
        "metrics": root / "metrics.jsonl",
        "corpus": REPO / "retrieval" / "sample-corpus",
    }


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: what 'nothing changed' compares."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def _run_case(case: Case, index: int, root: Path, paths: dict[str, Path], home: Path) -> dict:
    work = root / "cases" / f"{index:03d}"
    work.mkdir(parents=True)
    for rel, content in case.files:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if content == "/":
            target.mkdir()
        else:
            target.write_bytes(content.encode("utf-8", "surrogateescape"))
    names = {k: str(v) for k, v in paths.items()}
    args = [a.format(w=work, **names) for a in case.args]
    needles = [n.format(w=work, **names) for n in case.needles]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OPENCHATKIT_HOME": str(home),  # never convert the embedded model into the checkout
        "CUDA_VISIBLE_DEVICES": "",
        **dict(case.env),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    before = snapshot(work)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, case.script, *args],
        cwd=REPO,
        env=env,
        input=case.stdin if case.stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=180,
    )
    return {
        "proc": proc,
        "needles": needles,
        "before": before,
        "after": snapshot(work),
        "seconds": time.monotonic() - t0,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("bad_input")
    paths = _fixtures(root / "fixtures")
    home = root / "home"
    home.mkdir()
    inputs_before = snapshot(root / "fixtures")
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            i: pool.submit(_run_case, case, i, root, paths, home) for i, case in enumerate(CASES)
        }
        out = {i: f.result() for i, f in futures.items()}
    if os.environ.get("BAD_INPUT_TIMINGS"):  # where the time goes: the slowest cases
        slow = sorted(out, key=lambda i: -out[i]["seconds"])[:15]
        for i in slow:
            print(f"{out[i]['seconds']:6.1f} s  {CASES[i].id(i)}", file=sys.stderr)
    # No case may have written into the shared inputs (e.g. a converter into its source).
    assert snapshot(root / "fixtures") == inputs_before
    assert snapshot(home) == {}
    return out


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.id(i) for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_leaves_nothing(results, index):
    case, result = CASES[index], results[index]
    proc = result["proc"]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == case.code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in result["needles"]:
        assert needle in lines[0], lines[0]
    assert result["after"] == result["before"], "the case left or changed files at its output"


def test_the_table_covers_every_script_with_80_cases():
    scripts = {
        str(p.relative_to(REPO))
        for folder in COVERED_FOLDERS
        for p in (REPO / folder).rglob("*.py")
        # A script runs as one (a data generator's content module is imported, not run).
        if p.is_file() and '__name__ == "__main__"' in p.read_text()
    }
    covered = {c.script for c in CASES}
    assert scripts - covered == set(), f"scripts without a bad-input case: {scripts - covered}"
    assert len(CASES) >= 80
