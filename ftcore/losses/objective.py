"""What the recipe minimises: a small object per objective, called once per micro batch. The recipe sums the
reported terms over the step, all-reduces them, and backpropagates `loss`; it knows nothing else about the
objective. The run's task builds it (ftcore/tasks/: build_objective), so a new objective is a new class here (or
in a module beside this one) that a task builds.

Every objective returns its micro batch's loss already divided by the normaliser it is given: the number of
trained tokens (causal LM) or samples (classification) in the whole optimizer step, over all ranks. Evaluation
passes a normaliser of 1 and gets the sum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from ftcore.config import LossConfig
from ftcore.data.batch import ModelInputs
from ftcore.errors import TrainError
from ftcore.losses.chunked import HeadTensors, chunked_linear_cross_entropy
from ftcore.losses.head import (
    DecoderOutput,
    TrainedHeadUnderZero3,
    base_model_output,
    fused_cross_entropy,
    gathered,
    head_parts,
    head_tensors,
)


@dataclass
class LossOutput:
    """One micro batch: the loss to backpropagate, the model output, and the terms reported per step (the
    task's own loss under "loss", plus e.g. "base_kl"), detached."""

    loss: torch.Tensor
    output: Any
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """The interface: __call__ for training, eval_loss for evaluation (the task loss only); start_step and report
    for an objective with a quantity of the whole step (KTO's reference point); eval_report for one whose task
    evaluates by its summed terms (ftcore.tasks.base.summed_eval_terms)."""

    def start_step(self, model: Any, micro_inputs: Iterable[ModelInputs]) -> None:
        """Called on every rank with the step's micro batches (or the eval set's) before any of them runs."""

    def report(self, totals: dict[str, float]) -> dict[str, float]:
        """The step's terms, summed over micro batches and ranks -> the metrics logged (as they are here)."""
        return totals

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """The micro batch's loss / normaliser, with its output and reported terms."""
        raise NotImplementedError

    def eval_loss(self, model: Any, inputs: ModelInputs) -> LossOutput:
        """The summed task loss of an eval batch (no regulariser)."""
        return self(model, inputs, 1)

    def eval_report(self, totals: dict[str, float]) -> dict[str, float]:
        """The eval set's terms, summed over batches and ranks -> the eval metrics (without the eval_ prefix)."""
        return totals


class CausalLMLoss(Objective):
    """Cross-entropy per trained token, computed by the model (labels -100 are not trained)."""

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """Cross-entropy per trained token / normaliser."""
        out = model(**inputs.with_labels(), num_items_in_batch=normaliser)
        return LossOutput(out.loss, out, {"loss": out.loss.detach()})


class ChunkedCausalLMLoss(Objective):
    """The same cross-entropy per trained token (+ loss.base_kl's KL to the base model, + a mixture-of-experts
    model's router loss, as the model's own loss adds it), through the output head in chunks
    (loss.impl=chunked): the [tokens x vocab] logits never exist at once (ftcore/losses/chunked.py).
    With `fused`, liger-kernel's fused linear cross-entropy computes the cross-entropy instead (CUDA)."""

    def __init__(self, unwrap: Any, chunk_tokens: int, transform: Any, base_kl: float = 0.0,
                 reference: Optional[torch.nn.Module] = None, fused: bool = False):
        self.unwrap, self.chunk_tokens, self.transform = unwrap, chunk_tokens, transform
        self.base_kl, self.reference, self.fused = base_kl, reference, fused
        self.zero3_head = None  # TrainedHeadUnderZero3, on the first call (after the engine registered its hooks)

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """(CE + base_kl * KL) / normaliser + the router loss."""
        total, ce, kl, out = self._sums(model, inputs, self.base_kl)
        if self.zero3_head is None:
            self.zero3_head = TrainedHeadUnderZero3(self.unwrap(model).get_output_embeddings())
        router = self._router_loss(model, out)
        loss = self.zero3_head.wrap(total) / normaliser + router
        terms = {"loss": (ce / normaliser + router).detach()}
        if self.base_kl:
            terms["base_kl"] = (kl / normaliser).detach()
        return LossOutput(loss, out, terms)

    def eval_loss(self, model: Any, inputs: ModelInputs) -> LossOutput:
        """The summed cross-entropy (+ router loss) of an eval batch, no KL."""
        _, ce, _, out = self._sums(model, inputs, 0.0)
        loss = ce + self._router_loss(model, out)
        return LossOutput(loss, out, {"loss": loss.detach()})

    def _sums(self, model: Any, inputs: ModelInputs, base_kl: float):
        inner = self.unwrap(model)
        without_labels = inputs.forward_kwargs()
        base_hidden = base_module = None
        if base_kl:
            base_hidden, base_module = base_model_output(model, inner, self.reference, without_labels)
        with DecoderOutput(inner).capture() as decoder:
            out = model(**without_labels, logits_to_keep=1)  # the head runs on one position only
        head = inner.get_output_embeddings()
        # A sequence shard's labels come shifted (its last token predicts the next rank's first).
        targets = inputs.targets
        with gathered(head, base_module if self.reference is not None else None):
            if self.fused:
                ce = fused_cross_entropy(decoder.hidden, head, targets, self.transform)
                return ce, ce.detach(), None, out
            base_head = None
            if base_kl:
                base_linear = head_parts(base_module, "base model's head")[0]
                base_head = HeadTensors(base_linear.weight.detach(),
                                        None if base_linear.bias is None else base_linear.bias.detach())
            total, ce, kl = chunked_linear_cross_entropy(
                decoder.hidden, head_tensors(head, decoder.hidden), targets, self.chunk_tokens, self.transform,
                base_kl, base_hidden, base_head)
        return total, ce, kl, out

    def _router_loss(self, model: Any, out: Any):
        """What a mixture-of-experts model adds to its loss when it returns router logits (its coefficient
        times the load-balancing loss), 0 otherwise."""
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            return 0.0
        inner = self.unwrap(model)
        coefficient = getattr(inner, "router_aux_loss_coef", getattr(inner, "aux_loss_coef", None))
        if coefficient is None:
            raise TrainError(f"loss.impl: {type(inner).__name__} returns a router loss whose weight ft "
                             "does not know; use loss.impl=full")
        return coefficient * aux


class ClassificationLoss(Objective):
    """Cross-entropy of each sample's class (label -100: a padding row of an eval batch)."""

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """Cross-entropy per sample / normaliser."""
        out = model(**inputs.forward_kwargs())
        loss = torch.nn.functional.cross_entropy(out.logits.float(), inputs.labels, ignore_index=-100,
                                                 reduction="sum") / normaliser
        return LossOutput(loss, out, {"loss": loss.detach()})


class WithBaseKL(Objective):
    """The task loss + beta * KL(base || fine-tuned) per trained token between next-token distributions
    (loss.base_kl). The base logits come from the same weights with the adapter disabled (LoRA/QLoRA: no second
    copy), or from a frozen reference copy (full/freeze fine-tuning). "loss" stays the task loss; the KL is
    reported as "base_kl"."""

    def __init__(self, task: Objective, beta: float, unwrap: Any, reference: Optional[torch.nn.Module]):
        self.task, self.beta, self.unwrap, self.reference = task, beta, unwrap, reference

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """The task loss + beta * KL / normaliser."""
        result = self.task(model, inputs, normaliser)
        kl = self.base_kl(model, inputs, result.output.logits) / normaliser
        return LossOutput(result.loss + self.beta * kl, result.output, {**result.terms, "base_kl": kl.detach()})

    def eval_loss(self, model: Any, inputs: ModelInputs) -> LossOutput:
        """The task's eval loss (no KL)."""
        return self.task.eval_loss(model, inputs)

    def base_kl(self, model: Any, inputs: ModelInputs, logits: torch.Tensor) -> torch.Tensor:
        """Sum over this micro batch's trained tokens of KL(base || fine-tuned)."""
        without_labels = inputs.forward_kwargs()
        with torch.no_grad():
            if self.reference is not None:
                base = self.reference(**without_labels).logits
            else:
                with self.unwrap(model).disable_adapter():
                    base = model(**without_labels).logits
        trained = inputs.targets[:, :-1] != -100  # logits at t predict the label at t + 1
        fine_log = torch.log_softmax(logits[:, :-1][trained].float(), dim=-1)
        base_log = torch.log_softmax(base[:, :-1][trained].float(), dim=-1)
        return (base_log.exp() * (base_log - fine_log)).sum()


def causal_lm_objective(loss: LossConfig, unwrap: Any, reference: Optional[torch.nn.Module],
                        loss_impl: str = "full", transform: Any = None, chunk_tokens: int = 256) -> Objective:
    """The causal LM's objective from the loss section and the loss implementation choose_loss_impl settled on:
    cross-entropy per trained token, with the base-KL term when loss.base_kl is set; `chunk_tokens` per chunk of
    the chunked loss."""
    if loss_impl in ("chunked", "fused"):
        return ChunkedCausalLMLoss(unwrap, chunk_tokens, transform, loss.base_kl, reference,
                                   fused=loss_impl == "fused")
    if loss.base_kl:
        return WithBaseKL(CausalLMLoss(), loss.base_kl, unwrap, reference)
    return CausalLMLoss()
