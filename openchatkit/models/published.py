"""Published configs (config.json fields) of the base models the recipes use, so a memory plan
needs no download: one declarative list, one entry per model, keyed by the folder name
`pretrained/<Model>/prepare.py` writes (`<org>_<name>`). Fine-tuned variants with their base's
shape list the base's name as `same_as`.
"""

from __future__ import annotations

from typing import Any

PUBLISHED: list[dict[str, Any]] = [
    dict(name="EleutherAI_gpt-neox-20b", config=dict(
        model_type="gpt_neox", hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
        intermediate_size=24576, vocab_size=50432, rotary_pct=0.25, hidden_act="gelu_fast",
        tie_word_embeddings=False,
    )),
    dict(name="EleutherAI_pythia-6.9b-deduped", config=dict(
        model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, vocab_size=50432, rotary_pct=0.25, hidden_act="gelu",
        tie_word_embeddings=False,
    )),
    dict(name="togethercomputer_RedPajama-INCITE-Base-3B-v1", config=dict(
        model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=10240, vocab_size=50432, rotary_pct=1.0, hidden_act="gelu",
        tie_word_embeddings=False,
    )),
    dict(name="togethercomputer_RedPajama-INCITE-Chat-3B-v1",
         same_as="togethercomputer_RedPajama-INCITE-Base-3B-v1"),
    dict(name="togethercomputer_RedPajama-INCITE-7B-Base", config=dict(
        model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, vocab_size=50432, rotary_pct=1.0, hidden_act="gelu",
        tie_word_embeddings=False,
    )),
    dict(name="togethercomputer_LLaMA-2-7B-32K", config=dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, hidden_act="silu",
        tie_word_embeddings=False,
    )),
    dict(name="EleutherAI_gpt-j-6b", config=dict(
        model_type="gptj", n_embd=4096, n_layer=28, n_head=16, n_inner=None, rotary_dim=64,
        vocab_size=50400, activation_function="gelu_new", tie_word_embeddings=False,
    )),
    dict(name="togethercomputer_GPT-JT-6B-v1", same_as="EleutherAI_gpt-j-6b"),
    dict(name="Qwen_Qwen2.5-0.5B-Instruct", config=dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, hidden_act="silu",
        use_sliding_window=False, tie_word_embeddings=True,
    )),
]  # fmt: skip

_BY_NAME = {entry["name"]: entry for entry in PUBLISHED}


def published_names() -> list[str]:
    return sorted(_BY_NAME)


def published_config(name: str) -> dict[str, Any] | None:
    """The config.json fields of a published model by folder name; None if not listed."""
    entry = _BY_NAME.get(name)
    while entry is not None and "same_as" in entry:
        entry = _BY_NAME.get(entry["same_as"])
    return dict(entry["config"]) if entry is not None else None
