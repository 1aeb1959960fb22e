"""Batches as the model takes them: samples right-padded (or packed into rows, each sample its own attention
segment), with the sample ids and stream positions the audit records, and what the recipe counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from ftcore.data.formats import IGNORE_INDEX, Tokenized
from ftcore.data.packing import packed_attention_inputs


@dataclass
class Piece:
    """One sample as the stream buffers it: where it came from (stream position, piece) and its tokens."""

    tag: tuple[int, int]  # (stream position, index of the piece in its record's pieces)
    sample: Tokenized
    sample_id: str


@dataclass
class Batch:
    """A micro batch as the model takes it, with what the recipe counts and the audit records."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 on real tokens, 0 on padding (also kept for packed rows: token counts)
    labels: torch.Tensor
    sample_ids: list[str] = field(default_factory=list)
    position_ids: Optional[torch.Tensor] = None  # packed rows only: restarts at 0 for every sample
    seq_lens: Optional[list[list[int]]] = None  # packed rows only: segment lengths per row (padding included)
    positions: list[int] = field(default_factory=list)  # stream position of each sample (its epoch is in it)
    examples: int = 0  # the examples a per-example loss averages over (preference pairs, KTO samples)
    # sequence_shard: labels are already shifted (label t is the token after t) and the model gets no mask
    shifted: bool = False
    blocks: int = 1  # rows come in this many blocks of `examples` rows each (pairs: the chosen, then the rejected)
    extra: Optional[BatchExtra] = None  # what a task's objective reads beside the rows (KTO: its mismatched rows)

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is computed on."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def real_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(self.attention_mask.sum())

    def sample_lengths(self) -> list[int]:
        """Tokens of each sample the model attends within (a packed row holds several)."""
        if self.seq_lens is not None:
            return [n for row in self.seq_lens for n in row]
        return [int(n) for n in self.attention_mask.sum(dim=1)]

    def model_inputs(self, device: Any, attn_implementation: str = "sdpa",
                     dtype: Optional[torch.dtype] = None) -> dict:
        """The model's keyword arguments on `device` (packed rows: position ids, and the mask the attention needs;
        a sequence shard: its global position ids and shifted labels, no mask)."""
        if self.shifted or self.position_ids is None:
            out = ({"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device),
                    "shift_labels": self.labels.to(device), "use_cache": False} if self.shifted else
                   {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                    "labels": self.labels.to(device), "use_cache": False})
            if self.extra is not None:  # read (and removed) by the task's objective, never passed to the model
                out.update(self.extra.model_inputs(device))
            return out
        extra = packed_attention_inputs(self.seq_lens, self.input_ids.shape[1], attn_implementation, dtype)
        ids, labels, positions = self.input_ids, self.labels, self.position_ids
        if attn_implementation == "flash_attention_2":  # one varlen sequence: rows flattened
            ids, labels, positions = ids.reshape(1, -1), labels.reshape(1, -1), positions.reshape(1, -1)
        out = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device),
               "use_cache": False}
        out.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
        return out


    def sequence_shard(self, part: int, parts: int, rows: int, one_row: bool = False) -> "Batch":
        """Rank `part` of `parts` in a sequence group: its contiguous 1/parts of every row's tokens (distributed.
        sequence_parallel). Labels are shifted first, so the last token of a part still learns the first token of
        the next; rows are padded to `rows` (a pair batch keeps its chosen half, then its rejected half) and the
        width to a multiple of `parts` (padding never trains), as Ulysses needs the same shapes on every rank;
        position ids stay global (packed rows: per sample). Without a mask: Ulysses attends causally (right
        padding is never attended to by a real token). The task's extra rows (KTO's mismatched rows) are split
        alike.

        one_row (packing, which sequence parallelism allows with flash_attention_2 only): the rows are first
        joined into one varlen row, as the flash-attention path without sequence parallelism takes packed rows,
        every sample (or unpacked row) told apart by its position ids restarting at 0."""
        if one_row and self.input_ids.shape[0] > 1:
            count, width = self.input_ids.shape
            positions = self.position_ids if self.position_ids is not None else \
                torch.arange(width).expand(count, width)
            flat = Batch(self.input_ids.reshape(1, -1), self.attention_mask.reshape(1, -1),
                         self.labels.reshape(1, -1), position_ids=positions.reshape(1, -1))
            shard = flat.sequence_shard(part, parts, 1)
            shard.sample_ids, shard.positions = list(self.sample_ids), list(self.positions)
            return shard
        count, width = self.input_ids.shape
        rows = max(rows, count)
        wide = -(-width // parts) * parts
        if self.blocks > 1:  # pad each block to its share of the rows (pairs: chosen and rejected halves)
            share = rows // self.blocks
            order = [i for b in range(self.blocks)
                     for i in [b * self.examples + j for j in range(self.examples)] + [-1] * (share - self.examples)]
        else:
            order = list(range(count)) + [-1] * (rows - count)
        ids = torch.zeros((rows, wide), dtype=torch.long)
        labels = torch.full((rows, wide), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((rows, wide), dtype=torch.long)
        positions = torch.arange(wide).expand(rows, wide).clone()
        for row, source in enumerate(order):
            if source < 0:
                continue
            ids[row, :width] = self.input_ids[source]
            labels[row, :width - 1] = self.labels[source, 1:]
            mask[row, :width] = self.attention_mask[source]
            if self.position_ids is not None:  # (flattened) packed: per-sample positions, the padding counting on
                positions[row, :width] = self.position_ids[source]
                positions[row, width:] = self.position_ids[source, -1] + 1 + torch.arange(wide - width)
        extra = self.extra.sequence_shard(part, parts, rows, count) if self.extra is not None else None
        span = slice(part * wide // parts, (part + 1) * wide // parts)
        return Batch(ids[:, span].contiguous(), mask[:, span].contiguous(), labels[:, span].contiguous(),
                     sample_ids=list(self.sample_ids), position_ids=positions[:, span].contiguous(),
                     positions=list(self.positions), examples=self.examples, shifted=True, blocks=self.blocks,
                     extra=extra)


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


def collate_packed(rows: list[list[Piece]], pad_id: int) -> Batch:
    """Rows of concatenated samples, right-padded to the fullest row; the padding tail is its own segment."""
    width = max(sum(len(p.sample) for p in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    seq_lens, sample_ids = [], []
    for r, row in enumerate(rows):
        offset, lens = 0, []
        for piece in row:
            n = len(piece.sample)
            ids[r, offset:offset + n] = torch.tensor(piece.sample.input_ids)
            labels[r, offset:offset + n] = torch.tensor(piece.sample.labels)
            positions[r, offset:offset + n] = torch.arange(n)
            mask[r, offset:offset + n] = 1
            offset += n
            lens.append(n)
            sample_ids.append(piece.sample_id)
        if offset < width:
            positions[r, offset:] = torch.arange(width - offset)
            lens.append(width - offset)
        seq_lens.append(lens)
    return Batch(ids, mask, labels, sample_ids, positions, seq_lens,
                 [p.tag[0] for row in rows for p in row])


def pad_token_id(tokenizer: Any) -> int:
    """The id batches pad with: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def pad_eval_batches(batches: list[Batch], count: int, filler: Any) -> list[Batch]:
    """Add `filler()` batches (the task's: labels all ignored, counting as no example), so every rank runs `count`
    forward passes (each one is a collective under ZeRO-3)."""
    return batches + [filler() for _ in range(count - len(batches))]


def filler_sample(pad_id: int) -> Tokenized:
    """A sample of padding with nothing to train on, for filler batches."""
    return Tokenized([pad_id] * 8, [IGNORE_INDEX] * 8)


@dataclass(frozen=True)
class Collation:
    """What a task's collate needs beside the samples: the id rows are padded with, data.max_seq_len and the
    tokenizer's BOS id."""

    pad_id: int
    max_seq_len: int
    bos_id: Optional[int] = None

    @classmethod
    def of(cls, tokenizer: Any, max_seq_len: int) -> "Collation":
        """The collation of batches of `tokenizer`'s samples (pad_token_id's id) up to `max_seq_len` tokens."""
        return cls(pad_token_id(tokenizer), max_seq_len, tokenizer.bos_token_id)


class BatchExtra(Protocol):
    """A task's tensors beside a batch's rows (KTO: the desirable flags and the mismatched rows)."""

    def model_inputs(self, device: Any) -> dict:
        """Its entries of the objective's inputs, on `device` (the objective removes them before the forward)."""

    def sequence_shard(self, part: int, parts: int, rows: int, count: int) -> "BatchExtra":
        """Rank `part` of `parts` of a sequence group: its share, the batch's `count` rows padded to `rows`."""
