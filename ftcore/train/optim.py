"""The optimizer and its schedule: AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded), parameter groups
by decay and layer-wise rate (optimizer_grouping below), cosine schedule with linear warmup."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ftcore.config import OptimizerConfig
from ftcore.model_geometry import block_depths


def optimizer_grouping(params: list[tuple[str, int, bool]], depths: Optional[dict[str, int]], num_blocks: int,
                       layer_lr_decay: Optional[float]) -> list[tuple[float, bool, list[str]]]:
    """The recipe's AdamW groups from (name, ndim, trainable): (lr factor, is_matrix, names). Matrices (>= 2-D, the
    weight-decayed ones) first, then biases and norms; within each, higher learning rates first. With
    optimizer.layer_lr_decay, block i of L trains at decay^(L-1-i), embeddings at decay^L, the final norm and head at 1.
    `ft plan` uses the same grouping (DeepSpeed pads each group)."""
    groups: dict[tuple[float, bool], list[str]] = {}
    for name, ndim, trainable in params:
        if not trainable:  # frozen weights get no optimizer state
            continue
        scale = 1.0 if layer_lr_decay is None else layer_lr_decay ** max(0, num_blocks - 1 - depths[name])
        groups.setdefault((scale, ndim >= 2), []).append(name)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][1], -item[0][0]))
    return [(scale, is_matrix, names) for (scale, is_matrix), names in ordered]


def build_optimizer(t: OptimizerConfig, offload: str, model: torch.nn.Module
                    ) -> tuple[torch.optim.Optimizer, list[list[str]]]:
    """The optimizer section's optimizer over the model's parameters (DeepSpeed's CPU Adam when
    distributed.offload moves its step to the host), and the parameter names of each of its groups (the audit
    records which rate each weight got)."""
    named = dict(model.named_parameters())
    # ZeRO-3 placeholders are flat: the original shape says whether a weight is a matrix (decayed).
    described = [(n, len(getattr(p, "ds_shape", p.shape)), p.requires_grad) for n, p in named.items()]
    depths, num_blocks = block_depths(model) if t.layer_lr_decay is not None else (None, 0)
    grouping = optimizer_grouping(described, depths, num_blocks, t.layer_lr_decay)
    group_names = [names for _, _, names in grouping]
    param_groups = [{"params": [named[n] for n in names], "weight_decay": t.weight_decay if is_matrix else 0.0,
                     "lr": t.lr * scale} for scale, is_matrix, names in grouping]
    if offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # the offloaded step runs on the host

        return DeepSpeedCPUAdam(param_groups, lr=t.lr, adamw_mode=True), group_names
    # DeepSpeed's elastic ZeRO-1/2 checkpoint (what lets a run resume at another world size) records the step
    # from param_groups, where DeepSpeed's own optimizers keep it; torch's AdamW keeps it per parameter (and
    # that is what it uses). An inert group entry satisfies the checkpoint format.
    return torch.optim.AdamW([{**g, "step": 0} for g in param_groups], lr=t.lr), group_names


def attach_schedule(t: OptimizerConfig, max_steps: int, engine: Any, optimizer: torch.optim.Optimizer) -> None:
    """The engine owns the schedule: it steps it once per optimizer step (at the accumulation boundary, and not
    when fp16 overflow skips the step) and saves/loads it with its checkpoint. accelerate hands only
    DeepSpeed-native schedulers to the engine, so it is attached here; it is built on the client optimizer, whose
    param_groups DeepSpeed's ZeRO optimizer steps with."""
    from transformers import get_cosine_schedule_with_warmup

    engine.lr_scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, max_steps)


def restore_rates(engine: Any) -> None:
    """After a resume: DeepSpeed's elastic optimizer-state restore brings back the moments and steps but not the
    param groups' hyperparameters; put back the learning rate the restored schedule says the next step uses."""
    scheduler = engine.lr_scheduler
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
