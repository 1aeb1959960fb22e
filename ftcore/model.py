"""Model loading: dtype, attention backend, LoRA (peft), QLoRA (LoRA on a bitsandbytes NF4 base), non-reentrant
gradient checkpointing.

Knows nothing of data. Receives only its own config sections.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from ftcore.config import AdapterConfig, Config, ModelConfig
from ftcore.dtypes import DTYPES
from ftcore.model_files import BaseModelError, check_model_dir
from ftcore.model_geometry import (
    ModelError,
    block_depths,
    classification_head_names,
    moe_parts,
)
from ftcore.nf4 import nf4_quantization_config
from ftcore.preflight import flash_attn_available


def model_class_for(model_dir: str, classification: bool = False) -> Optional[type]:
    """The transformers class from_pretrained will build for `model_dir` (None when its config cannot be read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError):
        return None
    auto_class = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    return auto_class._model_mapping.get(type(config), None)


def resolve_attn_implementation(requested: str, cuda: bool, model_class: Optional[type] = None) -> str:
    """auto: the best implementation the model's class supports (flash-attn 2 on CUDA when installed, else sdpa,
    else eager); an explicit choice the class does not support is a one-line error."""
    supports = {"flash_attention_2": getattr(model_class, "_supports_flash_attn", True),
                "sdpa": getattr(model_class, "_supports_sdpa", True), "eager": True}
    name = getattr(model_class, "__name__", "the model")
    if requested == "auto":
        if cuda and flash_attn_available() and supports["flash_attention_2"]:
            return "flash_attention_2"
        return "sdpa" if supports["sdpa"] else "eager"
    if not supports.get(requested, True):
        raise ModelError(f"model.attn_implementation: {name} does not support {requested}; use auto (picks the "
                         f"best it supports) or eager")
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ModelError("model.attn_implementation: flash_attention_2 needs flash-attn "
                             "(pip install '.[flash]' on a CUDA machine); use sdpa or auto")
        if not cuda:
            raise ModelError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or auto")
    return requested


def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a model directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def quant_storage_dtype(adapter_cfg: AdapterConfig, model_dtype: str, zero_stage: int) -> torch.dtype:
    """ZeRO-3 partitions parameters of the model's float dtype: packed 4-bit weights stored as uint8 would stay
    whole on every rank (peft#2016), so under ZeRO-3 they are stored in the compute dtype."""
    if adapter_cfg.quant_storage == "auto":
        return DTYPES[model_dtype] if zero_stage == 3 else torch.uint8
    return torch.uint8 if adapter_cfg.quant_storage == "uint8" else DTYPES[adapter_cfg.quant_storage]


def qlora_quantization_config(adapter_cfg: AdapterConfig, model_dtype: str, zero_stage: int) -> Any:
    """QLoRA's recipe: NF4 with double quantization, computing in the model's dtype."""
    return nf4_quantization_config(DTYPES[model_dtype], quant_storage_dtype(adapter_cfg, model_dtype, zero_stage))


