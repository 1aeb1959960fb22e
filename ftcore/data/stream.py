"""Per-rank streams of tokenized training batches: read -> parse -> tokenize -> overflow -> (pack) -> batch.

Order (see order.py): stream positions map to records by a pure function of the seed; rank r of W reads
positions r, r+W, ... (after any left over from a resharded checkpoint). Records are read by block, so nothing
is loaded whole and memory does not grow with the corpus.

State (state_dict) is the cursor, the ids of samples read but not yet emitted (the packing buffer), and the
counters. Loading it seeks: buffered samples are re-read by position, the cursor continues where it was, so
the resumed batches equal the uninterrupted run's. At another world size, `reshard` (order.py) hands every
position no rank had emitted to exactly one new rank.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from typing import Any, Optional, Protocol

import numpy as np

from ftcore.builtin import resolve_data_path
from ftcore.config import DataConfig, DataSource
from ftcore.data.batch import Batch, Collation, Piece, collate_packed
from ftcore.data.formats import IGNORE_INDEX, RecordError, RecordSpec, Tokenized, resolve_train_on
from ftcore.data.order import WINDOW_BLOCKS, Mixture, RankCursor, SourceOrder, reshard
from ftcore.data.packing import BestFitPacker
from ftcore.data.sources import FileSource, RawRecord, expand, open_file

STATE_VERSION = 2
MAX_ERROR_EXAMPLES = 5
# Records read in a row that yield nothing to train on before the stream gives up (a misconfigured mask or
# max_seq_len, not bad luck).
MAX_BARREN_RUN = 10_000
COUNTER_KEYS = ("records", "samples", "truncated", "dropped_too_long", "split_records", "split_pieces",
                "skipped_errors", "skipped_no_trained_tokens", "tokens", "trained_tokens", "row_tokens")

__all__ = ["Batch", "DataError", "SampleTask", "SourceGroup", "TrainStream", "eval_batches", "reshard"]


class SampleTask(Protocol):
    """What the stream asks the run's task (ftcore/tasks/): how a record tokenizes and samples collate."""

    truncates_itself: bool  # its samples are cut to data.max_seq_len by its own rule (not data.overflow)
    reads_next_sample: bool  # collate takes each sample's successor in stream order too

    def tokenize(self, record: Any, spec: RecordSpec, tokenizer: Any, max_seq_len: int) -> Any:
        """One parsed record -> its sample (RecordError when it is malformed)."""

    def collate(self, samples: list, sample_ids: list[str], collation: Collation,
                next_samples: Optional[list] = None) -> Batch:
        """Samples (with their successors when reads_next_sample) -> one unpacked micro batch."""


class DataError(ValueError):
    """A data problem phrased as one line naming the file (and line)."""


# ---------------------------------------------------------------------------------------------- sources
class SourceGroup:
    """One entry of data.train / data.eval: its files as one sequence of blocks, and how to read records."""

    def __init__(self, spec: DataSource, data_cfg: DataConfig, index: int, seed: int):
        self.spec_text = spec.path
        try:
            self.spec = RecordSpec(spec.format, resolve_train_on(spec.format, data_cfg.train_on), spec.fields,
                                   spec.roles, data_cfg.labels)
            path = resolve_data_path(spec.path)
            self.files: list[FileSource] = [open_file(p, spec.format, spec.text_unit, spec.split)
                                            for p in expand(path)]
        except (ValueError, OSError) as e:  # SourceError, unknown builtin, bad train_on, unreadable file
            raise DataError(f"{spec.path}: {e}" if not str(e).startswith(spec.path) else str(e)) from None
        self.weight = spec.weight
        counts = [np.frombuffer(f.counts, dtype=np.int64) if len(f.counts) else np.zeros(0, np.int64)
                  for f in self.files]
        self.block_file = np.concatenate([np.full(len(c), i) for i, c in enumerate(counts)]).astype(np.int64)
        self.block_local = np.concatenate([np.arange(len(c)) for c in counts]).astype(np.int64)
        all_counts = np.concatenate(counts)
        if all_counts.sum() == 0:
            raise DataError(f"{spec.path}: no records (empty source)")
        self.order = SourceOrder(all_counts, seed, index, data_cfg.shuffle)
        self._blocks: OrderedDict[int, list[RawRecord]] = OrderedDict()
        self.blocks_read = 0

    def __len__(self) -> int:
        return self.order.total

    def record(self, block: int, offset: int) -> RawRecord:
        """The record at `offset` in `block`, reading (and caching) the block on first use."""
        records = self._blocks.get(block)
        if records is None:
            source = self.files[int(self.block_file[block])]
            try:
                records = source.read_block(int(self.block_local[block]))
            except (ValueError, OSError) as e:
                raise DataError(str(e)) from None
            self.blocks_read += 1
            self._blocks[block] = records
            while len(self._blocks) > WINDOW_BLOCKS + 1:  # the current shuffle window, plus one
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        return records[offset]

    def all_records(self):
        """Every record in file order (for evaluation)."""
        for block in range(len(self.block_file)):
            for record in self.files[int(self.block_file[block])].read_block(int(self.block_local[block])):
                yield record


