"""The global sample order: which record is at each position of the training stream. Pure functions of the seed.

Positions 0, 1, 2, ... of the stream are *draws*. With several sources, draws are dealt to sources in periods of
MIX_PERIOD slots, each source getting its weight's share of every period, in a seeded order; so the k-th draw of
a source is at a computable position and the mix holds at any scale. A source's draws go through its records
epoch after epoch (draw k is record k % N of epoch k // N), so a source with a large weight repeats and one with
a small weight is subsampled, each epoch in a fresh seeded order.

An epoch's order shuffles blocks (cheap: one entry per ~1 MiB), then records within windows of WINDOW_BLOCKS
consecutive blocks. Locating any position costs one window permutation, so a resumed run seeks in O(window)
instead of replaying the epoch, and memory is O(blocks), not O(records).

Ranks split positions (see RankCursor): rank r of W takes r, r+W, r+2W, ...
"""

from __future__ import annotations

from typing import Optional

import numpy as np

WINDOW_BLOCKS = 8
MIX_PERIOD = 1024
_MIX_STREAM = 0x5EED_0001  # keeps the mixing RNG stream apart from the per-source ones


class SourceOrder:
    """Epoch orders of one source (a concatenation of blocks with known record counts)."""

    def __init__(self, block_counts: np.ndarray, seed: int, source_index: int, shuffle: bool):
        self.counts = np.asarray(block_counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.source_index, self.shuffle = seed, source_index, shuffle
        self._epoch: Optional[int] = None
        self._window_cache: dict[int, tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}

    def _prepare_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        n = len(self.counts)
        rng = np.random.default_rng([self.seed, self.source_index, epoch])
        self.block_perm = rng.permutation(n) if self.shuffle else np.arange(n)
        counts = self.counts[self.block_perm]
        starts = np.arange(0, n, WINDOW_BLOCKS)
        self.window_starts = np.concatenate([[0], np.cumsum(np.add.reduceat(counts, starts))]) if n else np.zeros(1)
        self._epoch, self._window_cache = epoch, {}

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        if w not in self._window_cache:
            blocks = self.block_perm[w * WINDOW_BLOCKS:(w + 1) * WINDOW_BLOCKS]
            cum = np.concatenate([[0], np.cumsum(self.counts[blocks])])
            perm = None
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.source_index, self._epoch, w, 1])
                perm = rng.permutation(int(cum[-1]))
            self._window_cache = {w: (blocks, cum, perm)}  # one window at a time: memory stays bounded
        return self._window_cache[w]

    def locate(self, draw: int) -> tuple[int, int, int]:
        """Draw k of this source -> (epoch, block, record offset in the block)."""
        epoch, pos = divmod(draw, self.total)
        self._prepare_epoch(epoch)
        w = int(np.searchsorted(self.window_starts, pos, side="right") - 1)
        blocks, cum, perm = self._window(w)
        j = pos - int(self.window_starts[w])
        if perm is not None:
            j = int(perm[j])
        b = int(np.searchsorted(cum, j, side="right") - 1)
        return epoch, int(blocks[b]), j - int(cum[b])


