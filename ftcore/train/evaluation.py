"""Evaluation on data.eval: every rank scores its share of the eval set (padded to the same number of batches, so
no rank waits alone in a collective), the sums are all-reduced. What is measured is the task's (ftcore/tasks/:
evaluate): causal LM loss per trained token and perplexity; classification accuracy, macro-F1 and the confusion
matrix; preference reward accuracy and margin. With evaluation.generate the prompts are also answered by
generation and scored (ftcore/evaluation/generation.py)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from ftcore.config import Config
from ftcore.data.batch import Batch
from ftcore.evaluation.generation import evaluate_by_generation, write_predictions
from ftcore.losses.objective import Objective
from ftcore.rewards import rules_of
from ftcore.rewards.pool import RewardPool
from ftcore.run_dir import RunDir
from ftcore.tasks.base import EvalRun, Task
from ftcore.train.runtime import Runtime


class Evaluator:
    """Scores the model on this rank's eval batches; __call__ is collective."""

    def __init__(self, cfg: Config, runtime: Runtime, task: Task, objective: Objective, eval_set: list[Batch],
                 model_inputs: Any, tokenizer: Any, unwrap: Any, generation: Optional[list] = None):
        """`generation`: the eval prompts of evaluation.generate; `unwrap`: engine -> model."""
        self.cfg, self.runtime, self.task, self.objective, self.eval_set = cfg, runtime, task, objective, eval_set
        self.model_inputs = model_inputs  # Batch -> the model's keyword arguments, on the device
        self.tokenizer, self.unwrap, self.generation = tokenizer, unwrap, generation

    def __bool__(self) -> bool:
        return bool(self.eval_set)

    @torch.no_grad()
    def __call__(self, engine: Any, step: int) -> dict:
        """The eval metrics at `step` (the same on every rank)."""
        engine.eval()
        metrics = self.task.evaluate(EvalRun(self.cfg, engine, self.objective, self.eval_set, self.model_inputs,
                                             self.runtime, step, self.tokenizer, self.unwrap))  # (-> train mode)
        if self.generation:
            metrics.update(self._generate(engine, step))
        return metrics

    def _generate(self, engine: Any, step: int) -> dict:
        """evaluation.generate: the eval prompts answered (every rank its share; under ZeRO-3 in step), scored;
        every answer to output_dir/eval/generate-stepN.jsonl."""
        e, rt = self.cfg.evaluation, self.runtime
        with contextlib.ExitStack() as stack:
            pool = None
            if e.rewards:  # (workers and timeout: task rl's settings)
                pool = stack.enter_context(RewardPool(rules_of(e.rewards), self.cfg.rl.reward_workers,
                                                      self.cfg.rl.reward_timeout_s))
            rows, means = evaluate_by_generation(self.unwrap(engine), self.tokenizer, self.generation, e.generate,
                                                 batch_size=self.cfg.train.micro_batch_size,
                                                 max_new_tokens=e.max_new_tokens,
                                                 rank=rt.rank, world_size=rt.world_size,
                                                 gather=rt.all_gather_object, synced=rt.synced_forwards,
                                                 device=rt.device, rewards=pool)  # (leaves the model in train mode)
        if rt.is_main:
            write_predictions(RunDir(self.cfg.output_dir).eval_predictions / f"generate-step{step:06d}.jsonl", rows)
        return {**{f"eval_gen_{name}": value for name, value in means.items()}, "eval_gen_samples": len(rows)}
