"""The causal-LM loss through the output projection without ever holding [tokens x vocab] logits
(loss.impl=chunked, and fused through liger-kernel on CUDA): the projection, the family's logit transform,
log-softmax, loss (and loss.base_kl's KL to the base model) run over chunks of loss.chunk_tokens tokens.

While gradients are being recorded, each chunk's gradient with respect to the hidden states and to every trained
weight of the head (its weight, bias, LoRA A and B) is computed in the forward pass itself, from the chunk's logits
while they exist, and scaled by the incoming gradient in backward: the same matrix products per chunk as the plain
loss, never a recompute, and only one chunk's logits alive at a time. Without gradients (evaluation) only the loss.
Because nothing is left for backward to recompute, the head's weights are needed only while the forward runs: under
ZeRO-3 they are gathered once per micro batch, and their gradients reach DeepSpeed's per-parameter hooks like the
head module's own would.

What touches the model (its head's tensors, ZeRO-3 gathering, hidden-state capture, the choice of loss) is in
ftcore/losses/head.py.

Numerics: logits are computed in the model's dtype like the model's head does and upcast to fp32 for the
log-softmax, exactly as transformers' ForCausalLMLoss does; sums are fp32. The result equals the plain loss to
fp32 rounding of a different summation order (tested at rtol 1e-5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ftcore.data.formats import IGNORE_INDEX


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to its head's output before the loss: z = softcap * tanh(scale * raw / softcap), or
    scale * raw without a softcap (Gemma-2/3's final_logit_softcapping, Cohere's logit_scale, Granite's
    1 / logits_scaling). A family that does anything else is caught by verify_head and refused by name."""

    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0  # sampling's (task rl): the transformed logits are divided by it, as sampling does

    @classmethod
    def of(cls, config: Any) -> "LogitTransform":
        """The transform a transformers config declares."""
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        return cls(scale, getattr(config, "final_logit_softcapping", None) or None)

    def apply_(self, raw: torch.Tensor) -> Optional[torch.Tensor]:
        """Transform fp32 `raw` logits in place; returns what derivative_ needs (tanh of the softcap), if any."""
        if self.softcap is None:
            if self.scale / self.temperature != 1.0:
                raw.mul_(self.scale / self.temperature)
            return None
        tanh = raw.mul(self.scale / self.softcap).tanh_()
        torch.mul(tanh, self.softcap / self.temperature, out=raw)
        return tanh

    def derivative_(self, grad: torch.Tensor, tanh: Optional[torch.Tensor]) -> None:
        """d(loss)/d(transformed) -> d(loss)/d(raw), in place."""
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0)).mul_(self.scale / self.temperature)  # d tanh = 1 - tanh^2
        elif self.scale / self.temperature != 1.0:
            grad.mul_(self.scale / self.temperature)