class Mixture:
    """Stream position -> (source, k-th draw of that source), by weight."""

    def __init__(self, weights: list[float], seed: int):
        self.n = len(weights)
        self.seed = seed
        shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        if self.n == 1:
            self.counts = np.array([1])
        else:
            period = max(MIX_PERIOD, 4 * self.n)
            exact = shares * period
            counts = np.maximum(np.floor(exact).astype(np.int64), 1)
            # Largest remainder: hand the leftover slots to the sources furthest below their share.
            while counts.sum() < period:
                counts[np.argmax(exact - counts)] += 1
            while counts.sum() > period:
                counts[np.argmax(counts - exact)] -= 1
            self.counts = counts
        self.period = int(self.counts.sum())
        self._cached: Optional[tuple[int, np.ndarray, np.ndarray]] = None

    def _slots(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != p:
            slots = np.repeat(np.arange(self.n), self.counts)
            slots = np.random.default_rng([self.seed, _MIX_STREAM, p]).permutation(slots)
            rank_in_source = np.zeros(len(slots), dtype=np.int64)
            seen = np.zeros(self.n, dtype=np.int64)
            for i, s in enumerate(slots):
                rank_in_source[i] = seen[s]
                seen[s] += 1
            self._cached = (p, slots, rank_in_source)
        return self._cached[1], self._cached[2]

    def locate(self, position: int) -> tuple[int, int]:
        """The (source, index in source) of global position `position` in the weighted interleaving."""
        if self.n == 1:
            return 0, position
        p, j = divmod(position, self.period)
        slots, rank_in_source = self._slots(p)
        source = int(slots[j])
        return source, p * int(self.counts[source]) + int(rank_in_source[j])


class RankCursor:
    """Which stream positions this rank reads, in order, and how far it got.

    The positions are `pending[rank::world]` first (left over from a resharded checkpoint, see reshard), then
    base + rank + world * j for j = 0, 1, ... Each entry is [position, piece]: piece -1 is a whole record, piece
    i >= 0 one chunk of a record that data.overflow=split cut up.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.base, self.pending, self.pending_taken, self.taken = 0, [], 0, 0

    def next(self) -> tuple[int, int]:
        """This rank's next (position, piece): re-dealt positions of a resharded resume first, then its own."""
        mine = self.pending[self.rank:: self.world_size]
        if self.pending_taken < len(mine):
            position, piece = mine[self.pending_taken]
            self.pending_taken += 1
            return int(position), int(piece)
        position = self.base + self.rank + self.world_size * self.taken
        self.taken += 1
        return position, -1

    def state_dict(self) -> dict:
        """Where this rank's cursor is (saved per rank in data_state.json)."""
        return {"rank": self.rank, "world_size": self.world_size, "base": self.base, "pending": self.pending,
                "pending_taken": self.pending_taken, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """Continue from state_dict()."""
        self.base, self.pending = state["base"], [list(p) for p in state["pending"]]
        self.pending_taken, self.taken = state["pending_taken"], state["taken"]


def reshard(states: list[dict], world_size: int) -> list[dict]:
    """Every rank's stream state at one world size -> states for `world_size` ranks that continue the same
    stream: each position (or split piece) that no rank had emitted is read by exactly one new rank, once.

    Items a rank had read but still held in its buffer (not trained on yet) go back to the pool. The pool is
    bounded by how far the ranks drifted apart plus their buffers, not by the position in the epoch.
    """
    old_world = len(states)
    cursors = [s["cursor"] for s in states]
    if any(c["world_size"] != old_world for c in cursors) or sorted(c["rank"] for c in cursors) != list(
            range(old_world)):
        raise ValueError(f"the data state holds {old_world} ranks' states that do not form one world")
    base, pending = cursors[0]["base"], cursors[0]["pending"]
    leftover: list[tuple[int, int]] = []
    for c in sorted(cursors, key=lambda c: c["rank"]):
        leftover += [tuple(p) for p in pending[c["rank"]:: old_world][c["pending_taken"]:]]
    furthest = max(c["taken"] for c in cursors)
    for c in cursors:
        leftover += [(base + c["rank"] + old_world * j, -1) for j in range(c["taken"], furthest)]
    for s in states:
        leftover += [tuple(item) for item in s["buffer"]]
    new_pending = [list(item) for item in sorted(set(leftover))]
    new_base = base + old_world * furthest
    totals = {key: sum(s["counters"].get(key, 0) for s in states) for key in states[0]["counters"]}
    out = []
    for rank in range(world_size):
        out.append({**states[0], "cursor": {"rank": rank, "world_size": world_size, "base": new_base,
                                            "pending": new_pending, "pending_taken": 0, "taken": 0},
                    "buffer": [], "counters": totals if rank == 0 else {k: 0 for k in totals},
                    "error_examples": states[0].get("error_examples", []) if rank == 0 else []})
    return out
