"""Data pipeline benchmark: tokens/s per core, peak RSS against corpus size, packing efficiency. Prints JSON.

    python benchmarks/data_pipeline.py            # 1 GiB corpus (and a 1/8 one, to show RSS does not grow)
    python benchmarks/data_pipeline.py --quick    # 24 MiB, under a minute

A chat JSONL corpus with a skewed length mix (most conversations short, a few long) is generated on the fly.
Each measurement runs in a fresh process (so peak RSS is its own): open the corpus (index pass), then read and
tokenize samples through the real TrainStream for a fixed time, with packing on; then time the first batch after
resuming at 1% and at 90% of the epoch (a seek, so both should be equally fast). The trainer's consumption is
measured by a short real `ft train` of the built-in model on this machine (single process, its own tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is for on that with as at by from this be are it an or was can not which have "
         "model data train token batch layer weight gradient learning rate loss value network output input "
         "Paris Rome Lima river mountain ocean city number answer question system user assistant").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Skewed mix: 90% short exchanges (5-60 words), 10% long ones (150-700 words), some multi-turn."""
    rng = random.Random(seed)
    pool = []
    for _ in range(2000):
        long = rng.random() < 0.10
        turns = []
        if rng.random() < 0.3:
            turns.append({"role": "system", "content": sentence(rng, rng.randint(5, 15))})
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": sentence(rng, rng.randint(4, 30))})
            words = rng.randint(150, 700) if long else rng.randint(5, 60)
            turns.append({"role": "assistant", "content": sentence(rng, words)})
        pool.append(turns)
    written = records = 0
    with open(path, "w") as f:
        while written < size_bytes:
            turns = rng.choice(pool)
            line = json.dumps({"id": records, "messages": turns}) + "\n"
            f.write(line)
            written += len(line)
            records += 1
    return records


def measure_stream(corpus: Path, seconds: float, max_seq_len: int) -> dict:
    """Child process: open + stream with packing for `seconds`; returns throughput and peak RSS."""
    code = f"""
import json, resource, time
from ftcore.builtin import resolve_model_path
from ftcore.config import load_config
from ftcore.data.stream import TrainStream
from ftcore.model import load_tokenizer
from ftcore.tasks import task_for
tok = load_tokenizer(resolve_model_path("builtin:tiny-llama"))
cfg = load_config(None, ["data.train=[{{path: {str(corpus)!r}}}]", "data.packing=true",
                         "data.max_seq_len={max_seq_len}"])
t0 = time.perf_counter()
stream = TrainStream(cfg.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=8, task=task_for(cfg))
opened = time.perf_counter() - t0
stream.prime()
c0, t1 = dict(stream.counters), time.perf_counter()
cpu0 = time.process_time()
while time.perf_counter() - t1 < {seconds}:
    stream.next_batch()
wall, cpu = time.perf_counter() - t1, time.process_time() - cpu0
c = stream.counters
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # streaming only, before the resume probe

def first_batch_after_resume(fraction):
    # A checkpointed state whose cursor is `fraction` of the way through the epoch (its packing buffer
    # re-read by position, like a real resume), loaded into a fresh stream: time to its first batch.
    state = stream.state_dict()
    state["cursor"]["taken"] = int(fraction * stream.total_records)
    fresh = TrainStream(cfg.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=8, task=task_for(cfg))
    t = time.perf_counter()
    fresh.load_state_dict(state)
    fresh.next_batch()
    return time.perf_counter() - t

resume_early, resume_late = first_batch_after_resume(0.01), first_batch_after_resume(0.9)
print(json.dumps({{"open_s": opened, "records": stream.total_records, "tokens": c["tokens"] - c0["tokens"],
                   "wall_s": wall, "cpu_s": cpu, "packing_efficiency": stream.packing_efficiency,
                   "resume_first_batch_s_at_1pct": resume_early, "resume_first_batch_s_at_90pct": resume_late,
                   "peak_rss_mb": peak_rss_mb}}))
"""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainer_tokens_per_s(steps: int) -> float:
    """Median tokens/s of a real single-process `ft train` of the demo config on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ft("train", "examples/chat-demo.yaml",
               "--set", f"output_dir={tmp}/run",
               "--set", f"train.max_steps={steps}", "--set", "distributed.zero_stage=0", "--set",
               "checkpoint.every_steps=0", "--set", "evaluation.every=0", "--set", "data.eval=null")
        run_checked(cmd)
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl") if '"tokens_per_s"' in line]
    return statistics.median(r["tokens_per_s"] for r in rows[2:])  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 MiB corpus, short measurements")
    parser.add_argument("--size-mb", type=int, default=None, help="corpus size (default 1024, quick 24)")
    parser.add_argument("--seconds", type=float, default=None, help="streaming time per measurement")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    args = parser.parse_args()
    size_mb = args.size_mb or (24 if args.quick else 1024)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, mb in (("small", max(size_mb // 8, 1)), ("full", size_mb)):
            corpus = Path(tmp) / f"{label}.jsonl"
            t0 = time.perf_counter()
            records = make_corpus(corpus, mb << 20)
            gen_s = time.perf_counter() - t0
            results[label] = {"size_mb": mb, "records": records, "generate_s": round(gen_s, 1),
                              **measure_stream(corpus, seconds, args.max_seq_len)}
            corpus.unlink()
    full, small = results["full"], results["small"]
    per_core = full["tokens"] / full["cpu_s"]
    trainer = trainer_tokens_per_s(12 if args.quick else 30)
    print(json.dumps({
        "tokens_per_s_per_core": round(per_core),
        "peak_rss_mb": round(full["peak_rss_mb"], 1),
        "peak_rss_mb_corpus_one_eighth": round(small["peak_rss_mb"], 1),
        "packing_efficiency": round(full["packing_efficiency"], 4),
        "corpus_mb": full["size_mb"], "corpus_records": full["records"],
        "index_s": round(full["open_s"], 2), "index_s_one_eighth": round(small["open_s"], 2),
        "resume_first_batch_s_at_1pct_of_epoch": round(full["resume_first_batch_s_at_1pct"], 3),
        "resume_first_batch_s_at_90pct_of_epoch": round(full["resume_first_batch_s_at_90pct"], 3),
        "max_seq_len": args.max_seq_len,
        "trainer_tokens_per_s": round(trainer),
        "pipeline_vs_trainer": round(per_core / trainer, 1),
        "quick": args.quick,
    }, indent=1))


if __name__ == "__main__":
    main()
