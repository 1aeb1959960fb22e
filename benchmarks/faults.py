"""The fault-injection suite at a chosen scale (tests/faults/ runs it small in CI). Prints one JSON object.

    python benchmarks/faults.py [--kills 20] [--signals 10] [--dead 3] [--hangs 2] [--seed 0]

kill_trials / kill_resumed_ok: SIGKILLs of `ft launch` (2-process ZeRO-2 LoRA, a checkpoint every 2 steps) at seeded
random moments, and how many of them the rerun recovered from (resumed from the checkpoint `latest` named, final
adapter bit-identical to an uninterrupted run); kill_moments: start-up, a step, a checkpoint write, the pruning of
an old checkpoint, in turn. corrupt_checkpoints: kills after which `latest` did not name a complete, loadable
checkpoint, or a step dir with a manifest lacked files. kills_mid_deletion: kills that landed while an old
checkpoint was being deleted (renamed aside, not yet gone). kill_campaign_failures: for each run whose kills did not
all resume right, which property it broke (same_final, latest_sound, resumed_from_latest, logs_whole, finished).
hang_trials / hangs_detected: dead (SIGKILL) and hung (SIGSTOP) ranks the launcher ended in bounded time, naming the
rank, with no process left. signal_trials / signal_resumed_equal: SIGTERM/SIGUSR1 at random moments (start-up,
steps, eval, checkpoint writes). bad_inputs_*: the cases in tests/faults/bad_inputs.py. tracebacks: bad-input runs
that printed one. partial_outputs_left: bad-input runs that left something at their destination. disk_full_*: a
checkpoint and two exports on a full tmpfs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import harness  # noqa: E402
from tests.faults.bad_inputs import cases, run_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--signals", type=int, default=10)
    parser.add_argument("--dead", type=int, default=3)
    parser.add_argument("--hangs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # library log lines (DeepSpeed's) must not mix into the JSON
        result = run_suite(args)
    print(json.dumps(result, indent=1))


def run_suite(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    from ftcore.builtin import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="ft-faults-") as tmp:
        work = Path(tmp)
        reference = harness.reference_run(work)
        kills = harness.kill_campaigns(work, args.kills, args.seed, reference)
        signals = harness.signal_campaigns(work, args.signals, args.seed, reference)
        ranks = [harness.dead_or_hung_rank(work, i, hang=False) for i in range(args.dead)]
        ranks += [harness.dead_or_hung_rank(work, i, hang=True) for i in range(args.hangs)]
        prepared = {"run": reference, "model": resolve_model_path("builtin:tiny-llama"),
                    "run_args": json.dumps(harness.run_args(reference))}
        bad = [run_case(name, setup, work / f"bad-{i}", prepared) for i, (name, setup) in enumerate(cases())]
        disk = [harness.disk_full_checkpoint(work, reference),
                harness.disk_full_export(work, reference / "final", False),
                harness.disk_full_export(work, reference / "final", True)]
    disk_run = [d for d in disk if "skipped" not in d]
    result = {
        "kill_trials": kills["kill_trials"], "kill_resumed_ok": kills["kill_resumed_ok"],
        "corrupt_checkpoints": kills["corrupt_checkpoints"], "orphans_after_kill": kills["orphans_after_kill"],
        "kill_moments": kills["kill_moments"], "kills_mid_deletion": kills["kills_mid_deletion"],
        "kill_campaign_failures": kills["campaign_failures"],
        "hang_trials": len(ranks), "hangs_detected": sum(r["detected"] and r["orphans"] == 0 for r in ranks),
        "hang_detect_seconds": {"dead": [r["seconds"] for r in ranks[:args.dead]],
                                "hung": [r["seconds"] for r in ranks[args.dead:]]},
        "signal_trials": signals["signal_trials"], "signal_resumed_equal": signals["signal_resumed_equal"],
        "signal_moments": signals["signal_moments"],
        "signal_failures": signals["signal_failures"],
        "bad_inputs_tried": len(bad), "bad_inputs_clear_error": sum(b["clear"] for b in bad),
        "tracebacks": sum(b["traceback"] for b in bad), "partial_outputs_left": sum(b["partial"] for b in bad),
        "bad_inputs_unclear": [b["name"] for b in bad if not b["clear"] or b["traceback"] or b["partial"]],
        "disk_full_trials": len(disk_run), "disk_full_clean": sum(d["clean"] for d in disk_run),
        "disk_full_skipped": [d["skipped"] for d in disk if "skipped" in d],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return result


if __name__ == "__main__":
    main()
