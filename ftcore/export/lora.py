"""A PEFT LoRA adapter as a set of exact edits to named base tensors.

Every tensor in adapter_model.safetensors is one of:
- `X.lora_A.weight` / `X.lora_B.weight` (a Linear): base `X.weight` += (B @ A) * scale (transposed for
  fan_in_fan_out layers such as GPT-2's Conv1D);
- `X.lora_embedding_A` / `X.lora_embedding_B` (an Embedding): base `X.weight` += (B @ A).T * scale;
- anything else (`modules_to_save` copies, trained biases, embedding `base_layer` copies saved with the
  adapter): a full replacement of the base tensor of that name, which is what PEFT loads over the base.
scale = alpha / r, or alpha / sqrt(r) with rsLoRA; alpha and r may be overridden per module (alpha_pattern,
rank_pattern). The arithmetic is PEFT's own (fp32 product, then scale, then add), so fp32 merges are bit-exact.
Features whose merge is not a plain sum (DoRA, LoRA biases on the delta, ...) are refused, by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ftcore.export.st_io import read_header, read_tensor

PREFIX = "base_model.model."
# adapter_config.json settings whose merge is not W + scale * B @ A; value = the setting's inert value.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layer_replication": None, "use_qalora": False,
               "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
               "use_bdlora": False}


class AdapterError(ValueError):
    """An adapter that cannot be merged exactly, or does not fit the base; one line."""


@dataclass
class LoraPair:
    """One LoRA-adapted weight: its A and B matrices, scale and layout."""
    module: str  # base module path, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        """PEFT's get_delta_weight, in fp32."""
        product = self.b.float() @ self.a.float()
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        return product * self.scale


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its config, the LoRA pairs and the tensors it replaces whole (modules_to_save)."""
    directory: Optional[Path]
    config: dict
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # keyed by base tensor name (X.weight)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # keyed by base tensor name

    def targets(self) -> set[str]:
        """Names of the base tensors the adapter changes or replaces."""
        return set(self.pairs) | set(self.replacements)

    def apply(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The merged fp32 tensor for base tensor `name` (unchanged names are returned as given)."""
        tensor = self.replacements.get(name, base)
        pair = self.pairs.get(name)
        if pair is None:
            return tensor
        return tensor.float() + pair.delta()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_config(config: dict, where: str) -> None:
    """Refuse adapter settings the merge does not implement (DoRA, other PEFT types), naming the key."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')} is not LoRA; only LoRA adapters merge")
    for key, inert in UNSUPPORTED.items():
        value = config.get(key, inert)
        if value not in (inert, None, False, [], {}):
            raise AdapterError(f"{where}: {key}={value!r} cannot be merged exactly by ft export (plain LoRA only)")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where}: bias={config.get('bias')!r} is not a PEFT bias mode")


def build_adapter(config: dict, tensors: dict[str, torch.Tensor], where: str,
                  directory: Optional[Path] = None) -> Adapter:
    """Adapter tensors (PEFT's saved names, without the adapter name) -> edits keyed by base tensor name."""
    check_config(config, where)
    adapter = Adapter(directory, config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", name) or \
            re.match(r"(.+)\.(lora_embedding_A|lora_embedding_B)$", name)
        if match:
            halves.setdefault(match.group(1), {})[match.group(2)] = tensor
            continue
        if re.search(r"\.lora_[A-Za-z_]+", name):  # e.g. lora_magnitude_vector (DoRA)
            raise AdapterError(f"{where}: tensor {key} is not a plain LoRA weight; it cannot be merged exactly")
        adapter.replacements[name.replace(".base_layer.", ".")] = tensor
    alpha = config.get("lora_alpha", 8)
    for module, parts in halves.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise AdapterError(f"{where}: {module} has only one of its two LoRA matrices")
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{where}: {module} is not a Linear or Embedding LoRA (convolutions are not "
                               "supported)")
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterError(f"{where}: {module}: lora_A has rank {r}, lora_B {b.shape[1]}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        adapter.pairs[f"{module}.weight"] = LoraPair(module, a, b, scale, embedding,
                                                     bool(config.get("fan_in_fan_out")) and not embedding)
    return adapter


def load_adapter(directory: Path) -> Adapter:
    """The PEFT adapter at `directory` (adapter_config.json + adapter_model.safetensors)."""
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no adapter_config.json (not a PEFT adapter directory)")
    config = json.loads(config_path.read_text())
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{directory}: no adapter_model.safetensors (a .bin adapter is not read; re-save it "
                           "with safe_serialization)")
    infos, _ = read_header(weights)
    with open(weights, "rb") as handle:
        tensors = {name: read_tensor(info, handle) for name, info in infos.items()}
    return build_adapter(config, tensors, str(directory), directory)


def expected_shape(pair: LoraPair) -> tuple[int, int]:
    """The shape of the base weight a LoRA pair was trained on."""
    rows, cols = pair.b.shape[0], pair.a.shape[1]
    return (cols, rows) if (pair.embedding or pair.fan_in_fan_out) else (rows, cols)
