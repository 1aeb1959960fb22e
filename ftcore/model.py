"""Model loading: dtype, attention backend, LoRA (peft), non-reentrant gradient checkpointing.

Knows nothing of data. Receives only its own config sections.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from ftcore.config import AdapterConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model problem phrased as one line naming the config field or directory."""


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "flash_attention_2" if cuda and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ModelError("model.attn_implementation: flash_attention_2 needs flash-attn "
                             "(pip install '.[flash]' on a CUDA machine); use sdpa or auto")
        if not cuda:
            raise ModelError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or auto")
    return requested


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, model_dir: str, cuda: bool,
               seed: int) -> torch.nn.Module:
    """Base model (+ LoRA), ready for accelerate/DeepSpeed. Under ZeRO-3 the caller must hold an
    HfDeepSpeedConfig alive before this, so transformers loads straight into partitioned parameters."""
    from transformers import AutoModelForCausalLM

    attn = resolve_attn_implementation(model_cfg.attn_implementation, cuda)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[model_cfg.dtype],
                                                     attn_implementation=attn)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.name_or_path: cannot load {model_dir}: {first_line}") from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing

    if model_cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and is the faster variant (peft#1142).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if adapter_cfg.method == "lora":
        model = apply_lora(model, adapter_cfg, seed)
        if model_cfg.gradient_checkpointing:
            # With the base frozen, the embedding output does not require grad; without this, checkpointed
            # blocks see no input that needs grad ("element 0 of tensors does not require grad", peft#137).
            model.enable_input_require_grads()
    return model


def apply_lora(model: torch.nn.Module, adapter_cfg: AdapterConfig, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = adapter_cfg.target_modules
    lora = LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    # Same seed on every rank: the new adapter weights must be identical everywhere before ZeRO partitions them.
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"adapter.target_modules: {str(e).splitlines()[0]}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def expected_lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape every LoRA tensor must have in the saved adapter (keys as peft saves them, without adapter name)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        lora_a: Optional[Any] = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        shapes[f"{name}.lora_A.weight"] = (a.out_features, a.in_features)
        shapes[f"{name}.lora_B.weight"] = (b.out_features, b.in_features)
    return shapes
