"""What `ft export` is asked (ExportOptions), what it reports (ExportReport) and how it fails (ExportError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


class ExportError(ValueError):
    """An export problem as one line naming the file or option."""


@dataclass
class ExportOptions:
    """dtype: of the output (None: the base's); shard_size: per output file, e.g. "5GB"; merge_base: auto
    (the NF4 round trip when the run was QLoRA), quantized or original; verify: compare the export's logits with
    base + adapter (or the checkpoint) before it is put in place; force: replace an existing output; log: where
    progress lines go."""

    dtype: Optional[str] = None
    shard_size: str = "5GB"
    merge_base: str = "auto"
    verify: bool = True
    force: bool = False
    log: Callable[[str], None] = print
    shard_bytes: int = field(init=False)  # shard_size in bytes, parsed (and so checked) before any work starts

    def __post_init__(self) -> None:
        self.shard_bytes = parse_size(self.shard_size)


@dataclass
class ExportReport:
    """What was written where, and how verification went."""

    out: Path
    tensors: int
    bytes: int
    merged: int
    replaced: int
    max_abs_diff: Optional[float] = None
    relative_diff: Optional[float] = None
    verified: str = "skipped"
    merge_base: str = "original"


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB" -> bytes; anything else is an ExportError naming --shard-size."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise ExportError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB") from None
