"""The run's own position (step and token counts, and its experiment-tracker runs), saved with every checkpoint as
trainer_state.json next to the data stream's state, and restored from it through state_dict / load_state_dict like
every stateful part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ftcore.config import Config
from ftcore.resume import config_fingerprint


@dataclass
class RunState:
    """Optimizer steps taken and tokens seen, with what a resume must check (world, effective batch, config)."""

    cfg: Config
    world_size: int
    step: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    trackers: dict[str, str] = field(default_factory=dict)  # tracker -> run id (rank 0 knows them)
    base_model: Optional[dict] = None  # a GGUF base: its file and sha256 (ftcore.builtin.base_record)

    def advance(self, tokens: int, trained_tokens: int) -> None:
        """One optimizer step over `tokens` (of which `trained_tokens` trained), summed over all ranks."""
        self.step += 1
        self.tokens_seen += tokens
        self.trained_tokens_seen += trained_tokens

    def state_dict(self) -> dict:
        """What trainer_state.json holds."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "trained_tokens_seen": self.trained_tokens_seen,
                "world_size": self.world_size, "effective_batch_size": self.cfg.effective_batch_size(self.world_size),
                "config_fingerprint": config_fingerprint(self.cfg), "trackers": dict(self.trackers),
                "base_model": self.base_model}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's trainer_state.json (already checked by ftcore.resume)."""
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.trained_tokens_seen = state["trained_tokens_seen"]
        self.trackers = dict(state.get("trackers", {}))  # (absent from checkpoints of earlier releases)
