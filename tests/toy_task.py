"""A task defined only in the tests, named in a config by its import path (`task: tests.toy_task:SampleMeanLM`):
the proof that adding a task is one module implementing ftcore.tasks.base.Task, with nothing else in ft touched.

SampleMeanLM trains a causal LM on chat records with a per-sample mean: each sample's cross-entropy averaged over
its own trained tokens, then the mean over the step's samples (every sample weighs the same, however long its
answer), where task causal_lm averages over the step's trained tokens."""

from __future__ import annotations

from typing import Any, Optional

from ftcore.config import Config, FieldError
from ftcore.tasks.base import EvalRun, ObjectiveSetup, Task, data_sources, summed_eval_terms


class SampleMeanLM(Task):
    """Per-sample mean cross-entropy; eval: the same mean over the eval samples."""

    formats = ("chat",)
    selected_by = "task: tests.toy_task:SampleMeanLM"

    def check_config(self, cfg: Config) -> None:
        """Chat records, one sample per row."""
        super().check_config(cfg)
        for where, source in data_sources(cfg):
            if source.format not in self.formats:
                raise FieldError(f"{where}.format", f"the per-sample task reads format chat, not {source.format}")
        if cfg.data.packing:
            raise FieldError("data.packing", "does not apply to the per-sample task (a row must be one sample)")

    def collate(self, samples: list, sample_ids: list[str], collation: Any,
                next_samples: Optional[list] = None) -> Any:
        """The default right-padded rows, counting each sample as an example."""
        batch = super().collate(samples, sample_ids, collation)
        batch.examples = len(samples)
        return batch

    def normaliser(self, cfg: Any, examples: float, trained_tokens: float) -> int:
        """The step's samples over every rank."""
        return max(int(examples), 1)

    def build_objective(self, setup: ObjectiveSetup) -> tuple[Any, str]:
        """SampleMeanLoss, from the model's own logits."""
        return SampleMeanLoss(), "per-sample mean cross-entropy (tests/toy_task.py)"

    def evaluate(self, run: EvalRun) -> dict:
        """eval_loss (the mean over eval samples) and eval_toy_samples."""
        return summed_eval_terms(run)


def sample_losses(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(each row's mean cross-entropy over its trained tokens, which rows have any): the next-token loss."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    trained = (targets != -100).sum(dim=1)
    return tokens.sum(dim=1) / trained.clamp(min=1), trained > 0


class SampleMeanLoss:
    """The toy objective (the ftcore.losses.objective.Objective interface, duck-typed: no base class needed)."""

    def start_step(self, model: Any, micro_inputs: Any) -> None:
        """Nothing of the whole step is needed."""

    def __call__(self, model: Any, inputs: Any, normaliser: int) -> Any:
        """The micro batch's summed per-sample means / normaliser, and its sample count."""
        from ftcore.losses.objective import LossOutput

        out = model(**inputs.forward_kwargs())
        means, real = sample_losses(out.logits, inputs.labels)
        loss = means[real].sum() / normaliser
        return LossOutput(loss, out, {"loss": loss.detach(), "toy_samples": real.sum().double()})

    def eval_loss(self, model: Any, inputs: Any) -> Any:
        """The summed per-sample means of an eval batch."""
        return self(model, inputs, 1)

    def report(self, totals: dict) -> dict:
        """As summed (the loss is already the step's mean)."""
        return totals

    def eval_report(self, totals: dict) -> dict:
        """The mean over the eval samples, and how many there were."""
        samples = totals["toy_samples"]
        return {"loss": totals["loss"] / max(samples, 1), "toy_samples": int(samples)}
