"""`ft eval` throughput (samples/s of batched greedy generation), 1 process vs 2 processes, on this machine.

    python benchmarks/eval_generate.py [--target builtin:tiny-llama] [--copies 4] [--max-new-tokens 32]

Prints one JSON object. Each run is a real `ft eval` on the demo's held-out prompts (builtin:repeat-words-eval,
50 records, given `--copies` times). On the untrained built-in model no answer ends early (it never says EOS), so
every sample generates exactly max_new_tokens: the runs compare equal work. samples/s is `ft eval`'s own figure
(generation and scoring, without loading); the wall time of each whole command is reported too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
DATA = "builtin:repeat-words-eval"


def measure(target: str, nproc: int, copies: int, max_new_tokens: int, batch_size: int, workdir: Path) -> dict:
    out = workdir / f"np{nproc}"
    argv = ft("eval", target, *(["--data", DATA] * copies),
            "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size), "--nproc", str(nproc),
            "--out", str(out))
    started = time.perf_counter()
    run_checked(argv)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    answers = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {"answers": answers, "nproc": nproc, "samples": summary["samples"],
            "samples_per_s": round(summary["samples_per_s"], 2), "exact_match": summary["metrics"]["exact_match"],
            "command_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:tiny-llama",
                        help="also e.g. outputs/demo/merged (after make demo): answers then end at EOS")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(args.target, n, args.copies, args.max_new_tokens, args.batch_size, Path(tmp)) for n in (1, 2)]
    # The same answers, in input order, at any world size.
    assert runs[0].pop("answers") == runs[1].pop("answers")
    print(json.dumps({"benchmark": "eval_generate", "target": args.target, "data": DATA, "copies": args.copies,
                      "max_new_tokens": args.max_new_tokens, "batch_size_per_rank": args.batch_size, "runs": runs,
                      "speedup_2proc": round(runs[1]["samples_per_s"] / runs[0]["samples_per_s"], 3)}, indent=1))


if __name__ == "__main__":
    main()
