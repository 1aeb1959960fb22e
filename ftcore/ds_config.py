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
from typing import Any

from ftcore.config import DistributedConfig, TrainConfig


def template_name(zero_stage: int, offload: str) -> str:
    return f"zero{zero_stage}.json" if offload == "none" else f"zero{zero_stage}_offload_{offload}.json"


def template_names() -> list[str]:
    return sorted(p.name for p in resources.files("ds_configs").iterdir() if p.name.endswith(".json"))


def load_template(name: str) -> dict:
    path = resources.files("ds_configs") / name
    if not path.is_file():
        raise FileNotFoundError(f"ds_configs/{name} does not exist; available: {', '.join(template_names())}")
    return json.loads(path.read_text())


def _fills(train: TrainConfig, dist: DistributedConfig, dtype: str, cuda: bool) -> dict[str, Any]:
    """Dotted path -> value for every "auto" a template may contain."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
        "zero_optimization.stage3_param_persistence_threshold": dist.zero3_param_persistence_threshold,
        # Pinned host memory only exists with a GPU; on CPU it would be a no-op at best.
        "zero_optimization.offload_optimizer.pin_memory": cuda,
        "zero_optimization.offload_param.pin_memory": cuda,
    }


def fill_template(template: dict, fills: dict[str, Any], name: str = "template") -> dict:
    out = copy.deepcopy(template)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif value == "auto":
                if path not in fills:
                    raise ValueError(f"ds_configs/{name}: {path} is 'auto' but nothing in the typed config fills it")
                node[key] = fills[path]

    walk(out, "")
    return out


def build_ds_config(train: TrainConfig, dist: DistributedConfig, dtype: str, cuda: bool) -> dict:
    """The effective DeepSpeed config for a run (train_batch_size is left for DeepSpeed to derive from world size)."""
    name = template_name(dist.zero_stage, dist.offload)
    cfg = fill_template(load_template(name), _fills(train, dist, dtype, cuda), name)
    stage = cfg["zero_optimization"]["stage"]
    if stage != dist.zero_stage:
        raise ValueError(f"ds_configs/{name} has zero_optimization.stage={stage}, expected {dist.zero_stage}")
    return cfg
