"""inference/bot.py on the embedded SmolLM2 model (greedy): piped turns, --prompt and --retrieval
run the way a user runs them (a subprocess each); the cases where what is checked is not the
process (the decoding defaults, the answer without an index) through `main(argv)` in this
process, with stdin fed from a string."""

from __future__ import annotations

import io
import json
import sys

import pytest

BOT = "inference/bot.py"


@pytest.fixture
def run_bot(cli):
    """run_bot(args, stdin="", env_extra=None, timeout=300): the bot as a user runs it."""

    def run_bot(args, stdin="", env_extra=None, timeout=300):
        # One BLAS thread, as under `make test`: two threads spin against the other pytest worker.
        env = cli.user_env(**(env_extra or {}))
        return cli.run(BOT, *args, env=env, stdin=stdin, timeout=timeout)

    return run_bot


@pytest.fixture
def bot_in_process(in_process, monkeypatch):
    """bot_in_process(args, stdin=""): the bot's main(argv) in this process reading `stdin` as
    from a pipe (not a terminal; TextIOWrapper, which the bot reconfigures, as sys.stdin is)."""

    def call(args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        return in_process(BOT, *args, log_level="WARNING")

    return call


def test_capital_of_france_piped(tmp_path, run_bot):
    saved = tmp_path / "chat.json"
    script = (
        "What is the capital of France?\n"
        "\n"
        f"/save {saved}\n"
        "/reset\n"
        "/raw_prompt\n"
        f"/load {saved}\n"
        "/raw_prompt\n"
        "/quit\n"
        "this line is never read\n"
    )
    proc = run_bot(["--no-sample", "--max-tokens", "24"], stdin=script)
    assert proc.returncode == 0, proc.stderr
    answer, raw_after_load = proc.stdout.split("<|im_start|>system", 1)
    assert "Paris" in answer
    # After /reset the conversation is empty; after /load the saved turn is back.
    assert "(the conversation is empty)" in proc.stderr
    assert "What is the capital of France?" in raw_after_load and "Paris" in raw_after_load
    record = json.loads(saved.read_text())
    assert record["model"] == "SmolLM2-135M-Instruct"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert "tokens/s" in proc.stderr and "never read" not in proc.stdout


def test_prompt_flag_one_answer_no_stream(run_bot):
    proc = run_bot(
        [
            "--prompt",
            "What is the capital of France?",
            "--no-sample",
            "--no-stream",
            "--max-tokens",
            "16",
            "--dtype",
            "bfloat16",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


# The bot's other bad-input cases (a missing model folder or one without config.json, an
# unknown hub id offline, --temperature, --device cuda, --load-in-8bit, a missing --retrieval
# index) are rows of tests/test_bad_input.py, run as subprocesses; these two are not.
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--no-such-flag"], ["--no-such-flag"]),
        (["-g", "0-10"], ["-g/--gpu-vram"]),
    ],
)
def test_bad_input_exit_2(args, needles, in_process, cli):
    proc = in_process(BOT, *args, "--prompt", "hi", log_level="WARNING")
    cli.assert_one_line_error(proc, *needles, usage_first=True)


def test_retrieval_answers_from_made_up_corpus(tmp_path, run_bot, bot_in_process, in_process):
    index = tmp_path / "index"
    # The index is built in this process: build_index.py as a subprocess is
    # tests/retrieval/test_retrieval_cli.py's `cli_index`.
    build = in_process(
        "retrieval/build_index.py",
        "--input",
        "retrieval/sample-corpus",
        "--output",
        index,
        "--no-progress",
    )
    assert build.returncode == 0, build.stderr
    script = "Who is the chief executive of Brindlewick Cartography?\n/context\n/quit\n"
    proc = run_bot(["--retrieval", str(index), "--no-sample", "--max-tokens", "40"], stdin=script)
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.split("[1] score")[0]
    assert "Ignatius Pell" in answer
    assert "Brindlewick" in proc.stdout.split("[1] score")[1]  # /context lists the passage
    # Without the index the model cannot know the made-up name.
    plain = bot_in_process(
        ["--no-sample", "--max-tokens", "40"], stdin=script.replace("/context\n", "")
    )
    assert plain.returncode == 0, plain.stderr
    assert "Ignatius Pell" not in plain.stdout


def test_decoding_defaults_from_generation_config_then_flags(bot_in_process):
    # The embedded model's generation_config.json asks for greedy decoding; flags override it.
    proc = bot_in_process([], stdin="/hyperparameters\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "sample = False" in proc.stdout and "temperature = 0.6" in proc.stdout
    proc = bot_in_process(["--sample", "--temperature", "0.3"], stdin="/hyperparameters\n")
    assert "sample = True" in proc.stdout and "temperature = 0.3" in proc.stdout
