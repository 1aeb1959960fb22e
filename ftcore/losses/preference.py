"""Preference objectives (task preference): DPO, IPO, hinge, SimPO and ORPO on chosen-vs-rejected pairs.

Each pair's loss is a function of four sequence log-probabilities (the policy's and the reference's, summed over
each response's tokens) and the response lengths, as its paper defines it (preference_losses). Every log-prob
comes from the chunked head (ftcore/losses/chunked.py), never from [tokens x vocab] logits: one model forward
over the rows [chosen..., rejected...], then two passes of the head over the response tokens in chunks: the first
(no gradient) gives the sequence log-probs, from which the loss and its derivative by each sequence log-prob
follow on small tensors; the second forms the gradient, each token's cross-entropy weighted by minus its
sequence's derivative, which is the chain rule of the loss exactly. The reference is the same model with the
adapter disabled (LoRA/QLoRA) or a frozen copy (full/freeze); SimPO and ORPO have none.

The step loss is the mean over the pairs of the whole effective batch: each micro batch returns its pairs' sum
over that count (all ranks), so accumulation and data parallelism give the same update."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ftcore.config import PreferenceConfig
from ftcore.data.batch import ModelInputs
from ftcore.losses.chunked import HeadTensors, chunked_linear_cross_entropy, chunked_token_logprobs
from ftcore.losses.head import (
    DecoderOutput,
    TrainedHeadUnderZero3,
    base_model_output,
    gathered,
    head_parts,
    head_tensors,
)
from ftcore.losses.objective import LossOutput, Objective

NEEDS_REFERENCE = ("dpo", "ipo", "hinge", "kto")


def preference_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      reference_chosen: Optional[torch.Tensor], reference_rejected: Optional[torch.Tensor],
                      chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                      cfg: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair from summed response log-probs.

    - DPO (Rafailov et al. 2023, arXiv 2305.18290): -log sigmoid(beta * margin), margin = (log pi(y_w|x) -
      log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)); rewards beta * (log pi - log ref).
    - IPO (Azar et al. 2023, arXiv 2310.12036): (margin - 1 / (2 beta))^2.
    - hinge (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425): max(0, 1 - beta * margin).
    - SimPO (Meng et al. 2024, arXiv 2405.14734): -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l|
      log pi(y_l|x) - gamma); rewards beta x the mean log-prob per token.
    - ORPO (Hong et al. 2024, arXiv 2403.07691): -log pi(y_w|x) / |y_w| - lambda * log sigmoid(log odds(y_w) -
      log odds(y_l)), odds(y) = P / (1 - P) with P = exp(mean log-prob per token); rewards beta x the mean."""
    beta = cfg.beta
    if cfg.loss in NEEDS_REFERENCE:
        chosen_reward = beta * (policy_chosen - reference_chosen)
        rejected_reward = beta * (policy_rejected - reference_rejected)
        margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
        if cfg.loss == "dpo":
            loss = -F.logsigmoid(beta * margin)
        elif cfg.loss == "ipo":
            loss = (margin - 1 / (2 * beta)) ** 2
        else:
            loss = torch.relu(1 - beta * margin)
        return loss, chosen_reward, rejected_reward
    mean_chosen = policy_chosen / chosen_tokens
    mean_rejected = policy_rejected / rejected_tokens
    if cfg.loss == "simpo":
        loss = -F.logsigmoid(beta * (mean_chosen - mean_rejected) - cfg.simpo_gamma)
    else:  # orpo
        log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen))
                                                    - torch.log1p(-torch.exp(mean_rejected)))
        loss = -mean_chosen - cfg.orpo_lambda * F.logsigmoid(log_odds)
    return loss, beta * mean_chosen, beta * mean_rejected


