"""Training throughput of `ft train` against a plain `transformers.Trainer`, on this machine.

    python benchmarks/train_throughput.py [--quick] [--steps N]

Same model (a 34M-parameter Llama-style config, random init from a fixed seed, the built-in tokenizer), same data,
same effective batch, full fine-tuning in fp32 with AdamW, one process each:

  (a) loop overhead: every sample exactly the same length (no padding anywhere), `ft train` vs `Trainer`;
      tokens/s ratio (goal >= 1.0).
  (b) a skewed length mix (90% short, 10% near max_seq_len): `ft train` with packing vs `Trainer` padding each
      batch to its longest sample; trained-tokens/s ratio (goal >= 2.0).
  Beside them, `ft launch --nproc 2` (ZeRO-2; without --quick also ZeRO-0, which is what DDP does) on (a) and
  (b), and `Trainer` under torchrun with 2 processes (DDP: its DeepSpeed path wants CUDA) on (a).

Timings are steady-state: per optimizer step (batch fetch included on both sides), the first WARMUP steps dropped,
from ft's metrics.jsonl and from a Trainer callback; tokens are counted from the batches each side actually
trained on. With one process ft runs ZeRO stage 0 (nothing to partition in a world of one); with two, ZeRO-2.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from commands import ft, run_checked  # benchmarks/commands.py: ft by sys.executable, failures say why

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3
MODEL = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024}


def build_model(directory: Path) -> int:
    """The benchmark model, saved as a plain HF model directory with the built-in tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftcore.builtin import resolve_model_path

    builtin = Path(resolve_model_path("builtin:tiny-llama"))
    config = AutoConfig.from_pretrained(builtin)
    config.update(MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (builtin / name).exists():
            shutil.copy(builtin / name, directory / name)
    return sum(p.numel() for p in model.parameters())


def single_token_words(directory: Path, count: int = 400) -> list[str]:
    """Words that are one token each after a space, so a text of n of them is exactly n tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    words = []
    for word in ("the of and to in is was for on that with as by at from his her they this which are be had "
                 "not but have one all were when there we their been has can more if will who would so what "
                 "about out up into them time two may only other could new some these than first its also after "
                 "most over made like did many people before any must through years where much your way well "
                 "down should because each just those how too little state good very make world still own see "
                 "men work long get here between both life being under never day same another know while last "
                 "might us great old year off come since against go came right used take three").split():
        if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
            words.append(word)
    return words[:count]


def write_data(path: Path, words: list[str], lengths: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")


# ------------------------------------------------------------------------------------------------ ft side
def run_ft(model: Path, data: Path, out: Path, steps: int, mbs: int, seq: int, packing: bool, nproc: int,
           zero_stage: int | None = None) -> dict:
    sets = {"model.name_or_path": model, "adapter.method": "full", "optimizer.lr": 1e-4, "optimizer.warmup_steps": 0,
            "train.max_steps": steps, "train.micro_batch_size": mbs, "train.grad_accum_steps": 1,
            "data.train": f"[{{path: {data}, format: text}}]", "data.eval": "null", "data.max_seq_len": seq,
            "data.packing": str(packing).lower(), "data.overflow": "truncate", "evaluation.every": 0,
            "checkpoint.every_steps": 0, "logging.report_to": "none", "output_dir": out, "logging.every": 1000,
            "distributed.zero_stage": zero_stage if zero_stage is not None else (0 if nproc == 1 else 2)}
    args = [w for k, v in sets.items() for w in ("--set", f"{k}={v}")]
    if nproc == 1:  # `ft train` in this process tree: a plain single process, as the Trainer runs
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        argv = ft("train", *args, "--resume", "none")
    else:
        env = dict(os.environ)
        argv = ft("launch", *args, "--nproc", str(nproc), "--resume", "none")
    run_checked(argv, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][WARMUP:]
    seconds = sum(r["step_time_s"] for r in rows)
    return {"steps_timed": len(rows), "tokens_per_s": sum(r["tokens"] for r in rows) / seconds,
            "trained_tokens_per_s": sum(r["trained_tokens"] for r in rows) / seconds,
            "last_loss": rows[-1]["loss"]}


# ------------------------------------------------------------------------------------------------ Trainer side
def hf_worker(spec: dict) -> None:
    """Runs inside its own process (or each torchrun process): a plain Trainer on the same model and data."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    texts = [json.loads(line)["text"] for line in Path(spec["data"]).read_text().splitlines()]
    eos = tokenizer.eos_token_id
    samples = [{"input_ids": (tokenizer(t)["input_ids"] + [eos])[: spec["seq"]]} for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(batch):  # pad to the longest sample of the batch; padding carries no loss and no attention
        width = max(len(s["input_ids"]) for s in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            mask[i, : len(s["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    counts: list[tuple[int, int]] = []
    times: list[float] = []

    class Counting(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts.append((int(inputs["attention_mask"].sum()), int((inputs["labels"] != -100).sum())))
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        """Time from one step's end to the next: fetching and collating the batch included, as in ft's
        step_time_s (the Trainer fetches a step's batches before on_step_begin)."""

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=spec["mbs"],
                             gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=1e-4,
                             lr_scheduler_type="cosine", warmup_steps=0, optim="adamw_torch", report_to=[],
                             save_strategy="no", logging_steps=1000, use_cpu=True, dataloader_num_workers=0,
                             seed=42, disable_tqdm=True, ddp_backend="gloo" if spec.get("ddp") else None)
    trainer = Counting(model=model, args=args, train_dataset=samples, data_collator=collate,
                       callbacks=[StepClock()])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    Path(spec["out"], f"timing{rank}.json").write_text(json.dumps({"times": times, "counts": counts}))


def run_hf(model: Path, data: Path, out: Path, steps: int, mbs: int, seq: int, nproc: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model), "data": str(data), "out": str(out), "steps": steps, "mbs": mbs, "seq": seq,
            "ddp": nproc > 1}
    worker = [__file__, "--hf-worker", json.dumps(spec)]
    if nproc == 1:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        argv = [sys.executable, *worker]
    else:
        env = dict(os.environ)
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                str(_free_port()), *worker]
    run_checked(argv, env=env)
    ranks = [json.loads((out / f"timing{r}.json").read_text()) for r in range(nproc)]
    seconds = sum(max(r["times"][i] for r in ranks) for i in range(WARMUP, steps))
    tokens = sum(c[0] for r in ranks for c in r["counts"][WARMUP:steps])
    trained = sum(c[1] for r in ranks for c in r["counts"][WARMUP:steps])
    return {"steps_timed": steps - WARMUP, "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--hf-worker":
        hf_worker(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer steps and smaller batches (under 2 minutes).")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-two-process", action="store_true", help="Skip the 2-process runs.")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 30)
    mbs, seq_a, seq_b = (4, 128, 256) if args.quick else (8, 256, 512)
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params = build_model(tmp / "model")
        words = single_token_words(tmp / "model")
        rng = random.Random(0)
        # (a) every sample seq_a - 2 words: with BOS and EOS exactly seq_a tokens, no padding on either side.
        write_data(tmp / "uniform.jsonl", words, [seq_a - 2] * 2000, seed=1)
        # (b) 90% short samples (16-32 words), 10% near the maximum.
        lengths = [rng.randint(seq_b - 40, seq_b - 2) if rng.random() < 0.1 else rng.randint(16, 32)
                   for _ in range(4000)]
        write_data(tmp / "skewed.jsonl", words, lengths, seed=2)
        result: dict = {"benchmark": "train_throughput", "quick": args.quick, "model_params": params,
                        "steps": steps, "warmup_steps_dropped": WARMUP, "micro_batch_size": mbs,
                        "threads": os.cpu_count()}
        ft_a = run_ft(tmp / "model", tmp / "uniform.jsonl", tmp / "ft_a", steps, mbs, seq_a, False, 1)
        hf_a = run_hf(tmp / "model", tmp / "uniform.jsonl", tmp / "hf_a", steps, mbs, seq_a, 1)
        ft_b = run_ft(tmp / "model", tmp / "skewed.jsonl", tmp / "ft_b", steps, mbs, seq_b, True, 1)
        hf_b = run_hf(tmp / "model", tmp / "skewed.jsonl", tmp / "hf_b", steps, mbs, seq_b, 1)
        result["uniform"] = {"seq_len": seq_a, "ft": ft_a, "hf_trainer": hf_a}
        result["skewed"] = {"max_seq_len": seq_b, "ft_packed": ft_b, "hf_trainer_padded": hf_b}
        result["ratio_vs_hf_trainer"] = round(ft_a["tokens_per_s"] / hf_a["tokens_per_s"], 3)
        result["packed_trained_tokens_ratio_vs_padded"] = round(
            ft_b["trained_tokens_per_s"] / hf_b["trained_tokens_per_s"], 3)
        if not args.no_two_process:
            ft_a2 = run_ft(tmp / "model", tmp / "uniform.jsonl", tmp / "ft_a2", steps, mbs, seq_a, False, 2)
            hf_a2 = run_hf(tmp / "model", tmp / "uniform.jsonl", tmp / "hf_a2", steps, mbs, seq_a, 2)
            ft_b2 = run_ft(tmp / "model", tmp / "skewed.jsonl", tmp / "ft_b2", steps, mbs, seq_b, True, 2)
            result["two_process"] = {
                "ft_zero2_uniform": ft_a2, "hf_trainer_ddp_uniform": hf_a2, "ft_zero2_skewed_packed": ft_b2,
                "ratio_vs_hf_trainer": round(ft_a2["tokens_per_s"] / hf_a2["tokens_per_s"], 3)}
            if not args.quick:  # ZeRO-0 is what DDP does: the like-for-like comparison with the Trainer's DDP
                ft_a0 = run_ft(tmp / "model", tmp / "uniform.jsonl", tmp / "ft_a0", steps, mbs, seq_a, False, 2, 0)
                result["two_process"]["ft_zero0_uniform"] = ft_a0
                result["two_process"]["ratio_zero0_vs_hf_trainer_ddp"] = round(
                    ft_a0["tokens_per_s"] / hf_a2["tokens_per_s"], 3)
        result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
