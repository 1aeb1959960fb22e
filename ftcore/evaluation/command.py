"""`ft eval TARGET`: score a model by generation on a held-out set and write every prediction.

TARGET is a run's config (its output_dir/final/ and data.eval), a final/ adapter dir (on its base), a merged
export, a training checkpoint step dir (consolidated to a temporary export first, without verification), or a
built-in model. The prompts are rendered as the run's training rendered them, with the tokenizer and chat template
saved beside the model. Under torchrun / `ft launch` / `ft eval --nproc N` the set is split over the ranks
(ftcore/evaluation/generation.py); `--zero3` partitions the model over them with DeepSpeed ZeRO-3 first.

Outputs (rank 0): OUT/predictions.jsonl (one row per record, in input order: where, reference, prediction, the
scores) and OUT/summary.json (each metric's mean, samples, samples/s, world size), both written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ftcore.builtin import is_builtin, resolve_model_path
from ftcore.config import Config, DataConfig, DataSource, load_config, run_config_beside
from ftcore.durable import atomic_write_text
from ftcore.evaluation.scoring import METRICS
from ftcore.gguf_base import GGUFError, gguf_file
from ftcore.run_dir import RunDir

# What `ft eval` writes into its --out dir (a dir of its own, not a run dir).
EVAL_PREDICTIONS, EVAL_SUMMARY = "predictions.jsonl", "summary.json"


class EvalError(ValueError):
    """A bad target, data file or option, as one line."""


def resolve_target(target: str, sets: list[str]) -> tuple[str, Optional[Config], str]:
    """(what kind of target, its run config if known, the model dir or checkpoint dir)."""
    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, sets)
        final = RunDir(cfg.output_dir).final
        if not final.is_dir():
            raise EvalError(f"{target}: {final} does not exist yet (train first, or pass a checkpoint dir)")
        return "model", cfg, str(final)
    if is_builtin(target) or _gguf(target):
        return "model", None, resolve_model_path(target)
    path = Path(target)
    if not path.is_dir():
        raise EvalError(f"{target}: not a config file, a model or checkpoint directory, or a builtin: model")
    if (path / "trainer_state.json").is_file():
        cfg = run_config_beside(path)
        if cfg is None:
            raise EvalError(f"{target}: a checkpoint without ft_config.yaml: not an ft training checkpoint")
        return "checkpoint", cfg, str(path)
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise EvalError(f"{target}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    return "model", run_config_beside(path), str(path)


def _gguf(target: str) -> Optional[Path]:
    try:
        return gguf_file(target)
    except GGUFError as e:
        raise EvalError(str(e)) from None


def eval_data(cfg: Optional[Config], data: list[str], fmt: Optional[str]) -> DataConfig:
    """data.eval of the run, or the --data files (their format: --format, else the run's eval format, else chat)."""
    if not data:
        if cfg is None or not cfg.data.eval:
            raise EvalError("--data FILE is needed: the target has no run config with data.eval")
        if fmt is None:
            return cfg.data
        data = [s.path for s in cfg.data.eval]
    base = cfg.data if cfg is not None else DataConfig()
    known = fmt or (base.eval[0].format if base.eval else None) or "chat"
    try:
        return base.model_copy(update={"eval": [DataSource(path=p, format=known) for p in data]})
    except ValueError as e:
        raise EvalError(f"--data / --format: {e}") from None


def default_out(target: str, cfg: Optional[Config], model_dir: str) -> Path:
    """Where results go when --out is not given: output_dir/eval for a config, else eval-NAME beside the model."""
    if target.endswith((".yaml", ".yml")) and cfg is not None:
        return RunDir(cfg.output_dir).eval_predictions
    if is_builtin(target):
        return Path("outputs") / f"eval-{target.split(':', 1)[1]}"
    gguf = _gguf(target)
    if gguf is not None:  # beside the GGUF file, not in the cache where it was dequantized
        return gguf.parent / f"eval-{gguf.stem}"
    path = Path(model_dir)
    return path.parent / f"eval-{path.name}"


def run_eval(target: str, data: list[str], fmt: Optional[str], metrics: list[str], out: Optional[str],
             batch_size: int, max_new_tokens: int, zero3: bool, sets: list[str],
             log: Callable[[str], None] = print) -> dict:
    """The whole of `ft eval` in this process (one rank of a world set up by the launcher, or alone)."""
    import torch
    import torch.distributed as dist

    from ftcore.evaluation.generation import evaluate_by_generation, read_prompts, write_predictions
    from ftcore.tools.generate import load_for_inference

    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise EvalError(f"--metric {bad[0]}: expected one of {', '.join(METRICS)}")
    kind, cfg, where = resolve_target(target, sets)
    data_cfg = eval_data(cfg, data, fmt)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero3 and world < 2:
        raise EvalError("--zero3 partitions the model over the ranks: launch 2 or more (ft eval --nproc N)")
    temporary = None
    try:
        if kind == "checkpoint":
            temporary = _consolidated(Path(where), rank, world)
            where = str(temporary / "model")
        model, tokenizer = load_for_inference(where)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model.to(device)
        if zero3:
            model = _partitioned(model)
        prompts, counts = read_prompts(data_cfg, tokenizer, max_new_tokens)
        if not prompts:
            raise EvalError(f"{', '.join(s.path for s in data_cfg.eval)}: no records to evaluate")

        def gather(obj: Any) -> list:
            parts = [None] * world
            dist.all_gather_object(parts, obj)
            return parts

        started = time.perf_counter()
        rows, means = evaluate_by_generation(model, tokenizer, prompts, metrics, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, rank=rank, world_size=world,
                                             gather=gather if world > 1 else None, synced=zero3, device=device)
        seconds = time.perf_counter() - started
    finally:
        if temporary is not None and rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
    summary = {"target": target, "data": [s.path for s in data_cfg.eval], "metrics": means, "samples": len(rows),
               "samples_per_s": len(rows) / seconds if seconds else None, "world_size": world, "zero3": zero3,
               "max_new_tokens": max_new_tokens, **{k: v for k, v in counts.items() if k != "records"}}
    if rank == 0:
        out_dir = Path(out) if out else default_out(target, cfg, where)
        write_predictions(out_dir / EVAL_PREDICTIONS, rows)
        atomic_write_text(out_dir / EVAL_SUMMARY, json.dumps(summary, indent=1))
        summary["out"] = str(out_dir)
    return summary


def _consolidated(checkpoint: Path, rank: int, world: int) -> Path:
    """A checkpoint as a temporary merged export beside it (rank 0 writes it, every rank reads it)."""
    import torch.distributed as dist

    from ftcore.export.export import ExportError, export_checkpoint

    holder = [None]
    if rank == 0:
        temporary = Path(tempfile.mkdtemp(prefix=".eval-", dir=checkpoint.parent))
        try:
            export_checkpoint(checkpoint, None, temporary / "model", verify=False, log=lambda _: None)
            holder = [str(temporary)]
        except ExportError as e:
            shutil.rmtree(temporary, ignore_errors=True)
            holder = [f"error: {e}"]
    if world > 1:
        dist.broadcast_object_list(holder, src=0)
    if holder[0].startswith("error: "):
        raise EvalError(f"{checkpoint}: {holder[0][7:]}")
    return Path(holder[0])


def _partitioned(model: Any) -> Any:
    """The model partitioned over the ranks by a DeepSpeed ZeRO-3 engine without optimizer: each forward gathers
    one layer at a time (generate then needs synced_gpus)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module
