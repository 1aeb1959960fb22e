"""Preference training benchmark: pairs/s of a DPO step vs tokens/s of an SFT step on the same model and rows, and
the peak RSS of DPO with the reference taken from the same weights (adapter disabled) vs a separate frozen copy.
Prints JSON.

    python benchmarks/preference.py

The model is a ~105M-parameter Llama (8 blocks, hidden 768, 32k vocabulary) built from a config, fp32 on CPU,
with LoRA (r 16 on q/v). A micro batch is 8 pairs of 128 prompt + 128 response tokens (16 rows of 256); the SFT
step trains the same 16 rows (responses only) with the chunked causal-LM loss. Each measurement runs in a fresh
process (its peak RSS is its own): one warm-up step, then timed steps (forward, loss, backward, AdamW).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS, PROMPT, RESPONSE, VOCAB = 8, 128, 128, 32_000


def worker(mode: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from ftcore.config import PreferenceConfig
    from ftcore.losses.chunked import LogitTransform
    from ftcore.losses.objective import ChunkedCausalLMLoss
    from ftcore.losses.preference import PreferenceLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.config._attn_implementation = "sdpa"
    reference = None
    if mode == "dpo-reference-copy":
        reference = LlamaForCausalLM(config).requires_grad_(False).eval()
        reference.load_state_dict(base.state_dict())
        reference.config._attn_implementation = "sdpa"
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    transform = LogitTransform.of(config)
    if mode == "sft":
        objective = ChunkedCausalLMLoss(lambda m: m, 2048, transform)
    else:
        objective = PreferenceLoss(PreferenceConfig(loss="dpo"), lambda m: m, 2048, transform, reference)
    ids = torch.randint(3, VOCAB, (2 * PAIRS, PROMPT + RESPONSE), generator=torch.Generator().manual_seed(1))
    ids[PAIRS:, :PROMPT] = ids[:PAIRS, :PROMPT]  # each rejected row shares its chosen row's prompt
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "use_cache": False}
    normaliser = PAIRS if mode != "sft" else int((labels != -100).sum())
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        result = objective(model, inputs, normaliser)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del result
        if step:
            times.append(time.perf_counter() - started)
    step_s = sum(times) / len(times)
    out = {"mode": mode, "step_s": round(step_s, 3), "tokens_per_s": round(ids.numel() / step_s, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if mode != "sft":
        out["pairs_per_s"] = round(PAIRS / step_s, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--worker", choices=["sft", "dpo", "dpo-reference-copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    results = {}
    for mode in ("sft", "dpo", "dpo-reference-copy"):
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)],
                              capture_output=True, text=True, cwd=ROOT, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), file=sys.stderr)
    summary = {"benchmark": "preference", "pairs_per_micro_batch": PAIRS, "tokens_per_row": PROMPT + RESPONSE,
               "results": results,
               "dpo_step_over_sft_step": round(results["dpo"]["step_s"] / results["sft"]["step_s"], 3),
               "reference_copy_extra_rss_gib": round(results["dpo-reference-copy"]["peak_rss_gib"]
                                                     - results["dpo"]["peak_rss_gib"], 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
