"""Hostile model folders (security review finding 11) and checkpoint `latest` files (13) for the
converters: tokenizer and config copies and index weight maps may not reach outside the folder
(symlinks, absolute or `..` names), and a safetensors header is capped at 100 MB as the
reference library caps it. An HF cache snapshot, whose files link into its own `blobs/`, still
converts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from openchatkit.errors import UserError
from openchatkit.models.convert import convert_hf_to_sharded, resolve_checkpoint
from openchatkit.models.hf_weights import HFWeights, SafetensorsFile
from openchatkit.models.sharded import copy_tokenizer_files

SECRET = "-----BEGIN PRIVATE KEY-----\nnot for you\n"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, make_tiny, add_tokenizer):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    make_tiny(folder, "llama", num_layers=2)
    add_tokenizer(folder)
    return folder


def _secret(tmp_path: Path) -> Path:
    key = tmp_path / "id_key"
    key.write_text(SECRET)
    key.chmod(0o600)
    return key


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_a_symlink_out_of_the_model_folder_is_refused(tmp_path, hf_model, name):
    src = tmp_path / "src"
    shutil.copytree(hf_model, src)
    (src / name).unlink()
    if name == "config.json":
        # The converter must still read a config: a real copy beside it under another path
        # would not do, so the link points to a valid config outside the folder.
        outside = tmp_path / "outside_config.json"
        shutil.copyfile(hf_model / "config.json", outside)
        (src / name).symlink_to(outside)
    else:
        (src / name).symlink_to(_secret(tmp_path))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="outside the folder"):
        convert_hf_to_sharded(src, out, "llama")
    assert not out.exists()


def test_tokenizer_copies_follow_no_link_out(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "tokenizer.json").symlink_to(_secret(tmp_path))
    with pytest.raises(UserError, match="links outside the folder"):
        copy_tokenizer_files(src, dest)
    assert not (dest / "tokenizer.json").exists()


def test_an_hf_cache_snapshot_still_converts(tmp_path, hf_model):
    """The HF cache keeps a snapshot's files as links to ../../blobs/<hash>: allowed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in hf_model.iterdir():
        blob = repo / "blobs" / f"blob_{p.name}"
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(Path("../..") / "blobs" / blob.name)
    out = convert_hf_to_sharded(snap, tmp_path / "out", "llama")
    assert (out / "tokenizer.json").read_bytes() == (hf_model / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_weight_map_naming_a_file_outside_is_refused(tmp_path, hf_model, where):
    src = tmp_path / "src"
    shutil.copytree(hf_model, src)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(elsewhere)  # a valid weight file, outside the folder
    name = str(elsewhere) if where == "absolute" else "../elsewhere.safetensors"
    keys = SafetensorsFile(elsewhere).keys()
    index = {"metadata": {}, "weight_map": {k: name for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside the folder"):
        HFWeights(src)


def test_a_safetensors_header_over_100_mb_is_refused_unread(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    with open(path, "wb") as f:
        f.write((150_000_000).to_bytes(8, "little"))
        f.write(b"{")
        f.truncate(150_000_100)  # sparse: the size check alone would let it through
    with pytest.raises(UserError, match="100000000"):
        SafetensorsFile(path)


@pytest.mark.parametrize("text", ["/etc", "../other/checkpoint_1", "checkpoint_1/../../other"])
def test_a_latest_leading_outside_the_checkpoint_folder_is_refused(tmp_path, text):
    root = tmp_path / "run"
    (root / "checkpoint_1").mkdir(parents=True)
    (tmp_path / "other" / "checkpoint_1").mkdir(parents=True)
    (root / "latest").write_text(text)
    with pytest.raises(UserError, match="does not name a checkpoint_<step> folder"):
        resolve_checkpoint(root)
    (root / "latest").write_text("checkpoint_1\n")
    assert resolve_checkpoint(root) == root / "checkpoint_1"
    (root / "latest").write_text("1")
    assert resolve_checkpoint(root) == root / "checkpoint_1"
