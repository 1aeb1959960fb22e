"""Per-rank streams of tokenized batches with a deterministic global order and exact resume.

The global sample order of epoch e is a pure function of (sources, seed, e): all sources concatenated, then
permuted with a generator seeded by (seed, e). Rank r of W takes positions r, r+W, r+2W, ... and every rank
takes the same count (N // W) so that ranks stay in lockstep (a rank that runs out first would leave the
others waiting in a collective). Records are read by seeking to byte offsets indexed in one pass, so resuming
at sample k costs one seek, not k reads; memory is one 8-byte offset per line.

State is (epoch, position): position counts this rank's samples already emitted in batches.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ftcore.builtin import resolve_data_path
from ftcore.config import DataConfig, DataSource
from ftcore.data.formats import IGNORE_INDEX, RecordError, Tokenized, resolve_train_on, tokenize_record


class DataError(ValueError):
    """A data problem phrased as one line naming the file (and line)."""


class JsonlSource:
    """One JSONL file: line offsets indexed once, records read by seek."""

    def __init__(self, spec: DataSource, train_on: Optional[str]):
        self.path = Path(resolve_data_path(spec.path))
        self.format = spec.format
        try:
            self.train_on = resolve_train_on(spec.format, train_on)
        except ValueError as e:
            raise DataError(f"{spec.path}: {e}") from None
        if not self.path.is_file():
            raise DataError(f"{spec.path}: data file does not exist")
        self.offsets = array("q")  # byte offset of each non-blank line
        self.line_numbers = array("q")
        with open(self.path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)
        if not self.offsets:
            raise DataError(f"{self.path}: no records")
        self._handle = None

    def __len__(self) -> int:
        return len(self.offsets)

    def sample_id(self, index: int) -> str:
        return f"{self.path.name}:{self.line_numbers[index]}"

    def read(self, index: int) -> Any:
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(self.offsets[index])
        line = self._handle.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{self.line_numbers[index]}: invalid JSON: {e.msg}") from None

    def tokenize(self, index: int, tokenizer: Any) -> Tokenized:
        try:
            return tokenize_record(self.read(index), self.format, self.train_on, tokenizer)
        except RecordError as e:
            raise DataError(f"{self.path}:{self.line_numbers[index]}: {e}") from None


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    sample_ids: list[str] = field(default_factory=list)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def model_inputs(self, device: Any) -> dict:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "labels": self.labels.to(device)}


def collate(samples: list[Tokenized], pad_id: int, sample_ids: list[str]) -> Batch:
    """Right-pad to the longest sample in the batch; padding never carries loss or attention."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, sample_ids)


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _open_sources(specs: list[DataSource], data_cfg: DataConfig) -> list[JsonlSource]:
    return [JsonlSource(spec, data_cfg.train_on) for spec in specs]


def _truncate(sample: Tokenized, max_len: int) -> Tokenized:
    return Tokenized(sample.input_ids[:max_len], sample.labels[:max_len])


class TrainStream:
    """This rank's endless stream of training batches (epochs roll over), with state_dict for exact resume."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Any, seed: int, rank: int, world_size: int,
                 micro_batch_size: int):
        self.cfg, self.tokenizer, self.seed = data_cfg, tokenizer, seed
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.sources = _open_sources(data_cfg.train, data_cfg)
        self.total = sum(len(s) for s in self.sources)
        self.per_rank = self.total // world_size
        if self.per_rank < micro_batch_size:
            raise DataError(f"data.train has {self.total} samples: too few for {world_size} ranks x "
                            f"micro_batch_size {micro_batch_size}")
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])
        self.epoch, self.position = 0, 0
        self.skipped_no_loss = 0
        self._order: Optional[np.ndarray] = None

    def _rank_order(self) -> np.ndarray:
        if self._order is None:
            order = np.arange(self.total)
            if self.cfg.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.total)
            self._order = order[self.rank:: self.world_size][: self.per_rank]
        return self._order

    def _locate(self, global_index: int) -> tuple[JsonlSource, int]:
        src = int(np.searchsorted(self._starts, global_index, side="right") - 1)
        return self.sources[src], global_index - int(self._starts[src])

    def _next_sample(self) -> tuple[Tokenized, str]:
        skipped_in_a_row = 0
        while True:
            if self.position >= self.per_rank:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            source, index = self._locate(int(self._rank_order()[self.position]))
            self.position += 1
            sample = _truncate(source.tokenize(index, self.tokenizer), self.cfg.max_seq_len)
            if sample.trained_tokens == 0:  # e.g. the answer was cut off by truncation
                self.skipped_no_loss += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= self.per_rank:  # a whole epoch of this rank's share: would loop forever
                    raise DataError(f"no sample of this rank's {self.per_rank} in data.train has a trained token "
                                    f"within data.max_seq_len={self.cfg.max_seq_len}; raise it or check train_on")
                continue
            return sample, source.sample_id(index)

    def next_batch(self) -> Batch:
        pairs = [self._next_sample() for _ in range(self.micro_batch_size)]
        return collate([p[0] for p in pairs], pad_token_id(self.tokenizer), [p[1] for p in pairs])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rank": self.rank,
                "world_size": self.world_size, "total_samples": self.total,
                "skipped_no_loss": self.skipped_no_loss}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise DataError(f"data state is for rank {state['rank']} of {state['world_size']}, "
                            f"this is rank {self.rank} of {self.world_size}")
        if state["total_samples"] != self.total:
            raise DataError(f"data.train now has {self.total} samples, the checkpoint saw "
                            f"{state['total_samples']}: the data changed since the checkpoint was written")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        self.skipped_no_loss = state["skipped_no_loss"]


def eval_batches(data_cfg: DataConfig, tokenizer: Any, rank: int, world_size: int,
                 micro_batch_size: int) -> list[Batch]:
    """This rank's share of the eval set, in order. Every rank gets the same number of batches (forward passes
    are collectives under ZeRO-3); a rank short of samples gets filler rows whose labels are all ignored."""
    sources = _open_sources(data_cfg.eval or [], data_cfg)
    everything = [(s, i) for s in sources for i in range(len(s))]
    mine = everything[rank::world_size]
    per_rank = -(-len(everything) // world_size)
    n_batches = -(-per_rank // micro_batch_size)
    pad = pad_token_id(tokenizer)
    batches = []
    for b in range(n_batches):
        samples, ids = [], []
        for j in range(b * micro_batch_size, (b + 1) * micro_batch_size):
            if j < len(mine):
                source, index = mine[j]
                samples.append(_truncate(source.tokenize(index, tokenizer), data_cfg.max_seq_len))
                ids.append(source.sample_id(index))
            else:
                filler = samples[0] if samples else _truncate(
                    everything[0][0].tokenize(everything[0][1], tokenizer), data_cfg.max_seq_len)
                samples.append(Tokenized(filler.input_ids, [IGNORE_INDEX] * len(filler.input_ids)))
        batches.append(collate(samples, pad, ids))
    return batches
