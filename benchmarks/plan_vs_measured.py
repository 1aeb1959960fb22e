"""`ft plan`'s per-rank memory against what the real runs hold, on Gemma-3-270M: LoRA ZeRO-2, LoRA ZeRO-3 and full
ZeRO-3 on 2 CPU processes (2 steps each, data.audit on). Prints one JSON.

Per rank: the plan's model states (weights, 4-bit base, trainable weights, gradients, optimizer states) and
activations (without checkpointing, the loss's chunk included), against (a) the bytes DeepSpeed's engine holds
(parameters and optimizer states, which the plan says it predicts exactly), and (b) the process's memory: its RSS
after the first optimizer step and its peak RSS, each less its RSS before the model was loaded (imports, tokenizer
and data excluded). On a CPU the "GPU" is host memory, so (b) also holds what a GPU run keeps elsewhere (the
loader's transient copy of the weights, allocator slack): the plan is the lower bound it should be close to.

  python benchmarks/plan_vs_measured.py [--micro-batch 16 --seq 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
LAYOUTS = {"lora-zero2": ("lora", 2), "lora-zero3": ("lora", 3), "full-zero3": ("full", 3)}


def sets(out: Path, method: str, stage: int, args: argparse.Namespace) -> list[str]:
    values = {"output_dir": out, "adapter.method": method, "distributed.zero_stage": stage, "train.max_steps": 2,
              "train.micro_batch_size": args.micro_batch, "data.max_seq_len": args.seq, "evaluation.every": 0,
              "evaluation.generate": "[]", "data.eval": "null", "optimizer.warmup_steps": 0,
              "checkpoint.every_steps": 100, "data.audit": "true",
              "optimizer.lr": 1e-5 if method == "full" else 1e-3}
    return [w for k, v in values.items() for w in ("--set", f"{k}={v}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ftcore.builtin import resolve_model_path
    from ftcore.config import load_config
    from ftcore.tools.plan import build_facts, make_plan

    model_dir = resolve_model_path("builtin:gemma-3-270m")
    result = {"model": "builtin:gemma-3-270m (fp32)", "processes": 2, "micro_batch": args.micro_batch,
              "max_seq_len": args.seq, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="ft-plan-vs-measured-") as work:
        for name, (method, stage) in LAYOUTS.items():
            out = Path(work) / name
            overrides = sets(out, method, stage, args)
            run_checked(ft("launch", "examples/demo.yaml", "--nproc", "2", *overrides))
            cfg = load_config("examples/demo.yaml", [overrides[i + 1] for i in range(0, len(overrides), 2)])
            plan = make_plan(cfg, build_facts(cfg, model_dir), 2, 1, None)
            row = next(r for r in plan.rows if r.stage == stage and r.offload == "none")
            states = row.model_states
            ranks = [json.loads((out / "audit" / f"rank{r}_memory.json").read_text()) for r in range(2)]
            result["layouts"][name] = {
                "plan_model_states_gib": round(states / GIB, 3),
                "plan_activations_gib": round(row.activations_full / GIB, 3),
                "plan_total_gib": round((states + row.activations_full) / GIB, 3),
                "engine_params_plus_optimizer_gib": [round((m["param_bytes"] + m["optimizer_bytes"]) / GIB, 3)
                                                     for m in ranks],
                "rss_after_step_minus_before_model_gib": [
                    round(m["rss_after_first_step_gib"] - m["rss_before_model_gib"], 3) for m in ranks],
                "peak_rss_minus_before_model_gib": [round(m["peak_rss_gib"] - m["rss_before_model_gib"], 3)
                                                    for m in ranks],
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