@dataclass
class HeadTensors:
    """One projection as the loss reads it: logits = transform(hidden @ weight.T + bias
    + lora_scale * (lora_in @ lora_a.T) @ lora_b.T), where lora_in is the LoRA dropout's output."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    lora_in: Optional[torch.Tensor] = None
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    lora_scale: float = 1.0


@dataclass(frozen=True)
class _Settings:
    chunk_tokens: int
    lora_scale: float
    transform: LogitTransform
    base_kl: float
    grad_enabled: bool


def low_rank_projection(lora_in: Optional[torch.Tensor], lora_a: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """LoRA's A applied to the head's input, over flattened tokens, in fp32: the small [tokens x r] matrix that
    B maps to the vocabulary inside each chunk (None without LoRA on the head)."""
    if lora_in is None:
        return None
    return torch.nn.functional.linear(lora_in.reshape(-1, lora_in.shape[-1]).float(), lora_a.float())


def raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                low_rank: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """The head's logits of rows `h` in fp32 (computed in the weights' dtype, as the model's head does)."""
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if low_rank is not None:
        logits.addmm_(low_rank, lora_b.t(), alpha=lora_scale)  # no [chunk x vocab] temporary
    return logits


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] per row, without an [rows x vocab] product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _ChunkedLinearLoss(torch.autograd.Function):
    """(sum CE + base_kl * sum KL, sum CE, sum KL) over the tokens whose target is not -100; CE against the
    targets, KL(base || this model) between next-token distributions, each token's logits from its chunk only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_in, lora_a, lora_b, targets, base_hidden, base_weight, base_bias,
                token_weights, settings: _Settings):
        needs = [settings.grad_enabled and ctx.needs_input_grad[i] for i in range(6)]
        needs[2] = needs[2] and bias is not None
        needs[3], needs[4], needs[5] = (n and lora_in is not None for n in needs[3:6])
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None
        want_grad = any(needs)
        low_rank = grad_low_rank = lora_b32 = grad_lora_b = None
        if lora_in is not None:
            lora_b32 = lora_b.float()
            low_rank = low_rank_projection(lora_in, lora_a)  # [tokens x r]: small
            grad_low_rank = torch.zeros_like(low_rank) if (needs[3] or needs[4]) else None
            grad_lora_b = torch.zeros_like(lora_b32) if needs[5] else None
        beta, transform = settings.base_kl, settings.transform
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # untrained tokens need no logits at all
        for start in range(0, trained.numel(), settings.chunk_tokens):
            rows = trained[start:start + settings.chunk_tokens]
            h, target = hidden.index_select(0, rows), targets.index_select(0, rows)
            w = token_weights.index_select(0, rows).float() if token_weights is not None else None
            u = low_rank.index_select(0, rows) if low_rank is not None else None
            logits = raw_logits(h, weight, bias, u, lora_b32, settings.lora_scale)
            tanh = transform.apply_(logits)
            target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            base_probs = None
            if beta:
                base = torch.nn.functional.linear(base_hidden.index_select(0, rows), base_weight, base_bias).float()
                transform.apply_(base)
                base_lse = torch.logsumexp(base, dim=1)
                base_probs = torch.sub(base, base_lse.unsqueeze(1)).exp_()
                # KL = sum p_b (z_b - z_f) + (lse_f - lse_b) sum p_b: differences first, so a small KL between
                # close distributions is not the difference of two large sums.
                kl_rows = _row_dot(base_probs, base.sub_(logits))
                del base
            # log-sum-exp and softmax in the logits' own buffer: no [chunk x vocab] temporaries.
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()
            norm = exp.sum(dim=1, keepdim=True)
            lse = (peak + norm.log()).squeeze(1)
            ce_total += ((lse - target_logit) * w).sum() if w is not None else (lse - target_logit).sum()
            if beta:
                kl_total += (kl_rows + (lse - base_lse) * base_probs.sum(1)).sum()
            if not want_grad:
                continue
            # d(CE)/d(logits) = softmax - one_hot(target); d(KL)/d(logits) = softmax - p_base.
            grad_logits = exp.div_(norm)
            if beta:
                grad_logits.mul_(1.0 + beta).sub_(base_probs, alpha=beta)
                del base_probs
            grad_logits[torch.arange(rows.numel(), device=rows.device), target] -= 1.0
            if w is not None:
                grad_logits.mul_(w.unsqueeze(1))
            transform.derivative_(grad_logits, tanh)
            if needs[0]:
                grad_hidden.index_copy_(0, rows, (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
            if needs[1]:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if needs[2]:
                grad_bias += grad_logits.sum(0)
            if grad_low_rank is not None:
                grad_low_rank.index_copy_(0, rows, settings.lora_scale * (grad_logits @ lora_b32))
            if needs[5]:
                grad_lora_b.addmm_(grad_logits.t(), u, alpha=settings.lora_scale)
        grads = [grad_hidden, grad_weight, grad_bias, None, None, grad_lora_b]
        if needs[3]:
            grads[3] = grad_low_rank @ lora_a.float()
        if needs[4]:
            grads[4] = grad_low_rank.t() @ lora_in.float()
        ctx.has = [g is not None for g in grads]
        ctx.dtypes = [t.dtype if t is not None else None for t in (hidden, weight, bias, lora_in, lora_a, lora_b)]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.spent = False
        ctx.mark_non_differentiable(ce_total, kl_total)
        return ce_total + beta * kl_total, ce_total, kl_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        if ctx.spent:  # the gradients below are scaled in place: a second backward would be wrong, not slow
            raise RuntimeError("the chunked loss supports one backward pass per forward (no retain_graph)")
        ctx.spent = True
        saved = iter(ctx.saved_tensors)
        grads = [next(saved).mul_(grad_total).to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, head: HeadTensors, targets: torch.Tensor,
                                 chunk_tokens: int, transform: LogitTransform = LogitTransform(),
                                 base_kl: float = 0.0, base_hidden: Optional[torch.Tensor] = None,
                                 base_head: Optional[HeadTensors] = None,
                                 token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """(CE + base_kl * KL, CE, KL), each summed over tokens, for logits = transform(head(hidden)) against
    `targets` (-100: not trained), never materializing more than `chunk_tokens` rows of logits. KL(base || this)
    compares with transform(base_head(base_hidden)) (no LoRA on the base head) when base_kl > 0. token_weights
    (no gradient; not with base_kl): each token's CE counts that many times (a preference loss's chain rule).
    hidden: [..., H]; targets: [...]."""
    if base_kl and token_weights is not None:
        raise ValueError("token_weights apply to the CE term only; not with base_kl")
    width = hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    lora_in = head.lora_in.reshape(-1, width) if head.lora_in is not None else None
    base = base_head or HeadTensors(head.weight.detach())
    base_flat = base_hidden.reshape(-1, width) if base_hidden is not None else None
    if base_kl and base_flat is None:
        raise ValueError("base_kl needs base_hidden")
    settings = _Settings(chunk_tokens, head.lora_scale, transform, base_kl, torch.is_grad_enabled())
    weights = token_weights.reshape(-1).detach() if token_weights is not None else None
    return _ChunkedLinearLoss.apply(flat, head.weight, head.bias, lora_in, head.lora_a, head.lora_b,
                                    targets.reshape(-1), base_flat, base.weight, base.bias, weights, settings)


def chunked_token_logprobs(hidden: torch.Tensor, head: HeadTensors, targets: torch.Tensor, chunk_tokens: int,
                           transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """log p(target) of every token (0 where the target is -100), shaped like `targets`, without gradients and
    without more than `chunk_tokens` rows of logits at once."""
    width = hidden.shape[-1]
    flat, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    out = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        low_rank = low_rank_projection(head.lora_in, head.lora_a)
        lora_b32 = head.lora_b.float() if head.lora_b is not None else None
        trained = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        for start in range(0, trained.numel(), chunk_tokens):
            rows = trained[start:start + chunk_tokens]
            u = low_rank.index_select(0, rows) if low_rank is not None else None
            logits = raw_logits(flat.index_select(0, rows), head.weight, head.bias, u, lora_b32, head.lora_scale)
            transform.apply_(logits)
            target_logit = logits.gather(1, flat_targets.index_select(0, rows).unsqueeze(1)).squeeze(1)
            out.index_copy_(0, rows, target_logit - torch.logsumexp(logits, dim=1))
    return out.view(targets.shape)
