"""Loss memory benchmark: peak RSS and tokens/s of a training step with loss.impl full vs chunked. Prints JSON.

    python benchmarks/loss_memory.py                 # 4,096 and 16,384 tokens per micro batch
    python benchmarks/loss_memory.py --tokens 4096   # one size

The model is a small Llama (2 blocks, hidden 256) with Llama-3's 128,256-token vocabulary, built from a config:
at these sizes the logits, not the weights, are the step's largest tensors (16,384 x 128,256 fp32 = 8.4 GB). Each
measurement runs in a fresh process, so its peak RSS is its own: one warm-up step, then timed steps (forward, the
objective ft uses for that loss_impl, backward, AdamW step), fp32 on CPU. A process the machine kills for memory
is reported as such ("killed": the peak was above what the machine has).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128_256
SEQ = 4096


def worker(impl: str, tokens: int, steps: int, chunk: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from ftcore.losses.chunked import LogitTransform
    from ftcore.losses.objective import CausalLMLoss, ChunkedCausalLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = (ChunkedCausalLMLoss(lambda m: m, chunk, LogitTransform.of(config)) if impl == "chunked"
                 else CausalLMLoss())
    rows = tokens // SEQ
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        result = objective(model, inputs, normaliser=rows * (SEQ - 1))
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del result
        if step:  # the first step is the warm-up (allocator, optimizer states)
            times.append(time.perf_counter() - started)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"impl": impl, "tokens_per_micro_batch": tokens, "peak_rss_gib": round(peak_gib, 3),
            "tokens_per_s": round(tokens * len(times) / sum(times), 1), "step_s": round(sum(times) / len(times), 2)}


def measure(impl: str, tokens: int, steps: int, chunk: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", impl, "--tokens", str(tokens), "--steps",
                           str(steps), "--chunk", str(chunk)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        return {"impl": impl, "tokens_per_micro_batch": tokens, "killed": killed,
                "error": None if killed else proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, action="append", help="tokens per micro batch (multiple of 4096)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--chunk", type=int, default=2048, help="loss.chunk_tokens")
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args.steps, args.chunk)))
        return
    results = []
    for tokens in args.tokens or [4096, 16384]:
        pair = {impl: measure(impl, tokens, args.steps, args.chunk) for impl in ("full", "chunked")}
        full, chunked = pair["full"], pair["chunked"]
        row = {"tokens_per_micro_batch": tokens, "vocab": VOCAB, "chunk_tokens": args.chunk, **pair}
        if "peak_rss_gib" in full and "peak_rss_gib" in chunked:
            row["chunked_peak_over_full"] = round(chunked["peak_rss_gib"] / full["peak_rss_gib"], 3)
            row["chunked_speed_over_full"] = round(chunked["tokens_per_s"] / full["tokens_per_s"], 3)
        elif full.get("killed") and "peak_rss_gib" in chunked:
            # full did not fit: its peak was above the machine's memory, which bounds the ratio from above
            machine_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            row["full_peak_above_gib"] = round(machine_gib, 1)
            row["chunked_peak_over_full_at_most"] = round(chunked["peak_rss_gib"] / machine_gib, 3)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"benchmark": "loss_memory", "results": results}, indent=1))


if __name__ == "__main__":
    main()
