"""SFT then GRPO on the real Gemma-3-270M, in ft and in TRL's GRPOTrainer side by side: held-out exact match
before and after GRPO, each step's time split into generation and training, peak RSS. Prints one JSON.

The sequence (examples/rl-grpo-gemma.yaml describes it for a user):
1. SFT: `ft train examples/demo.yaml` for --sft-steps on 1 process (LoRA), merged into the base by `ft export`:
   the model both GRPO runs start from. Its held-out exact match on the 100 held-out sums is "before".
2. GRPO in ft: task rl on the merged model, a new LoRA (r 16, alpha 32, every linear layer, no dropout), reward
   exact_answer (the completion equals the record's answer), --prompts prompts x --generations completions per
   step, up to 6 new tokens, temperature 1, DAPO loss (token mean over the step), epsilon 0.2 / 0.28, beta 0,
   AdamW at --lr with cosine decay, clipping at 1.0.
3. The same GRPO in TRL's GRPOTrainer: the same merged model, LoRA, prompts (the chat template applied by TRL),
   reward (the same exact_answer function), group size, batch (per_device_train_batch_size = prompts x
   generations), sampling, loss_type dapo, epsilons, beta, learning rate and schedule, steps.
4. "after": `ft eval` of each side's adapter on the same 100 held-out sums (greedy, 6 new tokens).

Both run one process on the CPU (fp32). Step times skip the first two steps (warm-up). ft's generation time is its
generation_s metric; TRL's is the time in GRPOTrainer._generate_and_score_completions (generation and rewards),
the rest of the step is training. Peak RSS is each side's process ru_maxrss.

  python benchmarks/grpo.py                      # about 25 minutes on 2 CPU cores
  python benchmarks/grpo.py --steps 10 --sft-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from commands import CommandFailed, ft, run_checked, write_peak_rss  # benchmarks/commands.py

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/rl-grpo-gemma.yaml"


def ft_sets(work: Path, args: argparse.Namespace) -> list[str]:
    sets = {"output_dir": str(work / "ft"), "model.name_or_path": str(work / "sft-merged"),
            "train.max_steps": args.steps, "train.micro_batch_size": args.prompts, "train.grad_accum_steps": 1,
            "rl.num_generations": args.generations, "optimizer.lr": args.lr, "optimizer.warmup_steps": 0,
            "checkpoint.every_steps": 10 * args.steps, "evaluation.every": 0, "logging.every": 1,
            "train.seed": args.seed}
    return [w for k, v in sets.items() for w in ("--set", f"{k}={v}")]


def worker_ft(work: Path, args: argparse.Namespace) -> None:
    from launcher.cli import app

    try:
        app(["train", EXAMPLE, *ft_sets(work, args)], standalone_mode=False)
    finally:
        write_peak_rss(work / "ft-rss.json")


def worker_trl(work: Path, args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftcore.builtin import resolve_data_path
    from ftcore.data.chat_template import FALLBACK_CHAT_TEMPLATE
    from ftcore.rewards.builtin import exact_answer

    cfg = _config(work, args)
    records = [json.loads(line) for line in Path(resolve_data_path("builtin:add-two-digits")).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "reference": r["messages"][-1]["content"]}
                                 for r in records])

    def exact(completions, reference, **_):  # TRL passes conversational completions as message lists
        return exact_answer([c[-1]["content"] for c in completions], reference)

    generation_s: list[float] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                generation_s.append(time.perf_counter() - started)

    class Steps(TrainerCallback):
        def __init__(self):
            self.rows, self.last = [], None

        def on_step_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            self.rows.append({"step": state.global_step, "step_time_s": time.perf_counter() - self.last,
                              "generation_s": generation_s[-1] if generation_s else 0.0})

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "reward" in logs and self.rows:
                self.rows[-1]["reward"] = logs["reward"]

    model = AutoModelForCausalLM.from_pretrained(work / "sft-merged", dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(work / "sft-merged")
    tokenizer.chat_template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE  # as ft renders chat records
    r = cfg.rl
    config = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps,
        per_device_train_batch_size=args.prompts * r.num_generations, gradient_accumulation_steps=1,
        num_generations=r.num_generations, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, loss_type=r.loss_normalisation, epsilon=r.epsilon,
        epsilon_high=r.epsilon_high, beta=r.beta, num_iterations=r.num_iterations, scale_rewards=r.advantage_scale,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, use_cpu=True,
        bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0)
    peft_config = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    steps = Steps()
    trainer = Timed(model=model, reward_funcs=exact, args=config, train_dataset=dataset, processing_class=tokenizer,
                    peft_config=peft_config, callbacks=[steps])
    try:
        trainer.train()
        trainer.model.save_pretrained(work / "trl" / "final")
        tokenizer.save_pretrained(work / "trl" / "final")
        (work / "trl-steps.json").write_text(json.dumps(steps.rows))
    finally:
        write_peak_rss(work / "trl-rss.json")


def _config(work: Path, args: argparse.Namespace):
    from ftcore.config import load_config

    sets = ft_sets(work, args)
    return load_config(str(ROOT / EXAMPLE), [sets[i + 1] for i in range(0, len(sets), 2)])


def run(argv: list[str], log: Path) -> float:
    """Seconds `argv` took; its output goes to `log` (also when it fails, which raises saying why)."""
    started = time.perf_counter()
    try:
        proc = run_checked(argv)
    except CommandFailed as e:
        log.write_text(str(e))
        raise
    log.write_text(proc.stdout + proc.stderr)
    return time.perf_counter() - started


def held_out(model: Path, work: Path, name: str) -> float:
    out = work / f"eval-{name}"
    run(ft("eval", str(model), "--data", "builtin:add-two-digits-eval", "--max-new-tokens", "6", "--metric",
           "exact_match", "--out", str(out)), work / f"eval-{name}.log")
    return json.loads((out / "summary.json").read_text())["metrics"]["exact_match"]


def first_and_last(rows: list[dict]) -> list[float]:
    """The mean training reward of the first and of the last 5 steps."""
    return [round(sum(r.get("reward", 0.0) for r in part) / len(part), 4) for part in (rows[:5], rows[-5:])]


def steady_means(rows: list[dict]) -> dict:
    steady = [r for r in rows if r["step"] > 2]
    step = sum(r["step_time_s"] for r in steady) / len(steady)
    generation = sum(r["generation_s"] for r in steady) / len(steady)
    return {"step_s": round(step, 2), "generation_s": round(generation, 2), "training_s": round(step - generation, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ft", "trl"])
    parser.add_argument("--work")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.worker:
        (worker_ft if args.worker == "ft" else worker_trl)(Path(args.work), args)
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ft-grpo-"))
    run(ft("train", "examples/demo.yaml", "--set", f"output_dir={work / 'sft'}", "--set",
           f"train.max_steps={args.sft_steps}", "--set", "evaluation.every=0", "--set", "optimizer.warmup_steps=5",
           "--set", f"checkpoint.every_steps={10 * args.sft_steps}"), work / "sft.log")
    run(ft("export", "--adapter", str(work / "sft" / "final"), "--out", str(work / "sft-merged")), work / "export.log")
    before = held_out(work / "sft-merged", work, "sft")
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--steps", str(args.steps), "--prompts",
          str(args.prompts), "--generations", str(args.generations), "--lr", str(args.lr), "--seed", str(args.seed)]
    env_note = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",) if os.environ.get(k)}
    walls = {side: run([*me, "--worker", side], work / f"{side}.log") for side in ("ft", "trl")}

    ft_rows = [r for r in map(json.loads, (work / "ft" / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    trl_rows = json.loads((work / "trl-steps.json").read_text())
    rss = {side: json.loads((work / f"{side}-rss.json").read_text())["peak_rss_gib"] for side in ("ft", "trl")}
    after = {"ft": held_out(work / "ft" / "final", work, "ft"), "trl": held_out(work / "trl" / "final", work, "trl")}
    result = {
        "model": "builtin:gemma-3-270m (Gemma-3-270M, dequantized Q4_K_M GGUF, fp32), 1 process, CPU",
        "sft": f"ft train examples/demo.yaml, {args.sft_steps} steps x 8 samples, LoRA r16, merged by ft export",
        "grpo": {"steps": args.steps, "prompts_per_step": args.prompts, "generations": args.generations,
                 "lr": args.lr, "reward": "exact_answer", "loss": "dapo", "epsilon": [0.2, 0.28], "beta": 0.0,
                 "max_new_tokens": 6, "temperature": 1.0},
        "held_out_exact_match_100": {"sft (before GRPO)": before, "ft grpo": after["ft"], "trl grpo": after["trl"]},
        "train_reward_first5_last5": {"ft": first_and_last(ft_rows), "trl": first_and_last(trl_rows)},
        "step_time_after_warmup": {"ft": steady_means(ft_rows), "trl": steady_means(trl_rows)},
        "peak_rss_gib": {side: round(v, 2) for side, v in rss.items()},
        "wall_s": {side: round(v, 1) for side, v in walls.items()},
        "env": env_note,
    }
    print(json.dumps(result, indent=1))
    if not args.keep and not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
