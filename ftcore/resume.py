"""Whether a checkpoint may be resumed by this run: the rules, in the order they are checked.

1. The checkpoint is complete (ftcore/checkpoint.py's manifest check, done when it is read).
2. Its config fingerprint matches: the fields below must be equal (anything else may change, e.g. logging).
3. The effective batch (samples per optimizer step) is the same; how it is split (micro batch, accumulation,
   world size) may change: the data stream and the optimizer state carry over.
4. ZeRO-3 parameter shards are tied to the world size that wrote them; ZeRO 0-2 resume at any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ftcore.checkpoint import CheckpointError
from ftcore.config import MOVED_FIELDS, Config

FINGERPRINT_FIELDS = (
    "task", "model.name_or_path", "model.dtype", "adapter", "data.train", "data.labels", "data.max_seq_len",
    "data.train_on", "data.overflow", "data.packing", "data.packing_buffer", "data.on_error", "data.shuffle",
    "train.max_steps", "optimizer.lr", "optimizer.weight_decay", "optimizer.warmup_steps", "train.seed",
    "optimizer.layer_lr_decay", "loss.base_kl", "distributed.zero_stage",
)


def config_fingerprint(cfg: Config) -> dict:
    """The FINGERPRINT_FIELDS of `cfg`, by dotted name (saved in every checkpoint's trainer_state.json)."""
    dumped = cfg.model_dump(mode="json")
    out = {}
    for dotted in FINGERPRINT_FIELDS:
        node: Any = dumped
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Fields that differ. A field the checkpoint does not record (it was added to ft after that checkpoint was
    written) counts as its default, so a run upgraded mid-way resumes unless it changes that field."""
    defaults = config_fingerprint(Config())
    old_names = {new: old for old, new in MOVED_FIELDS.items()}  # a checkpoint from before a field moved

    def recorded(k: str) -> Any:
        return saved.get(k, saved.get(old_names.get(k, k), defaults[k]))

    return [f"{k}: checkpoint {recorded(k)!r}, this run {current[k]!r}" for k in current if recorded(k) != current[k]]


def check_resumable(path: Path, saved_state: dict, cfg: Config, world_size: int,
                    base_model: Optional[dict] = None) -> None:
    """Raise CheckpointError with the reason unless this run (`cfg` on `world_size` processes, on the GGUF base
    `base_model` when it has one) may resume from the checkpoint at `path`, whose run state (trainer_state.json) is
    `saved_state`."""
    saved_base = saved_state.get("base_model") or {}
    if base_model and saved_base and saved_base.get("sha256") != base_model["sha256"]:
        raise CheckpointError(f"{path} was trained on a different base: model.name_or_path {base_model['gguf']} now "
                              f"has sha256 {base_model['sha256'][:16]}..., the checkpoint's was "
                              f"{saved_base.get('sha256', '?')[:16]}... (restore that file, or use a new output_dir)")
    diff = fingerprint_diff(saved_state.get("config_fingerprint", {}), config_fingerprint(cfg))
    if diff:
        raise CheckpointError(f"{path} was written by a different config: " + "; ".join(diff)
                              + " (use a new output_dir, or --resume none)")
    effective = cfg.effective_batch_size(world_size)
    if saved_state.get("effective_batch_size", effective) != effective:
        raise CheckpointError(
            f"{path}: the effective batch was {saved_state['effective_batch_size']} samples per step, this run's is "
            f"{effective} (micro_batch_size {cfg.train.micro_batch_size} x grad_accum_steps "
            f"{cfg.train.grad_accum_steps} x {world_size} processes); set train.grad_accum_steps "
            "or train.micro_batch_size so that it stays the same")
    saved_world = saved_state["world_size"]
    if saved_world != world_size and cfg.distributed.zero_stage == 3:
        raise CheckpointError(
            f"{path}: a ZeRO-3 checkpoint written by {saved_world} ranks cannot be resumed by "
            f"{world_size}; resume with {saved_world} processes")
