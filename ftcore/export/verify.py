"""Verification before the export is put in place: the exported model's logits on fixed probe tokens against
the model as trained (base + adapter through PEFT, on the NF4-quantized base for a QLoRA run; or the checkpoint's
fp32 weights), within a tolerance for the output dtype.

Layer by layer by default (ftcore/export/layerwise.py): both models run the probe through their own transformers
modules one unit at a time -- embedding, each decoder block, final norm, head -- read from the safetensors shards
(or the ZeRO checkpoint) just before it runs, so memory is one block, whatever the model's size. The hidden states
are compared at every block boundary, and a failed check names the first block where they diverge. A model that
cannot be run that way (no decoder blocks found, a forward that reaches outside a unit, GPT-2-style Conv1D under
QLoRA, a freeze run's checkpoint) is compared whole, with the memory that needs said first; skipped, and said so,
when the machine lacks that RAM.

Tolerance: max |export logit - reference logit| / max |reference logit| <= 1e-4 for an fp32 export, 1e-2 fp16,
5e-2 bf16 (the reference computes in fp32)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ftcore.export.base import EMBEDDING_WEIGHTS, BaseModel, quantized_weight_names, tied_embedding_names
from ftcore.export.classifier import Classifier
from ftcore.export.layerwise import NotStreamable, boundary_states, checkpoint_names, skeleton
from ftcore.export.lora import Adapter
from ftcore.export.options import ExportError, ExportReport
from ftcore.export.st_io import read_model_headers, read_tensor
from ftcore.export.zero import ZeroCheckpoint
from ftcore.nf4 import nf4_quantization_config, nf4_round_trip

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


def _whole_against_adapter_bytes(base: BaseModel, report: ExportReport) -> int:
    """RAM the whole-model check against base + adapter takes: the base and the export, each about twice."""
    return sum(i.nbytes for i in base.infos.values()) * 2 + report.bytes * 2


def _whole_against_adapter(staging: Path, base: BaseModel, adapter: Adapter, adapter_dir: Optional[Path],
                            quantized: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                            report: ExportReport, log: Callable[[str], None],
                            classifier: Optional[Classifier] = None) -> None:
    """Logits of the staged export vs base + adapter (PEFT), both whole in RAM; the base NF4-quantized when
    `quantized`."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM

    needed = _whole_against_adapter_bytes(base, report)
    if not _fits_in_ram(needed):
        log(f"verify: skipped: the base and the export need about {needed / 1e9:.0f} GB of "
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


def _whole_full(staging: Path, zero: ZeroCheckpoint, base: BaseModel, out_dtype: torch.dtype, budget: int,
                 report: ExportReport, log: Callable[[str], None], classifier: Optional[Classifier] = None) -> None:
    """Logits of the staged export vs the checkpoint's fp32 weights, consolidated again in memory (both whole)."""
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


# ---------------------------------------------------------------------------------------------- layer by layer
def verify_against_adapter(staging: Path, base: BaseModel, adapter: Adapter, adapter_dir: Optional[Path],
                           quantized: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                           report: ExportReport, log: Callable[[str], None],
                           classifier: Optional[Classifier] = None) -> None:
    """The staged export vs base + adapter, layer by layer (the whole-model check where that cannot run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM
    config = AutoConfig.from_pretrained(base.dir, **_head_kwargs(classifier))
    quantized_names, transposed = quantized_weight_names(base) if quantized else (set(), set())
    tied = tied_embedding_names(base)
    try:
        if transposed:
            raise NotStreamable("its Conv1D layers were 4-bit Linear layers of the transposed weight in training")
        with _quiet_loading(classifier is not None):
            reference = skeleton(model_class, config, torch.float32, _lora_config(adapter, classifier))
        in_file = checkpoint_names(reference, list(base.infos))

        def weights(name: str) -> torch.Tensor:
            lora = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.default(?:\.weight)?$", name)
            if lora:
                pair = adapter.pairs[f"{lora.group(1)}.weight"]
                return pair.a if lora.group(2).endswith("A") else pair.b
            name = name.replace(".base_layer.", ".")
            if name in adapter.replacements:
                return adapter.replacements[name].float()
            source = tied[0] if tied and name == tied[1] else in_file.get(name, name)
            if source not in base.infos:
                raise ExportError(f"verification failed: the model as trained has a weight {name} that neither the "
                                  f"base ({base.dir}) nor the adapter holds")
            return _base_as_trained(base, source, name in quantized_names, quantized, compute_dtype).float()

        what = "base + adapter" + (" on the NF4-quantized base" if quantized else "")
        _compare_streamed(staging, model_class, reference, weights, out_dtype, report, log, what,
                          base.config.get("vocab_size"))
    except NotStreamable as e:
        log(f"verify: this {base.config.get('model_type', 'model')} cannot be verified layer by layer ({e}); "
            f"comparing the whole models needs about {_whole_against_adapter_bytes(base, report) / 1e9:.1f} GB "
            "of RAM")
        _whole_against_adapter(staging, base, adapter, adapter_dir, quantized, compute_dtype, out_dtype, report, log,
                               classifier)


def verify_against_merge(staging: Path, base: BaseModel, merge: Any, quantized: bool, compute_dtype: torch.dtype,
                         out_dtype: torch.dtype, report: ExportReport, log: Callable[[str], None]) -> None:
    """The staged export vs base + the adapters' combined deltas (combine.AdapterMerge, recomputed tensor by tensor
    from the adapters), layer by layer; a family that cannot be streamed is refused (the whole-model check of a
    single adapter goes through PEFT, which cannot express a TIES or DARE merge)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.dir)
    quantized_names, transposed = quantized_weight_names(base) if quantized else (set(), set())
    tied = tied_embedding_names(base)
    if tied is not None and merge.targets() & set(tied):  # the export unties them (merge.plan_merge)
        config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = False
    try:
        if transposed:
            raise NotStreamable("its Conv1D layers were 4-bit Linear layers of the transposed weight in training")
        with _quiet_loading(False):
            reference = skeleton(AutoModelForCausalLM, config, torch.float32)
        in_file = checkpoint_names(reference, list(base.infos))
    except NotStreamable as e:
        raise ExportError(f"verification of a multi-adapter merge needs a layer-by-layer check, which this "
                          f"{base.config.get('model_type', 'model')} cannot have ({e}); rerun with --no-verify to "
                          "write it unverified") from None

    def weights(name: str) -> torch.Tensor:
        source = tied[0] if tied and name == tied[1] else in_file.get(name, name)
        if source not in base.infos:
            raise ExportError(f"verification failed: the merged model has a weight {name} the base ({base.dir}) "
                              "does not hold")
        return merge.apply(name, _base_as_trained(base, source, name in quantized_names, quantized,
                                                  compute_dtype)).float()

    what = f"base + {len(merge.adapters)} adapters ({merge.recipe.method})"
    _compare_streamed(staging, AutoModelForCausalLM, reference, weights, out_dtype, report, log, what,
                      base.config.get("vocab_size"))


