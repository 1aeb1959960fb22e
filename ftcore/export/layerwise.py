"""A forward pass through a model whose weights stay on disk: the model's own transformers modules are built on the
meta device, and each unit -- the embedding, every decoder block, the final norm, the head -- is materialized from
its tensors just before it runs and sent back to meta right after. So a 70B model runs its probe tokens in the
memory of one block, through the family's own code (masks, rotary embeddings, MoE routing, soft-capping: whatever
its forward does). The hidden state entering the first block, leaving every block, and the logits are recorded.

`weights(name)` gives the tensor of a parameter by its name in the model (for a model with LoRA injected by PEFT,
the names PEFT gives: X.base_layer.weight, X.lora_A.default.weight, ...)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from ftcore.model_geometry import meta_skeleton

_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


class NotStreamable(Exception):
    """The model cannot be run unit by unit (no decoder blocks found, or its forward reaches a weight outside the
    unit that owns it); the message says why."""


def skeleton(model_class: Any, config: Any, dtype: torch.dtype, lora: Optional[Any] = None) -> torch.nn.Module:
    """The model with every parameter on the meta device (buffers, e.g. rotary frequencies, are real), with LoRA
    layers injected by PEFT when `lora` (a LoraConfig) is given."""
    from peft import inject_adapter_in_model

    adapt = (lambda model: inject_adapter_in_model(lora, model)) if lora is not None else None
    return meta_skeleton(config, model_class=model_class, dtype=dtype, adapt=adapt).eval()


def checkpoint_names(model: torch.nn.Module, file_names: list[str]) -> dict[str, str]:
    """Model parameter name -> the checkpoint tensor it is loaded from, by transformers' own renaming rules for the
    family (e.g. GPT-NeoX's embed_out -> lm_head). A family whose checkpoints transformers converts on load (fused
    or split tensors, e.g. the experts of MoE models) cannot be read unit by unit: NotStreamable."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = {name.replace(".base_layer.", "."): True for name, _ in model.named_parameters(remove_duplicate=False)}
    mapping, converted = {}, []
    for key in file_names:
        renamed, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                             wanted)
        if pattern is not None:
            converted.append(key)
        else:
            mapping[renamed] = key
    if converted:
        raise NotStreamable(f"transformers converts {len(converted)} of its checkpoint's tensors on load (e.g. "
                            f"{converted[0]}: fused or split, not one tensor per parameter)")
    return mapping


def _units(model: torch.nn.Module) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(module path, parameter names it materializes) for every unit, and the block paths in order. A block takes
    its whole subtree; any other module only its own parameters (tied weights appear under each owner)."""
    blocks: dict[str, list[str]] = {}
    owners: dict[str, list[str]] = defaultdict(list)
    for name, _ in model.named_parameters(remove_duplicate=False):
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault(match.group(1), []).append(name)
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        while owner and isinstance(model.get_submodule(owner), (torch.nn.ParameterDict, torch.nn.ParameterList)):
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""  # (PEFT's lora_embedding_A: its layer runs it)
        owners[owner].append(name)
    if not blocks:
        raise NotStreamable("no decoder blocks ('.layers.N.') among its parameters")
    return [*blocks.items(), *owners.items()], list(blocks)


def boundary_states(model: torch.nn.Module, weights: Callable[[str], torch.Tensor], input_ids: torch.Tensor,
                    dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """[("embeddings", hidden entering block 0), ("block 0", its output), ..., ("logits", ...)], in fp32, each
    unit's weights read (`weights`, cast to `dtype`) only while it runs."""
    from accelerate.utils import set_module_tensor_to_device

    units, block_paths = _units(model)
    labels = {path: f"block {i}" for i, path in enumerate(block_paths)}
    states: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hidden(value: Any) -> torch.Tensor:
        return (value[0] if isinstance(value, (tuple, list)) else value).detach().float().clone()

    for path, names in units:
        module = model.get_submodule(path) if path else model
        local = [n[len(path) + 1:] if path else n for n in names]

        def load(mod, args, kwargs, local=local, names=names, path=path):
            for short, full in zip(local, names):
                set_module_tensor_to_device(mod, short, "cpu", value=weights(full).to(dtype))
            if path == block_paths[0]:
                states.append(("embeddings", hidden(args[0] if args else kwargs["hidden_states"])))

        def free(mod, args, kwargs, output, local=local, path=path):
            for short in local:
                set_module_tensor_to_device(mod, short, "meta")
            if path in labels:
                states.append((labels[path], hidden(output)))

        handles.append(module.register_forward_pre_hook(load, with_kwargs=True))
        handles.append(module.register_forward_hook(free, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e):
            raise NotStreamable(f"its forward uses a weight outside the module that owns it ({e})") from None
        raise
    finally:
        for handle in handles:
            handle.remove()
    return [*states, ("logits", logits.detach().float())]