def classification_head_kwargs(labels: list[str], pad_token_id: int) -> dict:
    """from_pretrained / config settings of a sequence classifier over `labels`. pad_token_id matters: the model
    reads each row's prediction at its last token that is not pad_token_id, so it must be the id batches pad with."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": pad_token_id}


def load_model(cfg: Config, model_dir: str, device: torch.device,
               new_head: Optional[dict] = None) -> torch.nn.Module:
    """The run's base model (+ adapter) on `device` (this rank's), ready for accelerate/DeepSpeed: reads
    cfg.model, cfg.adapter, cfg.train.seed and cfg.distributed.zero_stage. Under ZeRO-3 the caller must hold an
    HfDeepSpeedConfig alive before this, so transformers loads straight into partitioned parameters.
    new_head: classification_head_kwargs(...) -> AutoModelForSequenceClassification with a new head (seeded
    identically on every rank), which always trains."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if Path(model_dir).is_dir():  # (a hub id is left to transformers)
        try:
            check_model_dir(model_dir)
        except BaseModelError as e:
            raise ModelError(f"model.name_or_path: {e}") from None
    model_cfg, adapter_cfg, seed, zero_stage = cfg.model, cfg.adapter, cfg.train.seed, cfg.distributed.zero_stage
    cuda = device.type == "cuda"
    attn = resolve_attn_implementation(model_cfg.attn_implementation, cuda,
                                       model_class_for(model_dir, new_head is not None))
    extra: dict[str, Any] = dict(new_head or {})
    auto_class = AutoModelForSequenceClassification if new_head else AutoModelForCausalLM
    if adapter_cfg.method == "qlora":
        extra["quantization_config"] = qlora_quantization_config(adapter_cfg, model_cfg.dtype, zero_stage)
        if cuda and zero_stage != 3:
            extra["device_map"] = {"": device}  # bitsandbytes quantizes on the GPU it loads to: this rank's
    if new_head:
        torch.manual_seed(seed)  # the head is new: the same initial weights on every rank
    try:
        model = auto_class.from_pretrained(model_dir, dtype=DTYPES[model_cfg.dtype], attn_implementation=attn,
                                           **extra)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        raise ModelError(f"model.name_or_path: cannot load {model_dir}: {first_line(e)}") from None
    if adapter_cfg.method == "qlora" and not any(getattr(p, "quant_state", None) is not None
                                                 for p in model.parameters()):
        # transformers converts only plain nn.Linear layers (falcon's FalconLinear, for one, is not): training
        # would silently be LoRA on a full-precision base.
        raise ModelError(f"adapter.method: qlora, but bitsandbytes quantized none of {type(model).__name__}'s "
                         "layers (transformers converts plain nn.Linear layers only); use adapter.method=lora")
    return _prepare_for_training(model, model_cfg, adapter_cfg, seed, new_head is not None)


def load_reference(model_dir: str, dtype: torch.dtype, attn_implementation: str, device: torch.device,
                   ds_config: Optional[dict]) -> tuple[torch.nn.Module, Any]:
    """A frozen copy of the base model (the reference of loss.base_kl and of dpo/ipo/hinge/kto with full/freeze
    fine-tuning) and what keeps it: ds_config given (ZeRO-3, an HfDeepSpeedConfig alive), it loads partitioned
    like the model and a DeepSpeed engine without optimizer gathers each layer in its forward, so no rank holds
    more than its share of it; otherwise whole on `device`. Returns (the module to call, its engine or None)."""
    import copy

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    reference.requires_grad_(False).eval()
    if ds_config is None:
        return reference.to(device), None
    import deepspeed

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    return engine.module, engine