def _base_as_trained(base: BaseModel, source: str, was_4bit: bool, quantized: bool,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """A base tensor as training saw it: its NF4 round trip where bitsandbytes quantized it, the rest of a QLoRA
    base in the compute dtype (as training loaded it), else as stored."""
    tensor = base.read(source)
    if was_4bit:
        return nf4_round_trip(tensor, compute_dtype)
    if quantized and tensor.is_floating_point():
        return tensor.to(compute_dtype)
    return tensor


def verify_full(staging: Path, zero: ZeroCheckpoint, base: BaseModel, out_dtype: torch.dtype, budget: int,
                report: ExportReport, log: Callable[[str], None], classifier: Optional[Classifier] = None) -> None:
    """The staged export vs the checkpoint's fp32 weights, layer by layer (the whole-model check where that cannot
    run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM
    try:
        if zero.frozen_shapes:
            raise NotStreamable("a freeze run's checkpoint stores its frozen weights whole in each rank's file")
        config = AutoConfig.from_pretrained(base.dir, **_head_kwargs(classifier))
        with _quiet_loading(classifier is not None):
            reference = skeleton(model_class, config, torch.float32)

        def weights(name: str) -> torch.Tensor:
            return zero.read(zero.shared.get(name, name))

        _compare_streamed(staging, model_class, reference, weights, out_dtype, report, log,
                          "the checkpoint's fp32 weights", None)
    except NotStreamable as e:
        log(f"verify: this {base.config.get('model_type', 'model')} cannot be verified layer by layer ({e}); "
            f"comparing the whole models needs about {report.bytes * 4 / 1e9:.1f} GB of RAM")
        _whole_full(staging, zero, base, out_dtype, budget, report, log, classifier)


def _lora_config(adapter: Adapter, classifier: Optional[Classifier]) -> Any:
    """A LoraConfig that rebuilds exactly the adapter's layers: every adapted module by its path, each with its
    rank and an alpha that gives its scale (alpha / r)."""
    from peft import LoraConfig

    modules = {p.module: p for p in adapter.pairs.values()}
    if not modules:
        return None
    some = next(iter(modules.values()))
    return LoraConfig(r=some.a.shape[0], lora_alpha=some.scale * some.a.shape[0], target_modules=sorted(modules),
                      rank_pattern={m: p.a.shape[0] for m, p in modules.items()},
                      alpha_pattern={m: p.scale * p.a.shape[0] for m, p in modules.items()}, lora_dropout=0.0,
                      fan_in_fan_out=any(p.fan_in_fan_out for p in modules.values()),
                      task_type="SEQ_CLS" if classifier else None)


def _staged_weights(staging: Path, model: torch.nn.Module) -> Callable[[str], torch.Tensor]:
    infos, _ = read_model_headers(staging)
    in_file = checkpoint_names(model, list(infos))
    embed = next((n for n in infos if n.endswith(EMBEDDING_WEIGHTS)), None)

    def weights(name: str) -> torch.Tensor:
        name = in_file.get(name, name)
        if name not in infos and name.endswith("lm_head.weight") and embed is not None:
            name = embed  # a tied head is stored once, as the embedding
        if name not in infos:
            raise ExportError(f"verification failed: the export at {staging} has no tensor {name}")
        return read_tensor(infos[name])

    return weights


def _compare_streamed(staging: Path, model_class: Any, reference: torch.nn.Module,
                      reference_weights: Callable[[str], torch.Tensor], out_dtype: torch.dtype, report: ExportReport,
                      log: Callable[[str], None], what: str, vocab: Optional[int]) -> None:
    """Run the probe through the reference, then through the export, unit by unit; compare at every boundary."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(staging)
    ids = _probe_ids(vocab or config.vocab_size)
    want = boundary_states(reference, reference_weights, ids, torch.float32)
    del reference
    exported = skeleton(model_class, config, out_dtype)
    got = boundary_states(exported, _staged_weights(staging, exported), ids, out_dtype)
    tolerance = VERIFY_TOLERANCE[out_dtype]
    relative = []
    for (label, w), (_, g) in zip(want, got):
        diff = (g - w).abs().max().item()
        relative.append((label, diff / max(w.abs().max().item(), 1e-6), diff))
    _, logits_rel, logits_diff = relative[-1]
    report.max_abs_diff, report.relative_diff = logits_diff, logits_rel
    worst = max(relative[:-1], key=lambda r: r[1])
    log(f"verify: layer by layer ({len(want) - 2} blocks) vs {what} on {ids.shape[0]}x{ids.shape[1]} tokens: "
        f"logits max abs diff {logits_diff:.3e} (relative {logits_rel:.3e}, tolerance {tolerance:g} for "
        f"{out_dtype}); hidden states at most {worst[1]:.3e} relative ({worst[0]})")
    if math.isfinite(logits_rel) and logits_rel <= tolerance:
        report.verified = "passed"
        return
    over = [r for r in relative[:-1] if not math.isfinite(r[1]) or r[1] > tolerance]
    if over:
        first = over[0]
        where = f"first diverging at {first[0]} (hidden states relative {first[1]:.3e} > {tolerance:g})"
    else:  # no boundary over the tolerance: name where the difference grew most
        growth = [(relative[i][0], relative[i][1] - (relative[i - 1][1] if i else 0.0))
                  for i in range(len(relative) - 1)]
        label = max(growth, key=lambda g: g[1])[0] if growth else "logits"
        where = f"diverging most at {label}"
    raise ExportError(f"verification failed: the exported model's logits differ from {what} by {logits_diff:.3e} "
                      f"(relative {logits_rel:.3e} > {tolerance:g}), {where}; nothing was written to {report.out}")
