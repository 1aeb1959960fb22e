"""Cross-entropy through the output projection without ever holding [tokens x vocab] logits (train.loss_impl=
chunked): the projection, log-softmax and loss run over chunks of train.loss_chunk_tokens tokens.

While gradients are being recorded, each chunk's gradient with respect to the hidden states (and the head weight,
when it trains) is computed in the forward pass itself, from the chunk's logits while they exist, and scaled by
the incoming gradient in backward: the same three matrix products per chunk as the plain loss (logits, grad of
the hidden states, grad of the weight), never a fourth to recompute the logits, and only one chunk's logits alive
at a time. Without gradients (evaluation) only the loss is computed.

Numerics: logits are computed in the model's dtype like the model's head does and upcast to fp32 for the
log-softmax, exactly as transformers' ForCausalLMLoss does; sums are fp32. The result equals the plain loss to
fp32 rounding of a different summation order (tested at rtol 1e-5)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ftcore.data.formats import IGNORE_INDEX
from ftcore.train.errors import TrainError


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position t predicts t + 1; the last position predicts
    nothing), as transformers' causal-LM loss shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T (+ bias), target); tokens with target -100 add nothing."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, chunk_tokens: int, grad_enabled: bool) -> torch.Tensor:
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        want_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # untrained tokens need no logits at all
        for start in range(0, trained.numel(), chunk_tokens):
            rows = trained[start:start + chunk_tokens]
            h, target = hidden.index_select(0, rows), targets.index_select(0, rows)
            logits = torch.nn.functional.linear(h, weight, bias).float()
            # log-sum-exp and softmax in the logits' own buffer: one chunk of [tokens x vocab] alive, no temporaries.
            target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()
            norm = exp.sum(dim=1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - target_logit).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d(sum CE)/d(logits) = softmax - one_hot(target).
            grad_logits = exp.div_(norm)
            grad_logits[torch.arange(rows.numel(), device=rows.device), target] -= 1.0
            if want_hidden:
                grad_hidden.index_copy_(0, rows, (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if want_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (want_hidden, want_weight, want_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if has else None for has in ctx.has]
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over tokens of the cross-entropy of `hidden @ weight.T + bias` against `targets` (-100: not trained),
    never materializing more than `chunk_tokens` rows of logits. hidden: [..., H]; targets: [...]."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, targets.reshape(-1), chunk_tokens,
                                            torch.is_grad_enabled())


def chunked_causal_lm_loss(model, inner: torch.nn.Module, inputs: dict,
                           chunk_tokens: int) -> tuple[torch.Tensor, object]:
    """(sum over trained tokens of the causal-LM loss, the model's output) for a model whose head is a plain
    linear layer: `model` (the engine) runs with logits for its last position only (logits_to_keep=1), a forward
    hook on `inner`'s (the unwrapped model's) decoder takes the final-norm hidden states, and the loss comes from
    those and the head's weight through chunked_linear_cross_entropy."""
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. a LoRA- or bitsandbytes-wrapped head
        raise TrainError(f"train.loss_impl: chunked needs a plain linear output head; this model's is "
                         f"{type(head).__name__}; use train.loss_impl=full")
    captured: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
    finally:
        hook.remove()
    with _gathered(head):
        loss = chunked_linear_cross_entropy(captured[0], head.weight, shifted_labels(inputs["labels"]),
                                            chunk_tokens, head.bias)
    return loss, out


def _gathered(head: torch.nn.Module):
    """Under ZeRO-3 the head's weight is partitioned over the ranks (DeepSpeed gathered it for the model's own
    forward and released it after): gather it once for all chunks of this micro batch."""
    params = [p for p in head.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    if any(p.requires_grad for p in params):
        # Its gradient would arrive after DeepSpeed re-partitioned it, outside the head's own backward hooks.
        raise TrainError("train.loss_impl: chunked cannot train the output head's weight under ZeRO-3 in this "
                         "release; use train.loss_impl=full, distributed.zero_stage <= 2, or a frozen head")
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