class ResponseLogpObjective(Objective):
    """What the preference objectives share: one forward over a batch's rows, the summed response log-prob of
    each row through the chunked head (module docstring), and the gradient of a loss of those sums."""

    def __init__(self, cfg: PreferenceConfig, unwrap: Any, chunk_tokens: int, transform: Any,
                 reference: Optional[torch.nn.Module] = None, sequence: Optional[Any] = None):
        self.cfg, self.unwrap, self.chunk_tokens, self.transform = cfg, unwrap, chunk_tokens, transform
        self.reference = reference
        self.zero3_head = None
        # Sequence parallelism: each rank holds part of every row's tokens. Per-row sums are summed over the
        # ranks sharing the rows (`across`), after which every one of them holds the same loss and metrics; each
        # reports 1 / share of them so that the recipe's sum over all ranks counts them once.
        self.across = sequence.sum if sequence is not None else (lambda t: t)
        self.share = sequence.degree if sequence is not None else 1

    def _response_tokens(self, inputs: ModelInputs) -> torch.Tensor:
        """Trained tokens per row (summed over a sequence group)."""
        return self.across((inputs.targets != -100).sum(dim=1).float())

    def _loss_of_logps(self, model: Any, inputs: ModelInputs,
                       loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, Any]], per_token: bool = False):
        """(loss to backpropagate, model output, each row's summed response log-probs, what loss_of returned
        beside the loss): loss_of maps the rows' log-prob sums (a leaf tensor; `per_token`: every token's log-prob,
        [rows, width], 0 where nothing trains) to (summed loss / normaliser, extras); its gradient reaches the
        weights by the chain rule through the chunked head."""
        inner = self.unwrap(model)
        if self.zero3_head is None:
            self.zero3_head = TrainedHeadUnderZero3(inner.get_output_embeddings())
        targets = inputs.targets
        with DecoderOutput(inner).capture() as decoder:
            out = model(**inputs.forward_kwargs(), logits_to_keep=1)
        head = inner.get_output_embeddings()
        with gathered(head):
            tensors = head_tensors(head, decoder.hidden)
            frozen = HeadTensors(*(t.detach() if isinstance(t, torch.Tensor) else t for t in (
                tensors.weight, tensors.bias, tensors.lora_in, tensors.lora_a, tensors.lora_b, tensors.lora_scale)))
            token_logps = chunked_token_logprobs(decoder.hidden.detach(), frozen, targets, self.chunk_tokens,
                                                 self.transform)
            policy_logps = token_logps if per_token else self.across(token_logps.sum(dim=1))
            sums = policy_logps.detach().requires_grad_(torch.is_grad_enabled())
            with torch.enable_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
                loss_value, extras = loss_of(sums)
            if torch.is_grad_enabled():
                (per_sequence,) = torch.autograd.grad(loss_value, sums)
                # d loss / d logp(token) = d loss / d (its sequence's sum); CE = -logp, so weigh CE by minus it.
                weights = -per_sequence if per_token else (-per_sequence).unsqueeze(1).expand_as(targets)
                weighted = chunked_linear_cross_entropy(decoder.hidden, tensors, targets, self.chunk_tokens,
                                                        self.transform, token_weights=weights)[0]
                weighted = self.zero3_head.wrap(weighted)
                # Its gradient is the preference loss's; its value is made the loss's own (this rank's share).
                loss = weighted + (loss_value.detach() / self.share - weighted.detach())
            else:
                loss = loss_value.detach() / self.share
        return loss, out, policy_logps, extras

    def _reference_logps(self, model: Any, inputs: ModelInputs, per_token: bool = False) -> torch.Tensor:
        """Summed response log-probs of the reference (`per_token`: each token's): the frozen copy, or this model
        with its adapter disabled."""
        hidden, head = base_model_output(model, self.unwrap(model), self.reference, inputs.forward_kwargs())
        with torch.no_grad(), gathered(head):
            linear = head_parts(head, "reference's head")[0]
            logps = chunked_token_logprobs(hidden, HeadTensors(linear.weight, linear.bias), inputs.targets,
                                           self.chunk_tokens, self.transform)
        return logps if per_token else self.across(logps.sum(dim=1))

    def _policy_logps(self, model: Any, inputs: ModelInputs, per_token: bool = False) -> torch.Tensor:
        """Summed response log-probs of the policy (`per_token`: each token's), without gradients."""
        inner = self.unwrap(model)
        with torch.no_grad(), DecoderOutput(inner).capture() as decoder:
            model(**inputs.forward_kwargs(), logits_to_keep=1)
        head = inner.get_output_embeddings()
        with torch.no_grad(), gathered(head):
            logps = chunked_token_logprobs(decoder.hidden, head_tensors(head, decoder.hidden), inputs.targets,
                                           self.chunk_tokens, self.transform)
        return logps if per_token else self.across(logps.sum(dim=1))


