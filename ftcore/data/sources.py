"""Streamed, random-access readers for every file type data.train accepts.

A file is a list of *blocks* (about 1 MiB of text, a Parquet row group, or 1024 Arrow rows), each holding a
known number of records. Only a small index is kept per block (byte offset, first line, record count), so memory
does not grow with the number of records; a block is read on demand and a record is addressed as
(block, offset). That is what lets a resumed run seek straight to its position instead of replaying the epoch.

Readers return raw records (bytes for JSONL and text, dicts for Parquet/Arrow) with the location used in errors
and audit logs; parsing and tokenizing happen in the stream, where `data.on_error` decides what a bad one does.

gzip files cannot be seeked, so the index pass also keeps a copy of the decompressor every
GZIP_SNAPSHOT_BYTES of output (about 40 KB each: zlib's 32 KB window plus its state); a block is read by
resuming the nearest snapshot before it.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

BLOCK_BYTES = 1 << 20
ARROW_BLOCK_ROWS = 1024
GZIP_SNAPSHOT_BYTES = 64 << 20
_READ_CHUNK = 1 << 20

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")
PARQUET_SUFFIXES = (".parquet",)


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, unknown type); one line naming the path."""


@dataclass
class RawRecord:
    """One record as read: its raw value and where it came from (file and line or row)."""
    value: Any  # bytes (a JSON line or text) or a dict (Parquet / Arrow row)
    where: str  # "path:line" or "path:row N": used in errors and as the sample id in audit logs
    json: bool = False  # bytes that must parse as one JSON object (a JSONL line), not plain text


