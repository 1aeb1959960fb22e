"""Median step time and tokens/s of the built-in demo config, 1 process vs 2 processes (ZeRO-2), on this machine.

    python benchmarks/train_step.py [--steps 30] [--zero-stage 2]

Prints one JSON object. Each run is a real `ft launch`; timings come from the run's own metrics.jsonl
(the first 5 steps are warm-up and not counted). Also reports the wall time of each whole launch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5


def measure(nproc: int, steps: int, zero_stage: int, workdir: Path) -> dict:
    out = workdir / f"np{nproc}"
    argv = ft("launch", "examples/chat-demo.yaml", "--nproc", str(nproc),
            "--set", f"output_dir={out}", "--set", f"train.max_steps={steps}", "--set", "evaluation.every=0",
            "--set", "data.eval=null", "--set", "checkpoint.every_steps=0", "--set",
            f"distributed.zero_stage={zero_stage}", "--resume", "none")
    started = time.perf_counter()
    run_checked(argv)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][WARMUP:]
    return {"nproc": nproc, "zero_stage": zero_stage, "steps_timed": len(rows),
            "median_step_s": round(statistics.median(r["step_time_s"] for r in rows), 4),
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "launch_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(n, args.steps, args.zero_stage, Path(tmp)) for n in (1, 2)]
    print(json.dumps({"benchmark": "train_step", "model": "builtin:tiny-llama", "runs": runs,
                      "speedup_2proc_tokens_per_s": round(runs[1]["median_tokens_per_s"]
                                                          / runs[0]["median_tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
