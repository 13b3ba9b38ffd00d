"""The tokenizer and chat format of a GGUF export, and the Ollama Modelfile beside it.

llama.cpp tokenizes by itself from the file's metadata: the vocabulary with each token's type,
the BPE merges, the special ids, whether to add BOS, and the pre-tokenizer (the regex split before
BPE), which llama.cpp knows by name. The name is found as llama.cpp's converter finds it: the
hash of the token ids of a fixed check text (`get_vocab_base_pre` in its convert_hf_to_gguf.py,
whose table of hashes this module copies for the tokenizers the kit's models use).
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from openchatkit.conversation import OPENCHATKIT_CHAT_TEMPLATE, OPENCHATKIT_STOP
from openchatkit.errors import UserError

log = logging.getLogger(__name__)

# llama.cpp's check text for pre-tokenizer detection (convert_hf_to_gguf.py).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp pre-tokenizer name (from its converter).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # EleutherAI's gpt-neox-20b tokenizer (GPT-NeoX, Pythia, RedPajama-INCITE; OLMo and MPT
    # reuse it).
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; "default" (GPT-2's split) with a
    warning when the hash is not in the table."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning(
            "pre-tokenizer not recognised (hash %s): writing 'default'; llama.cpp may split "
            "some text differently from transformers",
            digest[:12],
        )
        return "default"
    return name


def _looks_special(text: str) -> bool:
    # llama.cpp's converter's rule (does_token_look_special), for the kit's tokenizers.
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<unused") and text.endswith(">")
    )


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below the model's vocab_size: its text and gguf.TokenType. Ids the tokenizer
    lacks (vocabularies padded for speed) become [PADn], UNUSED; added tokens are CONTROL when
    special, else USER_DEFINED (llama.cpp matches those before BPE)."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only "
            f"{vocab_size} embeddings"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            special = added[i].special or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, [int(t) for t in types]


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template; models without one chat in OpenChatKit's format (as the
    bot does with them), so that format's template is written."""
    return getattr(tokenizer, "chat_template", None) or OPENCHATKIT_CHAT_TEMPLATE


def check_tokenizer_kind(hf_dir: Path) -> None:
    """Only byte-level BPE tokenizers (GPT-2 style: SmolLM2, GPT-NeoX, Llama-3, Qwen2) are
    exported; SentencePiece ones (Llama-2) are refused in one line."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json: GGUF export needs the fast tokenizer")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    model = (spec.get("model") or {}).get("type")
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if model != "BPE" or "ByteLevel" not in text:
        raise UserError(
            f"{path}: only byte-level BPE tokenizers (GPT-2 style) can be exported to GGUF "
            f"for now; this one is {model or 'unknown'} without a byte-level split"
        )


def add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, tokenizer: Any, vocab_size: int) -> str:
    """Write the tokenizer and chat template into `writer`; returns the chat template."""
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError(f"{hf_dir}: the tokenizer has no BPE merges")
    special.chat_template = chat_template_of(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    return special.chat_template


# ---- Ollama -----------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
OPENCHATKIT_OLLAMA_TEMPLATE = (
    "{{- if .System }}{{ .System }}\n{{ end }}"
    '{{- range .Messages }}{{ if eq .Role "user" }}<human>: {{ .Content }}\n'
    '{{ else if eq .Role "assistant" }}<bot>: {{ .Content }}\n{{ end }}{{ end }}<bot>:'
)


def modelfile_text(gguf_name: str, chat_template: str) -> str:
    """An Ollama Modelfile for the exported file: FROM, TEMPLATE in Ollama's Go-template syntax
    for the two formats the kit's models use (OpenChatKit's <human>/<bot>, ChatML), and the stop
    strings. Other templates are left to Ollama, which reads the GGUF's own chat template."""
    lines = [f"FROM ./{gguf_name}"]
    if "<human>" in chat_template:
        lines += [
            f'TEMPLATE """{OPENCHATKIT_OLLAMA_TEMPLATE}"""',
            f'PARAMETER stop "{OPENCHATKIT_STOP}"',
        ]
    elif "<|im_start|>" in chat_template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines.append("# TEMPLATE: Ollama derives it from the file's tokenizer.chat_template")
    return "\n".join(lines) + "\n"
