"""The GRPO family's loss on a rollout batch, from per-token log-probs (each from the chunked head: no [tokens x
vocab] tensor). A step's completions come in groups of `group_size` per prompt; with rewards r, log-probs of the
policy (log pi), of the policy that sampled them (log pi_old: the same weights on the first update of a rollout
batch) and of the reference (log pi_ref):

- Advantages (group_advantages): GRPO's outcome advantage A_i = (r_i - mean(group)) / std(group) (Shao et al.
  2024, arXiv 2402.03300, sec. 4.1.2); `scale=batch` divides by the whole batch's std instead; `scale=none` only
  centres, as Dr. GRPO prescribes (Liu et al. 2025, arXiv 2503.20783, sec. 3.2). std is the unbiased one, + 1e-4.
- Per token (token_terms): -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t, with
  rho_t = pi / pi_old and the k3 estimator KL_t = pi_ref / pi - log(pi_ref / pi) - 1 (2402.03300 eq. 3, 4);
  epsilon_high > epsilon is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476, eq. 10). With
  `importance=sequence`, rho is GSPO's sequence ratio s_i = exp(mean_t log(pi / pi_old)) for every token of the
  sequence (Zheng et al. 2025, arXiv 2507.18071, eq. 7), so the per-sequence mean is GSPO's objective.
- Normalisation (loss_sum / step_normaliser): `grpo` averages tokens within each sequence, then sequences
  (2402.03300 eq. 3); `dr_grpo` sums tokens and divides by sequences x max_completion_length, a constant
  (2503.20783 eq. 2 as TRL implements it); `dapo` sums tokens over the step and divides by the step's completion
  tokens (2503.14476 eq. 8).

The divisor is always the whole step's count (sequences or tokens, over every micro batch and rank), so a step's
loss and gradient do not depend on how it is split: accumulation equals data parallelism for every normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ftcore.data.batch import ModelInputs
from ftcore.losses.objective import LossOutput
from ftcore.losses.preference import ResponseLogpObjective

ADVANTAGE_SCALES = ("group", "batch", "none")
NORMALISATIONS = ("grpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4


@dataclass(frozen=True)
class GRPOLossSettings:
    """What the per-token loss and its normalisation need (the rl config section's clipping, KL, levels)."""

    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    normalisation: str = "grpo"
    importance: str = "token"
    max_completion_length: int = 256


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each completion's advantage from the rewards of the whole rollout batch ([groups * group_size], a group's
    completions consecutive). `valid`: False for a completion without a reward (its reward timed out): it gets
    advantage 0 and does not count in its group's mean and std. A group with fewer than two valid completions has
    no spread: advantage 0."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r}: expected one of {', '.join(ADVANTAGE_SCALES)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group_size}")
    rewards = rewards.double()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    r = torch.where(valid, rewards, 0.0).view(-1, group_size)
    v = valid.view(-1, group_size).double()
    count = v.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (r - mean) * v
    if scale == "group":
        std = ((centred ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std + STD_EPSILON)
    elif scale == "batch":
        flat = rewards[valid]
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=torch.float64)
        centred = centred / (std + STD_EPSILON)
    centred = torch.where(count > 1, centred, 0.0)
    return centred.reshape(-1)


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, s: GRPOLossSettings
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(per-token loss [sequences, tokens], where the clip was active, per-token KL or None). `mask`: 1 on the
    completion tokens that count (not the prompt, padding, or a masked truncated completion)."""
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if s.importance == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(logps)
    ratio = torch.exp(log_ratio)
    a = advantages.to(logps.dtype).unsqueeze(-1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + s.epsilon_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped) & (mask > 0)
    kl = None
    if s.beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + s.beta * kl
    return per_token, was_clipped, kl


def loss_sum(per_token: torch.Tensor, mask: torch.Tensor, s: GRPOLossSettings) -> torch.Tensor:
    """This micro batch's part of the step loss, before the division by step_normaliser."""
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if s.normalisation == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if s.normalisation == "dr_grpo":
        return masked.sum() / s.max_completion_length
    if s.normalisation == "dapo":
        return masked.sum()
    raise ValueError(f"loss normalisation {s.normalisation!r}: expected one of {', '.join(NORMALISATIONS)}")


def step_normaliser(normalisation: str, sequences: int, completion_tokens: int) -> int:
    """What the step's summed loss is divided by: its sequences (grpo, dr_grpo) or its counted completion tokens
    (dapo), over every micro batch and rank of the step."""
    return max(1, completion_tokens if normalisation == "dapo" else sequences)


