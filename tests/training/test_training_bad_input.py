"""Every bad-input case of `training/dist_clm_train.py` and `training/launch.py`: one line on
stderr naming the flag, exit code 2, no traceback, and no process group or file created.

The trainer's cases call its `main(argv)` in this process through `openchatkit.cli.run_main`,
as the script's `__main__` block does (the `in_process` fixture, tests/conftest.py), so each
costs no interpreter start; tests/test_bad_input.py runs the script itself as a subprocess for
the same contract. The 20B recipe's GPU check is a bash script and still runs as one."""

from __future__ import annotations

import subprocess

import pytest

# The torchrun variables a user's shell does not have (tests/training/conftest.py clean_env).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

CASES = [
    # (extra flags, environment, words the message must contain)
    (
        ["--pipeline-group-size", "2", "--data-group-size", "2"],
        {"WORLD_SIZE": "3", "RANK": "0"},
        ["--pipeline-group-size", "--data-group-size", "3"],
    ),
    (["--pipeline-group-size", "2"], {}, ["--world-size"]),
    (
        ["--num-layers", "1", "--pipeline-group-size", "2"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        ["--num-layers 1", "4 layers", "use --num-layers 2"],
    ),
    (
        ["--num-layers", "4", "--pipeline-group-size", "2"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        ["--num-layers 4", "4 layers", "use --num-layers 2"],
    ),
    (["--pipeline-group-size", "5"], {"WORLD_SIZE": "5", "RANK": "0"}, ["4 layers", "5"]),
    (["--embedding-dim", "64"], {}, ["--embedding-dim 64", "32"]),
    (
        ["--batch-size", "3", "--micro-batch-size", "2"],
        {},
        ["--batch-size 3", "--micro-batch-size 2"],
    ),
    (
        ["--batch-size", "6", "--pipeline-group-size", "2", "--data-group-size", "4"],
        {"WORLD_SIZE": "8", "RANK": "0"},
        ["--batch-size 6", "--data-group-size 4"],
    ),
    (
        ["--batch-size", "4", "--micro-batch-size", "4", "--data-group-size", "2"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        [
            "--batch-size 4",
            "--data-group-size 2",
            "2 sequences per replica",
            "--micro-batch-size 4",
        ],
    ),
    (["--fp16", "--bf16"], {}, ["--fp16", "--bf16"]),
    (
        ["--rank", "1", "--pipeline-group-size", "2"],
        {"RANK": "0", "WORLD_SIZE": "2"},
        ["--rank 1", "RANK=0"],
    ),
    (
        ["--world-size", "4", "--pipeline-group-size", "4"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        ["--world-size 4", "WORLD_SIZE=2"],
    ),
    (
        ["--dist-url", "tcp://127.0.0.1:1234"],
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "999"},
        ["--dist-url", "MASTER_PORT=999"],
    ),
    (["--dist-url", "http://x"], {}, ["--dist-url"]),
    (["--rank", "5", "--world-size", "2", "--pipeline-group-size", "2"], {}, ["--rank"]),
    (["--dp-backend", "nccl"], {}, ["--dp-backend nccl"]),
    (
        ["--pp-mode", "1f1b", "--pipeline-group-size", "4", "--batch-size", "2"],
        {"WORLD_SIZE": "4", "RANK": "0"},
        ["1f1b", "micro-batches"],
    ),
    (["--model-type", "gptj"], {}, ["--model-type gptj"]),
    (["--evaluation-steps", "2"], {}, ["--evaluation-data"]),
    (["--warmup-steps", "9", "--total-steps", "4"], {}, ["--warmup-steps"]),
    (["--total-steps", "0"], {}, ["--total-steps"]),
    (["--lr", "0"], {}, ["--lr"]),
    (["--peer-timeout", "-1"], {}, ["--peer-timeout"]),
    (["--task-name", "NOPE.jsonl"], {}, ["NOPE.jsonl"]),
    (["--task-name", "TRAIN:-1"], {}, ["-1"]),
    (["--model-name", "NOWHERE"], {}, ["--model-name", "NOWHERE"]),
]


def run_trainer(in_process, tt, *args, **env) -> subprocess.CompletedProcess:
    """The trainer's main(argv) in this process, in a user's environment plus `env`."""
    env = {
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        **env,
    }
    return in_process(tt.TRAIN, *args, env=env, unset=[k for k in TORCHRUN_VARS if k not in env])


@pytest.mark.parametrize("flags,env,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(tiny, tt, tmp_path, in_process, cli, flags, env, words):
    flags = [f.replace("TRAIN", str(tiny["train"])) for f in flags]
    args = tt.train_args(tiny, "llama", tmp_path / "ckpt")
    # later flags win with argparse, so the case's flags override the defaults
    r = run_trainer(in_process, tt, *args, *flags, **env)
    cli.assert_one_line_error(r, *words)
    assert not (tmp_path / "ckpt").exists()


def test_model_folder_without_manifest(tiny, tt, tmp_path, in_process, cli):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    args = tt.train_args(tiny, "llama", tmp_path / "ckpt", model_name=tmp_path / "hf")
    r = run_trainer(in_process, tt, *args)
    cli.assert_one_line_error(r, "manifest.json")


def test_help_lists_upstream_flags(tt, in_process):
    r = in_process(tt.TRAIN, "--help")
    assert r.returncode == 0
    for flag in (
        "--model-name",
        "--tokenizer-name",
        "--model-type",
        "--num-layers",
        "--embedding-dim",
        "--dist-url",
        "--world-size",
        "--rank",
        "--cuda-id",
        "--pipeline-group-size",
        "--data-group-size",
        "--net-interface",
        "--train-log-backend",
        "--optimizer",
        "--load-pretrained-model",
        "--task-name",
        "--checkpoint-path",
        "--checkpoint-steps",
        "--total-steps",
        "--warmup-steps",
        "--lr",
        "--seq-length",
        "--batch-size",
        "--micro-batch-size",
        "--gradient-accumulate-step",
        "--dp-backend",
        "--dp-mode",
        "--fp16",
        "--pp-mode",
        "--profiling",
        "--bf16",
        "--seed",
        "--device",
        "--evaluation-steps",
        "--evaluation-data",
        "--num-checkpoints",
        "--loss-on",
        "--project-name",
    ):
        assert flag in r.stdout, flag


def test_launcher_refuses_too_few_gpus(tt):
    """The 20B recipe needs 8 GPUs; with none visible it says so in one line (upstream failed
    with "invalid device ordinal")."""
    r = subprocess.run(
        ["bash", str(tt.REPO / "training" / "train-gpt-neox-chat-base-20b.sh")],
        env=tt.clean_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0] and "Traceback" not in r.stderr


def test_launcher_needs_nproc_on_cpu(tt, in_process, cli):
    r = in_process(tt.LAUNCH, "--device", "cpu", "--", str(tt.TRAIN), unset=TORCHRUN_VARS)
    cli.assert_one_line_error(r, "--nproc")
