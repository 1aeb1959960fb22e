"""Checkpoints: the only code that touches checkpoint files.

Layout (under output_dir/checkpoints/):
    step-000300/engine/...        DeepSpeed shards (every rank writes its own; frozen base weights excluded for LoRA)
    step-000300/trainer_state.json  step, token counts, world size, config fingerprint
    step-000300/data_state.json     every data-parallel rank's data-stream state, gathered
    step-000300/ft_config.yaml      the run's resolved config (what ft export needs to rebuild the model)
    step-000300/rng_rank{R}.pt      each rank's RNG states
    step-000300/manifest.json       every file with its size: written last; a dir without it is not a checkpoint
    latest                          names the newest complete step dir; replaced atomically after the rename
    superseded/<time>/step-...      checkpoints of a timeline abandoned by `--resume` of an older checkpoint (kept,
                                    never resumed from)

A save writes into step-000300.tmp/, every rank fsyncs, rank 0 writes the manifest, renames the directory into
place, then updates `latest`, then prunes to keep_last. An interrupted save leaves only a *.tmp directory, which
is never read and is removed by the next save.

Nothing that looks like a checkpoint is ever deleted in place: a kill in the middle of an rmtree would leave a
step dir that still has its manifest but lacks files. Every removal (pruning, a re-saved step's old copy, final/
replaced at the end of a run) first renames the directory out of the step-* namespace to `deleting.<name>.<id>`
(atomic, fsynced), then deletes it; a leftover `deleting.*` is never read and the next save removes it.

`--resume PATH` of an older checkpoint, or `--resume none`, starts a new timeline. The checkpoints that are not its
ancestors are moved to superseded/ first: otherwise a later automatic resume would pick the newest by name and
silently continue the abandoned timeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ftcore.config import CheckpointConfig
from ftcore.durable import atomic_write_text, discard_dir, fsync_dir, fsync_file, remove_leftovers, replace_dir
from ftcore.run_dir import RunDir

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-\d+")
ENGINE_TAG = "engine"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the path."""


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at `step`."""
    return f"step-{step:06d}"


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint (manifest present, every file its size)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {rel}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {rel} is {f.stat().st_size} bytes, manifest says {size} (truncated?)")


def rng_state() -> dict:
    """This process's RNG states (python, torch, CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state() returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Stateful(Protocol):
    """A part of the run that is saved and restored with the checkpoint (the run state, the data stream)."""

    def state_dict(self) -> dict:
        """The part's state, JSON-serialisable."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of an earlier run."""


class Collectives(Protocol):
    """What the checkpoint manager needs from the run's Runtime (ftcore/train/runtime.py)."""

    rank: int
    world_size: int
    sequence_parallel: int  # the ranks of a sequence group share one data stream

    def barrier(self) -> None:
        """Wait for every rank."""

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""


class OneProcess:
    """The Collectives of a single process: what tools and tests that find, read or save alone hand in."""

    rank, world_size, sequence_parallel = 0, 1, 1

    def barrier(self) -> None:
        """Nothing to wait for."""

    def all_gather_object(self, obj: Any) -> list:
        """This process's `obj`, alone."""
        return [obj]


@dataclass
class SavedCheckpoint:
    """A complete checkpoint as read from disk: its run state (trainer_state.json) and every data-parallel group's
    data-stream state (data_state.json: one per rank, or per sequence group under sequence parallelism), in rank
    order."""

    path: Path
    run_state: dict
    data_states: list[dict]

    @property
    def world_size(self) -> int:
        """How many ranks wrote it."""
        return self.run_state["world_size"]

    def task_states(self) -> list[dict]:
        """Every rank's task state (save's task_state: task rl's kept rollout batch), in rank order; [] if the
        run saved none."""
        files = [self.path / f"task_state_rank{rank}.pt" for rank in range(self.world_size)]
        if not any(f.is_file() for f in files):
            return []
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: {', '.join(missing)} missing (every rank writes its own)")
        return [torch.load(f, weights_only=True) for f in files]


