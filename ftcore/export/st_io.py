"""safetensors read and write one tensor at a time, so an export holds one tensor in memory, not a shard.

The safetensors library reads by mmap (touched pages count toward the process's RSS until the file is closed)
and writes a whole dict at once. The format itself is simple and fixed: an 8-byte little-endian header length,
a JSON header mapping names to {dtype, shape, data_offsets}, then the raw bytes. Here the header is written
first (shapes and dtypes are known in advance) and tensors are streamed after it; files are read with plain
seeks. Every file written here is read back by the safetensors library in the tests.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a complete safetensors file; one line naming it."""


class TensorInfo:
    """Where one tensor lies in a safetensors file: name, dtype, shape and byte range."""
    __slots__ = ("name", "dtype", "shape", "start", "end", "path")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple, start: int, end: int, path: Path):
        self.name, self.dtype, self.shape, self.start, self.end, self.path = name, dtype, shape, start, end, path

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor infos (absolute byte ranges) and the __metadata__ of one file; checks it is not truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise SafetensorsError(f"{path}: corrupted safetensors header (declares {length} header bytes)")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsError(f"{path}: corrupted safetensors header (not JSON)") from None
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: missing") from None
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + length
    infos, end_max = {}, base
    for name, entry in header.items():
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
        start, end = (base + o for o in entry["data_offsets"])
        shape = tuple(entry["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name} has {end - start} bytes for shape {list(shape)}")
        infos[name] = TensorInfo(name, dtype, shape, start, end, path)
        end_max = max(end_max, end)
    if size < end_max:
        raise SafetensorsError(f"{path}: truncated ({size} bytes, the header says {end_max})")
    return infos, metadata


def read_model_headers(directory: Path) -> tuple[dict[str, TensorInfo], Optional[dict[str, str]]]:
    """Every tensor of a model directory's safetensors weights (the shards model.safetensors.index.json lists, or
    every *.safetensors file), by name, and the index's weight map (None without an index); empty when the
    directory has no safetensors weights. SafetensorsError: an unreadable index, a listed shard that is missing,
    a bad header."""
    index = directory / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise SafetensorsError(f"{index}: not a safetensors index ({e})") from None
    files = sorted(set(weight_map.values())) if weight_map is not None else \
        sorted(p.name for p in directory.glob("*.safetensors"))
    infos: dict[str, TensorInfo] = {}
    for name in files:
        if not (directory / name).is_file():
            raise SafetensorsError(f"{directory / name}: missing (listed in model.safetensors.index.json)")
        infos.update(read_header(directory / name)[0])
    return infos, weight_map


def return_freed_tensors_to_the_system() -> None:
    """Make freed tensors leave the process. glibc keeps freed heap blocks below its mmap threshold (raised
    dynamically up to 32 MB) for reuse, so reading one block's tensors, freeing them and reading the next block's
    fragments the heap: RSS grows by most of a block per block (measured: a 1.1B verification at 3.9 GB instead of
    1 GB). A fixed 1 MB threshold gives every tensor its own mapping, returned when it is freed. A user's own
    MALLOC_MMAP_THRESHOLD_ is kept; other allocators than glibc's are left alone."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def read_tensor(info: TensorInfo, handle=None) -> torch.Tensor:
    """One tensor, read with a seek into fresh memory (no mmap)."""
    out = torch.empty(info.shape, dtype=info.dtype)
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    own = handle is None
    f = open(info.path, "rb") if own else handle
    try:
        f.seek(info.start)
        got = f.readinto(buffer) if out.numel() else 0
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise SafetensorsError(f"{info.path}: truncated while reading {info.name}")
    return out


@dataclass
class Entry:
    """One tensor of a planned output shard: its name, shape and dtype on disk."""

    name: str
    shape: tuple
    dtype: torch.dtype


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes, order) are declared up front."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: Optional[dict] = None):
        self.path = path
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, torch.dtype, tuple]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.expected.append((name, dtype, tuple(shape)))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.position = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (name, dtype and shape must be as planned)."""
        want_name, dtype, shape = self.expected[self.position]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want_name} {dtype} {list(shape)}, got {name} {tensor.dtype} "
                             f"{list(tensor.shape)}")
        data = tensor.detach().contiguous().view(-1)
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.position += 1

    def close(self) -> None:
        """Check every planned tensor was written, then flush and fsync the file."""
        if self.position != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self.position} tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
