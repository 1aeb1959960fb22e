"""Checkpoint directory rules: only complete checkpoints are ever chosen; `latest` is never trusted blindly."""

import json

import pytest

from ftcore.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify_checkpoint
from ftcore.config import CheckpointConfig


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
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2))
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
        CheckpointManager(tmp_path, CheckpointConfig(keep_last=2)).latest()


def test_resuming_an_older_checkpoint_moves_the_abandoned_timeline_aside(tmp_path):
    """--resume step-4 while step-6 and step-8 exist: a later automatic resume must continue the new timeline,
    not the old step-8, and nothing of the old one is deleted."""
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=10))
    for step in (2, 4, 6, 8):
        make_checkpoint(root, step)
    (root / "latest").write_text("step-000008\n")
    old_8 = (root / "step-000008" / MANIFEST).stat().st_ino
    assert manager.start_timeline(root / "step-000004") == ["step-000006", "step-000008"]
    assert [p.name for p in manager._complete_dirs()] == ["step-000002", "step-000004"]
    assert manager.latest().name == "step-000004"
    (moved,) = (root / "superseded").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["step-000006", "step-000008"]
    assert (moved / "step-000008" / MANIFEST).stat().st_ino == old_8
    verify_checkpoint(moved / "step-000008")
    assert manager.start_timeline(root / "step-000004") == []  # the same command rerun: nothing more to move


def test_resuming_another_runs_checkpoint_moves_all_of_this_runs_aside(tmp_path):
    other = make_checkpoint(tmp_path / "other" / "checkpoints", 4)
    manager = CheckpointManager(tmp_path / "run", CheckpointConfig(keep_last=10))
    for step in (2, 6):
        make_checkpoint(manager.root, step)
    (manager.root / "latest").write_text("step-000006\n")
    assert manager.start_timeline(other) == ["step-000002", "step-000006"]
    assert manager.latest() is None


def test_starting_over_moves_every_checkpoint_aside(tmp_path):
    """--resume none: the new run's step-2 must not lose to the old run's step-6 on a later automatic resume."""
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=10))
    make_checkpoint(manager.root, 6)
    assert manager.start_timeline(None) == ["step-000006"]
    make_checkpoint(manager.root, 2)
    assert manager.latest().name == "step-000002"
    assert CheckpointManager(tmp_path / "empty", CheckpointConfig(keep_last=2)).start_timeline(None) == []
    assert not (tmp_path / "empty").exists()


def test_a_leftover_old_dir_is_never_a_checkpoint(tmp_path):
    """Re-saving an existing step moves it to step-N.old before the rename; a kill there leaves a complete .old
    dir, which must not be chosen (its name sorts after step-N)."""
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 4)
    make_checkpoint(root, 6).rename(root / "step-000006.old")
    assert CheckpointManager(tmp_path, CheckpointConfig(keep_last=2)).latest().name == "step-000004"


def test_a_failed_latest_update_is_a_clear_error_and_the_checkpoint_still_wins(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2))
    make_checkpoint(manager.root, 2)
    (manager.root / "latest").write_text("step-000002\n")
    final = make_checkpoint(manager.root, 4)
    (manager.root / "latest.tmp").mkdir()  # the pointer's temporary file cannot be written
    with pytest.raises(CheckpointError, match=r"step-000004 is complete, but updating .*latest failed: Is a directory"
                                              r"\. A rerun resumes from step-000004"):
        manager._point_latest_at(final)
    assert (manager.root / "latest").read_text() == "step-000002\n"
    assert manager.latest().name == "step-000004"


class Killed(BaseException):
    """The process dying in the middle of a deletion (not an Exception: nothing may catch it)."""


def interrupt_deletions_after(monkeypatch, allowed: int) -> None:
    """os.unlink / os.rmdir (what shutil.rmtree calls) succeed `allowed` times, then the process 'dies'."""
    import os

    calls = {"n": 0}
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def counted(real):
        def call(*args, **kwargs):
            if calls["n"] >= allowed:
                raise Killed()
            calls["n"] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "unlink", counted(real_unlink))
    monkeypatch.setattr(os, "rmdir", counted(real_rmdir))


def every_step_dir_is_complete_or_absent(root) -> None:
    manager = CheckpointManager(root.parent, CheckpointConfig(keep_last=2))
    for d in root.glob("step-*"):
        if (d / MANIFEST).is_file():
            verify_checkpoint(d)  # raises on a dir that looks complete and is not
    assert manager.latest() is not None


@pytest.mark.parametrize("allowed", range(0, 7))
def test_a_kill_at_any_instant_of_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch, allowed):
    """Pruning an old step dir (4 files, 2 dirs: 6 deletions) interrupted after each number of deletions: no
    step-* dir with a manifest is ever missing files, `latest` still resolves, and the next save cleans up."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = make_checkpoint(root, step)
        (d / "engine" / "other.pt").write_bytes(b"y" * 10)
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["files"]["engine/other.pt"] = 10
        (d / MANIFEST).write_text(json.dumps(manifest))
    (root / "latest").write_text("step-000006\n")
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2))
    interrupt_deletions_after(monkeypatch, allowed)
    try:
        manager._prune()
    except Killed:
        pass
    monkeypatch.undo()
    every_step_dir_is_complete_or_absent(root)
    assert sorted(p.name for p in root.glob("step-*")) in (["step-000004", "step-000006"],
                                                          ["step-000002", "step-000004", "step-000006"])
    from ftcore.durable import remove_leftovers

    remove_leftovers(root)  # what the next save does first
    assert not list(root.glob("deleting.*"))


@pytest.mark.parametrize("allowed", range(0, 5))
def test_a_kill_while_replacing_a_directory_leaves_the_old_or_the_new_copy(tmp_path, monkeypatch, allowed):
    """final/ (and a re-saved step dir) replaced by a complete staged copy: at every instant the name holds one
    whole copy."""
    from ftcore.durable import replace_dir

    final, staged = tmp_path / "final", tmp_path / "final.tmp"
    for d, text in ((final, "old"), (staged, "new")):
        (d / "sub").mkdir(parents=True)
        (d / "a.txt").write_text(text)
        (d / "sub" / "b.txt").write_text(text)
    interrupt_deletions_after(monkeypatch, allowed)
    try:
        replace_dir(staged, final)
    except Killed:
        pass
    monkeypatch.undo()
    assert (final / "a.txt").read_text() == (final / "sub" / "b.txt").read_text() == "new"