def parse_record(raw: RawRecord, spec: RecordSpec) -> Any:
    if isinstance(raw.value, dict):
        return raw.value
    try:
        text = raw.value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    if not raw.json:
        return {spec.fields.text: text}  # a plain text file's document, paragraph or line
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e.msg} (column {e.colno})") from None


def discover_labels(data_cfg: DataConfig) -> list[str]:
    """data.labels when it is set; else every label in data.train and data.eval: names sorted, or for integer ids
    "0".."max". Reads every record once (set data.labels to skip that on a large corpus)."""
    if data_cfg.labels is not None:
        return list(data_cfg.labels)
    names: set[str] = set()
    ids: set[int] = set()
    for i, spec in enumerate(list(data_cfg.train) + list(data_cfg.eval or [])):
        group = SourceGroup(spec, data_cfg, i, 0)
        for raw in group.all_records():
            try:
                record = parse_record(raw, group.spec)
            except RecordError:
                continue  # reported with file:line when the record is read for training
            value = record.get(spec.fields.label) if isinstance(record, dict) else None
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                ids.add(value)
    if names and ids:
        raise DataError(f"data.labels: the data mixes class names ({sorted(names)[:3]}) and integer ids "
                        f"({sorted(ids)[:3]}); set data.labels to the class names in id order")
    labels = [str(i) for i in range(max(ids) + 1)] if ids else sorted(names)
    if len(labels) < 2:
        raise DataError(f"data.labels: the data has {len(labels)} class ({labels}); a classifier needs at least two "
                        "(set data.labels to list them)")
    return labels


