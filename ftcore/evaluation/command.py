"""`ft eval TARGET`: score a model by generation on a held-out set and write every prediction.

TARGET is a run's config (its output_dir/final/ and data.eval), a final/ adapter dir (on its base), a merged
export, a training checkpoint step dir (consolidated to a temporary export first, without verification), or a
built-in model. The prompts are rendered as the run's training rendered them, with the tokenizer and chat template
saved beside the model. Under torchrun / `ft eval --nproc N` (the supervised launch of `ft launch`) the set
is split over the ranks (ftcore/evaluation/generation.py), which join the training's Runtime (process group with
distributed.timeout_s, world-size check) on its forward-only DeepSpeed config; `--zero3` partitions the model over
them with DeepSpeed ZeRO-3, loaded straight into the partitions.

Outputs (rank 0): OUT/predictions.jsonl (one row per record, in input order: where, reference, prediction, the
scores) and OUT/summary.json (each metric's mean, samples, samples/s, world size), both written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ftcore.builtin import is_builtin, resolve_model_path
from ftcore.config import (
    Config,
    DataConfig,
    DataSource,
    DistributedConfig,
    RLConfig,
    load_config,
    run_config_beside,
)
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


def eval_distributed(cfg: Optional[Config], zero3: bool) -> DistributedConfig:
    """The distributed settings `ft eval` runs on: the run's (backend, timeout, parameter offload) when the target
    has a run config, else the defaults; ZeRO-3 with --zero3, else every rank holds the whole model; no sequence
    parallelism (each rank answers whole prompts)."""
    base = cfg.distributed if cfg is not None else DistributedConfig()
    return base.model_copy(update={"zero_stage": 3 if zero3 else 0, "sequence_parallel": 1,
                                   "offload": base.offload if zero3 and base.offload == "all" else "none",
                                   "deepspeed_config": None})


def reward_rules(specs: list[str]) -> list:
    """--reward SPEC -> RewardRules: SPEC is a built-in's name or package.module:function, optionally followed by
    its arguments as a JSON object: `regex {"pattern": "^[0-9]+$"}`. Checked here (EvalError, one line)."""
    from ftcore.rewards import RewardError, RewardRule, check_rules

    rules = []
    for spec in specs:
        function, brace, rest = spec.partition("{")
        try:
            args = json.loads(brace + rest) if brace else {}
        except ValueError as e:
            raise EvalError(f"--reward {spec!r}: its arguments are not a JSON object ({e})") from None
        if not isinstance(args, dict):
            raise EvalError(f"--reward {spec!r}: its arguments are not a JSON object")
        rules.append(RewardRule(function.strip(), args=args))
    try:
        check_rules(rules)
    except RewardError as e:
        raise EvalError(f"--reward: {e}") from None
    return rules


def run_eval(target: str, data: list[str], fmt: Optional[str], metrics: list[str], out: Optional[str],
             batch_size: int, max_new_tokens: int, zero3: bool, sets: list[str],
             log: Callable[[str], None] = print, rewards: tuple[str, ...] = ()) -> dict:
    """The whole of `ft eval` in this process: one rank of a world a launcher started (`ft eval --nproc N`,
    torchrun), or alone. It runs on the training's Runtime (process group, timeout, world-size check) and
    DeepSpeed config (build_inference_ds_config)."""
    # (torch and the training stack are imported here: `ft eval --help` and the launcher's side stay light)
    from ftcore.rewards.pool import RewardPool
    from ftcore.train.runtime import leave_world, start_inference_runtime

    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise EvalError(f"--metric {bad[0]}: expected one of {', '.join(METRICS)}")
    rules = reward_rules(list(rewards))
    kind, cfg, where = resolve_target(target, sets)
    data_cfg = eval_data(cfg, data, fmt)
    if zero3 and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise EvalError("--zero3 partitions the model over the ranks: launch 2 or more (ft eval --nproc N)")
    rl = cfg.rl if cfg is not None else RLConfig()  # reward workers and timeout: the run's, or the defaults
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(RewardPool(rules, rl.reward_workers, rl.reward_timeout_s)) if rules else None
        try:
            rt = start_inference_runtime(eval_distributed(cfg, zero3), where)
            return _evaluate(rt, kind, cfg, where, target, data_cfg, metrics, out, batch_size, max_new_tokens,
                             zero3, pool)
        finally:
            leave_world()


def _evaluate(rt: Any, kind: str, cfg: Optional[Config], where: str, target: str, data_cfg: DataConfig,
              metrics: list[str], out: Optional[str], batch_size: int, max_new_tokens: int, zero3: bool,
              rewards: Any) -> dict:
    """Load the model on the runtime, answer and score this rank's share (and by `rewards`, a RewardPool);
    rank 0 writes the results."""
    from ftcore.evaluation.generation import evaluate_by_generation, read_prompts, write_predictions
    from ftcore.tools.generate import load_for_inference

    temporary = None
    try:
        if kind == "checkpoint":
            temporary = _consolidated(Path(where), rt)
            where = str(temporary / "model")
        # Under ZeRO-3 the runtime's DeepSpeed config is alive: the model loads straight into partitions.
        model, tokenizer = load_for_inference(where)
        if zero3:
            model = _partitioned(model, rt.ds_config)
        else:
            model.to(rt.device)
        prompts, counts = read_prompts(data_cfg, tokenizer, max_new_tokens)
        if not prompts:
            raise EvalError(f"{', '.join(s.path for s in data_cfg.eval)}: no records to evaluate")
        started = time.perf_counter()
        rows, means = evaluate_by_generation(model, tokenizer, prompts, metrics, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, rank=rt.rank, world_size=rt.world_size,
                                             gather=rt.all_gather_object, synced=rt.synced_forwards,
                                             device=rt.device, rewards=rewards)
        seconds = time.perf_counter() - started
    finally:
        if temporary is not None and rt.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
    summary = {"target": target, "data": [s.path for s in data_cfg.eval], "metrics": means, "samples": len(rows),
               "samples_per_s": len(rows) / seconds if seconds else None, "world_size": rt.world_size,
               "zero3": zero3, "max_new_tokens": max_new_tokens,
               **{k: v for k, v in counts.items() if k != "records"}}
    if rt.is_main:
        out_dir = Path(out) if out else default_out(target, cfg, where)
        write_predictions(out_dir / EVAL_PREDICTIONS, rows)
        atomic_write_text(out_dir / EVAL_SUMMARY, json.dumps(summary, indent=1))
        summary["out"] = str(out_dir)
    return summary


def _consolidated(checkpoint: Path, rt: Any) -> Path:
    """A checkpoint as a temporary merged export beside it (rank 0 writes it, every rank reads it)."""
    from ftcore.export.export import ExportError, export_checkpoint

    made = None
    if rt.is_main:
        temporary = Path(tempfile.mkdtemp(prefix=".eval-", dir=checkpoint.parent))
        try:
            export_checkpoint(checkpoint, None, temporary / "model", verify=False, log=lambda _: None)
            made = str(temporary)
        except ExportError as e:
            shutil.rmtree(temporary, ignore_errors=True)
            made = f"error: {e}"
    made = rt.all_gather_object(made)[0]
    if made.startswith("error: "):
        raise EvalError(f"{checkpoint}: {made[7:]}")
    return Path(made)


def _partitioned(model: Any, ds_config: dict) -> Any:
    """The model partitioned over the ranks by a DeepSpeed ZeRO-3 engine on the runtime's forward-only config (no
    optimizer): each forward gathers one layer at a time (generate then needs synced_gpus)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine.module
