"""The same LoRA SFT run in ft and in Hugging Face's Trainer, on the real Gemma-3-270M: per-step losses side by side,
the final eval loss and held-out exact match of each, tokens/s and peak RSS per rank. Prints one JSON.

Same run, by construction: both take ft's training stream for each rank (the same chat rendering, completion-only
labels, order and per-rank split: samples are tokenized once, by ft's data code, and Trainer gets those batches as
they are), the same LoRA (ft's apply_lora: r, alpha, targets and the initial A/B from the seed), AdamW with the same
lr, cosine schedule with linear warmup, clipping at 1.0, the same number of steps. 1 process: ft (DeepSpeed ZeRO-2,
world of one) vs a plain Trainer; 2 processes: ft ZeRO-2 vs Trainer with a DeepSpeed ZeRO-2 JSON (ft's own, from
the run's ds_config.json), both under torchrun on gloo. Each side's peak RSS per rank is its process's ru_maxrss.
The held-out score is `ft eval` of each side's adapter on the same 40 held-out sums.

  python benchmarks/vs_trainer.py --nproc 1 --steps 30
  python benchmarks/vs_trainer.py --nproc 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from commands import write_peak_rss  # benchmarks/commands.py

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/demo.yaml"


def ft_sets(out: Path, args: argparse.Namespace) -> list[str]:
    sets = {"output_dir": str(out), "train.max_steps": args.steps, "train.micro_batch_size": args.micro_batch,
            "data.max_seq_len": args.seq, "optimizer.lr": args.lr, "optimizer.warmup_steps": args.warmup,
            "evaluation.every": args.steps, "evaluation.generate": "[]", "logging.every": 1,
            "checkpoint.every_steps": 10 * args.steps, "distributed.zero_stage": 2, "model.dtype": "float32"}
    return [w for k, v in sets.items() for w in ("--set", f"{k}={v}")]


def write_rank_peak_rss(out: Path, side: str) -> None:
    write_peak_rss(out / f"{side}-rss-rank{int(os.environ.get('RANK', 0))}.json")


def worker_ft(out: Path, args: argparse.Namespace) -> None:
    from launcher.cli import app

    try:
        app(["train", CONFIG, *ft_sets(out, args)], standalone_mode=False)
    finally:
        write_rank_peak_rss(out.parent, "ft")


def worker_trainer(out: Path, args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ftcore.builtin import resolve_model_path
    from ftcore.config import load_config
    from ftcore.data.stream import TrainStream, eval_batches
    from ftcore.model import apply_lora, load_tokenizer
    from ftcore.tasks import task_for

    sets = ft_sets(out, args)
    cfg = load_config(CONFIG, [sets[i + 1] for i in range(0, len(sets), 2)])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model_dir = resolve_model_path(cfg.model.name_or_path, cfg.model.dtype)
    tokenizer = load_tokenizer(model_dir)
    stream = TrainStream(cfg.data, tokenizer, cfg.train.seed, rank, world, cfg.train.micro_batch_size,
                         task_for(cfg))
    batches = [stream.next_batch() for _ in range(args.steps)]
    evals = eval_batches(cfg.data, tokenizer, rank, world, cfg.train.micro_batch_size, task_for(cfg))

    class Batches(Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            b = self.items[i]
            return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    def as_is(items):  # each item is already a collated micro batch
        return items[0]

    class InOrder(Trainer):
        """Each rank reads its own ft batches, in ft's order (no resampling, no resharding)."""

        def get_train_dataloader(self):
            return DataLoader(Batches(batches), batch_size=1, shuffle=False, collate_fn=as_is)

        def get_eval_dataloader(self, eval_dataset=None):
            return DataLoader(Batches(evals), batch_size=1, shuffle=False, collate_fn=as_is)

    class Losses(TrainerCallback):
        def __init__(self):
            self.rows, self.last = [], time.perf_counter()

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                now = time.perf_counter()
                self.rows.append({"step": state.global_step, "loss": logs["loss"], "time_s": now - self.last})
                self.last = now

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_lora(model, cfg.adapter, cfg.train.seed, "CAUSAL_LM")
    ds = None
    if world > 1:
        ds = json.loads((out.parent / "ft" / "ds_config.json").read_text())  # ft's own ZeRO-2 JSON
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
        ds.update({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "train_batch_size": "auto", "gradient_clipping": "auto"})
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=1, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], seed=cfg.train.seed,
        use_cpu=True, ddp_backend="gloo" if world > 1 else None, deepspeed=ds, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)
    losses = Losses()
    trainer = InOrder(model=model, args=training_args, callbacks=[losses])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    metrics = trainer.evaluate()
    if rank == 0:
        trainer.model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        tokens = sum(b.real_tokens for b in batches) * world
        (out / "result.json").write_text(json.dumps({"losses": losses.rows, "eval_loss": metrics["eval_loss"],
                                                     "wall_s": wall, "tokens": tokens}))
    write_rank_peak_rss(out.parent, "trainer")


