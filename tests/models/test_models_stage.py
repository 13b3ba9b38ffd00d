"""Pipeline stages: the pure split, chained stages == HF logits, own-files-only loading, saving."""

from __future__ import annotations

import json

import pytest
import torch

from openchatkit.models import sharded
from openchatkit.models.convert import convert_hf_to_sharded
from openchatkit.models.stage import StageModel, save_stage, split_layers

ARCH = {"gpt_neox": "gptneox", "gptj": "gptj", "llama": "llama"}
CASES = [
    ("gpt_neox", False),
    ("gpt_neox", True),
    ("gptj", False),
    ("llama", False),
    ("llama", True),
]


def test_split_layers_even_and_uneven():
    assert split_layers(4, 1) == [range(0, 4)]
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    for n in range(1, 9):
        for p in range(1, n + 1):
            parts = split_layers(n, p)
            assert [i for r in parts for i in r] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("bad", [(0, 1), (4, 0), (3, 4), (-1, 1), (4.0, 2)])
def test_split_layers_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        split_layers(*bad)


def run_chain(folder, num_layers, num_stages, ids, dtype=None):
    x = ids
    for i, layers in enumerate(split_layers(num_layers, num_stages)):
        stage = StageModel.from_sharded(folder, layers, i == 0, i == num_stages - 1, dtype=dtype)
        with torch.no_grad():
            x = stage.eval()(x)
    return x


@pytest.mark.parametrize("kind,tied", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chained_stages_match_hf_logits(tmp_path, make_tiny, reference_logits, kind, tied, dtype):
    hf = make_tiny(tmp_path / "hf", kind, tied, dtype)
    folder = convert_hf_to_sharded(hf, tmp_path / "sharded", ARCH[kind])
    manifest = sharded.read_manifest(folder)
    assert manifest.tie_word_embeddings == tied
    assert manifest.dtype == str(dtype).removeprefix("torch.")
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf, ids)
    for num_stages in (1, 2, 3):
        out = run_chain(folder, 4, num_stages, ids)
        assert out.dtype == ref.dtype
        assert torch.equal(out, ref), (num_stages, (out - ref).abs().max())


def test_tied_embeddings_single_and_split(tmp_path, make_tiny):
    hf = make_tiny(tmp_path / "hf", "llama", tied=True)
    folder = convert_hf_to_sharded(hf, tmp_path / "sharded", "llama")
    with torch.no_grad():
        import safetensors.torch as st

        assert "lm_head.weight" not in st.load_file(folder / "head.safetensors")
    one = StageModel.from_sharded(folder, range(0, 4), True, True)
    assert one.head.lm_head.weight is one.embed.embed_tokens.weight
    assert one.tied_embed_param is None and one.tied_head_param is None
    first = StageModel.from_sharded(folder, range(0, 2), True, False)
    last = StageModel.from_sharded(folder, range(2, 4), False, True)
    assert first.tied_embed_param == "embed.embed_tokens.weight"
    assert last.tied_head_param == "head.lm_head.weight"
    params_first = dict(first.named_parameters())
    params_last = dict(last.named_parameters())
    assert torch.equal(params_first[first.tied_embed_param], params_last[last.tied_head_param])
    assert all(p.requires_grad for p in last.parameters())


def test_stage_loads_only_its_own_files(tmp_path, make_tiny, monkeypatch):
    import safetensors

    hf = make_tiny(tmp_path / "hf", "llama", tied=True, num_layers=6)
    folder = convert_hf_to_sharded(hf, tmp_path / "sharded", "llama")
    opened = []
    real = safetensors.safe_open

    def recording(path, *args, **kwargs):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    StageModel.from_sharded(folder, range(2, 4), False, False)
    assert opened == ["layer_00002.safetensors", "layer_00003.safetensors"]
    opened.clear()
    StageModel.from_sharded(folder, range(0, 2), True, False)
    assert opened == [
        "embeddings.safetensors",
        "layer_00000.safetensors",
        "layer_00001.safetensors",
    ]
    opened.clear()
    # A tied last stage also reads the embedding matrix it keeps a copy of.
    StageModel.from_sharded(folder, range(4, 6), False, True)
    assert sorted(opened) == sorted(
        [
            "layer_00004.safetensors",
            "layer_00005.safetensors",
            "head.safetensors",
            "embeddings.safetensors",
        ]
    )
    # Deleting another stage's file does not matter to this one.
    monkeypatch.undo()
    (folder / "layer_00000.safetensors").unlink()
    StageModel.from_sharded(folder, range(2, 4), False, False)


@pytest.mark.parametrize("kind,tied", [("gptj", False), ("llama", True)])
def test_save_stage_writes_identical_files(tmp_path, make_tiny, kind, tied):
    from safetensors.torch import load_file

    hf = make_tiny(tmp_path / "hf", kind, tied)
    folder = convert_hf_to_sharded(hf, tmp_path / "sharded", ARCH[kind], chat_format="openchatkit")
    out = tmp_path / "saved"
    written = []
    for i, layers in enumerate(split_layers(4, 3)):
        stage = StageModel.from_sharded(folder, layers, i == 0, i == 2)
        written += save_stage(stage, out)
    assert sorted(n for n in written if n.endswith(".safetensors")) == sorted(sharded.part_files(4))
    for name in sharded.part_files(4):
        a, b = load_file(folder / name), load_file(out / name)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == ARCH[kind]
    assert manifest["tie_word_embeddings"] is tied
    assert manifest["chat_format"] == "openchatkit"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    ids = torch.randint(0, 96, (1, 7))
    assert torch.equal(run_chain(out, 4, 2, ids), run_chain(folder, 4, 1, ids))


@pytest.mark.parametrize("kind", ["gpt_neox", "gptj", "llama"])
def test_random_init_stages_train_like_one_model(make_config, kind):
    """Two randomly initialised stages holding the same weights as one stage give the same loss
    and gradients; tied gradient copies sum to the single-stage gradient."""
    config = make_config(kind, tied=True)
    torch.manual_seed(0)
    whole = StageModel(config, range(0, 4), True, True)
    first = StageModel(config, range(0, 2), True, False, init_weights=False)
    last = StageModel(config, range(2, 4), False, True, init_weights=False)
    state = whole.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in state.items() if k in last.state_dict()})
    ids = torch.randint(0, 96, (2, 9))
    pos = torch.arange(9).unsqueeze(0)
    loss_whole = whole(ids, pos).float().square().mean()
    loss_split = last(first(ids, pos), pos).float().square().mean()
    assert torch.equal(loss_whole, loss_split)
    loss_whole.backward()
    loss_split.backward()
    grads = dict(whole.named_parameters())
    emb = grads[first.tied_embed_param].grad
    summed = (
        dict(first.named_parameters())[first.tied_embed_param].grad
        + dict(last.named_parameters())[last.tied_head_param].grad
    )
    torch.testing.assert_close(summed, emb)


def test_stage_with_a_missing_or_damaged_file_names_it(tmp_path, make_tiny):
    from openchatkit.errors import UserError

    hf = make_tiny(tmp_path / "hf", "gpt_neox")
    folder = convert_hf_to_sharded(hf, tmp_path / "sharded", "gptneox")
    (folder / "layer_00001.safetensors").unlink()
    with pytest.raises(UserError, match="layer_00001.safetensors"):
        StageModel.from_sharded(folder, range(0, 2), True, False)
    head = folder / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-16])
    with pytest.raises(UserError, match="head.safetensors"):
        StageModel.from_sharded(folder, range(2, 4), False, True)
