"""The chat format, in one place: messages, OpenChatKit's `<human>:`/`<bot>:` markers and chat
template, prompt rendering, and fitting history to the context window. Training data
(`openchatkit/data/rendering.py`), the bot and evaluation all take the format from here.

Two prompt formats:
- the tokenizer's chat template, when it has one (SmolLM2, Llama-2-chat, RedPajama-chat HF folders);
- OpenChatKit's own format, used by the original GPT-NeoXT-Chat-Base-20B and by models fine-tuned
  here on OIG-style data:

      <human>: Hello
      <bot>: Hi! How can I help?
      <human>: What is the capital of France?
      <bot>:

  Generation stops at the next `<human>:`.

Content cannot forge a turn: `PromptFormat.render` breaks every turn marker inside a message's
text (`<human>:`, `<bot>:`, and a chat template's special tokens such as `<|im_start|>`) with a
zero-width space after its first character, so neither the text nor the tokenizer sees a marker
there. That covers what the user types, `/load`ed files, retrieved passages and model answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

HUMAN = "<human>"
BOT = "<bot>"
# The turn prefixes as they stand in the text (OIG data, prompts, the stop string).
HUMAN_PREFIX = f"{HUMAN}:"
BOT_PREFIX = f"{BOT}:"
OPENCHATKIT_STOP = HUMAN_PREFIX

# The same format as a Jinja chat template, written into HF folders of models fine-tuned on it
# (tools/convert_to_hf_*.py), so `apply_chat_template` renders exactly `render_openchatkit`.
OPENCHATKIT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '" + HUMAN_PREFIX + " ' + message['content'] + '\n' }}"
    "{% else %}{{ '" + BOT_PREFIX + " ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + BOT_PREFIX + "' }}{% endif %}"
)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ZWSP = "\u200b"  # zero-width space: breaks a marker inside content without showing


def neutralise_markers(text: str, markers: Sequence[str]) -> str:
    """`text` with each occurrence of a turn marker broken by a zero-width space after its first
    character ("<human>:" becomes "<\u200bhuman>:"), so it no longer starts a turn."""
    for marker in sorted({m for m in markers if len(m) > 1}, key=len, reverse=True):
        if marker in text:
            text = text.replace(marker, marker[0] + ZWSP + marker[1:])
    return text


def clean_text(text: str) -> str:
    """Text a tokenizer accepts: bytes that were not UTF-8 (kept by Python as lone surrogates,
    from a pipe or argv) become U+FFFD instead of failing deep inside the tokenizer."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def render_openchatkit(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Render messages in OpenChatKit's `<human>: …\\n<bot>: …` format."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n")
        elif m["role"] == "user":
            parts.append(f"{HUMAN_PREFIX} {m['content']}\n")
        else:
            parts.append(f"{BOT_PREFIX} {m['content']}\n")
    if add_generation_prompt:
        parts.append(BOT_PREFIX)
    return "".join(parts)


@dataclass
class PromptFormat:
    """How a tokenizer's model wants its prompt: chat template, or OpenChatKit's format."""

    tokenizer: object
    use_chat_template: bool

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PromptFormat:
        return cls(tokenizer, bool(getattr(tokenizer, "chat_template", None)))

    @property
    def name(self) -> str:
        return "chat template" if self.use_chat_template else "OpenChatKit <human>/<bot>"

    @property
    def stop_strings(self) -> list[str]:
        """Text that ends an answer besides EOS. Most chat templates end turns with EOS tokens;
        OpenChatKit's format (plain, or as the template of a model fine-tuned on it) has none,
        so the next `<human>:` ends the answer."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        if not self.use_chat_template or HUMAN in template:
            return [OPENCHATKIT_STOP]
        return []

    @cached_property
    def markers(self) -> list[str]:
        """Text that would start or end a turn if it stood in a message: OpenChatKit's prefixes,
        and with a chat template the tokenizer's special tokens (the tokenizer turns their text
        into the special token ids)."""
        out = [HUMAN_PREFIX, BOT_PREFIX]
        if self.use_chat_template:
            out += list(getattr(self.tokenizer, "all_special_tokens", []) or [])
            decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
            out += [t.content for t in decoder.values() if getattr(t, "special", False)]
        return out

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; markers inside their content are neutralised."""
        markers = self.markers
        messages = [{**m, "content": neutralise_markers(m["content"], markers)} for m in messages]
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
            )
        return render_openchatkit(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        # Templates already hold their special tokens (e.g. <|im_start|>) as text.
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Split into (leading system messages, turns); a turn is a user message and what follows it."""
    system: list[Message] = []
    turns: list[list[Message]] = []
    for m in messages:
        if m["role"] == "system" and not turns:
            system.append(m)
        elif m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return system, turns


def fit_to_window(
    messages: Sequence[Message],
    count_tokens: Callable[[Sequence[Message]], int],
    budget: int,
) -> tuple[list[Message], int]:
    """Drop the oldest whole turns until the rendered prompt fits `budget` tokens.

    The system message and the newest turn are always kept. Returns (kept messages, number of
    turns dropped). If even system + newest turn exceed the budget, they are returned as they are
    and the caller decides (the bot refuses with a message).
    """
    system, turns = split_turns(messages)
    dropped = 0
    while len(turns) > 1 and count_tokens(system + [m for t in turns for m in t]) > budget:
        turns.pop(0)
        dropped += 1
    return system + [m for t in turns for m in t], dropped
