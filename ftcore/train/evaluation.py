"""Evaluation on data.eval: every rank scores its share of the eval set (padded to the same number of batches, so
no rank waits alone in a collective), the sums are all-reduced. Causal LM: loss per trained token and perplexity.
With train.eval_generate the prompts are also answered by generation and scored (ftcore/evaluation/generation.py).
Classification: loss per sample, accuracy, macro-F1 and the confusion matrix, made from every sample's
prediction, which is written to output_dir/eval/step{N}.json (so anyone can recompute the scores). Preference:
the pairs' (KTO: samples') mean loss, reward accuracy and margin, rewards and log-probs."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ftcore.config import Config
from ftcore.data.batch import Batch
from ftcore.evaluation.generation import evaluate_by_generation, write_predictions
from ftcore.metrics import classification_scores, write_summary
from ftcore.run_dir import RunDir
from ftcore.train.objective import Objective
from ftcore.train.runtime import Runtime


class Evaluator:
    """Scores the model on this rank's eval batches; __call__ is collective."""

    def __init__(self, cfg: Config, runtime: Runtime, objective: Objective, eval_set: list[Batch],
                 model_inputs: Any, generation: Optional[tuple[Any, list, Any]] = None):
        """`generation`: (tokenizer, the eval prompts, engine -> model) for train.eval_generate."""
        self.cfg, self.runtime, self.objective, self.eval_set = cfg, runtime, objective, eval_set
        self.model_inputs = model_inputs  # Batch -> the model's keyword arguments, on the device
        self.classification = cfg.classification
        self.generation = generation

    def __bool__(self) -> bool:
        return bool(self.eval_set)

    @torch.no_grad()
    def __call__(self, engine: Any, step: int) -> dict:
        """The eval metrics at `step` (the same on every rank)."""
        engine.eval()
        if self.cfg.task == "preference":
            return self._preference(engine, step)
        loss_sum = tokens = 0.0
        predictions: list[tuple[str, int, int]] = []  # classification: (sample id, label, predicted class)
        for batch in self.eval_set:
            result = self.objective.eval_loss(engine, self.model_inputs(batch))  # -> sum over tokens (samples)
            loss_sum += result.loss.item()
            tokens += batch.trained_tokens
            if self.classification:
                predicted = result.output.logits.argmax(dim=-1).tolist()
                predictions += [(sample_id, int(label), int(p)) for sample_id, label, p
                                in zip(batch.sample_ids, batch.labels.tolist(), predicted) if label != -100]
        engine.train()
        loss_sum, tokens = self.runtime.all_reduce([loss_sum, tokens])
        loss = loss_sum / max(tokens, 1)
        if not self.classification:
            return {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                    **(self._generate(engine, step) if self.generation else {})}
        gathered = self.runtime.all_gather_object(predictions)
        everything = sorted((p for part in gathered for p in part), key=_file_order)  # the same at any world size
        scores = classification_scores([label for _, label, _ in everything], [p for _, _, p in everything],
                                       len(self.cfg.data.labels))
        if self.runtime.is_main:
            self._save_predictions(step, everything, scores)
        return {"step": step, "eval_loss": loss, "eval_accuracy": scores["accuracy"],
                "eval_macro_f1": scores["macro_f1"], "eval_samples": len(everything),
                "eval_confusion": scores["confusion"]}

    def _preference(self, engine: Any, step: int) -> dict:
        """Means over the eval pairs (KTO: samples): eval_loss, eval_reward_accuracy, eval_reward_margin,
        eval_rewards_chosen / _rejected, eval_logps_chosen / _rejected, and eval_pairs (eval_samples, eval_kl)."""
        sums: dict[str, float] = {}
        self.objective.start_step(engine, (self.model_inputs(batch) for batch in self.eval_set))
        for batch in self.eval_set:
            result = self.objective.eval_loss(engine, self.model_inputs(batch))
            for name, value in result.terms.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        engine.train()
        names = sorted(sums)
        totals = dict(zip(names, self.runtime.all_reduce([sums[n] for n in names])))
        return {"step": step, **{f"eval_{name}": value for name, value in self.objective.eval_report(totals).items()}}

    def _generate(self, engine: Any, step: int) -> dict:
        """train.eval_generate: the eval prompts answered (every rank its share; under ZeRO-3 in step), scored;
        every answer to output_dir/eval/generate-stepN.jsonl."""
        tokenizer, prompts, unwrap = self.generation
        t, rt = self.cfg.train, self.runtime
        rows, means = evaluate_by_generation(unwrap(engine), tokenizer, prompts, t.eval_generate,
                                             batch_size=t.micro_batch_size, max_new_tokens=t.eval_max_new_tokens,
                                             rank=rt.rank, world_size=rt.world_size,
                                             gather=rt.all_gather_object if rt.world_size > 1 else None,
                                             synced=self.cfg.distributed.zero_stage == 3 and rt.world_size > 1,
                                             device=rt.device)  # (leaves the model in train mode)
        if rt.is_main:
            write_predictions(RunDir(self.cfg.output_dir).eval_predictions / f"generate-step{step:06d}.jsonl", rows)
        return {**{f"eval_gen_{name}": value for name, value in means.items()}, "eval_gen_samples": len(rows)}

    def _save_predictions(self, step: int, predictions: list[tuple[str, int, int]], scores: dict) -> None:
        labels = self.cfg.data.labels
        directory = RunDir(self.cfg.output_dir).eval_predictions
        directory.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "labels": labels, **scores,
                  "predictions": [{"id": sample_id, "label": labels[label], "prediction": labels[p]}
                                  for sample_id, label, p in predictions]}
        write_summary(directory / f"step{step:06d}.json", record)


def _file_order(prediction: tuple[str, int, int]) -> tuple[str, int]:
    """Sample ids are `file:line` (or `file:row`): order by file, then line number."""
    where, _, number = prediction[0].rpartition(":")
    return (where, int(number)) if number.isdigit() else (prediction[0], 0)
