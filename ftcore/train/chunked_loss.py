"""The causal-LM loss through the output projection without ever holding [tokens x vocab] logits
(train.loss_impl=chunked, and fused through liger-kernel on CUDA): the projection, the family's logit transform,
log-softmax, loss (and train.base_kl's KL to the base model) run over chunks of train.loss_chunk_tokens tokens.

While gradients are being recorded, each chunk's gradient with respect to the hidden states and to every trained
weight of the head (its weight, bias, LoRA A and B) is computed in the forward pass itself, from the chunk's logits
while they exist, and scaled by the incoming gradient in backward: the same matrix products per chunk as the plain
loss, never a recompute, and only one chunk's logits alive at a time. Without gradients (evaluation) only the loss.
Because nothing is left for backward to recompute, the head's weights are needed only while the forward runs: under
ZeRO-3 they are gathered once per micro batch, and their gradients reach DeepSpeed's per-parameter hooks like the
head module's own would.

Numerics: logits are computed in the model's dtype like the model's head does and upcast to fp32 for the
log-softmax, exactly as transformers' ForCausalLMLoss does; sums are fp32. The result equals the plain loss to
fp32 rounding of a different summation order (tested at rtol 1e-5)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ftcore.data.formats import IGNORE_INDEX
from ftcore.train.errors import TrainError


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position t predicts t + 1; the last position predicts
    nothing), as transformers' causal-LM loss shifts them."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to its head's output before the loss: z = softcap * tanh(scale * raw / softcap), or
    scale * raw without a softcap (Gemma-2/3's final_logit_softcapping, Cohere's logit_scale, Granite's
    1 / logits_scaling). A family that does anything else is caught by verify_head and refused by name."""

    scale: float = 1.0
    softcap: Optional[float] = None

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
            if self.scale != 1.0:
                raw.mul_(self.scale)
            return None
        tanh = raw.mul(self.scale / self.softcap).tanh_()
        torch.mul(tanh, self.softcap, out=raw)
        return tanh

    def derivative_(self, grad: torch.Tensor, tanh: Optional[torch.Tensor]) -> None:
        """d(loss)/d(transformed) -> d(loss)/d(raw), in place."""
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0)).mul_(self.scale)  # d tanh = 1 - tanh^2
        elif self.scale != 1.0:
            grad.mul_(self.scale)


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


def _raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                low_rank: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
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
            low_rank = torch.nn.functional.linear(lora_in.float(), lora_a.float())  # [tokens x r]: small
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
            logits = _raw_logits(h, weight, bias, u, lora_b32, settings.lora_scale)
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
        low_rank = lora_b32 = None
        if head.lora_in is not None:
            low_rank = torch.nn.functional.linear(head.lora_in.reshape(-1, width).float(), head.lora_a.float())
            lora_b32 = head.lora_b.float()
        trained = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        for start in range(0, trained.numel(), chunk_tokens):
            rows = trained[start:start + chunk_tokens]
            u = low_rank.index_select(0, rows) if low_rank is not None else None
            logits = _raw_logits(flat.index_select(0, rows), head.weight, head.bias, u, lora_b32, head.lora_scale)
            transform.apply_(logits)
            target_logit = logits.gather(1, flat_targets.index_select(0, rows).unsqueeze(1)).squeeze(1)
            out.index_copy_(0, rows, target_logit - torch.logsumexp(logits, dim=1))
    return out.view(targets.shape)


# ----------------------------------------------------------------------------------------------- the model's head
def head_parts(module: torch.nn.Module, what: str = "output head") -> tuple[torch.nn.Linear, Optional[tuple]]:
    """(the plain linear layer, (dropout, lora_A weight, lora_B weight, scale) or None) of an output head that
    is an nn.Linear or a peft LoRA layer around one; TrainError for any other head."""
    if type(module) is torch.nn.Linear:
        return module, None
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        raise TrainError(f"train.loss_impl: the chunked loss needs a plain linear {what} (or LoRA on one); "
                         f"this model's is {type(module).__name__}; use train.loss_impl=full")
    if module.disable_adapters or module.merged:
        return base, None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return base, None
    if len(active) > 1 or module.use_dora.get(active[0]) or getattr(module, "lora_bias", {}).get(active[0]):
        raise TrainError(f"train.loss_impl: the chunked loss supports one plain LoRA adapter on the {what}; "
                         f"it has {active} (DoRA or a LoRA bias not covered); use train.loss_impl=full")
    name = active[0]
    return base, (module.lora_dropout[name], module.lora_A[name].weight, module.lora_B[name].weight,
                  float(module.scaling[name]))