class GRPOLoss(ResponseLogpObjective):
    """Task rl's objective on a micro batch of rollout rows (prompt + completion; labels on the completion): each
    completion's advantage rides in ModelInputs.extra (RolloutExtra), every log-prob (policy, reference) comes
    from the chunked head, divided by the sampling temperature as sampling divided the logits. On the first update
    of a rollout batch the old policy is the policy itself (ratio 1, the gradient of the surrogate is A * grad log
    pi); with rl.num_iterations > 1 the sampling policy's per-token log-probs ride in RolloutExtra.old_logps
    (old_token_logps computed them at rollout time). normaliser = step_normaliser's count over the whole step.
    Reported per step (report): loss, reward and its std, each reward rule's mean, the share of completions at the
    step's best reward, completion length, the share truncated, the share of tokens clipped, KL, the share of
    groups whose rewards were all equal, reward timeouts, generation seconds and tokens per second."""

    def __init__(self, settings: GRPOLossSettings, unwrap: Any, chunk_tokens: int, transform: Any,
                 reference: Optional[torch.nn.Module] = None):
        super().__init__(None, unwrap, chunk_tokens, transform, reference)
        self.settings = settings

    def __call__(self, model: Any, inputs: ModelInputs, normaliser: int) -> LossOutput:
        """The micro batch's part of the step loss / normaliser, with the rollout's counts as terms."""
        s = self.settings
        mask = inputs.targets != -100
        reference = self._reference_logps(model, inputs, per_token=True) if s.beta else None
        advantages, old = inputs.extra.advantages, inputs.extra.old_logps

        def loss_of(token_logps: torch.Tensor):
            per_token, clipped, kl = token_terms(token_logps, token_logps.detach() if old is None else old,
                                                 reference, advantages, mask, s)
            return loss_sum(per_token, mask, s) / normaliser, (clipped, kl)

        loss, out, _, (clipped, kl) = self._loss_of_logps(model, inputs, loss_of, per_token=True)
        terms = {"loss": loss.detach(), "clipped_tokens": clipped.sum().double(),
                 "loss_tokens": mask.sum().double(), **inputs.extra.counts}
        if kl is not None:
            terms["kl_sum"] = (kl.detach() * mask).sum().double()
        return LossOutput(loss, out, terms)

    def old_token_logps(self, model: Any, inputs: ModelInputs) -> torch.Tensor:
        """Each completion token's log-prob under the policy as it is (no gradient; [rows, width], 0 where nothing
        trains): the old policy's of a rollout batch trained num_iterations times."""
        return self._policy_logps(model, inputs, per_token=True)

    def report(self, totals: dict[str, float]) -> dict[str, float]:
        """The step's sums -> its means and shares."""
        return rollout_report(totals)


def rollout_report(totals: dict[str, float]) -> dict[str, float]:
    """Sums of a step's (or an eval's) rollout counts -> the metrics logged (module docstring of ftcore/tasks/rl.py
    names them)."""
    t = dict(totals)
    rewarded, completions = max(t.pop("rewarded", 0.0), 1.0), max(t.pop("completions", 0.0), 1.0)
    out = {k: t.pop(k) for k in ("loss",) if k in t}
    mean = t.pop("reward_sum", 0.0) / rewarded
    out["reward"] = mean
    out["reward_std"] = math.sqrt(max(t.pop("reward_sq_sum", 0.0) / rewarded - mean * mean, 0.0))
    for name in [k for k in t if k.startswith("reward_rule_")]:
        out[f"reward_{name[len('reward_rule_'):]}"] = t.pop(name) / rewarded
    out["reward_at_max"] = t.pop("at_max", 0.0) / rewarded
    out["completion_length"] = t.pop("completion_tokens", 0.0) / completions
    if "completion_tokens_max" in t:
        out["completion_length_max"] = t.pop("completion_tokens_max")
    out["truncated"] = t.pop("truncated", 0.0) / completions
    tokens = max(t.pop("loss_tokens", 0.0), 1.0)
    if "clipped_tokens" in t:
        out["clip_ratio"] = t.pop("clipped_tokens") / tokens
    if "kl_sum" in t:
        out["kl"] = t.pop("kl_sum") / tokens
    groups = max(t.pop("groups", 0.0), 1.0)
    out["equal_reward_groups"] = t.pop("equal_groups", 0.0) / groups
    out["reward_timeouts"] = t.pop("timeouts", 0.0)
    ranks = max(t.pop("ranks", 0.0), 1.0)
    if "generation_s" in t:  # (summed over ranks: their mean; 0 on a later update of a rollout batch)
        seconds = t.pop("generation_s")
        out["generation_s"] = seconds / ranks
        if seconds > 0:  # completion tokens of every rank per second of a rank's generation
            out["generation_tokens_per_s"] = out["completion_length"] * completions / (seconds / ranks)
    return {**out, **t}