class PreferenceLoss(ResponseLogpObjective):
    """The pairwise objectives (dpo, ipo, hinge, simpo, orpo), for micro batches of collate_pairs rows;
    normaliser = pairs in the step over all ranks. Reported per step: loss, rewards_chosen, rewards_rejected,
    reward_margin, reward_accuracy, logps_chosen, logps_rejected (means over the step's pairs)."""

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """The pairs' summed loss / normaliser, with the reward metrics."""
        tokens = self._response_tokens(inputs)
        pairs = tokens.shape[0] // 2
        # An eval filler pair (every label -100) counts as no pair: its loss and metrics are 0.
        real = (tokens[:pairs] > 0) & (tokens[pairs:] > 0)
        tokens = tokens.clamp(min=1)
        reference_logps = self._reference_logps(model, inputs) if self.cfg.loss in NEEDS_REFERENCE else None
        ref_c, ref_r = (reference_logps[:pairs], reference_logps[pairs:]) if reference_logps is not None \
            else (None, None)

        def loss_of(sums: torch.Tensor):
            losses, chosen_reward, rejected_reward = preference_losses(
                sums[:pairs], sums[pairs:], ref_c, ref_r, tokens[:pairs], tokens[pairs:], self.cfg)
            return torch.where(real, losses, 0.0).sum() / normaliser, (chosen_reward, rejected_reward)

        loss, out, policy_logps, (chosen_reward, rejected_reward) = self._loss_of_logps(model, inputs, loss_of)
        real_f = real.float() / self.share
        chosen_reward, rejected_reward = chosen_reward.detach() * real_f, rejected_reward.detach() * real_f
        terms = {"loss": loss.detach(),
                 "rewards_chosen": chosen_reward.sum() / normaliser,
                 "rewards_rejected": rejected_reward.sum() / normaliser,
                 "reward_margin": (chosen_reward - rejected_reward).sum() / normaliser,
                 "reward_accuracy": ((chosen_reward > rejected_reward).float() * real_f).sum() / normaliser,
                 "logps_chosen": (policy_logps[:pairs] * real_f).sum() / normaliser,
                 "logps_rejected": (policy_logps[pairs:] * real_f).sum() / normaliser}
        return LossOutput(loss, out, terms)

    def eval_loss(self, model: Any, inputs: ModelInputs) -> LossOutput:
        """Sums over the batch's pairs (loss and every metric), and "pairs": how many real pairs it holds."""
        result = self(model, inputs, 1)
        trained = self._response_tokens(inputs) > 0
        half = trained.shape[0] // 2
        result.terms["pairs"] = (trained[:half] & trained[half:]).float().sum() / self.share
        return result

    def eval_report(self, totals: dict[str, float]) -> dict:
        """The eval set's sums -> "pairs" and the mean of every term over them."""
        pairs = totals.pop("pairs")
        return {"pairs": int(pairs), **{name: value / max(pairs, 1) for name, value in totals.items()}}


