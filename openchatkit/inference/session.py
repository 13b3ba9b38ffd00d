"""The chat session behind `inference/bot.py`: history, commands, and streaming answers.

Kept apart from the REPL loop so tests can drive a session line by line; the script only reads
lines (readline on a terminal, plain lines from a pipe) and hands them to `ChatSession.handle_line`.

The conversation survives whatever is typed or loaded: a command's error (a quoting mistake, a
file nested too deep, Ctrl-C) is one line and the session goes on. `/load` reads only regular
files of at most MAX_LOAD_BYTES, opened without blocking (a FIFO or device is refused, not read);
`/save` writes one named file, new transcripts 0600, and replaces a file only when it is a saved
chat (keeping its mode) or with `/save!`. On a terminal, text from the model, a loaded chat or a
retrieved passage is shown with control characters escaped (`openchatkit.terminal`). The saved
chat's record and its files are transcript.py's; the settings' text forms are generation.py's.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import TextIO

from openchatkit.conversation import Message, PromptFormat, clean_text, fit_to_window
from openchatkit.fileio import describe_os_error
from openchatkit.inference.generation import (
    SETTERS,
    GenerationSettings,
    GenerationStats,
    chat_backend,
    checked,
    parse_on_off,
    stream_text,
)
from openchatkit.inference.transcript import (
    MAX_LOAD_BYTES,
    NEW_TRANSCRIPT_MODE,
    SAVE_FORMAT,
    chat_record,
    is_saved_chat,
    one_path,
    read_small_file,
    validate_saved,
    write_private,
)
from openchatkit.models.loading import LoadedModel
from openchatkit.moderation import (
    CAUTION_INSTRUCTION,
    CAUTION_LABELS,
    INTERVENTION,
    REFUSAL,
    refuses,
)
from openchatkit.terminal import escape_controls, is_terminal

HELP = """\
Commands:
  /help, /?             this list
  /quit                 leave (Ctrl-D too); Ctrl-C stops an answer, not the session
  /reset                forget the conversation (keeps the system message and settings)
  /raw_say TEXT         let the model continue TEXT as is, without the chat format or history
  /raw_prompt           print the exact prompt the model gets for the conversation so far
  /hyperparameters      show the generation settings
  /set NAME VALUE       temperature, top_k, top_p, max_tokens, sample (on/off), seed (N/none),
                        verbose (on/off)
  /system TEXT          set the system message (no TEXT: remove it)
  /save FILE            save messages, settings and model name as JSON (quote a name with
                        spaces); replaces only an earlier saved chat
  /save! FILE           the same, replacing any regular file
  /load FILE            load a conversation saved with /save
With --retrieval INDEX_DIR:
  /context              show the passages retrieved for the last message, with scores
  /retrieval on|off     use the index for the next messages or not
  /set retrieval_k N    how many passages to retrieve (default 3)
With --moderation MODEL:
  /moderation on|off    classify each message and answer before replying, or not
