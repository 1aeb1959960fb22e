"""Filesystem steps that survive a kill or a power cut at any instant: fsync what is about to be renamed into place,
rename it in one step, and never delete something that looks complete in place. No torch import: used by
checkpoints, the recipe's final/ and the offline export alike.

A directory on its way out is first renamed beside itself to `deleting.<name>.<pid>-<ns>` (atomic, durable), then
removed; a kill mid-rmtree leaves only a `deleting.*` name, which nothing reads and remove_leftovers clears.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

TRASH_PREFIX = "deleting."


def fsync_file(path: Path) -> None:
    """Flush a file's (or directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the renames and creations inside a directory durable."""
    fsync_file(path)  # directories fsync the same way on POSIX: makes renames inside them durable


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (write a temporary file, fsync, rename, fsync the directory)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(directory: Path) -> None:
    """Make every file under `directory` durable before it is renamed into place."""
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            fsync_file(f)
    fsync_dir(directory)


def _aside(path: Path) -> Path:
    """The name a directory is moved to before it is deleted: out of every namespace that is read."""
    return path.with_name(f"{TRASH_PREFIX}{path.name}.{os.getpid()}-{time.monotonic_ns()}")


def discard_dir(path: Path) -> None:
    """Delete a directory so that no instant leaves a partial copy under its name: rename it aside (atomic), make
    the rename durable, then remove it."""
    trash = _aside(path)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(directory: Path, *patterns: str) -> None:
    """What a killed save or deletion left in `directory` (never read): deleting.* dirs, and `patterns`."""
    for stale in [*directory.glob(f"{TRASH_PREFIX}*"), *(p for pattern in patterns for p in directory.glob(pattern))]:
        if stale.name.startswith(TRASH_PREFIX):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            discard_dir(stale)


def replace_dir(staged: Path, final: Path) -> None:
    """Put the complete directory `staged` in place as `final`; an existing `final` is moved aside first and
    deleted after, so at every instant `final` is either the old complete copy or the new one."""
    old = None
    if final.exists():
        old = _aside(final)
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
