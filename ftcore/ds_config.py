"""The run's DeepSpeed config: a template from ds_configs/ with every "auto" filled from the typed config.

The templates hold the tuning knobs (bucket sizes, overlap); every value that the typed config also expresses
(batch sizes, clipping, precision, persistence threshold) is "auto" in the template and filled here, so the
two can never disagree. An "auto" this module does not know how to fill is an error, not a silent default.
No torch import: the launcher and tests use this without the training stack.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any, Optional

from ftcore.config import DistributedConfig, OptimizerConfig, TrainConfig


def template_name(zero_stage: int, offload: str) -> str:
    """The ds_configs/ template for a ZeRO stage and offload mode."""
    return f"zero{zero_stage}.json" if offload == "none" else f"zero{zero_stage}_offload_{offload}.json"


def template_names() -> list[str]:
    """Every template in ds_configs/."""
    return sorted(p.name for p in resources.files("ds_configs").iterdir() if p.name.endswith(".json"))


def load_template(name: str) -> dict:
    """A ds_configs/ template as a dict."""
    path = resources.files("ds_configs") / name
    if not path.is_file():
        raise FileNotFoundError(f"ds_configs/{name} does not exist; available: {', '.join(template_names())}")
    return json.loads(path.read_text())


def _fills(train: TrainConfig, optimizer: OptimizerConfig, dist: DistributedConfig, dtype: str, cuda: bool,
           world_size: Optional[int] = None, hidden_size: Optional[int] = None) -> dict[str, Any]:
    """Dotted path -> value for every "auto" a template (or a user's HF-Trainer-style JSON) may contain."""
    fills: dict[str, Any] = {
        "optimizer.params.lr": optimizer.lr, "optimizer.params.weight_decay": optimizer.weight_decay,
        "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
        "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": optimizer.lr,
        "scheduler.params.warmup_num_steps": optimizer.warmup_steps,
        "scheduler.params.total_num_steps": train.max_steps,
    }
    if world_size is not None:
        fills["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps * world_size
    if hidden_size is not None:  # transformers' Trainer's rules for these
        fills["zero_optimization.reduce_bucket_size"] = hidden_size * hidden_size
        fills["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    return fills | {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": optimizer.max_grad_norm,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
        "zero_optimization.stage3_param_persistence_threshold": dist.zero3_param_persistence_threshold,
        # Pinned host memory only exists with a GPU; on CPU it would be a no-op at best.
        "zero_optimization.offload_optimizer.pin_memory": cuda,
        "zero_optimization.offload_param.pin_memory": cuda,
    }


def fill_template(template: dict, fills: dict[str, Any], name: str = "ds_configs/template") -> dict:
    """The template with every "auto" placeholder filled from `fills`; a missing fill is an error naming it."""
    out = copy.deepcopy(template)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif value == "auto":
                if path not in fills:
                    raise ValueError(f"{name}: {path} is 'auto' but nothing in the typed config fills it")
                node[key] = fills[path]

    walk(out, "")
    return out


def build_ds_config(train: TrainConfig, optimizer: OptimizerConfig, dist: DistributedConfig, dtype: str, cuda: bool,
                    world_size: Optional[int] = None, hidden_size: Optional[int] = None) -> dict:
    """The effective DeepSpeed config for a run (train_batch_size is left for DeepSpeed to derive from world size).
    With distributed.deepspeed_config, the user's JSON is the base instead of ds_configs/ (see from_user_json)."""
    fills = _fills(train, optimizer, dist, dtype, cuda, world_size, hidden_size)
    if dist.deepspeed_config is not None:
        return from_user_json(dist.deepspeed_config, fills, train, dist, dtype, cuda)
    name = template_name(dist.zero_stage, dist.offload)
    cfg = fill_template(load_template(name), fills, f"ds_configs/{name}")
    stage = cfg["zero_optimization"]["stage"]
    if stage != dist.zero_stage:
        raise ValueError(f"ds_configs/{name} has zero_optimization.stage={stage}, expected {dist.zero_stage}")
    return cfg


def build_inference_ds_config(dist: DistributedConfig, cuda: bool, world_size: int,
                              hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config of a forward-only run (ft eval): the template of distributed.zero_stage (0 or 3) and
    its parameter offload, one sample per forward, no optimizer and no optimizer offload, in float32 (as ft eval
    scores). A user's distributed.deepspeed_config configures training only."""
    offload = "all" if dist.zero_stage == 3 and dist.offload == "all" else "none"
    forward_only = TrainConfig(micro_batch_size=1, grad_accum_steps=1)
    name = template_name(dist.zero_stage, offload)
    cfg = fill_template(load_template(name),
                        _fills(forward_only, OptimizerConfig(), dist, "float32", cuda, world_size, hidden_size),
                        f"ds_configs/{name}")
    cfg.get("zero_optimization", {}).pop("offload_optimizer", None)
    return cfg


def from_user_json(path: str, fills: dict[str, Any], train: TrainConfig, dist: DistributedConfig, dtype: str,
                   cuda: bool) -> dict:
    """A user's DeepSpeed JSON with its "auto" values filled, and every setting the typed config expresses written
    from it (launch_settings has already refused a JSON value that contradicts one). Its optimizer and scheduler
    sections are dropped: the recipe passes its own AdamW and warmup+cosine schedule (the same settings)."""
    from ftcore.launch_settings import LaunchSettingsError, read_deepspeed_json

    try:
        cfg = fill_template(read_deepspeed_json(path), fills, path)
    except ValueError as e:
        raise LaunchSettingsError(str(e)) from None
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    if ("train_batch_size" in cfg and "train_batch_size" in fills
            and cfg["train_batch_size"] != fills["train_batch_size"]):
        raise LaunchSettingsError(
            f"{path}: train_batch_size={cfg['train_batch_size']}, but train.micro_batch_size {train.micro_batch_size}"
            f" x train.grad_accum_steps {train.grad_accum_steps} x processes makes {fills['train_batch_size']}; "
            "set it to \"auto\"")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        cfg[key] = fills[key]
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {})
        section["enabled"] = fills[f"{key}.enabled"]
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = dist.zero_stage
    if dist.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = dist.zero3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    devices = {"none": ("none", "none"), "optimizer": ("cpu", "none"), "all": ("cpu", "cpu")}[dist.offload]
    for key, device in zip(("offload_optimizer", "offload_param"), devices):
        if device == "none":
            zero.pop(key, None)
        else:
            # Pinned host memory only exists with a GPU.
            zero[key] = {**zero.get(key, {}), "device": device, "pin_memory": cuda}
    if dist.offload != "none":
        cfg["zero_force_ds_cpu_optimizer"] = True
    return cfg
