"""Verification before the export is put in place: the exported model's logits on fixed probe tokens against
the model as trained (base + adapter through PEFT, on the NF4-quantized base for a QLoRA run; or the checkpoint's
fp32 weights), within a tolerance for the output dtype. Skipped, and said so, when the machine lacks the RAM."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ftcore.export.base import BaseModel
from ftcore.export.classifier import Classifier
from ftcore.export.lora import Adapter
from ftcore.export.options import ExportError, ExportReport
from ftcore.export.zero import ZeroCheckpoint
from ftcore.nf4 import nf4_quantization_config

# Logits of the exported model vs the model as trained: max |difference| / max |reference logit|.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _probe_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (3, 24), generator=g)


def _available_ram() -> int:
    """MemAvailable (free + reclaimable page cache), the kernel's estimate of what can be allocated."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fits_in_ram(nbytes: int) -> bool:
    return nbytes < 0.6 * _available_ram()


def _compare(exported: torch.nn.Module, reference: torch.nn.Module, vocab: int, out_dtype: torch.dtype,
             report: ExportReport, log: Callable[[str], None], what: str) -> None:
    ids = _probe_ids(vocab)
    with torch.no_grad():
        got = exported(input_ids=ids).logits.float()
        want = reference(input_ids=ids).logits.float()
    diff = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-6)
    report.max_abs_diff, report.relative_diff = diff, diff / scale
    tolerance = VERIFY_TOLERANCE[out_dtype]
    log(f"verify: logits of the export vs {what} on {ids.shape[0]}x{ids.shape[1]} tokens: max abs diff "
        f"{diff:.3e} (relative {diff / scale:.3e}, tolerance {tolerance:g} for {out_dtype})")
    if not math.isfinite(diff) or diff / scale > tolerance:
        raise ExportError(f"verification failed: the exported model's logits differ from {what} by {diff:.3e} "
                          f"(relative {diff / scale:.3e} > {tolerance:g}); nothing was written to {report.out}")
    report.verified = "passed"


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """transformers reports the base's unused LM head and the new classifier head on load; both are expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _head_kwargs(classifier: Optional[Classifier]) -> dict:
    """from_pretrained settings that make the base a classifier like the run's (its new head is then replaced)."""
    if classifier is None:
        return {}
    return {"num_labels": len(classifier.config["id2label"]), "pad_token_id": classifier.config["pad_token_id"]}


def verify_against_adapter(staging: Path, base: BaseModel, adapter: Adapter, adapter_dir: Optional[Path],
                            quantized: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                            report: ExportReport, log: Callable[[str], None],
                            classifier: Optional[Classifier] = None) -> None:
    """Logits of the staged export vs base + adapter (PEFT), the base NF4-quantized when `quantized`."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM

    size = sum(i.nbytes for i in base.infos.values())
    if not _fits_in_ram(size * 2 + report.bytes * 2):
        log(f"verify: skipped: the base and the export need about {(size * 2 + report.bytes * 2) / 1e9:.0f} GB of "
            "RAM to compare; run the export on a larger machine to verify")
        report.verified = "skipped (not enough RAM)"
        return
    kwargs: dict = {"dtype": torch.float32}
    if quantized:
        kwargs = {"dtype": compute_dtype, "quantization_config": nf4_quantization_config(compute_dtype)}
    with _quiet_loading(classifier is not None):  # a causal LM loaded as a classifier: its load report is noise
        reference = model_class.from_pretrained(base.dir, **kwargs, **_head_kwargs(classifier))
    if quantized:
        # The base as transformers quantized it on load, turned back into float weights by bitsandbytes: the
        # weights training saw. (bitsandbytes' own CPU inference kernel computes in bf16 whatever the compute
        # dtype, which would blur the comparison; training's matmul dequantizes to the compute dtype.)
        reference = reference.dequantize().to(torch.float32)
    if adapter_dir is not None:
        reference = PeftModel.from_pretrained(reference, adapter_dir)
    else:  # an adapter consolidated from a checkpoint: attach it the way the run did
        targets = sorted({p.module.rsplit(".", 1)[-1] for p in adapter.pairs.values()})
        r = next(iter(adapter.pairs.values())).a.shape[0]
        reference = get_peft_model(reference, LoraConfig(r=r, lora_alpha=adapter.config["lora_alpha"],
                                                         target_modules=targets, lora_dropout=0.0,
                                                         task_type="SEQ_CLS" if classifier else None))
        state = {f"base_model.model.{p.module}.lora_{ab}.weight": getattr(p, ab.lower())
                 for p in adapter.pairs.values() for ab in ("A", "B")}
        state.update({f"base_model.model.{name}": tensor for name, tensor in adapter.replacements.items()})
        set_peft_model_state_dict(reference, state)
    reference.eval()
    exported = model_class.from_pretrained(staging, dtype=out_dtype).eval()
    what = "base + adapter" + (" on the NF4-quantized base" if quantized else "")
    _compare(exported, reference, base.config.get("vocab_size") or exported.config.vocab_size, out_dtype, report,
             log, what)


def verify_full(staging: Path, zero: ZeroCheckpoint, base: BaseModel, out_dtype: torch.dtype, budget: int,
                 report: ExportReport, log: Callable[[str], None], classifier: Optional[Classifier] = None) -> None:
    """Logits of the staged export vs the checkpoint's fp32 weights, consolidated again in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM

    if not _fits_in_ram(report.bytes * 4):
        log("verify: skipped: comparing needs the fp32 model twice in RAM; run on a larger machine to verify")
        report.verified = "skipped (not enough RAM)"
        return
    reference = model_class.from_config(AutoConfig.from_pretrained(base.dir, **_head_kwargs(classifier)),
                                        dtype=torch.float32)
    missing, unexpected = reference.load_state_dict(dict(zero.iter_tensors(budget)), strict=False)
    missing = [m for m in missing if m not in zero.shared and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"verification failed: the checkpoint's parameters do not match the model config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    reference.tie_weights()
    exported = model_class.from_pretrained(staging, dtype=out_dtype).eval()
    _compare(exported, reference.eval(), exported.config.vocab_size, out_dtype, report, log,
             "the checkpoint's fp32 weights")
