"""Batches as the model takes them: samples right-padded (or packed into rows, each sample its own attention
segment), with the sample ids and stream positions the audit records, and what the recipe counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from ftcore.data.formats import IGNORE_INDEX, Tokenized


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
    # A sequence shard (ftcore/train/sequence_parallel.py): labels are already shifted (label t is the token after
    # t) and the model gets no mask.
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

    def on_device(self, device: Any, inputs_of: Callable[[Batch], ModelInputs]) -> Any:
        """Its part of the objective's inputs (ModelInputs.extra) on `device`; `inputs_of` lays out a Batch of
        rows of its own as the run lays out the batch's."""

    def sequence_shard(self, shard_of: Callable[[Batch], Batch], rows: int, count: int) -> "BatchExtra":
        """This rank's share in a sequence group: the batch's `count` rows padded to `rows`; `shard_of` splits a
        Batch of rows of its own as the batch's were split."""


@dataclass(frozen=True)
class VarlenSegments:
    """flash-attention's varlen inputs for one row of joined samples: where each segment starts (cumulative
    lengths, 0 first) and the longest segment."""

    cu_seq_lens: torch.Tensor
    max_length: int

    def to(self, device: Any) -> "VarlenSegments":
        """The segments on `device`."""
        return VarlenSegments(self.cu_seq_lens.to(device), self.max_length)

    def forward_kwargs(self) -> dict:
        """transformers' flash-attention keyword arguments (queries and keys are the same segments)."""
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


@dataclass
class ModelInputs:
    """A micro batch on the device as an objective takes it (built by ftcore/train/sequence_parallel.py's
    model_inputs, which knows the run's attention and sequence layout): what the model's forward gets, the labels
    the loss reads, and the task's extra tensors. The objective decides what reaches the model: forward_kwargs()
    without labels (it computes the loss itself), with_labels() for the model's own loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # per token (IGNORE_INDEX: not trained); a classifier's: one class per row
    # Padding mask (plain rows), or packed rows' block-causal mask; None: causal over the row (flash-attention's
    # varlen segments, a sequence shard).
    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None  # packed rows and sequence shards
    varlen: Optional[VarlenSegments] = None  # packed rows joined into one row for flash-attention
    shifted: bool = False  # labels already shifted: label t is the token after t (a sequence shard)
    extra: Any = None  # the task's (its BatchExtra.on_device; KTO: the desirable flags and the mismatched rows)

    def forward_kwargs(self) -> dict:
        """The model's keyword arguments, without labels."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        if self.varlen is not None:
            kwargs.update(self.varlen.forward_kwargs())
        return kwargs

    def with_labels(self) -> dict:
        """The keyword arguments of a forward that computes the model's own loss (shift_labels when shifted)."""
        return {**self.forward_kwargs(), ("shift_labels" if self.shifted else "labels"): self.labels}

    @property
    def targets(self) -> torch.Tensor:
        """Each position's next-token label (the last position predicts nothing), as the logits at t are
        scored: transformers' causal-LM shift, or the labels as they are when already shifted."""
        return self.labels if self.shifted else shifted_labels(self.labels)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position t predicts t + 1; the last position predicts
    nothing), as transformers' causal-LM loss shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
