"""HF <-> layer-sharded conversion in the library: bit-identical round trips, the key map's
errors, tied embeddings, `.bin` sources, sharded HF output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openchatkit.errors import UserError
from openchatkit.models import sharded
from openchatkit.models.convert import (
    check_stage_layout,
    convert_hf_to_sharded,
    convert_sharded_to_hf,
)
from openchatkit.models.registry import get_architecture

ARCH = {"gpt_neox": "gptneox", "gptj": "gptj", "llama": "llama"}


def hf_tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize(
    "kind,tied",
    [
        ("gpt_neox", False),
        ("gpt_neox", True),
        ("gptj", False),
        ("gptj", True),
        ("llama", False),
        ("llama", True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_identical(tmp_path, make_tiny, reference_logits, kind, tied, dtype):
    hf = make_tiny(tmp_path / "hf", kind, tied, dtype)
    mid = convert_hf_to_sharded(hf, tmp_path / "sharded", ARCH[kind])
    back = convert_sharded_to_hf(mid, tmp_path / "back", ARCH[kind])
    a, b = hf_tensors(hf), hf_tensors(back)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == dtype, key
        assert torch.equal(a[key], b[key]), key
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference_logits(hf, ids), reference_logits(back, ids))


def test_tied_model_stores_the_matrix_once(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "llama", tied=True)
    out = convert_hf_to_sharded(hf, tmp_path / "sharded", "llama")
    assert "lm_head.weight" not in load_file(out / "head.safetensors")
    assert "embed_tokens.weight" in load_file(out / "embeddings.safetensors")
    assert json.loads((out / "manifest.json").read_text())["tie_word_embeddings"] is True


def _edit_hf(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_key_is_an_error_naming_it(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "llama")
    _edit_hf(hf, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        convert_hf_to_sharded(hf, tmp_path / "out", "llama")
    assert not (tmp_path / "out").exists()


def test_missing_key_is_an_error_naming_it(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "gpt_neox")
    _edit_hf(hf, lambda t: t.pop("gpt_neox.layers.2.mlp.dense_4h_to_h.bias"))
    with pytest.raises(UserError, match=r"gpt_neox\.layers\.2\.mlp\.dense_4h_to_h\.bias"):
        convert_hf_to_sharded(hf, tmp_path / "out", "gptneox")
    assert not (tmp_path / "out").exists()


def test_old_checkpoint_buffers_are_ignored(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "gptj")
    _edit_hf(
        hf,
        lambda t: t.update(
            {
                "transformer.h.1.attn.bias": torch.ones(1, 1, 4, 4),
                "transformer.h.1.attn.masked_bias": torch.tensor(-1e9),
            }
        ),
    )
    out = convert_hf_to_sharded(hf, tmp_path / "out", "gptj")
    assert set(load_file(out / "layer_00001.safetensors")) == set(
        load_file(out / "layer_00000.safetensors")
    )


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "llama", tied=True)
    _edit_hf(
        hf, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])})
    )
    with pytest.raises(UserError, match="lm_head.weight"):
        convert_hf_to_sharded(hf, tmp_path / "out", "llama")
    _edit_hf(hf, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    out = convert_hf_to_sharded(hf, tmp_path / "out", "llama")
    assert "lm_head.weight" not in load_file(out / "head.safetensors")


def test_pickled_bin_source_and_sharded_hf_output(
    tmp_path, make_tiny, reference_logits, monkeypatch
):
    hf = make_tiny(tmp_path / "hf", "gpt_neox")
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    mid = convert_hf_to_sharded(hf, tmp_path / "sharded", "gptneox")
    back = convert_sharded_to_hf(mid, tmp_path / "back", "gptneox", max_shard_bytes=40_000)
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(shards) > 2 and (back / "model.safetensors.index.json").is_file()
    got = hf_tensors(back)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(reference_logits(back, ids), reference_logits(hf, ids))


def test_dtype_cast_both_ways(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "llama")
    mid = convert_hf_to_sharded(hf, tmp_path / "sharded", "llama", dtype="bf16")
    assert sharded.read_manifest(mid).dtype == "bfloat16"
    back = convert_sharded_to_hf(mid, tmp_path / "back", "llama", dtype="float16")
    assert {t.dtype for t in hf_tensors(back).values()} == {torch.float16}
    assert json.loads((back / "config.json").read_text())["dtype"] == "float16"


def test_key_map_covers_every_module_key(make_config):
    for kind in ("gpt_neox", "gptj", "llama"):
        for tied in (False, True):
            config = make_config(kind, tied)
            arch = get_architecture(kind)
            keys = arch.expected_hf_keys(config)  # raises if a module key is unmapped
            assert len(keys) == len(set(keys))
            assert ("lm_head.weight" in keys or "embed_out.weight" in keys) != tied


def test_stage_layout_is_inferred_and_checked():
    assert check_stage_layout(8, None, None) == (1, 8)
    assert check_stage_layout(8, 4, None) == (4, 2)
    assert check_stage_layout(8, None, 2) == (4, 2)
    assert check_stage_layout(8, 2, 4) == (2, 4)
    for bad in [(8, 3, 3), (8, 3, None), (8, None, 3), (8, 0, None)]:
        with pytest.raises(UserError, match="--n-"):
            check_stage_layout(*bad)


def test_layer_files_without_manifest_need_a_config(tmp_path, make_tiny):
    """Per-layer files alone (no manifest.json, no config.json): --config-name describes them."""
    hf = make_tiny(tmp_path / "hf", "gptj", num_layers=3)
    mid = convert_hf_to_sharded(hf, tmp_path / "sharded", "gptj")
    (mid / "manifest.json").unlink()
    (mid / "config.json").unlink()
    with pytest.raises(UserError, match="neither"):
        convert_sharded_to_hf(mid, tmp_path / "x", "gptj")
    back = convert_sharded_to_hf(mid, tmp_path / "back", "gptj", config_name=str(hf))
    a, b = hf_tensors(hf), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = make_tiny(tmp_path / "other", "gptj", num_layers=2)
    with pytest.raises(UserError, match="3 layer files.*2 layers"):
        convert_sharded_to_hf(mid, tmp_path / "y", "gptj", config_name=str(other))


def test_output_names_and_prepare_scripts(capsys):
    import runpy
    from pathlib import Path

    from openchatkit.models.pretrained import PRETRAINED_MODELS, output_name

    assert output_name("EleutherAI/gpt-neox-20b") == "EleutherAI_gpt-neox-20b"
    assert output_name("embedded") == "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert output_name(str(Path(__file__).parent)) == "models"  # a local path: its folder name
    repo = Path(__file__).resolve().parents[2]
    scripts = sorted(p.parent.name for p in (repo / "pretrained").glob("*/prepare.py"))
    assert scripts == sorted(PRETRAINED_MODELS)
    assert {m.repo_id for m in PRETRAINED_MODELS.values()} >= {
        "EleutherAI/gpt-neox-20b",
        "EleutherAI/pythia-6.9b-deduped",
        "togethercomputer/RedPajama-INCITE-Base-3B-v1",
        "togethercomputer/RedPajama-INCITE-7B-Base",
        "togethercomputer/LLaMA-2-7B-32K",
        "EleutherAI/gpt-j-6b",
    }
    for folder, spec in PRETRAINED_MODELS.items():
        main = runpy.run_path(str(repo / "pretrained" / folder / "prepare.py"))["main"]
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        assert spec.repo_id in capsys.readouterr().out
