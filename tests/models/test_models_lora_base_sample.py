"""The base-weight sample an exported adapter carries: the same base passes in any dtype it is
loaded or was sharded in; another base of the same shapes is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from openchatkit.errors import UserError
from openchatkit.models.lora.peft_io import BASE_SAMPLE, _sample, check_base_sample

KEY = "layers.0.q.weight"


def _model(weight: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].q = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.layers[0].q.weight = nn.Parameter(weight.clone())
    model.config = SimpleNamespace(_name_or_path="some/base")
    return model


def _adapter(tmp_path, weight: torch.Tensor, dtype: str):
    folder = tmp_path / dtype
    folder.mkdir()
    record = {"base_model": "trained/base", "key": KEY, "dtype": dtype, "values": _sample(weight)}
    (folder / BASE_SAMPLE).write_text(json.dumps(record))
    return folder


def test_same_base_in_any_dtype_passes_and_another_is_refused(tmp_path):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 0.05
    fp32 = _adapter(tmp_path, w, "float32")
    bf16 = _adapter(tmp_path, w.to(torch.bfloat16), "bfloat16")
    for folder in (fp32, bf16):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_base_sample(_model(w.to(dtype)), folder, "--adapter")
    # A fine-tune of the base: every weight moved by ~2 % (an Adam run of a few dozen steps).
    tuned = w * (1 + 0.02 * torch.sign(torch.randn(w.shape, generator=torch.Generator())))
    for folder, dtype in ((fp32, torch.float32), (fp32, torch.bfloat16), (bf16, torch.float32)):
        with pytest.raises(UserError, match=r"exported for trained/base, but some/base holds"):
            check_base_sample(_model(tuned.to(dtype)), folder, "--adapter")
    # No sample (an adapter not exported by us): nothing to check.
    check_base_sample(_model(tuned), tmp_path, "--adapter")


def test_sample_of_a_large_weight_stays_in_bounds():
    """Past 2**24 elements float32 index arithmetic rounds out of bounds (a 20B model's qkv)."""
    weight = torch.arange(12288 * 4096, dtype=torch.int32).reshape(12288, 4096)
    values = _sample(weight)
    # The last element is sampled (its value, read back as float32, rounds to 2**-24).
    assert len(values) == 256 and values[0] == 0
    assert values[-1] == pytest.approx(weight.numel() - 1, rel=1e-7)