class KTOLoss(ResponseLogpObjective):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on format kto batches (collate_kto): each sample is one
    completion, desirable or not; with r = log pi(y|x) - log ref(y|x) (summed over the completion), its loss is
    kto_desirable_weight * (1 - sigmoid(beta * (r - z))) when desirable, kto_undesirable_weight * (1 - sigmoid(
    beta * (z - r))) when not. The reference point z = max(0, mean of r over mismatched rows (a prompt with another
    sample's completion)), estimated over the whole step (every micro batch, all ranks) before its first micro
    batch trains (start_step), and not differentiated, as in the paper; so accumulation equals data parallelism.
    The step loss is the mean over the step's samples (normaliser = samples, all ranks).

    Reported: loss, kl (z), rewards_chosen / rewards_rejected (beta * r, mean over desirable / undesirable
    samples), reward_margin (their difference), reward_accuracy (the share of samples on their label's side of
    z: r > z when desirable, r < z when not), logps_chosen / logps_rejected (mean policy log-prob)."""

    SUMS = ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "chosen", "rejected",
            "correct", "samples")

    def __init__(self, cfg: PreferenceConfig, unwrap: Any, chunk_tokens: int, transform: Any,
                 reference: Optional[torch.nn.Module], all_reduce: Callable[[list[float]], list[float]],
                 sequence: Optional[Any] = None):
        super().__init__(cfg, unwrap, chunk_tokens, transform, reference, sequence)
        self.all_reduce = all_reduce
        self.reference_point = 0.0

    def start_step(self, model: Any, micro_inputs: Iterable[ModelInputs]) -> None:
        """Estimate z over the mismatched rows of these micro batches on every rank (collective)."""
        total = rows = 0.0
        for inputs in micro_inputs:
            mismatched = inputs.extra.mismatched
            real = self._response_tokens(mismatched) > 0
            # (Under sequence parallelism every rank of a group adds the same rows: the mean is unchanged.)
            ratio = self._policy_logps(model, mismatched) - self._reference_logps(model, mismatched)
            total += float((ratio * real).sum())
            rows += float(real.sum())
        total, rows = self.all_reduce([total, rows])
        self.reference_point = max(0.0, total / rows) if rows else 0.0

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """The samples' summed loss / normaliser; the other terms are sums (report turns them into means)."""
        desirable = inputs.extra.desirable
        real = self._response_tokens(inputs) > 0
        reference_logps = self._reference_logps(model, inputs)
        z, beta, cfg = self.reference_point, self.cfg.beta, self.cfg

        def loss_of(sums: torch.Tensor):
            ratio = sums - reference_logps
            losses = torch.where(desirable, cfg.kto_desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                                 cfg.kto_undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
            return torch.where(real, losses, 0.0).sum() / normaliser, ratio.detach()

        loss, out, policy_logps, ratio = self._loss_of_logps(model, inputs, loss_of)
        share = 1.0 / self.share
        chosen, rejected = (real & desirable).double() * share, (real & ~desirable).double() * share
        reward, logps = beta * ratio.double(), policy_logps.double()
        correct = torch.where(desirable, ratio > z, ratio < z) & real
        terms = {"loss": loss.detach(),
                 "rewards_chosen": (reward * chosen).sum(), "rewards_rejected": (reward * rejected).sum(),
                 "logps_chosen": (logps * chosen).sum(), "logps_rejected": (logps * rejected).sum(),
                 "chosen": chosen.sum(), "rejected": rejected.sum(), "correct": correct.double().sum() * share,
                 "samples": real.double().sum() * share}
        return LossOutput(loss, out, terms)

    def report(self, totals: dict[str, float]) -> dict:
        """A step's summed terms -> its metrics (loss is already the step's mean)."""
        return {"loss": totals["loss"], **self._means(totals)}

    def eval_report(self, totals: dict[str, float]) -> dict:
        """The eval set's sums -> "samples", the mean loss and the metrics."""
        samples = totals["samples"]
        return {"samples": int(samples), "loss": totals["loss"] / max(samples, 1), **self._means(totals)}

    def _means(self, totals: dict[str, float]) -> dict:
        out = {"kl": self.reference_point}
        for side in ("chosen", "rejected"):
            if totals[side]:  # a step without a desirable (undesirable) sample has no mean for that side
                out[f"rewards_{side}"] = totals[f"rewards_{side}"] / totals[side]
                out[f"logps_{side}"] = totals[f"logps_{side}"] / totals[side]
        if "rewards_chosen" in out and "rewards_rejected" in out:
            out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
        out["reward_accuracy"] = totals["correct"] / max(totals["samples"], 1)
        return out