# ---------------------------------------------------------------------------------------------- samples
class SampleMaker:
    """Raw record -> the pieces to train on, applying data.overflow and data.on_error, with counters."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Any, task: SampleTask):
        self.cfg, self.tokenizer, self.task = data_cfg, tokenizer, task
        self.counters = {k: 0 for k in COUNTER_KEYS}
        self.error_examples: list[str] = []

    def make(self, raw: RawRecord, spec: RecordSpec, count: bool = True) -> list[Optional[Tokenized]]:
        """The record's pieces, in order; a piece with nothing to train on is None (kept so piece indexes are
        stable). An unusable record gives [] under on_error=skip."""
        c = self.counters if count else {k: 0 for k in COUNTER_KEYS}
        c["records"] += 1
        try:
            sample = self.task.tokenize(parse_record(raw, spec), spec, self.tokenizer, self.cfg.max_seq_len)
        except RecordError as e:
            if self.cfg.on_error == "raise":
                raise DataError(f"{raw.where}: {e} (data.on_error=skip skips such records)") from None
            c["skipped_errors"] += 1
            if count and len(self.error_examples) < MAX_ERROR_EXAMPLES:
                self.error_examples.append(f"{raw.where}: {e}")
            return []
        if self.task.truncates_itself:  # e.g. a pair, cut by its own rule (ftcore/data/preference.py)
            c["truncated"] += int(sample.truncated)
            if not sample.trainable:
                c["skipped_no_trained_tokens"] += 1
                return [None]
            return [sample]
        limit = self.cfg.max_seq_len
        pieces: list[Tokenized] = [sample]
        if len(sample) > limit:
            if self.cfg.overflow == "drop":
                c["dropped_too_long"] += 1
                return []
            if self.cfg.overflow == "truncate":
                c["truncated"] += 1
                pieces = [Tokenized(sample.input_ids[:limit], sample.labels[:limit])]
            else:
                pieces = split_sample(sample, limit)
                c["split_records"] += 1
                c["split_pieces"] += len(pieces)
        out: list[Optional[Tokenized]] = []
        for piece in pieces:
            if piece.trained_tokens == 0:  # e.g. the answer was cut off by truncation
                c["skipped_no_trained_tokens"] += 1
                out.append(None)
            else:
                out.append(piece)
        return out


def split_sample(sample: Tokenized, limit: int) -> list[Tokenized]:
    """Chunks of `limit` tokens overlapping by one: each chunk's first token is only context (its prediction
    belongs to the previous chunk), so every token but the very first is trained exactly once."""
    pieces, start = [], 0
    while True:
        ids = sample.input_ids[start:start + limit]
        labels = list(sample.labels[start:start + limit])
        labels[0] = IGNORE_INDEX
        pieces.append(Tokenized(ids, labels))
        if start + limit >= len(sample):
            return pieces
        start += limit - 1


# ---------------------------------------------------------------------------------------------- train stream
class TrainStream:
    """This rank's endless stream of training batches, with state_dict / load_state_dict for exact resume."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Any, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, task: SampleTask):
        self.cfg, self.tokenizer, self.seed, self.task = data_cfg, tokenizer, seed, task
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.groups = [SourceGroup(spec, data_cfg, i, seed) for i, spec in enumerate(data_cfg.train)]
        self.mixture = Mixture([g.weight for g in self.groups], seed)
        self.cursor = RankCursor(rank, world_size)
        self.maker = SampleMaker(data_cfg, tokenizer, task)
        self.collation = Collation.of(tokenizer, data_cfg.max_seq_len)
        self.pad_id = self.collation.pad_id
        self.packer: Optional[BestFitPacker[Piece]] = BestFitPacker(data_cfg.max_seq_len) if data_cfg.packing \
            else None
        self.fifo: deque[Piece] = deque()
        self.barren_limit = min(MAX_BARREN_RUN, sum(len(g) for g in self.groups))

    @property
    def counters(self) -> dict:
        """Samples read, trained, truncated, dropped and skipped so far on this rank."""
        return self.maker.counters

    @property
    def total_records(self) -> int:
        """Records in all training sources."""
        return sum(len(g) for g in self.groups)

    def _buffered(self) -> int:
        return len(self.packer) if self.packer is not None else len(self.fifo)

    def _buffer(self, piece: Piece) -> None:
        if self.packer is not None:
            self.packer.add(len(piece.sample), piece)
        else:
            self.fifo.append(piece)

    def _pieces_at(self, position: int, only: int, count: bool = True) -> list[Piece]:
        g, draw = self.mixture.locate(position)
        group = self.groups[g]
        _, block, offset = group.order.locate(draw)
        raw = group.record(block, offset)
        made = self.maker.make(raw, group.spec, count=count)
        many = len(made) > 1
        out = []
        for i, sample in enumerate(made):
            if sample is None or (only >= 0 and i != only):
                continue
            out.append(Piece((position, i), sample, f"{raw.where}#{i}" if many else raw.where))
        return out

    def _fill(self, target: int) -> None:
        barren = 0
        while self._buffered() < target:
            position, piece = self.cursor.next()
            pieces = self._pieces_at(position, piece)
            for p in pieces:
                self._buffer(p)
            barren = 0 if pieces else barren + 1
            if barren >= self.barren_limit:
                c = self.counters
                raise DataError(
                    f"data.train: {barren} records in a row gave nothing to train on (malformed, skipped: "
                    f"{c['skipped_errors']}; longer than data.max_seq_len={self.cfg.max_seq_len}, dropped: "
                    f"{c['dropped_too_long']}; no trained token left: {c['skipped_no_trained_tokens']}); check "
                    "data.train_on, data.max_seq_len and the files")

    def _emitted(self, pieces: list[Piece], row_tokens: int) -> None:
        c = self.counters
        c["samples"] += len(pieces)
        c["tokens"] += sum(len(p.sample) for p in pieces)
        c["trained_tokens"] += sum(p.sample.trained_tokens for p in pieces)
        c["row_tokens"] += row_tokens

    def prime(self) -> None:
        """Read ahead the first batch: a source with nothing to train on fails here, before any model loads."""
        self._fill(self.cfg.packing_buffer if self.packer is not None else self.micro_batch_size)

    def next_batch(self) -> Batch:
        """The next micro batch of this rank (packed rows when data.packing)."""
        if self.packer is None:
            self._fill(self.micro_batch_size)
            pieces = [self.fifo.popleft() for _ in range(self.micro_batch_size)]
            after = [self._next_sample(p.tag[0]) for p in pieces] if self.task.reads_next_sample else None
            batch = self.task.collate([p.sample for p in pieces], [p.sample_id for p in pieces], self.collation,
                                      after)
            batch.positions = [p.tag[0] for p in pieces]
            self._emitted(pieces, batch.input_ids.numel())
            return batch
        rows = []
        for _ in range(self.micro_batch_size):
            self._fill(self.cfg.packing_buffer)
            rows.append(self.packer.pop_row())
        batch = collate_packed(rows, self.pad_id)
        self._emitted([p for row in rows for p in row], batch.input_ids.numel())
        return batch

    def _next_sample(self, position: int) -> Any:
        """The sample after `position` in stream order: the one at the next stream position that yields one (read
        here, whichever rank trains it), so what a task makes of it (KTO: the mismatched rows, and with them its
        reference point) is the same at any world size and accumulation."""
        for after in range(1, self.barren_limit + 1):
            pieces = self._pieces_at(position + after, -1, count=False)
            if pieces:
                return pieces[0].sample
        raise DataError(f"data.train: no usable record within {self.barren_limit} positions after {position}")

    @property
    def packing_efficiency(self) -> Optional[float]:
        """Real tokens / row slots over every batch emitted so far (padding is the rest)."""
        c = self.counters
        return c["tokens"] / c["row_tokens"] if c["row_tokens"] else None

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: cursor, buffered samples, counters."""
        buffered = self.packer.items() if self.packer is not None else list(self.fifo)
        return {"version": STATE_VERSION, "cursor": self.cursor.state_dict(),
                "buffer": [list(p.tag) for p in buffered], "counters": dict(self.counters),
                "error_examples": list(self.maker.error_examples), "source_records": [len(g) for g in self.groups],
                "packing": self.cfg.packing, "max_seq_len": self.cfg.max_seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off. A state from another world size must go through reshard
        first (every rank's state is needed to know what is left)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}: the checkpoint "
                            "was written by another version of ft")
        cursor = state["cursor"]
        if cursor["world_size"] != self.world_size or cursor["rank"] != self.rank:
            raise DataError(f"data state is for rank {cursor['rank']} of {cursor['world_size']}, this is rank "
                            f"{self.rank} of {self.world_size} (reshard the states first)")
        if state["source_records"] != [len(g) for g in self.groups]:
            raise DataError(f"data.train now has {[len(g) for g in self.groups]} records per source, the "
                            f"checkpoint saw {state['source_records']}: the data changed since it was written")
        self.cursor.load_state_dict(cursor)
        self.maker.counters = {k: state["counters"].get(k, 0) for k in COUNTER_KEYS}
        self.maker.error_examples = list(state.get("error_examples", []))
        self.fifo.clear()
        if self.packer is not None:
            self.packer = BestFitPacker(self.cfg.max_seq_len)
        for position, piece in state["buffer"]:  # re-read by position: seeks, no replay
            for p in self._pieces_at(position, piece, count=False):
                self._buffer(p)

    def report(self) -> dict:
        """Counters plus packing efficiency and the first few skipped records' reasons."""
        out = dict(self.counters)
        out["packing_efficiency"] = self.packing_efficiency
        out["error_examples"] = list(self.maker.error_examples)
        return out


