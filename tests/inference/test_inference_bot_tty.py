"""The bot on a real terminal (pexpect): prompt, readline input, Ctrl-C stops one answer only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect

REPO = Path(__file__).resolve().parents[2]


def test_ctrl_c_stops_answer_and_keeps_session(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # as under make test
    child = pexpect.spawn(
        sys.executable,
        [str(REPO / "inference" / "bot.py"), "--max-tokens", "400", "--seed", "1"],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=240,
    )
    try:
        child.expect("Type /help")
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("knight.\r\n")  # the echoed input line
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact(">>> ")
        child.sendline("/hyperparameters")
        child.expect_exact("max_tokens = 400")
        child.expect_exact(">>> ")
        child.sendline("/raw_prompt")
        child.expect_exact("dragon and a knight")  # the interrupted turn stays in the history
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # readline history is written for the next session
    assert (tmp_path / ".cache" / "openchatkit" / "bot_history").is_file()
