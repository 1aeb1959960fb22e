"""Writing the export: tensors streamed into safetensors shards of a planned size (plus the index), config and
tokenizer files beside them, all in a staging directory beside OUT that is fsynced and renamed into place only when
complete and verified (ftcore/durable.py); on any failure the staging directory is removed and OUT is untouched."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from ftcore.durable import fsync_tree, replace_dir
from ftcore.export.options import ExportError, ExportOptions, ExportReport
from ftcore.export.st_io import Entry, ShardWriter

if TYPE_CHECKING:
    from ftcore.export.merge import MergePlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


def plan_shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Entries grouped into shards of at most shard_bytes (a larger tensor is a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def check_disk_space(directory: Path, needed: int) -> None:
    """Refuse up front when the filesystem of `directory` cannot hold `needed` bytes (and some margin)."""
    free = shutil.disk_usage(directory).free
    if free < needed * 1.02 + (64 << 20):
        raise ExportError(f"{directory}: not enough disk space: the export needs {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")


def write_shards(staging: Path, entries: list[Entry], tensors: Iterator[tuple[str, torch.Tensor]],
                 shard_bytes: int) -> dict:
    """Stream (name, tensor) pairs, in `entries` order, into safetensors shards plus the index."""
    shards = plan_shards(entries, shard_bytes)
    weight_map, total = {}, 0
    source = iter(tensors)
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(staging / filename, [(e.name, e.dtype, e.shape) for e in shard])
        for e in shard:
            name, tensor = next(source)
            if name != e.name:
                raise ExportError(f"internal: tensor {name} arrived where {e.name} was planned")
            writer.write(name, tensor.to(e.dtype).reshape(e.shape))
            weight_map[name] = filename
        writer.close()
        total += writer.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


class StagedOutput:
    """OUT is written as .OUT.tmp-PID beside it and renamed into place when complete; nothing half-written
    ever sits at OUT. An existing OUT is refused unless force."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        if out.exists() and not force:
            raise ExportError(f"{out}: already exists (use --force to replace it)")
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = parent / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as e:
            raise ExportError(f"{parent}: cannot write the export there ({e.strerror})") from None

    def commit(self) -> None:
        """fsync everything, then rename into place."""
        fsync_tree(self.staging)
        replace_dir(self.staging, self.out)  # a replaced OUT is moved aside first, deleted after

    def abort(self) -> None:
        """Remove the staging directory."""
        shutil.rmtree(self.staging, ignore_errors=True)


def copy_side_files(sources: list[Path], staging: Path, config: dict) -> None:
    """config.json (given), generation config and tokenizer files: the first source that has each wins."""
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        for directory in sources:
            if directory is not None and (directory / name).is_file():
                shutil.copy2(directory / name, staging / name)
                break


def write_export(out: Path, options: ExportOptions, plan: "MergePlan", side_sources: list[Path],
                 verify: Optional[Callable[[Path, ExportReport], None]]) -> ExportReport:
    """Stage, check space, stream the shards, add side files, verify, then put in place (or remove it all)."""
    staged = StagedOutput(out, options.force)
    try:
        check_disk_space(staged.staging, sum(math.prod(e.shape) * e.dtype.itemsize for e in plan.entries))
        index = write_shards(staged.staging, plan.entries, plan.tensors(), options.shard_bytes)
        copy_side_files(side_sources, staged.staging, plan.config)
        for name, text in plan.notes.items():
            (staged.staging / name).write_text(text)
        report = ExportReport(out, len(plan.entries), index["metadata"]["total_size"], merged=plan.merged,
                              replaced=plan.replaced, merge_base=plan.merge_base)
        if verify is not None and options.verify:
            verify(staged.staging, report)
        staged.commit()
    except OSError as e:  # a full disk, most often: say so, and leave nothing behind
        staged.abort()
        try:
            free = f"{shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise ExportError(f"writing the export beside {out} failed: {e.strerror or e} ({free}); nothing was "
                          f"written to {out} (staging removed)") from None
    except BaseException:
        staged.abort()
        raise
    return report
