"""output_dir/final/: what a finished run hands over. LoRA/QLoRA: the PEFT adapter dir; full or freeze fine-tuning:
an HF safetensors model dir; both with the tokenizer and the run's config (ft_config.yaml). Written to final.tmp/,
checked (every adapter tensor at its full shape; every weight element of the model present), fsynced, and renamed
into place, so a final/ that exists is complete."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ftcore.config import Config, dump_config
from ftcore.durable import fsync_tree, remove_leftovers, replace_dir
from ftcore.errors import TrainError
from ftcore.gguf_base import read_base_record, write_base_record
from ftcore.run_dir import RunDir
from ftcore.train.runtime import Runtime


def save_final(cfg: Config, runtime: Runtime, engine: Any, tokenizer: Any, *, is_lora: bool, total_params: int,
               adapter_shapes: dict[str, tuple[int, ...]]) -> Path:
    """Collective: write output_dir/final/ (see the module docstring). Returns its path."""
    run = RunDir(cfg.output_dir)
    final, tmp = run.final, run.final_staging
    if runtime.is_main:
        remove_leftovers(run.root, tmp.name)
        tmp.mkdir(parents=True)
    runtime.barrier()
    unwrapped = runtime.accelerator.unwrap_model(engine)
    if is_lora:
        _save_adapter(runtime, unwrapped, tmp, adapter_shapes)
    else:
        state_dict = runtime.accelerator.get_state_dict(engine)  # ZeRO-3: 16-bit gather onto rank 0
        if runtime.is_main:
            # A tied weight (input embedding = output head) is one parameter under two names; the gathered
            # state dict has a copy under each. Stored once, as transformers does, and re-tied on load.
            for name in tied_duplicate_names(unwrapped):
                state_dict.pop(name, None)
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            check_full_model(tmp, total_params)
    if runtime.is_main:
        tokenizer.save_pretrained(tmp)
        (tmp / "ft_config.yaml").write_text(dump_config(cfg))
        write_base_record(tmp, read_base_record(run.root))  # a GGUF base's file and sha256, for ft export
        fsync_tree(tmp)
        replace_dir(tmp, final)  # a rerun's final/ replaces the old one without a moment of a partial copy
        runtime.log(f"final {'adapter' if is_lora else 'model'} saved: {final}")
    runtime.barrier()
    return final


def _save_adapter(runtime: Runtime, unwrapped: torch.nn.Module, out: Path,
                  expected: dict[str, tuple[int, ...]]) -> None:
    import deepspeed

    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    # Under ZeRO-3 each rank holds a slice: gather the adapter (small) on every rank, copy on rank 0.
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        state = {n: p.detach().to("cpu", copy=True) for n, p in named} if runtime.is_main else {}
    if runtime.is_main:
        unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
        check_adapter(out, expected)


def check_adapter(adapter_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """A saved adapter must hold every LoRA tensor at its full shape (ZeRO-3 is known to save empty ones)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainError(f"{adapter_dir}: adapter_model.safetensors was not written")
    with safe_open(path, "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k}: missing" for k in expected if k not in saved]
    problems += [f"{k}: shape {saved[k]}, expected {v}" for k, v in expected.items() if k in saved and saved[k] != v]
    if not saved or problems:
        raise TrainError(f"{path} is not a complete adapter ({len(saved)} tensors): " + "; ".join(problems[:5]))


def tied_duplicate_names(model: torch.nn.Module) -> list[str]:
    """Every name but the first of each parameter that the model registers under several names (tied weights)."""
    seen: set[int] = set()
    duplicates = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.append(name)
        seen.add(id(param))
    return duplicates


def check_full_model(model_dir: Path, total_params: int) -> None:
    """A saved full model must hold as many elements as the model has parameters (tied weights counted once)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    if count != total_params:
        raise TrainError(f"{model_dir}: saved {count:,} weight elements, the model has {total_params:,}")
