"""Long-context benchmark: the longest sequence that trains within a fixed memory budget per rank, without sequence
parallelism (1 process) and with distributed.sequence_parallel=2 (2 processes, Ulysses), and tokens/s of each.
Prints JSON.

    python benchmarks/long_context.py                    # budget 1.6 GiB peak RSS per rank
    python benchmarks/long_context.py --budget-gib 2.0

Each trial is a real `ft train` / `ft launch` run (2 steps, micro batch 1, LoRA, fp32, CPU, gloo) of a small
Llama (4 blocks, hidden 256, 4 heads, 131,072 positions, random weights, the built-in tokenizer) on documents of
random words truncated to data.max_seq_len, so every sample is exactly that long. Its per-rank peak is the
largest peak RSS of any process of the run (getrusage of the children of a wrapper process: the biggest rank).
The search doubles the length from 2,048 while the run fits, then bisects to the nearest 1,024. A trial the
machine kills, or one that fails, counts as not fitting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from commands import CommandFailed, ft  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
STEP = 1024


def build_model(directory: Path) -> Path:
    """The benchmark's model: random weights from a config, the built-in model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from ftcore.builtin import resolve_model_path

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=131072,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama")).save_pretrained(directory)
    return directory


def write_documents(path: Path, words: int) -> Path:
    rng = random.Random(0)
    vocabulary = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]
    with open(path, "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words))}) + "\n")
    return path


def trial(model: Path, data: Path, out: Path, length: int, degree: int) -> dict:
    """One run at `length` tokens per sample; its biggest rank's peak RSS and tokens/s."""
    args = ["examples/chat-demo.yaml", "--set", f"model.name_or_path={model}", "--set",
            f"data.train=[{{path: {data}, format: text}}]", "--set", "data.eval=null", "--set", "evaluation.every=0",
            "--set", f"data.max_seq_len={length}", "--set", "train.micro_batch_size=1", "--set",
            "train.max_steps=2", "--set", "optimizer.warmup_steps=0", "--set", "checkpoint.every_steps=0", "--set",
            "model.dtype=float32", "--set", "adapter.dropout=0", "--set", "data.shuffle=false", "--set",
            f"distributed.sequence_parallel={degree}", "--set", f"output_dir={out}"]
    command = ft("train", *args) if degree == 1 else ft("launch", *args, "--nproc", str(degree))
    # The run's own output goes to a log beside it; the wrapper prints only the exit code and the children's peak.
    log = out.parent / f"{out.name}.log"
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), "
               "stderr=subprocess.STDOUT).returncode; "
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(log), *command], capture_output=True, text=True,
                          cwd=ROOT)
    words = proc.stdout.split()
    if proc.returncode != 0 or len(words) != 2:
        raise CommandFailed(f"the measuring wrapper failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rc, peak_kib = (int(x) for x in words)
    result = {"seq_len": length, "peak_rss_gib": round(peak_kib / 2**20, 3), "ok": rc == 0}
    if rc != 0:  # out of memory is an answer here (the longest length that fits), but say which failure it was
        result["error"] = log.read_text(errors="replace").strip().splitlines()[-3:]
    metrics = out / "metrics.jsonl"
    if rc == 0 and metrics.is_file():  # the second step's speed (the first warms up)
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"lr"' in line]
        result["tokens_per_s"] = round(steps[-1]["tokens_per_s"], 1)
    return result


def longest(model: Path, data: Path, work: Path, degree: int, budget_gib: float) -> dict:
    trials = []

    def fits(length: int) -> bool:
        result = trial(model, data, work / f"sp{degree}-{length}", length, degree)
        trials.append(result)
        print(json.dumps({"degree": degree, **result}), file=sys.stderr, flush=True)
        return result["ok"] and result["peak_rss_gib"] <= budget_gib

    low, high = 0, 2 * STEP
    while fits(high):
        low, high = high, 2 * high
    while high - low > STEP:
        middle = (low + high) // 2 // STEP * STEP
        if fits(middle):
            low = middle
        else:
            high = middle
    best = next((t for t in trials if t["seq_len"] == low), None)
    return {"sequence_parallel": degree, "processes": degree, "longest_seq_len": low,
            "peak_rss_gib": best["peak_rss_gib"] if best else None,
            "tokens_per_s": best.get("tokens_per_s") if best else None, "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=1.6, help="peak RSS allowed per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ft-long-context-") as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # import-time log lines: stdout is the JSON's
            model = build_model(work / "model")
        data = write_documents(work / "docs.jsonl", 200_000)
        results = [longest(model, data, work, degree, args.budget_gib) for degree in (1, 2)]
    one, two = results
    print(json.dumps({"budget_gib_per_rank": args.budget_gib, "results": results,
                      "length_ratio": round(two["longest_seq_len"] / max(one["longest_seq_len"], 1), 3)}, indent=1))


if __name__ == "__main__":
    main()
