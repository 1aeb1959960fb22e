"""The GRPO family's loss equals each paper's formula, written here independently as per-sample loops (float64;
loss and gradient to 1e-10 relative), and a step's loss and gradient do not depend on how the step is split."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ftcore.losses.grpo import GRPOLossSettings, group_advantages, loss_sum, step_normaliser, token_terms

G = 4  # completions per prompt


def rollout(seed: int = 0, groups: int = 3, width: int = 7):
    """Log-probs of a rollout batch: policy (a leaf the gradient is taken for), old policy, reference; rewards;
    a completion mask of varied lengths (one completion masked whole: truncated)."""
    g = torch.Generator().manual_seed(seed)
    n = groups * G
    logps = (-torch.rand((n, width), generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + torch.randn((n, width), generator=g, dtype=torch.float64) * 0.3
    ref = logps.detach() + torch.randn((n, width), generator=g, dtype=torch.float64) * 0.2
    rewards = torch.randint(0, 3, (n,), generator=g).double()
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    lengths[5] = 0  # a truncated completion, masked whole
    mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
    return logps, old, ref, rewards, mask


def paper_advantages(rewards: list[float], scale: str) -> list[float]:
    out = []
    batch_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group), "batch": batch_std, "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group]
    return out


def paper_loss(logps, old, ref, rewards, mask, s: GRPOLossSettings, scale: str):
    """The objective as the papers write it, one sample and one token at a time."""
    adv = paper_advantages(rewards.tolist(), scale)
    n, width = logps.shape
    lengths = [int(mask[i].sum()) for i in range(n)]
    per_sequence = []
    for i in range(n):
        tokens = [t for t in range(width) if mask[i, t] > 0]
        if s.importance == "sequence":  # GSPO eq. 7: s_i = (pi / pi_old)^(1 / |y_i|)
            sequence_ratio = torch.exp(sum((logps[i, t] - old[i, t] for t in tokens), logps.sum() * 0)
                                       / max(1, len(tokens)))
        terms = []
        for t in tokens:
            ratio = sequence_ratio if s.importance == "sequence" else torch.exp(logps[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + s.epsilon_high)
            term = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if s.beta:  # k3: pi_ref / pi - log(pi_ref / pi) - 1
                term = term + s.beta * (torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1)
            terms.append(term)
        per_sequence.append(terms)
    zero = logps.sum() * 0
    if s.normalisation == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        return sum((sum(terms, zero) / max(1, len(terms)) for terms in per_sequence), zero) / n
    if s.normalisation == "dr_grpo":  # 1/(G * L_max) sum_i sum_t
        return sum((sum(terms, zero) for terms in per_sequence), zero) / (n * s.max_completion_length)
    return sum((sum(terms, zero) for terms in per_sequence), zero) / sum(lengths)  # DAPO: 1/sum|o_i| sum_i sum_t


def ours(logps, old, ref, rewards, mask, s: GRPOLossSettings, scale: str, rows=None):
    advantages = group_advantages(rewards, G, scale)
    rows = rows or slice(None)
    per_token, _, _ = token_terms(logps[rows], old[rows], ref[rows], advantages[rows], mask[rows], s)
    return loss_sum(per_token, mask[rows], s)


VARIANTS = {
    "grpo": (GRPOLossSettings(0.2, 0.2, 0.04, "grpo"), "group"),
    "grpo-no-kl-batch-std": (GRPOLossSettings(0.2, 0.2, 0.0, "grpo"), "batch"),
    "dr_grpo": (GRPOLossSettings(0.2, 0.2, 0.0, "dr_grpo", max_completion_length=9), "none"),
    "dapo-clip-higher": (GRPOLossSettings(0.2, 0.28, 0.0, "dapo"), "group"),
    "gspo": (GRPOLossSettings(3e-4, 4e-4, 0.0, "grpo", "sequence"), "group"),
    "gspo-kl": (GRPOLossSettings(0.1, 0.15, 0.02, "grpo", "sequence"), "group"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_equals_its_papers_formula(variant):
    s, scale = VARIANTS[variant]
    logps, old, ref, rewards, mask = rollout()
    want = paper_loss(logps, old, ref, rewards, mask, s, scale)
    want_grad, = torch.autograd.grad(want, logps)
    got = ours(logps, old, ref, rewards, mask, s, scale) / step_normaliser(
        s.normalisation, logps.shape[0], int(mask.sum()))
    got_grad, = torch.autograd.grad(got, logps)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)
    assert got_grad[5].abs().sum() == 0  # the masked truncated completion trains nothing


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_step_split_into_micro_batches_or_ranks_has_the_same_loss_and_gradient(variant):
    """The step's completions in 1 micro batch, or in 3 of unequal sizes (accumulation, or 3 ranks): the summed
    parts over the step's normaliser equal the whole."""
    s, scale = VARIANTS[variant]
    logps, old, ref, rewards, mask = rollout(seed=1)
    normaliser = step_normaliser(s.normalisation, logps.shape[0], int(mask.sum()))
    whole = ours(logps, old, ref, rewards, mask, s, scale) / normaliser
    whole_grad, = torch.autograd.grad(whole, logps)
    parts = sum(ours(logps, old, ref, rewards, mask, s, scale, rows=slice(a, b)) / normaliser
                for a, b in ((0, 2), (2, 7), (7, 12)))
    parts_grad, = torch.autograd.grad(parts, logps)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(parts_grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_advantages_ignore_a_completion_without_a_reward_and_a_group_without_spread():
    rewards = torch.tensor([1.0, 0.0, 1.0, 7.0, 2.0, 2.0, 2.0, 2.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    got = group_advantages(rewards, G, "group", valid)
    mean, std = 2 / 3, statistics.stdev([1.0, 0.0, 1.0])
    want = [(1 - mean) / (std + 1e-4), (0 - mean) / (std + 1e-4), (1 - mean) / (std + 1e-4), 0.0, 0, 0, 0, 0]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert group_advantages(torch.tensor([3.0, 1.0, 0, 0]), G, "none").tolist() == [2.0, 0.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="5 rewards do not make groups of 4"):
        group_advantages(torch.zeros(5), G)
    assert not math.isnan(group_advantages(torch.ones(4), G, "batch").sum().item())


# ------------------------------------------------------------------------------------- through the model
@pytest.mark.parametrize("method, old_policy", [("lora", False), ("full", False), ("lora", True)])
@pytest.mark.parametrize("variant", ["grpo", "dapo-clip-higher", "gspo-kl"])
def test_the_objective_through_the_chunked_head_equals_the_formula_on_whole_logits(builtin_model_dir, method,
                                                                                    old_policy, variant):
    """GRPOLoss on a fixed rollout micro batch (2 prompts x 3 completions of different lengths, temperature 0.7):
    its loss and every trained parameter's gradient equal the paper formula on log-probs from the model's whole
    logits / temperature (the reference: the adapter disabled, or a frozen copy). `old_policy`: a later update of
    the rollout batch (rl.num_iterations > 1): the old policy's log-probs (old_token_logps, moved by a fixed
    pattern of +-0.3 +-0.1 so that ratios leave the clip range) ride with the batch. float32: rtol 1e-4."""
    import dataclasses

    from ftcore.config import load_config
    from ftcore.data.batch import collate
    from ftcore.data.formats import IGNORE_INDEX, Tokenized
    from ftcore.losses.chunked import LogitTransform
    from ftcore.losses.grpo import GRPOLoss
    from ftcore.tasks.rollouts import RolloutExtra
    from ftcore.train.sequence_parallel import model_inputs
    from tests.test_preference import policy_and_reference

    settings, _ = VARIANTS[variant]
    cfg = load_config(None, [f"adapter.method={method}", "adapter.dropout=0", "model.attn_implementation=sdpa"])
    model, reference = policy_and_reference(cfg, builtin_model_dir, method, seed=3)
    g = torch.Generator().manual_seed(4)
    rows = []
    for prompt_len, completion_len in [(5, 6), (5, 3), (5, 8), (7, 2), (7, 7), (7, 5)]:
        ids = torch.randint(3, 32000, (prompt_len + completion_len,), generator=g).tolist()
        rows.append(Tokenized(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))
    batch = collate(rows, 0, [])
    advantages = torch.tensor([0.8, -1.1, 0.3, 1.4, -0.2, -1.2])
    batch.extra = RolloutExtra(advantages, {})
    inputs = model_inputs(batch, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    temperature = 0.7
    transform = dataclasses.replace(LogitTransform.of(model.config), temperature=temperature)
    normaliser = 11
    objective = GRPOLoss(settings, lambda m: m, 8, transform, reference)
    old = None
    if old_policy:
        shift = torch.tensor([[0.3 * (-1.0) ** i + 0.1 * (-1.0) ** t for t in range(inputs.targets.shape[1])]
                              for i in range(len(rows))])
        old = objective.old_token_logps(model, inputs) + shift * (inputs.targets != IGNORE_INDEX)
        inputs.extra = RolloutExtra(advantages, {}, old)
    result = objective(model, inputs, normaliser)
    if old_policy:
        assert result.terms["clipped_tokens"] > 0
    got = torch.autograd.grad(result.loss, trained)

    def token_logps(m):
        logits = m(**inputs.forward_kwargs()).logits.float()[:, :-1] / temperature
        targets = inputs.labels[:, 1:]
        return torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)

    mask = (inputs.labels[:, 1:] != IGNORE_INDEX).double()
    logps = token_logps(model).double()
    with torch.no_grad():
        if reference is not None:
            ref = token_logps(reference).double()
        else:
            with model.disable_adapter():
                ref = token_logps(model).double()
    # The formula, one sample and one token at a time (old policy = this policy on a first update).
    old_logps = logps.detach() if old is None else old[:, :-1].double()
    zero = logps.sum() * 0
    total = zero
    for i in range(len(rows)):
        tokens = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        seq = torch.exp(sum((logps[i, t] - old_logps[i, t] for t in tokens), zero) / len(tokens))
        terms = []
        for t in tokens:
            ratio = seq if settings.importance == "sequence" else torch.exp(logps[i, t] - old_logps[i, t])
            clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.epsilon_high)
            term = -torch.minimum(ratio * advantages[i].double(), clipped * advantages[i].double())
            if settings.beta:
                term = term + settings.beta * (torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1)
            terms.append(term)
        part = sum(terms, zero)
        total = total + (part / len(tokens) if settings.normalisation == "grpo" else part)
    want_loss = total / normaliser
    want = torch.autograd.grad(want_loss, trained)
    assert result.loss.item() == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    for w, gr in zip(want, got):
        torch.testing.assert_close(gr, w.float(), rtol=1e-4, atol=1e-6)