Anything else is a message to the model."""

# At most this many tokens of retrieved context per turn; the real budget is also bounded by
# what the window leaves after the system message, the question and max_tokens.
RETRIEVAL_MAX_TOKENS = 1024


@dataclass
class TurnPlan:
    """What `ChatSession.plan_turn` decided for one user message."""

    text: str  # the user's own words (what the history keeps)
    prompt: str = ""  # the full prompt for the chat model ("" when refused)
    refused: bool = False  # moderation flagged the message: answer REFUSAL, no chat model
    dropped: int = 0  # oldest turns left out to fit the window
    prompt_tokens: int = 0
    budget: int = 0  # tokens the window leaves for the prompt after max_tokens
    too_long: str | None = None  # why the prompt does not fit, when it does not
    hits: list = field(default_factory=list)  # retrieved passages (retrieval Hit objects)


class ChatSession:
    """One conversation with a loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        stream: bool = True,
        out: TextIO | None = None,
        err: TextIO | None = None,
        retriever=None,
        retrieval_k: int = 3,
        moderator=None,
        moderation_threshold: float | None = None,
        escape: bool | None = None,
    ):
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.system = system
        self.stream = stream
        self.verbose = True
        # The streams of the call, not of the import (a default bound at import time would
        # keep writing to whatever sys.stdout was then, e.g. a closed test capture).
        out, err = out or sys.stdout, err or sys.stderr
        self.out, self.err = out, err
        # Escape control characters in shown text: on a terminal (None), always or never.
        self.escape_out = is_terminal(out) if escape is None else escape
        self.escape_err = is_terminal(err) if escape is None else escape
        self.messages: list[Message] = []  # user/assistant turns; the system message is apart
        self.format = PromptFormat.for_tokenizer(loaded.tokenizer)
        self.told_dropped = False
        self.last_stats: GenerationStats | None = None
        self.retriever = retriever  # an openchatkit.retrieval.RetrievalIndex, or None
        self.retrieval_k = retrieval_k
        self.retrieval_on = retriever is not None
        self.last_hits: list = []
        # An openchatkit.inference.moderator.Moderator, or None. A turn is refused when p(needs
        # intervention) >= moderation_threshold (None: the moderator's own threshold).
        self.moderator = moderator
        self.moderation_on = moderator is not None
        self.moderation_threshold = moderation_threshold
        self.moderation_notes: list[str] = []  # this turn's labels, for the stats line
        # The model as the decode loop drives it, keeping the KV cache between turns.
        self.chat_model = chat_backend(loaded.model, keep_cache=True)

    # ---- prompt building -------------------------------------------------------------
    def _with_system(self, messages: list[Message], extra: str | None = None) -> list[Message]:
        system = "\n\n".join(s for s in (self.system, extra) if s)
        return ([{"role": "system", "content": system}] if system else []) + messages

    def _count(self, messages) -> int:
        return self.format.count_tokens(self.format.render(messages))

    def prompt_for(
        self, messages: list[Message], extra_system: str | None = None
    ) -> tuple[str, int]:
        """The prompt for `messages` (ending with a user turn), cut to the context window;
        `extra_system` is appended to the system message for this prompt only.
        Returns (prompt text, number of old turns dropped)."""
        budget = self.loaded.context_window - self.settings.max_tokens
        messages = self._with_system(messages, extra_system)
        kept, dropped = fit_to_window(messages, self._count, budget)
        return self.format.render(kept), dropped

    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (
            getattr(self.loaded.model, "generation_config", None),
            self.loaded.tokenizer,
        ):
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return sorted(ids)

    # ---- generation --------------------------------------------------------------------
    def generate(self, prompt: str, stop_strings: list[str], review=None) -> str:
        """Stream an answer to `prompt` onto `out`; Ctrl-C stops it and keeps what was shown.
        `review(answer) -> answer` (moderation) sees the whole answer before it is shown."""
        tok = self.loaded.tokenizer
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(self.loaded.device)  # "cpu" or "cuda:N" (also with device_map offload)
        stats = GenerationStats()
        stream = self.stream and review is None
        pieces: list[str] = []
        # Whitespace is shown only once text follows it, so an answer that ends with "\n"
        # before a stop string or EOS leaves no blank line.
        held = ""
        try:
            for piece in stream_text(
                self.chat_model,
                tok,
                ids,
                self.settings,
                self.eos_token_ids(),
                stop_strings,
                stats,
            ):
                if not pieces:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                pieces.append(piece)
                body = piece.rstrip()
                if not body:
                    held += piece
                    continue
                if stream:
                    self.out.write(self.shown(held + body))
                    self.out.flush()
                held = piece[len(body) :]
        except KeyboardInterrupt:
            stats.stop_reason = "interrupted"
        answer = "".join(pieces).strip()
        if review is not None:
            answer = review(answer)
        if not stream:
            self.out.write(self.shown(answer))
        self.out.write("\n")
        self.out.flush()
        if stats.stop_reason == "interrupted":
            self.err.write("(stopped)\n")
        self.last_stats = stats
        if self.verbose:
            self.err.write(
                f"[prompt {stats.prompt_tokens} tokens, generated {stats.generated_tokens} "
                f"tokens, {stats.tokens_per_s:.1f} tokens/s{self._moderation_note()}]\n"
            )
        self.err.flush()
        return answer

    def shown(self, text: str, on_err: bool = False) -> str:
        """Text from the model, a file or an index as it may go to `out` (or `err`)."""
        return escape_controls(text) if (self.escape_err if on_err else self.escape_out) else text

    def with_context(self, text: str) -> str:
        """The user's text with retrieved passages in front of it, within the token budget:
        what the window leaves after system message, question and max_tokens, at most
        RETRIEVAL_MAX_TOKENS. Older turns then give way to the context, not the reverse."""
        from openchatkit.retrieval import CONTEXT_INSTRUCTION, format_context

        self.last_hits = self.retriever.search(text, self.retrieval_k)
        wrapped = f"\n{CONTEXT_INSTRUCTION}\n\n{text}"
        base = self._count(self._with_system([{"role": "user", "content": wrapped}]))
        budget = self.loaded.context_window - self.settings.max_tokens - base
        block = format_context(
            self.last_hits, self.loaded.tokenizer, min(RETRIEVAL_MAX_TOKENS, budget)
        )
        return f"{block}{wrapped}" if block else text

    def plan_turn(self, text: str) -> TurnPlan:
        """Everything a user turn needs before the chat model runs, without printing: moderation
        of the message, the caution note, retrieval, the prompt fitted to the window, and whether
        it fits. The REPL (`say`) and the server (openchatkit/inference/server.py) both call it.

        With retrieval on, only this turn's prompt carries the retrieved passages; the history
        keeps the user's own words, so old contexts do not crowd the window.
        """
        budget = self.loaded.context_window - self.settings.max_tokens
        label, refuse = self.moderate("user", text) or (None, False)
        if refuse:  # a fixed refusal without calling the chat model; the turn is not kept
            return TurnPlan(text=text, refused=True, budget=budget)
        # Caution labels (and an intervention label under the threshold): this turn only.
        caution = CAUTION_INSTRUCTION if label in (*CAUTION_LABELS, INTERVENTION) else None
        retrieve = bool(self.retriever and self.retrieval_on)
        content = self.with_context(text) if retrieve else text
        prompt, dropped = self.prompt_for(
            self.messages + [{"role": "user", "content": content}], extra_system=caution
        )
        plan = TurnPlan(text=text, prompt=prompt, dropped=dropped, budget=budget)
        plan.prompt_tokens = self.format.count_tokens(prompt)
        plan.hits = list(self.last_hits) if retrieve else []
        if plan.prompt_tokens > budget:
            system_alone = self._count(self._with_system([])) if self.system else 0
            if system_alone > budget // 2:
                plan.too_long = (
                    f"the system message is too long ({system_alone} tokens of the "
                    f"{budget} the window leaves after max_tokens)"
                )
            else:
                plan.too_long = "message too long for the context window"
        return plan

    def say(self, text: str) -> str | None:
        """A user turn: add it, answer it, keep the answer in the history."""
        plan = self.plan_turn(text)
        if plan.refused:
            self.out.write(REFUSAL + "\n")
            if self.verbose:
                self.err.write(f"[chat model not called{self._moderation_note()}]\n")
            return None
        if plan.dropped and not self.told_dropped:
            self.err.write(
                f"(the oldest turns no longer fit the {self.loaded.context_window}-token "
                "context window and are left out of the prompt)\n"
            )
            self.told_dropped = True
        if plan.too_long:
            hint = "shorten it with /system" if plan.too_long.startswith("the system") else None
            hint = hint or "shorten it or lower max_tokens"
            self.err.write(f"{plan.too_long}; {hint}\n")
            return None
        review = self.review_answer if self.moderator and self.moderation_on else None
        answer = self.generate(plan.prompt, self.format.stop_strings, review)
        if review is not None and answer == REFUSAL:  # the answer was flagged: turn not kept
            return answer
        if not answer and self.last_stats and self.last_stats.stop_reason == "interrupted":
            return None  # Ctrl-C before the first word: the turn is dropped, not kept empty
        self.messages = self.messages + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
        return answer

    # ---- moderation --------------------------------------------------------------------
    def moderate(self, who: str, text: str) -> tuple[str, bool] | None:
        """Classify `text` (who: "user" or "bot"): (label, refuse), or None when moderation is
        off. Refuse as `openchatkit.moderation.refuses` decides: when p(needs intervention) >=
        moderation_threshold (None: the moderator's own `threshold`, INTERVENTION_THRESHOLD for
        a causal LM moderator), whatever the top label."""
        if self.moderator is None or not self.moderation_on:
            return None
        if who == "user":
            self.moderation_notes = []
        label, probs = self.moderator.classify(text)
        self.moderation_notes.append(f"{who} {label} {probs[label]:.2f}")
        threshold = self.moderation_threshold
        if threshold is None:  # an encoder moderation model carries the one tuned with it
            threshold = getattr(self.moderator, "threshold", None)
        return label, refuses(probs, threshold)

    def review_answer(self, answer: str) -> str:
        verdict = self.moderate("bot", answer) if answer else None
        return REFUSAL if verdict and verdict[1] else answer

    def _moderation_note(self) -> str:
        if self.moderator is None or not self.moderation_on or not self.moderation_notes:
            return ""
        return ", moderation: " + ", ".join(self.moderation_notes)

    def cmd_moderation(self, arg: str) -> None:
        if self.moderator is None:
            self.err.write(
                "/moderation: no moderation model; start the bot with --moderation MODEL\n"
            )
            return
        try:
            self.moderation_on = parse_on_off(arg)
        except ValueError:
            self.err.write("usage: /moderation on|off\n")
            return
        self.err.write(f"(moderation {'on' if self.moderation_on else 'off'})\n")

    # ---- commands ----------------------------------------------------------------------
    def handle_line(self, line: str) -> bool:
        """Handle one input line; False means the session should end."""
        line = clean_text(line).strip()
        if not line:
            return True
        if not line.startswith("/"):
            try:
                self.say(line)
            except KeyboardInterrupt:  # before the answer started: the turn is dropped
                self.err.write("(stopped)\n")
            return True
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        handler = getattr(self, f"cmd_{name}", None) if name.isidentifier() else None
        if name == "?":
            handler = self.cmd_help
        if name == "save!":
            handler = self.cmd_save_force
        if handler is None:
            self.err.write(
                f"unknown command {self.shown('/' + name, True)}; type /help for the list\n"
            )
            return True
        # A command's failure is one line; the conversation is kept whatever happened.
        try:
            return handler(arg) is not False
        except KeyboardInterrupt:
            self.err.write(f"(/{name} interrupted; the conversation is kept)\n")
        except (ValueError, RecursionError, MemoryError, OSError) as exc:
            self.err.write(f"/{name}: {self.shown(str(exc) or type(exc).__name__, True)}\n")
        return True

    def cmd_help(self, arg: str) -> None:
        self.out.write(HELP + "\n")

    def cmd_quit(self, arg: str) -> bool:
        return False

    cmd_exit = cmd_quit

    def cmd_reset(self, arg: str) -> None:
        self.messages = []
        self.told_dropped = False
        self.err.write("(conversation cleared)\n")

    def cmd_raw_say(self, arg: str) -> None:
        if not arg:
            self.err.write("/raw_say needs TEXT\n")
            return
        self.generate(arg, [])

    def cmd_raw_prompt(self, arg: str) -> None:
        messages = self._with_system(self.messages)
        if not messages:
            self.err.write("(the conversation is empty)\n")
            return
        # As the model sees it: old turns that no longer fit the window are left out.
        budget = self.loaded.context_window - self.settings.max_tokens
        kept, dropped = fit_to_window(messages, self._count, budget)
        if dropped:
            self.err.write(f"({dropped} oldest turn(s) no longer fit the window; not shown)\n")
        self.out.write(self.shown(self.format.render(kept, add_generation_prompt=False)) + "\n")

    def cmd_hyperparameters(self, arg: str) -> None:
        for key, value in self.settings.as_dict().items():
            self.out.write(f"{key} = {value}\n")
        self.out.write(f"verbose = {'on' if self.verbose else 'off'}\n")
        if self.retriever is not None:
            self.out.write(f"retrieval = {'on' if self.retrieval_on else 'off'}\n")
            self.out.write(f"retrieval_k = {self.retrieval_k}\n")
        if self.moderator is not None:
            self.out.write(f"moderation = {'on' if self.moderation_on else 'off'}\n")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2:
            self.err.write("usage: /set NAME VALUE (see /help)\n")
            return
        key, value = parts
        if key == "verbose":
            setter = parse_on_off
        elif key == "retrieval_k":
            setter = checked(int, lambda v: v >= 1, "must be >= 1")
        elif key in SETTERS:
            setter = SETTERS[key]
        else:
            self.err.write(
                f"/set: unknown setting '{key}'; one of {', '.join(SETTERS)}, verbose, retrieval_k\n"
            )
            return
        try:
            parsed = setter(value)
        except ValueError as exc:
            reason = str(exc) if "must" in str(exc) or "expected" in str(exc) else "bad value"
            self.err.write(f"/set {key}: '{value}' rejected: {reason}\n")
            return
        if key == "max_tokens" and parsed >= self.loaded.context_window:
            self.err.write(
                f"/set max_tokens: '{value}' rejected: must be below the "
                f"{self.loaded.context_window}-token context window\n"
            )
            return
        if key == "verbose":
            self.verbose = parsed
        elif key == "retrieval_k":
            self.retrieval_k = parsed
        else:
            setattr(self.settings, key, parsed)
        note = ""
        if key in ("temperature", "top_k", "top_p") and not self.settings.sample:
            note = "; sampling is off, so it applies after /set sample on"
        self.err.write(f"({key} = {parsed}{note})\n")

    def cmd_context(self, arg: str) -> None:
        if self.retriever is None:
            self.err.write(
                "/context: no retrieval index; start the bot with --retrieval INDEX_DIR\n"
            )
            return
        if not self.last_hits:
            self.err.write("(nothing retrieved yet)\n")
            return
        for i, hit in enumerate(self.last_hits, start=1):
            source = f" ({hit.source})" if hit.source else ""
            title = self.shown(f"{hit.title or 'untitled'}{source}")
            self.out.write(f"[{i}] score {hit.score:.3f}  {title}\n")
            self.out.write(f"    {self.shown(hit.text)}\n")

    def cmd_retrieval(self, arg: str) -> None:
        if self.retriever is None:
            self.err.write("/retrieval: no index; start the bot with --retrieval INDEX_DIR\n")
            return
        try:
            self.retrieval_on = parse_on_off(arg)
        except ValueError:
            self.err.write("usage: /retrieval on|off\n")
            return
        self.err.write(f"(retrieval {'on' if self.retrieval_on else 'off'})\n")

    def cmd_system(self, arg: str) -> None:
        self.system = arg or None
        self.err.write("(system message set)\n" if arg else "(system message removed)\n")

    def cmd_save(self, arg: str, force: bool = False) -> None:
        command = "/save!" if force else "/save"
        if not arg:
            self.err.write(f"{command} needs FILE\n")
            return
        path = one_path(arg, command)
        if path is None:
            self.err.write(
                f"{command} takes one FILE; quote a name with spaces or quotes: "
                f'{command} "my chat.json"\n'
            )
            return
        # A new name or a regular file only (a device, symlink or folder is refused, never
        # replaced), in a folder that exists; a file that is not a saved chat only with /save!.
        mode = NEW_TRANSCRIPT_MODE
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                self.err.write(f"{command}: cannot write {path}: it is {what}\n")
                return
            if not force and not is_saved_chat(path, SAVE_FORMAT, MAX_LOAD_BYTES):
                self.err.write(
                    f"{command}: {path} exists and is not a saved chat; /save! {path} replaces it\n"
                )
                return
            mode = stat.S_IMODE(st.st_mode)
        if not path.parent.is_dir():
            self.err.write(f"{command}: cannot write {path}: folder {path.parent} does not exist\n")
            return
        record = chat_record(self.loaded.name, self.system, self.settings, self.messages)
        try:
            write_private(path, json.dumps(record, indent=2) + "\n", mode)
        except OSError as exc:
            self.err.write(f"{command}: cannot write {path}: {describe_os_error(exc)}\n")
            return
        self.err.write(f"(saved {len(self.messages)} messages to {path})\n")

    def cmd_save_force(self, arg: str) -> None:
        self.cmd_save(arg, force=True)

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.err.write("/load needs FILE\n")
            return
        path = one_path(arg, "/load")
        if path is None:
            self.err.write('/load takes one FILE; quote a name with spaces: /load "my chat.json"\n')
            return
        try:
            record = json.loads(read_small_file(path, MAX_LOAD_BYTES))
            messages, settings, system = validate_saved(record)
        except FileNotFoundError:
            self.err.write(f"/load {path}: no such file\n")
            return
        except (OSError, UnicodeDecodeError) as exc:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else exc
            self.err.write(f"/load {path}: cannot read: {reason}\n")
            return
        except RecursionError:
            self.err.write(f"/load {path}: not a saved chat (nested too deeply)\n")
            return
        except (json.JSONDecodeError, ValueError) as exc:
            self.err.write(f"/load {path}: not a saved chat ({self.shown(str(exc), True)})\n")
            return
        self.messages, self.settings, self.system = messages, settings, system
        self.told_dropped = False
        note = ""
        if record.get("model") and record["model"] != self.loaded.name:
            note = f"; it was saved with model {self.shown(record['model'], True)}"
        self.err.write(f"(loaded {len(messages)} messages from {path}{note})\n")
