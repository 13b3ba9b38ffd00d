"""oneDNN-packed linear layers (openchatkit/models/packed_linear.py): the same products as
nn.Linear up to fp32 summation order, swapped only where they apply, and the bot's and server's
torch loader uses them."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from openchatkit.models.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in {"x86_64", "amd64"}
    or not torch.backends.mkldnn.is_available(),
    reason="packing is for x86-64 CPUs with oneDNN",
)
needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 kernels on this CPU"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_packed_equals_linear(bias, rows):
    torch.manual_seed(rows)
    lin = nn.Linear(576, 192, bias=bias)
    packed = PackedLinear(lin)
    x = torch.randn(rows, 576)
    with torch.no_grad():
        want = lin(x)
        # fp32 sums of 576 products in another order: relative error ~1e-7 per sum.
        assert rel_err(packed(x), want) < 1e-5
        x3 = torch.randn(2, rows, 576)  # [batch, seq, hidden]
        assert packed(x3).shape == (2, rows, 192)
        assert rel_err(packed(x3), lin(x3)) < 1e-5
        xs = torch.randn(rows, 1152)[:, ::2]  # strided rows: not contiguous
        assert not xs.is_contiguous()
        assert rel_err(packed(xs), lin(xs)) < 1e-5


def tiny_model(make_config, kind="llama", tied=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(kind, tied=tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def tiny_llama(make_config, tied=False):
    return tiny_model(make_config, "llama", tied)


@pytest.mark.parametrize(
    "kind,tied,linears",
    [
        ("llama", False, 4 * 7 + 1),  # q k v o gate up down per layer, and the head
        ("llama", True, 4 * 7 + 1),
        ("gpt_neox", False, 4 * 4 + 1),  # qkv dense, h_to_4h 4h_to_h
        ("gptj", False, 4 * 6 + 1),  # q k v out, fc_in fc_out
    ],
)
def test_pack_same_logits_and_greedy_text(make_config, kind, tied, linears):
    import copy

    plain = tiny_model(make_config, kind, tied)
    packed = copy.deepcopy(plain)
    assert sum(type(m) is nn.Linear for m in plain.modules()) == linears
    assert pack_linears(packed) == linears
    assert not any(type(m) is nn.Linear for m in packed.modules())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(packed(ids).logits, plain(ids).logits) < 1e-5
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids, **kw), plain.generate(ids, **kw))
    if tied:  # the head got a packed copy; the embedding keeps its dense weight
        assert isinstance(packed.get_output_embeddings(), PackedLinear)
        assert isinstance(packed.get_input_embeddings().weight, nn.Parameter)


def test_old_weights_freed_as_packed(make_config):
    import gc
    import weakref

    model = tiny_llama(make_config)
    old = [weakref.ref(m) for m in model.modules() if type(m) is nn.Linear]
    assert pack_linears(model) == len(old) == 29
    gc.collect()
    assert all(ref() is None for ref in old)


def test_pack_not_applied(make_config, monkeypatch):
    from openchatkit.models.packed_linear import OPT_OUT_ENV

    model = tiny_llama(make_config)
    model.config.model_type = "mamba"  # outside the registry: its forward reads .weight
    assert not can_pack(model) and pack_linears(model) == 0
    model = tiny_llama(make_config)
    model.hf_device_map = {"": "cpu"}  # spread by accelerate
    assert not can_pack(model)
    monkeypatch.setenv(OPT_OUT_ENV, "0")
    model = tiny_llama(make_config)
    assert not can_pack(model) and pack_linears(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) == 29
    monkeypatch.setenv(OPT_OUT_ENV, "1")
    assert can_pack(model)


@needs_bf16
def test_pack_bf16(make_config):
    plain = tiny_llama(make_config).to(torch.bfloat16)
    packed = tiny_llama(make_config).to(torch.bfloat16)
    assert can_pack(packed) and pack_linears(packed) == 29
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # bf16 outputs: products summed in fp32 on both sides, then rounded
        assert rel_err(packed(ids).logits.float(), plain(ids).logits.float()) < 2e-2


def test_not_fp16(make_config):
    fp16 = tiny_llama(make_config).to(torch.float16)
    assert not can_pack(fp16) and pack_linears(fp16) == 0
    assert sum(type(m) is nn.Linear for m in fp16.modules()) == 29


def test_pack_not_with_a_peft_adapter(make_config):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(tiny_llama(make_config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert pack_linears(adapted) == 0  # PEFT's layers read their base layer's .weight
    assert not any(isinstance(m, PackedLinear) for m in adapted.modules())


def test_torch_chat_loader_packs(tmp_path, make_tiny, add_tokenizer):
    from openchatkit.inference.backends import load_torch_chat_model

    folder = add_tokenizer(make_tiny(tmp_path / "m", "llama"))
    dtypes = ["float32"] + ["bfloat16"] * torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for dtype in dtypes:
        model = load_torch_chat_model(str(folder), device="cpu", dtype=dtype).model
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 29


def test_torch_chat_loader_keeps_an_adapter_unpacked(tmp_path, make_tiny, add_tokenizer):
    from peft import LoraConfig, get_peft_model

    from openchatkit.inference.backends import load_torch_chat_model

    folder = add_tokenizer(make_tiny(tmp_path / "m", "llama"))
    base = load_torch_chat_model(str(folder), device="cpu", dtype="float32").model
    assert any(isinstance(m, PackedLinear) for m in base.modules())
    from transformers import AutoModelForCausalLM

    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"])
    )
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = load_torch_chat_model(
        str(folder), device="cpu", dtype="float32", adapter=str(tmp_path / "adapter")
    )
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())


def test_continuous_batching_same_tokens(make_config):
    """The server's engine (transformers' continuous batching manager) on a packed model."""
    import copy

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    plain = tiny_llama(make_config)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    prompts = [[(7 * i + j) % 90 + 2 for j in range(5 + i)] for i in range(4)]

    def generate(model):
        out = model.generate_batch(
            prompts,
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=-1),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=16, num_blocks=32, max_batch_tokens=64, max_requests_per_batch=4
            ),
            progress_bar=False,
        )
        return [list(out[k].generated_tokens) for k in sorted(out)]

    want = generate(plain)
    assert all(len(t) == 12 for t in want)
    assert generate(packed) == want
