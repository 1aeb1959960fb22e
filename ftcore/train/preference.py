"""Preference objectives (task preference): DPO, IPO, hinge, SimPO and ORPO on chosen-vs-rejected pairs.

Each pair's loss is a function of four sequence log-probabilities (the policy's and the reference's, summed over
each response's tokens) and the response lengths, as its paper defines it (preference_losses). Every log-prob
comes from the chunked head (ftcore/train/chunked_loss.py), never from [tokens x vocab] logits: one model forward
over the rows [chosen..., rejected...], then two passes of the head over the response tokens in chunks: the first
(no gradient) gives the sequence log-probs, from which the loss and its derivative by each sequence log-prob
follow on small tensors; the second forms the gradient, each token's cross-entropy weighted by minus its
sequence's derivative, which is the chain rule of the loss exactly. The reference is the same model with the
adapter disabled (LoRA/QLoRA) or a frozen copy (full/freeze); SimPO and ORPO have none.

The step loss is the mean over the pairs of the whole effective batch: each micro batch returns its pairs' sum
over that count (all ranks), so accumulation and data parallelism give the same update."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ftcore.config import PreferenceConfig
from ftcore.train.objective import LossOutput, Objective

NEEDS_REFERENCE = ("dpo", "ipo", "hinge")


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


class PreferenceLoss(Objective):
    """The preference objective of a run, for micro batches of collate_pairs rows; normaliser = pairs in the step
    over all ranks. Reported per step: loss, rewards_chosen, rewards_rejected, reward_margin, reward_accuracy,
    logps_chosen, logps_rejected (means over the step's pairs)."""

    def __init__(self, cfg: PreferenceConfig, unwrap: Any, chunk_tokens: int, transform: Any,
                 reference: Optional[torch.nn.Module] = None):
        self.cfg, self.unwrap, self.chunk_tokens, self.transform = cfg, unwrap, chunk_tokens, transform
        self.reference = reference
        self.zero3_head = None

    def __call__(self, model: Any, inputs: dict, normaliser: int) -> LossOutput:
        """The pairs' summed loss / normaliser, with the reward metrics."""
        from ftcore.train.chunked_loss import (
            DecoderOutput,
            HeadTensors,
            TrainedHeadUnderZero3,
            chunked_linear_cross_entropy,
            chunked_token_logprobs,
            gathered,
            head_tensors,
            shifted_labels,
        )

        inner = self.unwrap(model)
        if self.zero3_head is None:
            self.zero3_head = TrainedHeadUnderZero3(inner.get_output_embeddings())
        without_labels = {k: v for k, v in inputs.items() if k != "labels"}
        targets = shifted_labels(inputs["labels"])
        pairs = targets.shape[0] // 2
        tokens = (targets != -100).sum(dim=1).float()
        # An eval filler pair (every label -100) counts as no pair: its loss and metrics are 0.
        real = (tokens[:pairs] > 0) & (tokens[pairs:] > 0)
        tokens = tokens.clamp(min=1)
        reference_logps = None
        if self.cfg.loss in NEEDS_REFERENCE:
            reference_logps = self._reference_logps(model, inner, without_labels, targets)
        with DecoderOutput(inner).capture() as decoder:
            out = model(**without_labels, logits_to_keep=1)
        head = inner.get_output_embeddings()
        with gathered(head):
            tensors = head_tensors(head, decoder.hidden)
            frozen = HeadTensors(*(t.detach() if isinstance(t, torch.Tensor) else t for t in (
                tensors.weight, tensors.bias, tensors.lora_in, tensors.lora_a, tensors.lora_b, tensors.lora_scale)))
            policy_logps = chunked_token_logprobs(decoder.hidden.detach(), frozen, targets, self.chunk_tokens,
                                                  self.transform).sum(dim=1)
            sums = policy_logps.detach().requires_grad_(torch.is_grad_enabled())
            with torch.enable_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
                ref_c, ref_r = (reference_logps[:pairs], reference_logps[pairs:]) if reference_logps is not None \
                    else (None, None)
                losses, chosen_reward, rejected_reward = preference_losses(
                    sums[:pairs], sums[pairs:], ref_c, ref_r, tokens[:pairs], tokens[pairs:], self.cfg)
                loss_value = torch.where(real, losses, 0.0).sum() / normaliser
            if torch.is_grad_enabled():
                (per_sequence,) = torch.autograd.grad(loss_value, sums)
                # d loss / d logp(token) = d loss / d (its sequence's sum); CE = -logp, so weigh CE by minus it.
                weights = (-per_sequence).unsqueeze(1).expand_as(targets)
                weighted = chunked_linear_cross_entropy(decoder.hidden, tensors, targets, self.chunk_tokens,
                                                        self.transform, token_weights=weights)[0]
                weighted = self.zero3_head.wrap(weighted)
                # Its gradient is the preference loss's; its value is made the loss's own.
                loss = weighted + (loss_value.detach() - weighted.detach())
            else:
                loss = loss_value.detach()
        real_f = real.float()
        chosen_reward, rejected_reward = chosen_reward.detach() * real_f, rejected_reward.detach() * real_f
        terms = {"loss": loss_value.detach(),
                 "rewards_chosen": chosen_reward.sum() / normaliser,
                 "rewards_rejected": rejected_reward.sum() / normaliser,
                 "reward_margin": (chosen_reward - rejected_reward).sum() / normaliser,
                 "reward_accuracy": ((chosen_reward > rejected_reward).float() * real_f).sum() / normaliser,
                 "logps_chosen": (policy_logps[:pairs] * real_f).sum() / normaliser,
                 "logps_rejected": (policy_logps[pairs:] * real_f).sum() / normaliser}
        return LossOutput(loss, out, terms)

    def eval_loss(self, model: Any, inputs: dict) -> LossOutput:
        """Sums over the batch's pairs (loss and every metric), and "pairs": how many real pairs it holds."""
        result = self(model, inputs, 1)
        labels = inputs["labels"]
        half = labels.shape[0] // 2
        trained = (labels[:, 1:] != -100).any(dim=1)
        result.terms["pairs"] = (trained[:half] & trained[half:]).float().sum()
        return result

    def _reference_logps(self, model: Any, inner: Any, without_labels: dict, targets: torch.Tensor) -> torch.Tensor:
        """Summed response log-probs of the reference: the frozen copy, or this model with its adapter disabled."""
        from ftcore.train.chunked_loss import (
            HeadTensors,
            base_model_output,
            chunked_token_logprobs,
            gathered,
            head_parts,
        )

        hidden, head = base_model_output(model, inner, self.reference, without_labels)
        with torch.no_grad(), gathered(head):
            linear = head_parts(head, "reference's head")[0]
            logps = chunked_token_logprobs(hidden, HeadTensors(linear.weight, linear.bias), targets,
                                           self.chunk_tokens, self.transform)
        return logps.sum(dim=1)