def display_path(path: Path) -> str:
    """A path as users wrote it relative to where they run, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------------- byte streams
class _GzipSnapshot:
    def __init__(self, compressed_offset: int, decompressor: Any, output_offset: int):
        self.compressed_offset, self.decompressor, self.output_offset = compressed_offset, decompressor, output_offset


def _gzip_chunks(path: Path, snapshots: Optional[list] = None, start: Optional[_GzipSnapshot] = None,
                 snapshot_every: int = GZIP_SNAPSHOT_BYTES) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-member) gzip file, from the start or from a snapshot. When
    `snapshots` is a list, decompressor copies are appended to it every `snapshot_every` output bytes."""
    with open(path, "rb") as f:
        if start is None:
            d, out_pos, comp_pos = zlib.decompressobj(wbits=47), 0, 0
        else:
            d, out_pos, comp_pos = start.decompressor.copy(), start.output_offset, start.compressed_offset
            f.seek(comp_pos)
        last_snapshot = -snapshot_every
        # Snapshots can only be taken between reads; small reads keep them close to the requested spacing even
        # when the data compresses 50x.
        read_size = max(512, min(_READ_CHUNK, snapshot_every // 64))
        while True:
            if snapshots is not None and out_pos - last_snapshot >= snapshot_every and not d.unused_data:
                snapshots.append(_GzipSnapshot(comp_pos, d.copy(), out_pos))
                last_snapshot = out_pos
            chunk = f.read(read_size)
            if not chunk:
                tail = d.flush()
                if tail:
                    yield tail
                if not d.eof and (out_pos or tail):
                    raise SourceError(f"{display_path(path)}: truncated gzip file")
                return
            comp_pos += len(chunk)
            while chunk:
                try:
                    out = d.decompress(chunk)
                except zlib.error as e:
                    raise SourceError(f"{display_path(path)}: not a valid gzip file ({e})") from None
                if out:
                    out_pos += len(out)
                    yield out
                chunk = d.unused_data if d.eof else b""
                if d.eof and chunk:  # the next gzip member starts here
                    d = zlib.decompressobj(wbits=47)


def _plain_chunks(path: Path, start: int = 0) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_READ_CHUNK):
            yield chunk


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines with their newline (the last may lack it), across chunk boundaries."""
    carry = b""
    for chunk in chunks:
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        for part in parts:
            yield part + b"\n"
    if carry:
        yield carry


# ---------------------------------------------------------------------------------------------- file sources
class FileSource:
    """Blocks of records. Subclasses fill `counts` (records per block) and implement read_block."""

    path: Path
    counts: array

    def __len__(self) -> int:
        return int(sum(self.counts))

    def read_block(self, block: int) -> list[RawRecord]:
        """The records of one block (a few MB of lines, a row group, a slice of rows)."""
        raise NotImplementedError


class DelimitedSource(FileSource):
    """JSONL or plain text read as lines or blank-line-separated paragraphs, plain or gzip-compressed."""

    def __init__(self, path: Path, unit: str, block_bytes: Optional[int] = None,
                 snapshot_every: Optional[int] = None, json_lines: bool = False):
        block_bytes = block_bytes or BLOCK_BYTES  # module constants read at call time (tests shrink them)
        snapshot_every = snapshot_every or GZIP_SNAPSHOT_BYTES
        self.path, self.unit, self.name, self.json_lines = path, unit, display_path(path), json_lines
        self.gzip = path.suffix == ".gz"
        self.offsets, self.first_lines, self.counts = array("q"), array("q"), array("q")
        self.snapshots: list[_GzipSnapshot] = []
        chunks = (_gzip_chunks(path, self.snapshots, snapshot_every=snapshot_every) if self.gzip
                  else _plain_chunks(path))
        self._index(_lines(chunks), block_bytes)
        self.end = self._size

    def _index(self, lines: Iterator[bytes], block_bytes: int) -> None:
        offset, number, in_record = 0, 0, False
        block_start = None
        for line in lines:
            number += 1
            blank = not line.strip()
            starts_record = not blank and (self.unit == "line" or not in_record)
            if starts_record:
                if block_start is None or offset - block_start >= block_bytes:
                    block_start = offset
                    self.offsets.append(offset)
                    self.first_lines.append(number)
                    self.counts.append(0)
                self.counts[-1] += 1
            in_record = not blank
            offset += len(line)
        self._size = offset

    def _block_bytes(self, block: int) -> bytes:
        start = self.offsets[block]
        end = self.offsets[block + 1] if block + 1 < len(self.offsets) else self.end
        if not self.gzip:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        snapshot = max((s for s in self.snapshots if s.output_offset <= start), key=lambda s: s.output_offset)
        pos, pieces = snapshot.output_offset, []
        for chunk in _gzip_chunks(self.path, start=snapshot):
            lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
            if lo < hi:
                pieces.append(chunk[lo:hi])
            pos += len(chunk)
            if pos >= end:
                break
        return b"".join(pieces)

    def read_block(self, block: int) -> list[RawRecord]:
        """The records of one block of lines (a JSON record may span no line break; blank lines are skipped)."""
        records, number, current, current_line = [], self.first_lines[block] - 1, [], 0
        for line in self._block_bytes(block).split(b"\n"):
            number += 1
            if not line.strip():
                if current:
                    records.append(RawRecord(b"\n".join(current), f"{self.name}:{current_line}"))
                    current = []
                continue
            if self.unit == "line":
                records.append(RawRecord(line, f"{self.name}:{number}", self.json_lines))
            else:
                if not current:
                    current_line = number
                current.append(line)
        if current:
            records.append(RawRecord(b"\n".join(current), f"{self.name}:{current_line}"))
        if len(records) != self.counts[block]:  # the file changed under us: never train on shifted records
            raise SourceError(f"{self.name}: changed while being read (block {block} has {len(records)} records, "
                              f"indexed {self.counts[block]})")
        return records


class DocumentSource(FileSource):
    """A plain text file that is one sample."""

    def __init__(self, path: Path):
        self.path, self.name = path, display_path(path)
        self.gzip = path.suffix == ".gz"
        size = path.stat().st_size
        self.counts = array("q", [1 if size else 0])

    def read_block(self, block: int) -> list[RawRecord]:
        """The whole file as one record."""
        chunks = _gzip_chunks(self.path) if self.gzip else _plain_chunks(self.path)
        return [RawRecord(b"".join(chunks), f"{self.name}:1")]


class ParquetSource(FileSource):
    """One block per row group, read with pyarrow (only that row group is in memory)."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, self.name = path, display_path(path)
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own text
            raise SourceError(f"{self.name}: not a readable Parquet file ({e})") from None
        meta = self.file.metadata
        self.counts = array("q", [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self.first_rows = array("q", [0])
        for n in self.counts[:-1]:
            self.first_rows.append(self.first_rows[-1] + n)

    def read_block(self, block: int) -> list[RawRecord]:
        """The rows of one Parquet row group."""
        rows = self.file.read_row_group(block).to_pylist()
        first = self.first_rows[block]
        return [RawRecord(row, f"{self.name}:row {first + i}") for i, row in enumerate(rows)]


class ArrowDiskSource(FileSource):
    """A dataset written by HF datasets' save_to_disk: Arrow stream files, memory-mapped (pages are read on
    demand and belong to the page cache, not the process heap)."""

    def __init__(self, directory: Path, split: str):
        import pyarrow as pa

        self.path, self.name = directory, display_path(directory)
        if (directory / "dataset_dict.json").is_file():
            splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise SourceError(f"{self.name}: no split {split!r} (has {', '.join(splits)}); set the source's "
                                  "split")
            directory = directory / split
            self.name = f"{self.name}[{split}]"
        state = json.loads((directory / "state.json").read_text())
        tables = []
        for entry in state.get("_data_files", []):
            with pa.memory_map(str(directory / entry["filename"])) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        self.table = pa.concat_tables(tables) if tables else None
        rows = self.table.num_rows if self.table is not None else 0
        self.block_rows = ARROW_BLOCK_ROWS
        self.counts = array("q", [min(self.block_rows, rows - s) for s in range(0, rows, self.block_rows)])

    def read_block(self, block: int) -> list[RawRecord]:
        """One slice of the Arrow table's rows."""
        first = block * self.block_rows
        rows = self.table.slice(first, self.counts[block]).to_pylist()
        return [RawRecord(row, f"{self.name}:row {first + i}") for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------- discovery
def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def _kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(PARQUET_SUFFIXES) and not path.name.endswith(".gz"):
        return "parquet"
    return None


def expand(path_text: str) -> list[Path]:
    """A source path -> the files (or saved-dataset directories) it names, in a stable order."""
    if any(ch in path_text for ch in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(path_text), recursive=True))
        if not matches:
            raise SourceError(f"{path_text}: the pattern matches no file")
        out: list[Path] = []
        for match in matches:
            out.extend(expand(str(match)) if match.is_dir() else [match])
        return out
    path = Path(path_text).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
        if not files:
            raise SourceError(f"{path_text}: the directory holds no .jsonl, .parquet or .txt file and is not a "
                              "save_to_disk dataset")
        return files
    if not path.exists():
        raise SourceError(f"{path_text}: does not exist")
    return [path]


def _check_json_lines(path: Path) -> None:
    """A .json file holding one JSON array is not streamable: say how to convert it."""
    if path.name.lower().endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            raise SourceError(f"{display_path(path)}: a JSON array, not JSON Lines; convert it with "
                              f"`jq -c '.[]' {path.name} > {path.stem}.jsonl`")


def open_file(path: Path, fmt: str, text_unit: str, split: str) -> FileSource:
    """The FileSource that reads `path` (by extension, or a save_to_disk directory)."""
    if path.is_dir():
        return ArrowDiskSource(path, split)
    kind = _kind(path)
    if kind is None:
        raise SourceError(f"{display_path(path)}: unknown file type (use .jsonl, .jsonl.gz, .parquet, .txt, a "
                          "directory, or a save_to_disk dataset)")
    if kind == "text" and fmt != "text":
        raise SourceError(f"{display_path(path)}: a plain text file can only be format text, not {fmt}")
    if kind == "parquet":
        return ParquetSource(path)
    if kind == "jsonl":
        _check_json_lines(path)
        return DelimitedSource(path, "line", json_lines=True)
    if text_unit == "document":
        return DocumentSource(path)
    return DelimitedSource(path, text_unit)