def head_tensors(module: torch.nn.Module, hidden: torch.Tensor) -> HeadTensors:
    """The tensors of `module` (the model's output head, as head_parts reads it) for hidden states `hidden`."""
    linear, lora = head_parts(module)
    if lora is None:
        return HeadTensors(linear.weight, linear.bias)
    dropout, lora_a, lora_b, scale = lora
    return HeadTensors(linear.weight, linear.bias, dropout(hidden), lora_a, lora_b, scale)


def gathered(*modules: Optional[torch.nn.Module]):
    """Under ZeRO-3 the head's weights are partitioned over the ranks (DeepSpeed gathered them for the model's
    own forward and released them after): gather them once for all chunks of this micro batch. The chunked loss
    forms every gradient inside this block, so backward never needs the released weights."""
    params = [p for m in modules if m is not None for p in m.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


class _GatherForBackward(torch.autograd.Function):
    """Identity on the loss; its backward (the first of the step) gathers the trained partitioned head weights
    again, so that their full gradients (formed in the forward pass) land on full-shaped parameters, as
    DeepSpeed's per-parameter reduce hook expects; TrainedHeadUnderZero3 releases them once all have landed."""

    @staticmethod
    def forward(ctx, loss, landing):
        ctx.landing = landing
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.landing.gather()
        return grad, None


class TrainedHeadUnderZero3:
    """ZeRO-3 with the head's own weights trained (full fine-tuning, LoRA on the head): one gather in the
    backward pass (as the head module's own backward would do), released by a post-accumulate hook that runs
    after DeepSpeed's reduce hook of the same parameter (registered after the engine's)."""

    def __init__(self, head: torch.nn.Module):
        self.params = [p for p in head.parameters() if p.requires_grad and hasattr(p, "ds_id")]
        self.waiting: set[int] = set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._landed)

    def wrap(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, whose backward lands the head's gradients on gathered parameters."""
        if not self.params or not loss.requires_grad:
            return loss
        return _GatherForBackward.apply(loss, self)

    def gather(self) -> None:
        """Gather the trained head weights for their gradients to land on (called by the loss's backward)."""
        self.params[0].all_gather(param_list=self.params)
        self.waiting = {id(p) for p in self.params}

    def _landed(self, param: torch.nn.Parameter) -> None:
        self.waiting.discard(id(param))
        if self.waiting:
            return
        # A tied weight is still in use by the embedding's backward: its module releases it when done.
        idle = [p for p in self.params if not p.ds_active_sub_modules]
        if idle:
            idle[0].partition(param_list=idle, has_been_updated=False)


class DecoderOutput:
    """Captures the final-norm hidden states of `inner`'s decoder during one forward (a forward hook), which the
    model would feed its output head."""

    def __init__(self, inner: torch.nn.Module):
        self.inner, self.hidden = inner, None

    @contextlib.contextmanager
    def capture(self):
        """Within this block, the decoder's forward output is kept in self.hidden."""
        def keep(_module, _args, out):
            self.hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

        handle = self.inner.get_decoder().register_forward_hook(keep)
        try:
            yield self
        finally:
            handle.remove()


def base_model_output(model: Any, inner: torch.nn.Module, reference: Optional[torch.nn.Module],
                      inputs: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """(final hidden states, output head) of the base model on `inputs` (no labels), without gradients: the
    frozen reference copy (full/freeze), or this model with its adapter disabled (LoRA/QLoRA, no second copy)."""
    base = reference if reference is not None else inner
    with torch.no_grad(), DecoderOutput(base).capture() as decoder, \
            (contextlib.nullcontext() if reference is not None else inner.disable_adapter()):
        (reference or model)(**inputs, logits_to_keep=1)
    return decoder.hidden, base.get_output_embeddings()


def verify_head(model: Any, inner: torch.nn.Module, transform: LogitTransform) -> Optional[str]:
    """None when the chunked loss's logits equal the model's own on a probe of 16 tokens (eval mode, no
    gradients, every rank the same input so ZeRO-3's gathers match); otherwise what differs, in words. Catches a
    family that transforms the hidden states or logits in a way LogitTransform does not know."""
    head_weight = head_parts(inner.get_output_embeddings())[0].weight
    vocab = getattr(head_weight, "ds_shape", head_weight.shape)[0]  # ZeRO-3: the partitioned weight's real shape
    device = next(inner.parameters()).device
    ids = torch.linspace(0, vocab - 1, 16, device=device).long().unsqueeze(0)
    decoder = DecoderOutput(inner)
    was_training = inner.training
    model.eval()
    try:
        with torch.no_grad(), decoder.capture():
            theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        head = inner.get_output_embeddings()
        with torch.no_grad(), gathered(head):
            tensors = head_tensors(head, decoder.hidden)
            mine = _raw_logits(decoder.hidden.reshape(-1, decoder.hidden.shape[-1]), tensors.weight, tensors.bias,
                               None if tensors.lora_in is None else torch.nn.functional.linear(
                                   tensors.lora_in.reshape(-1, tensors.lora_in.shape[-1]).float(),
                                   tensors.lora_a.float()),
                               None if tensors.lora_b is None else tensors.lora_b.float(), tensors.lora_scale)
            transform.apply_(mine)
    finally:
        model.train(was_training)
    theirs = theirs.reshape(mine.shape)
    tolerance = 1e-3 if head_weight.dtype == torch.float32 else 2e-2
    difference = (mine - theirs).abs().max().item()
    if difference <= tolerance * theirs.abs().max().item() + 1e-6:
        return None
    return (f"{type(inner).__name__}'s logits differ from its decoder output through the head by {difference:.3g} "
            f"(max |logit| {theirs.abs().max().item():.3g}): this family transforms them in a way the chunked loss "
            "does not reproduce")


# ----------------------------------------------------------------------------------------------- fused and auto
def fused_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                        transform: LogitTransform) -> torch.Tensor:
    """Sum over trained tokens of the cross-entropy through a plain linear head, by liger-kernel's fused linear
    cross-entropy (Triton, CUDA): like the chunked loss it forms the gradients in its forward pass."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    linear, _ = head_parts(head)
    return liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), linear.weight,
                                            targets.reshape(-1), bias=linear.bias, ignore_index=IGNORE_INDEX,
                                            reduction="sum", softcap=transform.softcap)


def why_not_fused(cuda: bool, has_head_lora: bool, transform: LogitTransform, base_kl: float) -> Optional[str]:
    """None when liger-kernel's fused loss can compute this run's loss; otherwise why not."""
    if not cuda:
        return "the fused kernel needs a CUDA GPU"
    from ftcore.preflight import liger_available

    if not liger_available():
        return "liger-kernel is not installed (pip install '.[fused]')"
    if has_head_lora:
        return "LoRA on the output head is not covered by the fused kernel"
    if base_kl:
        return "train.base_kl is not covered by the fused kernel"
    if transform.scale != 1.0:
        return "this family's logit scale is not covered by the fused kernel"
    return None


def choose_loss_impl(requested: str, chunk_tokens: int, base_kl: float, engine: Any, inner: torch.nn.Module,
                     cuda: bool) -> tuple[str, LogitTransform, str]:
    """(full | chunked | fused, the family's logit transform, the words the run's first line says) for a causal
    LM run's train.loss_impl. auto = fused where it can run, else chunked, else full, the reason said; a chunked
    or fused request this model cannot honour is a TrainError. Every rank calls it (verify_head's probe runs the
    model through the engine)."""
    transform = LogitTransform.of(inner.config)
    if requested == "full":
        return "full", transform, "full"
    try:
        _, lora = head_parts(inner.get_output_embeddings())
        mismatch = verify_head(engine, inner, transform)
        if mismatch:
            raise TrainError(f"train.loss_impl={requested}: {mismatch}; use train.loss_impl=full")
    except TrainError as e:
        if requested != "auto":
            raise
        return "full", transform, f"full (auto: {str(e).split(': ', 1)[1].split('; use')[0]})"
    reason = why_not_fused(cuda, lora is not None, transform, base_kl)
    if requested == "fused":
        if reason:
            raise TrainError(f"train.loss_impl=fused: {reason}; use train.loss_impl=chunked (or auto)")
        return "fused", transform, "fused (liger-kernel fused linear cross-entropy)"
    if requested == "auto" and reason is None:
        return "fused", transform, "fused (auto: liger-kernel fused linear cross-entropy)"
    auto = f"; auto: {reason}" if requested == "auto" else ""
    return "chunked", transform, f"chunked ({chunk_tokens} tokens per chunk{auto})"