def _prepare_for_training(model: torch.nn.Module, model_cfg: ModelConfig, adapter_cfg: AdapterConfig, seed: int,
                          classification: bool) -> torch.nn.Module:
    """Checkpointing, then what trains: the LoRA adapter (QLoRA: on the frozen 4-bit base) or the chosen weights."""
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if model_cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and is the faster variant (peft#1142).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if adapter_cfg.method == "qlora":
        # prepare_model_for_kbit_training's semantics: the quantized base is frozen (get_peft_model freezes it)
        # and checkpointing is non-reentrant with input grads enabled (below). Its fp32 upcast of the remaining
        # weights is left out: DeepSpeed's bf16/fp16 engine casts them back to the compute dtype (and under ZeRO-3
        # the partitioned weights cannot be recast), while the trained LoRA weights get fp32 masters anyway.
        for param in model.parameters():
            param.requires_grad_(False)
        disable_cpu_weight_repacking(model)
    if adapter_cfg.method in ("lora", "qlora"):
        model = apply_lora(model, adapter_cfg, seed, "SEQ_CLS" if classification else "CAUSAL_LM")
    elif adapter_cfg.method == "freeze":
        apply_freeze(model, adapter_cfg, head=classification_head_names(model) if classification else ())
        if model_cfg.gradient_checkpointing:
            # With the base frozen, the embedding output does not require grad; without this, checkpointed
            # blocks see no input that needs grad ("element 0 of tensors does not require grad", peft#137).
            model.enable_input_require_grads()
    return model


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def apply_freeze(model: torch.nn.Module, adapter_cfg: AdapterConfig, head: tuple[str, ...] = ()) -> None:
    """adapter.method=freeze: only the parameters chosen by adapter.trainable / adapter.top_layers train, plus
    `head` (a new classification head cannot stay at its random initialisation)."""
    depths, num_blocks = block_depths(model)
    patterns = [re.compile(p) for p in adapter_cfg.trainable]
    unmatched = [p.pattern for p in patterns if not any(p.search(n) for n in depths)]
    if unmatched:
        example = next(iter(depths))
        raise ModelError(f"adapter.trainable: {unmatched} match no parameter (names look like {example!r})")
    if adapter_cfg.top_layers is not None and adapter_cfg.top_layers > num_blocks:
        raise ModelError(f"adapter.top_layers: {adapter_cfg.top_layers} exceeds the model's {num_blocks} blocks")
    lowest = num_blocks - (adapter_cfg.top_layers or 0)
    for name, param in model.named_parameters():
        chosen = name in head or any(p.search(name) for p in patterns) or (
            adapter_cfg.top_layers is not None and depths[name] >= lowest)
        param.requires_grad_(chosen)


def apply_lora(model: torch.nn.Module, adapter_cfg: AdapterConfig, seed: int,
               task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """task_type SEQ_CLS: peft keeps the classification head out of all-linear and trains it whole
    (modules_to_save), so the saved adapter carries the head."""
    from peft import LoraConfig, get_peft_model

    targets, parameters = lora_targets(model, adapter_cfg)
    if parameters and adapter_cfg.dropout:
        raise ModelError(f"adapter.dropout: {adapter_cfg.dropout}, but LoRA on fused MoE expert weights "
                         "(adapter.moe_experts) needs adapter.dropout=0 (peft's ParamWrapper has no dropout)")
    lora = LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                      target_modules=targets, target_parameters=parameters or None, task_type=task_type)
    # Same seed on every rank: the new adapter weights must be identical everywhere before ZeRO partitions them.
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"adapter.target_modules: {str(e).splitlines()[0]}") from None


def lora_targets(model: torch.nn.Module, adapter_cfg: AdapterConfig) -> tuple[Any, list[str]]:
    """(target_modules, target_parameters) for peft. all-linear = every Linear/Conv1D except the output head and,
    in MoE models, the router (adapter.moe_router); fused expert weights only with adapter.moe_experts."""
    from transformers.pytorch_utils import Conv1D

    routers, experts = moe_parts(model)
    parameters = sorted({name.rpartition(".")[2] for name in experts}) if adapter_cfg.moe_experts else []
    if adapter_cfg.moe_experts and not experts:
        raise ModelError("adapter.moe_experts: this model has no fused MoE expert weights")
    if adapter_cfg.target_modules != "all-linear":
        return adapter_cfg.target_modules, parameters
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = {name for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
               and not any(name == r or name.startswith(r + ".") for r in routers)}
    if adapter_cfg.moe_router:
        linear_routers = [r for r in routers if r in dict(model.named_modules())
                          and isinstance(model.get_submodule(r), torch.nn.Linear)]
        modules |= set(linear_routers)
        parameters += [f"{r.rpartition('.')[2]}.weight" for r in routers if r not in linear_routers]
    if not routers:
        return "all-linear", parameters  # peft's own rule (it also knows classification heads)
    return sorted(modules), sorted(set(parameters))


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU inference path (eval mode, no grad, AVX512-BF16 CPUs) replaces a 4-bit layer's weight
    data in place with a repacked layout. That would swap out a ZeRO-3 partition and the tensors checkpoints and
    exports read; it also needs out-features divisible by 32. Training keeps the standard layout everywhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


