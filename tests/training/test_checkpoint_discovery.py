"""Which trainer checkpoint counts: only complete ones, whatever `latest` says."""

from __future__ import annotations

from openchatkit.training import checkpoint as ckpt


def test_latest_names_only_complete_checkpoints(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    for step in (2, 4):
        tmp = ckpt.prepare_temp(tmp_path, step)
        (tmp / "x").write_text("weights")
        (tmp / "manifest.json").write_text("{}")  # a checkpoint is a layer-sharded folder
        ckpt.publish(tmp_path, step, {"step": step}, keep=0)
    # A half-written temp folder and a folder without meta.json never count.
    ckpt.prepare_temp(tmp_path, 6)
    (tmp_path / "checkpoint_8").mkdir()
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint_4"
    (tmp_path / "latest").write_text("checkpoint_8\n")  # names an incomplete one
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint_4"
    ckpt.prepare_temp(tmp_path, 6)
    ckpt.publish(tmp_path, 6, {"step": 6}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert ckpt.read_meta(tmp_path / "checkpoint_6")["step"] == 6
