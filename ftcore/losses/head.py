"""The model-facing side of the chunked loss (ftcore/losses/chunked.py is the kernel): the output head's tensors
as the kernel takes them (a plain linear layer or LoRA on one), ZeRO-3's gathering of the head for one micro batch
and the landing of its gradients on partitioned parameters, the decoder's hidden states captured from the model's
own forward, the base model's forward (a reference copy, or the adapter disabled), the probe that checks the
chunked head reproduces the model's logits, and the choice between full, chunked and liger-kernel's fused loss."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from ftcore.data.formats import IGNORE_INDEX
from ftcore.errors import TrainError
from ftcore.losses.chunked import HeadTensors, LogitTransform, low_rank_projection, raw_logits
from ftcore.preflight import liger_available


def head_parts(module: torch.nn.Module, what: str = "output head") -> tuple[torch.nn.Linear, Optional[tuple]]:
    """(the plain linear layer, (dropout, lora_A weight, lora_B weight, scale) or None) of an output head that
    is an nn.Linear or a peft LoRA layer around one; TrainError for any other head."""
    if type(module) is torch.nn.Linear:
        return module, None
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        raise TrainError(f"loss.impl: the chunked loss needs a plain linear {what} (or LoRA on one); "
                         f"this model's is {type(module).__name__}; use loss.impl=full")
    if module.disable_adapters or module.merged:
        return base, None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return base, None
    if len(active) > 1 or module.use_dora.get(active[0]) or getattr(module, "lora_bias", {}).get(active[0]):
        raise TrainError(f"loss.impl: the chunked loss supports one plain LoRA adapter on the {what}; "
                         f"it has {active} (DoRA or a LoRA bias not covered); use loss.impl=full")
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


def verify_head(model: Any, inner: torch.nn.Module, transform: LogitTransform, rows: int = 1) -> Optional[str]:
    """None when the chunked loss's logits equal the model's own on a probe of 16 tokens (eval mode, no
    gradients, every rank the same input so ZeRO-3's gathers match; `rows` copies of it, as sequence parallelism
    needs every forward to hold micro_batch_size rows); otherwise what differs, in words. Catches a family that
    transforms the hidden states or logits in a way LogitTransform does not know."""
    head_weight = head_parts(inner.get_output_embeddings())[0].weight
    vocab = getattr(head_weight, "ds_shape", head_weight.shape)[0]  # ZeRO-3: the partitioned weight's real shape
    device = next(inner.parameters()).device
    ids = torch.linspace(0, vocab - 1, 16, device=device).long().expand(rows, 16)
    decoder = DecoderOutput(inner)
    was_training = inner.training
    model.eval()
    try:
        with torch.no_grad(), decoder.capture():
            theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        head = inner.get_output_embeddings()
        with torch.no_grad(), gathered(head):
            tensors = head_tensors(head, decoder.hidden)
            mine = raw_logits(decoder.hidden.reshape(-1, decoder.hidden.shape[-1]), tensors.weight, tensors.bias,
                              low_rank_projection(tensors.lora_in, tensors.lora_a),
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
    if not liger_available():
        return "liger-kernel is not installed (pip install '.[fused]')"
    if has_head_lora:
        return "LoRA on the output head is not covered by the fused kernel"
    if base_kl:
        return "loss.base_kl is not covered by the fused kernel"
    if transform.scale != 1.0:
        return "this family's logit scale is not covered by the fused kernel"
    return None


def choose_loss_impl(requested: str, chunk_tokens: int, base_kl: float, engine: Any, inner: torch.nn.Module,
                     cuda: bool, probe_rows: int = 1) -> tuple[str, LogitTransform, str]:
    """(full | chunked | fused, the family's logit transform, the words the run's first line says) for a causal
    LM run's loss.impl. auto = fused where it can run, else chunked, else full, the reason said; a chunked
    or fused request this model cannot honour is a TrainError. Every rank calls it (verify_head's probe runs the
    model through the engine)."""
    transform = LogitTransform.of(inner.config)
    if requested == "full":
        return "full", transform, "full"
    try:
        _, lora = head_parts(inner.get_output_embeddings())
        mismatch = verify_head(engine, inner, transform, probe_rows)
        if mismatch:
            raise TrainError(f"loss.impl={requested}: {mismatch}; use loss.impl=full")
    except TrainError as e:
        if requested != "auto":
            raise
        return "full", transform, f"full (auto: {str(e).split(': ', 1)[1].split('; use')[0]})"
    reason = why_not_fused(cuda, lora is not None, transform, base_kl)
    if requested == "fused":
        if reason:
            raise TrainError(f"loss.impl=fused: {reason}; use loss.impl=chunked (or auto)")
        return "fused", transform, "fused (liger-kernel fused linear cross-entropy)"
    if requested == "auto" and reason is None:
        return "fused", transform, "fused (auto: liger-kernel fused linear cross-entropy)"
    auto = f"; auto: {reason}" if requested == "auto" else ""
    return "chunked", transform, f"chunked ({chunk_tokens} tokens per chunk{auto})"