class CheckpointManager:
    """Finds, saves, prunes and restores the checkpoints under output_dir/checkpoints/. Saving is collective
    (`runtime`: the run's Runtime); finding and reading are not."""

    def __init__(self, output_dir: str | Path, cfg: Optional[CheckpointConfig] = None,
                 runtime: Optional[Collectives] = None):
        self.root = RunDir(output_dir).checkpoints
        self.keep_last = (cfg or CheckpointConfig()).keep_last
        self.collectives = runtime or OneProcess()
        self.rank, self.world_size = self.collectives.rank, self.collectives.world_size

    # ---- finding -------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None. `latest` is trusted only if what it names is complete."""
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            verify_checkpoint(path)  # a broken pointer is an error, never a silent fallback to an older step
            newer = [p for p in self._complete_dirs() if p.name > path.name]
            # A crash between the rename and the pointer update leaves a complete, newer dir: use it.
            return newer[-1] if newer else path
        dirs = self._complete_dirs()
        return dirs[-1] if dirs else None

    def _complete_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if p.is_dir() and STEP_DIR.fullmatch(p.name)
                      and (p / MANIFEST).is_file())

    def start_timeline(self, resumed: Optional[Path]) -> list[str]:
        """Rank 0, on `--resume PATH` or `--resume none`: move every checkpoint here that is not an ancestor of
        `resumed` (newer steps; all of them when `resumed` is another run's or None) to superseded/<time>/, and
        point `latest` at `resumed` when it lives here. Returns the moved names. A kill in between leaves `latest`
        naming a moved dir, which fails loudly on the next automatic resume, never silently picks the old
        timeline."""
        here = resumed is not None and resumed.resolve().parent == self.root.resolve()
        moved = [p for p in self._complete_dirs() if not here or p.name > resumed.name]
        if not moved:
            return []
        target = self.root / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for path in reversed(moved):  # newest first: at every moment the remaining dirs are one timeline
            os.replace(path, target / path.name)
        fsync_dir(self.root)
        if here:
            atomic_write_text(self.root / "latest", resumed.name + "\n")
        else:
            (self.root / "latest").unlink(missing_ok=True)
        return [p.name for p in moved]

    # ---- saving --------------------------------------------------------------------------------------
    def save(self, engine: Any, run_state: Stateful, data_stream: Stateful, *, exclude_frozen: bool,
             config_text: str = "", task_state: Optional[dict] = None) -> Path:
        """Collective: every rank calls it at the same step. Returns the final directory. `task_state`: this
        rank's state of the task (tensors, lists, numbers; saved as task_state_rank<r>.pt when not empty)."""
        state = run_state.state_dict()
        step = state["step"]
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.root, "step-*.tmp", "step-*.old")  # (.old: written by earlier releases)
            tmp.mkdir()
        self.collectives.barrier()
        try:
            engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False,
                                   exclude_frozen_parameters=exclude_frozen)
            torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
            if task_state:
                torch.save(task_state, tmp / f"task_state_rank{self.rank}.pt")
        except (OSError, RuntimeError) as e:
            self._write_failed(step, tmp, e)
        # The ranks of a sequence group read one stream: its state is saved once.
        gathered = self.collectives.all_gather_object(data_stream.state_dict())[::self.collectives.sequence_parallel]
        try:
            if self.rank == 0:
                (tmp / "data_state.json").write_text(json.dumps(gathered, indent=1))
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
                if config_text:  # the run's config travels with the checkpoint (ft export reads it)
                    (tmp / "ft_config.yaml").write_text(config_text)
            self._flush_and_seal(step, tmp)
        except OSError as e:
            self._write_failed(step, tmp, e)
        if self.rank == 0:
            # The same step saved before is moved aside first, so `latest` never names a missing or partial dir.
            replace_dir(tmp, final)
            self._point_latest_at(final)
            self._prune()
        self.collectives.barrier()
        return final

    def _flush_and_seal(self, step: int, tmp: Path) -> None:
        """Every rank flushes what is in the directory (on a shared filesystem this covers what it wrote); then
        rank 0 writes the manifest, the mark of a complete checkpoint."""
        self.collectives.barrier()
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fsync_file(f)
        self.collectives.barrier()
        if self.rank == 0:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))

    def _point_latest_at(self, final: Path) -> None:
        """The directory is complete before `latest` names it, so a failure here loses nothing: say so."""
        try:
            atomic_write_text(self.root / "latest", final.name + "\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                (self.root / "latest.tmp").unlink()
            raise CheckpointError(
                f"checkpoint {final} is complete, but updating {self.root / 'latest'} failed: {e.strerror or e}. "
                f"A rerun resumes from {final.name} (a complete checkpoint newer than `latest` wins)") from None

    def _write_failed(self, step: int, tmp: Path, error: BaseException) -> None:
        """A failed write (a full disk, most often) becomes one clear error; the partial directory is removed (it
        is never read: no manifest), the previous checkpoint and `latest` are untouched."""
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free_bytes = shutil.disk_usage(self.root).free
            free = f"{free_bytes / 2**20:.1f} MiB free on the filesystem of {self.root}"
        except OSError:
            free_bytes, free = None, "free space unknown"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # torch.save reports a full disk as "file write failed" or "unexpected pos N vs M" (a short write).
        if getattr(error, "errno", None) == 28 or "No space" in reason or (
                free_bytes is not None and free_bytes < 16 << 20):
            reason = f"no space left on device ({reason})"
        previous = self.latest_name()
        raise CheckpointError(
            f"checkpoint at step {step}: writing {tmp} failed on rank {self.rank}: {reason}; {free}. "
            + (f"The previous checkpoint {previous} is intact and `latest` names it: free space and rerun to resume"
               if previous else "There is no earlier checkpoint: free space and rerun")) from None

    def latest_name(self) -> Optional[str]:
        """What `latest` names (unchecked), or None."""
        pointer = self.root / "latest"
        try:
            return pointer.read_text().strip() if pointer.is_file() else None
        except OSError:
            return None

    def _prune(self) -> None:
        for old in self._complete_dirs()[: -self.keep_last]:
            discard_dir(old)

    # ---- loading -------------------------------------------------------------------------------------
    def read(self, path: Path) -> SavedCheckpoint:
        """The one reader of a checkpoint's run and data state; raises CheckpointError unless it is complete."""
        verify_checkpoint(path)
        return SavedCheckpoint(path, json.loads((path / "trainer_state.json").read_text()),
                               json.loads((path / "data_state.json").read_text()))

    def restore_engine(self, saved: SavedCheckpoint, engine: Any, exclude_frozen: bool, zero_stage: int) -> None:
        """Restore engine (weights, optimizer, scheduler) and this rank's RNG from a checkpoint that
        ftcore.resume accepted. Another world size is fine for ZeRO 0-2: optimizer state is saved in DeepSpeed's
        elastic layout and re-partitioned here."""
        path, saved_world = saved.path, saved.world_size
        resharding = saved_world != self.world_size and zero_stage in (1, 2)
        # DeepSpeed's load_checkpoint refuses ZeRO optimizer state from another world size outright, although
        # its ZeRO-1/2 optimizer can merge and re-partition state saved in the elastic layout (our templates set
        # elastic_checkpoint). So: load module and schedule through the engine, then hand every saved rank's
        # optimizer state to the optimizer's own elastic restore.
        load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=not exclude_frozen,
                                              load_optimizer_states=not resharding, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the engine state under {ENGINE_TAG}/")
        if resharding:
            saved_states = engine._get_all_zero_checkpoints(str(path), ENGINE_TAG)
            if saved_states is None or len(saved_states) != saved_world:
                raise CheckpointError(f"{path}: expected optimizer state files of {saved_world} ranks under "
                                      f"{ENGINE_TAG}/")
            zero_optimizer = engine.optimizer
            zero_optimizer._load_global_state(saved_states[0])
            zero_optimizer._restore_elastic_base_optimizer_state(saved_states)
            zero_optimizer._restore_from_elastic_fp32_weights(saved_states)
        # RNG streams (dropout) are per rank: a rank that did not exist before starts from rank 0's.
        rng_file = path / f"rng_rank{self.rank if self.rank < saved_world else 0}.pt"
        set_rng_state(torch.load(rng_file, weights_only=True))
