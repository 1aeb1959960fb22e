"""`ft data inspect`: what the model will see, before spending GPU hours on it.

Reads the training stream exactly as rank 0 of a 1-process run would (same order, masks, overflow handling),
shows a few samples with trained tokens marked, as the run's task shows a sample, and summarises a scan of the
first samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftcore.config import Config
from ftcore.data.formats import IGNORE_INDEX
from ftcore.data.packing import BestFitPacker
from ftcore.data.stream import TrainStream
from ftcore.tasks import task_for


@dataclass
class InspectResult:
    """What `ft data inspect` shows: a few samples with trained pieces marked, and statistics of a scan."""
    shown: list[tuple[str, list[tuple[str, bool]]]]  # (sample id, [(text piece, trained)])
    lengths: list[int]
    trained: list[int]
    counters: dict
    error_examples: list[str]
    packing_efficiency: float
    packing_rows: int
    sources: list[tuple[str, int, int]] = field(default_factory=list)  # (path, records, files)


def token_pieces(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The text of each run of trained / masked tokens (decoded incrementally, so spaces are exact)."""
    runs: list[tuple[str, bool]] = []
    previous_text = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        piece, previous_text = text[len(previous_text):], text
        trained = labels[i] != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1] = (runs[-1][0] + piece, trained)
        else:
            runs.append((piece, trained))
    return runs


def simulate_packing(lengths: list[int], capacity: int, buffer: int) -> tuple[float, int]:
    """Packing efficiency (tokens / row slots) the trainer's packer reaches on these lengths."""
    packer: BestFitPacker[int] = BestFitPacker(capacity)
    rows = 0
    for i, n in enumerate(lengths):
        packer.add(n, i)
        if len(packer) >= buffer:
            packer.pop_row()
            rows += 1
    while len(packer):
        packer.pop_row()
        rows += 1
    return (sum(lengths) / (rows * capacity) if rows else 0.0), rows


def inspect_data(cfg: Config, tokenizer: Any, show: int, scan: int) -> InspectResult:
    """Read `scan` samples as training would (packing off), keeping `show` of them for display; each as the run's
    task shows it (a preference pair as its chosen and its rejected row, a class with its text)."""
    task = task_for(cfg)
    data = cfg.data.model_copy(update={"packing": False})
    task.prepare_data(data)
    stream = TrainStream(data, tokenizer, cfg.train.seed, rank=0, world_size=1, micro_batch_size=1, task=task)
    shown, lengths, trained = [], [], []
    for i in range(max(scan, show)):
        batch = stream.next_batch()
        for suffix, ids, labels, targets in task.describe(batch, data):
            lengths.append(len(ids))
            trained.append(targets)
            if i < show:
                shown.append((batch.sample_ids[0] + suffix, token_pieces(tokenizer, ids, labels)))
    efficiency, rows = simulate_packing(lengths, cfg.data.max_seq_len, cfg.data.packing_buffer)
    return InspectResult(shown, lengths, trained, dict(stream.counters), list(stream.maker.error_examples),
                         efficiency, rows, [(g.spec_text, len(g), len(g.files)) for g in stream.groups])


def length_histogram(lengths: list[int], max_len: int, bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of sample lengths up to max_len, one line per bin."""
    edges = np.linspace(0, max_len, bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"{edges[i] + 1:>6}-{edges[i + 1]:<6} {'#' * round(width * c / top):<{width}} {c}"
            for i, c in enumerate(counts)]
