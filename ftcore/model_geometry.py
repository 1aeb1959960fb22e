"""What ft reads off a model's structure without loading or changing it: the model built as a skeleton on the meta
device (meta_skeleton, the one builder), transformer-block depths, MoE parts, the modules 4-bit loading quantizes,
head width, logical parameter counts, the shapes a LoRA adapter must have. Used by loading (ftcore/model.py), the
optimizer groups, FLOP counting, `ft plan`, the model-directory check and the export."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch


class ModelError(ValueError):
    """A model problem phrased as one line naming the config field or directory."""


def meta_skeleton(config: Any, head: str = "causal_lm", model_class: Optional[type] = None,
                  dtype: Optional[torch.dtype] = None,
                  adapt: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None) -> torch.nn.Module:
    """The model `config` describes with every parameter on the meta device: no weight read or allocated. Buffers
    (e.g. rotary frequencies) are real, so the skeleton can run once its weights are loaded unit by unit.
    `head`: causal_lm or sequence_classification (a Task's head), for transformers' auto class; `model_class`: the
    class (or auto class) to build instead; `dtype`: its parameters' dtype (default: the config's); `adapt(model)`:
    a change made on the meta device too (LoRA layers injected). Built as from_config builds it, except while a
    ZeRO-3 config is alive in this process (a training rank): from_config would then wrap the build in
    deepspeed.zero.Init, which cannot partition meta tensors, so the class is built directly, in `dtype`."""
    # (transformers and accelerate are imported here: importing this module stays as light as torch)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled

    cls = model_class or {"causal_lm": AutoModelForCausalLM,
                          "sequence_classification": AutoModelForSequenceClassification}[head]
    if hasattr(cls, "_model_mapping"):  # an auto class: the family's class for this config
        if type(config) not in cls._model_mapping:
            raise ValueError(f"transformers has no {cls.__name__} class for model_type {config.model_type!r}")
        cls = cls._model_mapping[type(config)]
    with init_empty_weights():
        if not is_deepspeed_zero3_enabled():
            model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
        else:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype or previous)
            try:
                model = cls(config)
            finally:
                torch.set_default_dtype(previous)
    # init_empty_weights makes a new meta parameter at every registration, so the build's tie (a tied embedding and
    # head as one parameter, as loading makes them) is lost inside it: tied again here, outside it.
    model.tie_weights()
    if adapt is not None:
        with init_empty_weights():
            model = adapt(model)
    return model


_BLOCK = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def block_depths(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth: its transformer block's index; -1 below the blocks (embeddings), num_blocks above
    them (final norm, output head). Returns (depths, num_blocks)."""
    names = [n for n, _ in model.named_parameters()]
    found = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if not found:
        raise ModelError("cannot find the transformer blocks in the parameter names (expected '.layers.N.')")
    num_blocks = max(found.values()) + 1
    first = min(i for i, n in enumerate(names) if n in found)
    depths = {n: found.get(n, -1 if i < first else num_blocks) for i, n in enumerate(names)}
    return depths, num_blocks


def classification_head_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Parameters of a sequence classifier's new head (`score` in Llama-like models, `classifier` in others)."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    return tuple(n for n, _ in model.named_parameters() if n.split(".")[0] in SEQ_CLS_HEAD_NAMES)


def moe_parts(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(router module names, fused expert parameter names) of a mixture-of-experts model: an MoE block is a module
    with an `experts` child; its router is the sibling named gate/router; the experts' weights are the >= 3-D
    parameters under `experts` (transformers 5 fuses them: [experts, out, in])."""
    routers, experts = [], []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        routers += [f"{name}.{child}" for child in ("gate", "router") if child in children]
        experts += [f"{name}.experts.{p}" for p, param in children["experts"].named_parameters(recurse=False)
                    if param.dim() >= 3]
    return routers, experts


def quantized_module_names(model: torch.nn.Module) -> set[str]:
    """Modules transformers' bitsandbytes 4-bit loading quantizes, by its own rules (default skips: output head,
    tied weights, last module; plus the model's keep-in-fp32 modules)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {name for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)}


def logical_numel(p: torch.nn.Parameter) -> int:
    """Elements of the weight a parameter stands for: a ZeRO-3 partition at its full size, a packed 4-bit weight
    at its unquantized shape."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return getattr(p, "ds_numel", p.numel())


def head_dim(config: Any) -> int:
    """Width of one attention head: the config's head_dim where the family sets it (Gemma, Qwen3), else
    hidden_size / num_attention_heads. The one place ft derives it (FLOP counting, ft plan)."""
    heads = getattr(config, "num_attention_heads", 1)
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_cache_bytes(config: Any, rows: int, tokens: int, element_bytes: int) -> int:
    """The KV cache of generating `rows` sequences of up to `tokens` tokens: keys and values of every layer (an
    upper bound for sliding-window layers, which keep fewer)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim(config) * rows * tokens * element_bytes


def attention_width(config: Any) -> int:
    """num_attention_heads * head_dim: the width of the attention's query (and output) projection."""
    return getattr(config, "num_attention_heads", 1) * head_dim(config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) in logical elements (see logical_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
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