def torchrun(nproc: int, side: str, out: Path, args: argparse.Namespace) -> float:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(29400 + (os.getpid() % 500)), str(Path(__file__).resolve()), "--worker", side, "--out", str(out),
            "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
            "--lr", str(args.lr), "--warmup", str(args.warmup)]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    (out.parent / f"{side}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed ({proc.returncode}); log: {out.parent / f'{side}.log'}\n"
                         + proc.stderr[-3000:])
    return time.perf_counter() - start


def held_out_score(adapter: Path, work: Path, name: str) -> float:
    out = work / f"eval-{name}"
    subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(adapter), "--data", str(work / "held-out.jsonl"),
                    "--max-new-tokens", "6", "--metric", "exact_match", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return json.loads((out / "summary.json").read_text())["metrics"]["exact_match"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", choices=["ft", "trainer"])
    parser.add_argument("--out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.worker:
        (worker_ft if args.worker == "ft" else worker_trainer)(Path(args.out), args)
        return

    from ftcore.builtin import resolve_data_path, resolve_model_path

    resolve_model_path("builtin:gemma-3-270m")  # dequantized once, before either side starts
    work = Path(tempfile.mkdtemp(prefix="ft-vs-trainer-"))
    rows = Path(resolve_data_path("builtin:add-two-digits-eval")).read_text().splitlines()[:40]
    (work / "held-out.jsonl").write_text("\n".join(rows) + "\n")
    ft_wall = torchrun(args.nproc, "ft", work / "ft", args)
    trainer_wall = torchrun(args.nproc, "trainer", work / "trainer", args)

    ft_rows = [json.loads(line) for line in (work / "ft" / "metrics.jsonl").read_text().splitlines()]
    ft_steps = {r["step"]: r for r in ft_rows if "loss" in r}
    ft_eval = next(r["eval_loss"] for r in reversed(ft_rows) if "eval_loss" in r)
    trainer = json.loads((work / "trainer" / "result.json").read_text())
    tr_steps = {r["step"]: r for r in trainer["losses"]}
    steady = range(3, args.steps + 1)  # the first steps include warm-up costs on both sides
    ft_tok_s = sum(ft_steps[s]["tokens"] for s in steady) / sum(ft_steps[s]["step_time_s"] for s in steady)
    tr_tok_s = (trainer["tokens"] / args.steps * len(steady)) / sum(tr_steps[s]["time_s"] for s in steady)
    rss = {side: [json.loads((work / f"{side}-rss-rank{r}.json").read_text())["peak_rss_gib"]
                  for r in range(args.nproc)] for side in ("ft", "trainer")}
    result = {
        "model": "builtin:gemma-3-270m (Gemma-3-270M, dequantized Q4_K_M GGUF, fp32)",
        "processes": args.nproc, "steps": args.steps, "micro_batch": args.micro_batch, "max_seq_len": args.seq,
        "lr": args.lr, "trainer": "transformers.Trainer" + (" + DeepSpeed ZeRO-2" if args.nproc > 1 else ""),
        "ft": "ft ZeRO-2",
        "losses": [{"step": s, "ft": round(ft_steps[s]["loss"], 5), "trainer": round(tr_steps[s]["loss"], 5)}
                   for s in range(1, args.steps + 1)],
        "max_abs_step_loss_diff": max(abs(ft_steps[s]["loss"] - tr_steps[s]["loss"]) for s in range(1, args.steps + 1)),
        "eval_loss": {"ft": ft_eval, "trainer": trainer["eval_loss"]},
        "eval_loss_rel_diff": abs(ft_eval - trainer["eval_loss"]) / trainer["eval_loss"],
        "held_out_exact_match_40": {"ft": held_out_score(work / "ft" / "final", work, "ft"),
                                    "trainer": held_out_score(work / "trainer" / "final", work, "trainer")},
        "tokens_per_s": {"ft": round(ft_tok_s, 1), "trainer": round(tr_tok_s, 1)},
        "tokens_per_s_ratio_ft_over_trainer": round(ft_tok_s / tr_tok_s, 3),
        "peak_rss_gib_per_rank": rss,
        "peak_rss_ratio_ft_over_trainer": [round(a / b, 3) for a, b in zip(rss["ft"], rss["trainer"])],
        "wall_s": {"ft": round(ft_wall, 1), "trainer": round(trainer_wall, 1)},
    }
    print(json.dumps(result, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
