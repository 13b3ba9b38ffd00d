"""Every registered architecture from its facts alone, with a tiny random model of each: the facts
are read without torch, the parameter counts are the built modules', the default LoRA targets
exist in every layer, and Qwen2 and Mistral (added as one module and one registry line each)
convert to and from HF bit-identically and compute HF's logits when split into stages.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from openchatkit.models.convert import convert_hf_to_sharded, convert_sharded_to_hf
from openchatkit.models.registry import get_architecture, supported_model_types
from openchatkit.models.shape import ModelShape
from openchatkit.models.stage import StageModel

VOCAB, SEQ = 96, 12


def tiny_config(model_type: str, tied: bool | None = None):
    """A tiny config of each registered architecture (GQA where the architecture has it; the
    Mistral window shorter than SEQ so that it matters)."""
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    sizes = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    gqa = dict(sizes, num_key_value_heads=2)
    configs = {
        "gpt_neox": ("GPTNeoXConfig", dict(sizes, rotary_pct=0.5)),
        "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=64)),
        "llama": ("LlamaConfig", gqa),
        "qwen2": ("Qwen2Config", gqa),
        "mistral": ("MistralConfig", dict(gqa, sliding_window=4)),
    }
    name, kwargs = configs[model_type]
    if model_type == "gptj":
        common.pop("max_position_embeddings")
    if tied is not None:
        kwargs = dict(kwargs, tie_word_embeddings=tied)
    return getattr(transformers, name)(**common, **kwargs)


def test_every_architecture_has_a_tiny_config():
    assert set(supported_model_types()) <= {"gpt_neox", "gptj", "llama", "qwen2", "mistral"}
    assert {"qwen2", "mistral"} <= set(supported_model_types())


def test_facts_are_read_without_torch_or_transformers():
    code = (
        "import sys\n"
        "from openchatkit.models.registry import architecture_names, get_architecture\n"
        "from openchatkit.training.config import TrainConfig\n"
        "from openchatkit.training.memory import plan_memory\n"
        "for name in architecture_names():\n"
        "    arch = get_architecture(name)\n"
        "    assert arch.lora_targets and arch.layer_linears, name\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("model_type", supported_model_types())
def test_parameter_counts_and_lora_targets_are_the_modules(model_type):
    config = tiny_config(model_type)
    shape = ModelShape.from_dict(config.to_dict())
    arch = get_architecture(model_type)
    assert shape.arch is arch and shape.num_layers == 4
    stage = StageModel(config, range(1, 3), False, False)
    layer = stage.layers["1"]
    assert shape.layer_params() == sum(p.numel() for p in layer.parameters())
    vectors = sorted(p.numel() for p in layer.parameters() if p.dim() == 1)
    assert sorted(shape.layer_vectors()) == vectors
    linears = {
        n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if type(m) is torch.nn.Linear
    }
    assert {n: (m.in_features, m.out_features) for n, m in linears.items()} == shape.linear_shapes()
    assert set(arch.lora_targets) <= set(linears)
    head = StageModel(config, range(3, 4), False, True).head
    assert shape.head_params() == sum(p.numel() for p in head.parameters())
    # The tie default is transformers' for the config class when config.json does not say.
    cfg = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings"}
    assert ModelShape.from_dict(cfg).tie_word_embeddings == arch.default_tied


@pytest.mark.parametrize("model_type", supported_model_types())
def test_default_lora_targets_adapt_every_layer(model_type):
    from openchatkit.models.lora import LoraSettings, apply_lora

    arch = get_architecture(model_type)
    stage = StageModel(tiny_config(model_type), range(4), True, True)
    apply_lora(stage, LoraSettings(r=2, alpha=4.0, dropout=0.0, target_modules=arch.lora_targets))
    adapted = {n.split(".lora_A")[0] for n, _ in stage.named_parameters() if ".lora_A" in n}
    expected = {
        n
        for n, m in stage.named_modules()
        if n.startswith("layers.") and n.rsplit(".", 1)[-1] in arch.lora_targets and "lora" not in n
        and hasattr(m, "base_layer")
    }  # fmt: skip
    assert len(adapted) == 4 * len(arch.lora_targets) and adapted == expected


def _hf_model(folder, config, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():  # biases and norms random too
            param.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_new_architecture_round_trip_and_stage_logits(tmp_path, model_type, tied):
    name = get_architecture(model_type).name
    model = _hf_model(tmp_path / "hf", tiny_config(model_type, tied))
    mid = convert_hf_to_sharded(tmp_path / "hf", tmp_path / "sharded", name)
    back = convert_sharded_to_hf(mid, tmp_path / "back", name)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), {}
    for path in sorted(back.glob("*.safetensors")):
        b.update(load_file(path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in a
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        first = StageModel.from_sharded(mid, range(0, 2), True, False).eval()
        last = StageModel.from_sharded(mid, range(2, 4), False, True).eval()
        split = last(first(ids))
        whole = StageModel.from_sharded(mid, range(4), True, True).eval()(ids)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)


def test_mistral_window_changes_the_logits():
    """The stage applies the sliding window: with the window the logits of late tokens differ
    from full causal attention, and equal HF's (checked above)."""
    config = tiny_config("mistral")
    torch.manual_seed(0)
    stage = StageModel(config, range(4), True, True).eval()
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        windowed = stage(ids)
        stage.config.sliding_window = None
        full = stage(ids)
    window = config.sliding_window
    torch.testing.assert_close(windowed[:, :window], full[:, :window])
    assert not torch.allclose(windowed[:, window:], full[:, window:])
