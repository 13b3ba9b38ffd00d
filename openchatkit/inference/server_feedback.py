"""Feedback from the chat page, kept as training data: one JSON line per rated answer.

A thumbs-up keeps the answer; a thumbs-down with a better answer typed by the user keeps the
correction; a thumbs-down alone is not training data and is not written. Each record is in the
kit's own chat format, so `--task-name FILE.jsonl` fine-tunes on the file as it is:
`{"text": "<human>: ...\\n<bot>: ..."}` for models in OpenChatKit's format, `{"messages": [...]}`
for models with a chat template (rendered with it at training time). The record also keeps the
rating, the model's own answer when it was corrected, the model name and the time; the trainer
ignores those fields.

Appends are atomic: each record is one `write` on a file opened with O_APPEND (POSIX appends a
single write whole, even from several processes), under a lock, then fsync'd.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from openchatkit.conversation import PromptFormat, render_openchatkit
from openchatkit.inference.server_api import bad

RATINGS = ("up", "down")


class FeedbackLog:
    """Appends rated turns to `path` in the chat format of the served model's `prompt_format`."""

    def __init__(self, path: str | Path, prompt_format: PromptFormat, model_name: str):
        self.path = Path(path)
        self.format = prompt_format
        self.model_name = model_name
        self._lock = threading.Lock()

    @staticmethod
    def check_path(path: str | Path) -> None:
        """ValueError when `path` cannot take appends: a folder, or a missing parent folder."""
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{path} is a folder; give a .jsonl file")
        if not p.parent.is_dir():
            raise ValueError(f"folder {p.parent} does not exist")
        if p.exists() and not p.is_file():
            raise ValueError(f"{path} is not a regular file")

    def record_for(self, body: object) -> dict | None:
        """The record for a feedback request body, or None when it is not training data.
        APIError(400) when the body is malformed."""
        if not isinstance(body, dict):
            raise bad("the feedback body must be a JSON object")
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
            or messages[-1]["role"] != "user"
        ):
            raise bad(
                "'messages' must be the conversation up to the rated answer, ending with the "
                "user's message",
                "messages",
            )
        answer = body.get("answer")
        if not isinstance(answer, str):
            raise bad("'answer' must be the rated answer's text", "answer")
        rating = body.get("rating")
        if rating not in RATINGS:
            raise bad("'rating' must be 'up' or 'down'", "rating")
        correction = body.get("correction")
        if correction is not None and not isinstance(correction, str):
            raise bad("'correction' must be a string", "correction")
        correction = (correction or "").strip()
        if rating == "down" and not correction:
            return None  # a bad answer with no better one: nothing to train on
        final = correction or answer.strip()
        if not final:
            return None
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        turns.append({"role": "assistant", "content": final})
        if self.format.use_chat_template:
            record: dict = {"messages": turns}
        else:
            record = {"text": render_openchatkit(turns, add_generation_prompt=False).rstrip("\n")}
        record["rating"] = rating
        if correction:
            record["original_answer"] = answer
        record["model"] = self.model_name
        record["created"] = int(time.time())
        return record

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a full disk: never leave half a record behind
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise OSError(f"short write to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)
