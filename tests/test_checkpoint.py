"""Checkpoint directory rules: only complete checkpoints are ever chosen; `latest` is never trusted blindly."""

import json

import pytest

from ftcore.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify_checkpoint


def make_checkpoint(root, step, complete=True):
    d = root / f"step-{step:06d}"
    (d / "engine").mkdir(parents=True)
    (d / "engine" / "shard.pt").write_bytes(b"x" * 100)
    (d / "trainer_state.json").write_text("{}")
    if complete:
        files = {"engine/shard.pt": 100, "trainer_state.json": 2}
        (d / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_latest_picks_newest_complete_and_ignores_partial(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    assert manager.latest() is None
    make_checkpoint(root, 2)
    make_checkpoint(root, 4)
    make_checkpoint(root, 6, complete=False)  # died before its manifest
    (root / "step-000008.tmp").mkdir()  # died mid-write
    assert manager.latest().name == "step-000004"
    (root / "latest").write_text("step-000002\n")
    # A crash between the rename and the pointer update: the newer complete dir wins.
    assert manager.latest().name == "step-000004"


def test_truncated_or_missing_files_are_detected(tmp_path):
    d = make_checkpoint(tmp_path / "checkpoints", 2)
    verify_checkpoint(d)
    (d / "engine" / "shard.pt").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="shard.pt is 10 bytes, manifest says 100"):
        verify_checkpoint(d)
    (d / "engine" / "shard.pt").unlink()
    with pytest.raises(CheckpointError, match="missing engine/shard.pt"):
        verify_checkpoint(d)


def test_pointer_to_a_broken_checkpoint_is_an_error_not_a_fallback(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 2)
    make_checkpoint(root, 4, complete=False)
    (root / "latest").write_text("step-000004\n")
    with pytest.raises(CheckpointError, match="step-000004: not a complete checkpoint"):
        CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1).latest()
