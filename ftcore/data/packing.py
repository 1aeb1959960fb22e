"""Best-fit packing of samples into rows of a fixed length, and the attention inputs that keep them apart.

A row starts with the oldest sample in the buffer (so no sample waits more than buffer-size rows), then takes
the longest remaining sample that still fits, until none does. With many short samples to choose from, rows
come out nearly full.

Isolation: every sample restarts its position ids at 0 and is its own attention segment. On flash-attn the
rows are flattened into one varlen sequence with cumulative segment lengths (no token sees another segment);
on sdpa and eager an equivalent block-diagonal causal mask is passed. The first label of every sample is
already ignored (see formats._finish), so no token is trained to predict the next sample's start.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Generic, Optional, TypeVar

import torch

from ftcore.data.batch import VarlenSegments

T = TypeVar("T")


class BestFitPacker(Generic[T]):
    """Holds (length, item) pairs; pop_row returns items whose lengths sum to at most `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[int, tuple[int, T]] = OrderedDict()  # insertion order = age
        self._by_length: dict[int, OrderedDict[int, None]] = {}
        self._lengths: list[int] = []  # sorted distinct lengths present
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, length: int, item: T) -> None:
        """Buffer a sample of `length` tokens."""
        if not 0 < length <= self.capacity:
            raise ValueError(f"sample of {length} tokens cannot be packed into rows of {self.capacity}")
        key = self._next_id
        self._next_id += 1
        self._items[key] = (length, item)
        bucket = self._by_length.get(length)
        if bucket is None:
            bucket = self._by_length[length] = OrderedDict()
            bisect.insort(self._lengths, length)
        bucket[key] = None

    def _remove(self, key: int) -> T:
        length, item = self._items.pop(key)
        bucket = self._by_length[length]
        del bucket[key]
        if not bucket:
            del self._by_length[length]
            self._lengths.pop(bisect.bisect_left(self._lengths, length))
        return item

    def pop_row(self) -> list[T]:
        """The next row: the oldest buffered sample plus the largest that still fit (best fit, first-in first)."""
        if not self._items:
            return []
        first = next(iter(self._items))
        room = self.capacity - self._items[first][0]
        row = [self._remove(first)]
        while room > 0:
            i = bisect.bisect_right(self._lengths, room) - 1
            if i < 0:
                break
            length = self._lengths[i]
            row.append(self._remove(next(iter(self._by_length[length]))))
            room -= length
        return row

    def items(self) -> list[T]:
        """Buffered items, oldest first (re-adding them in this order rebuilds the same packer)."""
        return [item for _, item in self._items.values()]


def segment_ids(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """(rows, width) segment index of every token; the padding tail is a segment of its own."""
    out = torch.empty((len(seq_lens), width), dtype=torch.long)
    for row, lens in enumerate(seq_lens):
        out[row] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return out


def block_causal_mask(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """(rows, 1, width, width) bool: query q may attend key k iff same segment and k <= q."""
    seg = segment_ids(seq_lens, width)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    return (same & causal)[:, None]


def packed_attention_mask(seq_lens: list[list[int]], width: int, attn_implementation: str,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The mask that keeps packed samples apart on sdpa (boolean, True = attend) or eager (added to the scores,
    in `dtype`). flash-attention takes varlen_segments instead."""
    mask = block_causal_mask(seq_lens, width)
    if attn_implementation == "eager":
        dtype = dtype or torch.float32
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def varlen_segments(lengths: list[int]) -> VarlenSegments:
    """flash-attention's segments of one row joining samples of these lengths."""
    lens = torch.tensor(lengths, dtype=torch.int32)
    return VarlenSegments(torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)), int(lens.max()))