def restore_states(states: list[dict], world_size: int) -> list[dict]:
    """Checkpointed per-rank states -> states for this world size (unchanged when it is the same)."""
    if len(states) == world_size:
        return states
    return reshard(states, world_size)


# ---------------------------------------------------------------------------------------------- eval
def eval_batches(data_cfg: DataConfig, tokenizer: Any, rank: int, world_size: int, micro_batch_size: int,
                 task: SampleTask) -> list[Batch]:
    """This rank's share of the eval set, in file order (records i with i % world == rank), unpacked.
    Ranks may end up with different batch counts (skipped records); pad_eval_batches evens them out."""
    maker = SampleMaker(data_cfg, tokenizer, task)
    mine: list[tuple[Tokenized, str]] = []
    # A task that reads each sample's successor gets the next one of the whole set, so every rank reads every
    # record (what the task makes of it is then the same at any world size): `everything`, with the successor of
    # each of `mine` by its place in it.
    successors = task.reads_next_sample
    everything: list[Any] = []
    after: list[int] = []
    index = 0
    for i, spec in enumerate(data_cfg.eval or []):
        group = SourceGroup(spec, data_cfg, i, 0)
        for raw in group.all_records():
            if index % world_size == rank or successors:
                made = maker.make(raw, group.spec)
                kept = [(s, f"{raw.where}#{j}" if len(made) > 1 else raw.where)
                        for j, s in enumerate(made) if s is not None]
                if index % world_size == rank:
                    mine += kept
                    after += range(len(everything) + 1, len(everything) + 1 + len(kept))
                if successors:
                    everything += [s for s, _ in kept]
            index += 1
    collation = Collation.of(tokenizer, data_cfg.max_seq_len)
    batches = []
    for start in range(0, len(mine), micro_batch_size):
        chunk = mine[start:start + micro_batch_size]
        # (the last sample's successor is the first)
        next_samples = [everything[k % len(everything)] for k in after[start:start + len(chunk)]] if successors \
            else None
        batches.append(task.collate([s for s, _ in chunk], [w for _, w in chunk], collation, next_samples))
    return batches
