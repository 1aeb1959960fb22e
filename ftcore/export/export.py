"""`ft export`: a fine-tuned model as a plain Hugging Face safetensors directory, on a machine that could not hold it.

Three inputs:
- an adapter (`--adapter DIR --base DIR`): the base is read one tensor at a time, each LoRA-targeted tensor gets
  its delta, and output shards are streamed to disk; memory is one tensor plus the adapter.
- several adapters (`--adapter A --adapter B --merge ties ...`): the same pass, each tensor getting the adapters'
  deltas combined by the recipe (combine.py).
- a training checkpoint (`--checkpoint STEP_DIR`): the ZeRO partitions are consolidated out of core (zero.py);
  a full fine-tune is written as is, a LoRA run becomes an adapter that is merged onto the base as above.

QLoRA: an adapter trained on a 4-bit base learned a correction to dequant(NF4(W)), not to W. By default (when
the run's ft_config.yaml says qlora, or with `--merge-base quantized`) every weight that bitsandbytes quantized
is replaced by its NF4 round trip before the delta is added; `--merge-base original` merges onto W instead.

The parts: base.py (reading the base), classifier.py (classification exports), merge.py (the merge plan),
output.py (staged, sharded output), verify.py and layerwise.py (the export against the model as trained, one block
at a time), lora.py and zero.py (the adapter and checkpoint formats), st_io.py (safetensors headers and tensors).
This file only orchestrates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftcore.builtin import check_same_base, resolve_model_path
from ftcore.config import Config, run_config_beside
from ftcore.dtypes import DTYPES
from ftcore.export.base import BaseModel, quantized_weight_names, tied_embedding_names
from ftcore.export.classifier import build_classifier, head_outputs, is_classification
from ftcore.export.combine import AdapterMerge, MergeRecipe
from ftcore.export.lora import Adapter, AdapterError, build_adapter, load_adapter
from ftcore.export.merge import MergePlan, check_adapter_fits, output_config, plan_merge
from ftcore.export.options import ExportError, ExportOptions, ExportReport
from ftcore.export.output import write_export
from ftcore.export.st_io import Entry, SafetensorsError
from ftcore.export.verify import verify_against_adapter, verify_against_merge, verify_full
from ftcore.export.zero import ConsolidationError, ZeroCheckpoint, lora_state_to_adapter
from ftcore.gguf_base import GGUFError, read_base_record

CONSOLIDATION_BATCH_BYTES = 256 << 20  # bitsandbytes' default, used by transformers' 4-bit loading

__all__ = ["ExportError", "ExportOptions", "ExportReport", "MergeRecipe", "export_adapter", "export_adapters",
           "export_checkpoint"]


def export_adapter(adapter_dir: Path, base_dir: Optional[str], out: Path, **options) -> ExportReport:
    """base + the PEFT adapter at `adapter_dir`, merged, at `out`; options: ExportOptions' fields."""
    opts = ExportOptions(**options)
    try:
        adapter = load_adapter(adapter_dir)
    except (AdapterError, SafetensorsError) as e:
        raise ExportError(str(e)) from None
    run_config = _run_config(adapter_dir)
    name = run_config.model.name_or_path if run_config else adapter.config.get("base_model_name_or_path")
    base = BaseModel(_resolve_base(base_dir or name, f"--adapter {adapter_dir}", run_config, opts,
                                   read_base_record(adapter_dir, adapter_dir.parent)))
    return _merge_adapter(base, adapter, out, opts, run_config, reference_adapter_dir=adapter_dir,
                          side_sources=[adapter_dir, base.dir])


def export_adapters(adapter_dirs: list[Path], base_dir: Optional[str], out: Path, recipe: MergeRecipe,
                    **options) -> ExportReport:
    """base + several PEFT adapters combined by `recipe` (combine.py), merged at `out` in one pass over the base;
    the recipe and each adapter's provenance in merge_recipe.json beside the weights. Adapters trained on another
    base, on another kind of base (4-bit or not), or adapting other modules are refused in one line."""
    opts = ExportOptions(**options)
    adapters, run_configs, bases = [], [], []
    try:
        for directory in adapter_dirs:
            adapters.append(load_adapter(directory))
            run_configs.append(_run_config(directory))
            config = run_configs[-1]
            bases.append(config.model.name_or_path if config else adapters[-1].config.get("base_model_name_or_path"))
        merge = AdapterMerge(adapters, recipe, [str(d) for d in adapter_dirs])
    except (AdapterError, SafetensorsError) as e:
        raise ExportError(str(e)) from None
    for directory, name, config in zip(adapter_dirs[1:], bases[1:], run_configs[1:]):
        if name != bases[0] and not base_dir:
            raise ExportError(f"--adapter {directory} was trained on {name}, --adapter {adapter_dirs[0]} on "
                              f"{bases[0]}: adapters merged together must share their base")
        if _trained_4bit(config) != _trained_4bit(run_configs[0]):
            raise ExportError(f"--adapter {directory} and --adapter {adapter_dirs[0]}: one was trained on a 4-bit "
                              "(QLoRA) base, the other not; they learned corrections to different weights")
    if any(is_classification(c, a) for c, a in zip(run_configs, adapters)):
        raise ExportError("a multi-adapter merge is for causal-LM adapters; a classification adapter is exported "
                          "alone (--adapter DIR)")
    base = BaseModel(_resolve_base(base_dir or bases[0], f"--adapter {adapter_dirs[0]}", run_configs[0], opts,
                                   read_base_record(adapter_dirs[0], adapter_dirs[0].parent)))
    trained_4bit = _trained_4bit(run_configs[0])
    for adapter in adapters:
        if trained_4bit:
            _as_trained_on_4bit(adapter, base)
        check_adapter_fits(adapter, base, tied_embedding_names(base))
    out_dtype = DTYPES[opts.dtype] if opts.dtype else base.dtype
    quantized = trained_4bit if opts.merge_base == "auto" else opts.merge_base == "quantized"
    compute_dtype = DTYPES[run_configs[0].model.dtype] if run_configs[0] else out_dtype
    plan = plan_merge(base, merge, out_dtype, quantized, compute_dtype)
    plan.notes["merge_recipe.json"] = json.dumps({
        **recipe.record(), "base": str(base.dir),
        "adapters": [{"path": str(d.resolve()), "base_model": name, "r": a.config.get("r"),
                      "lora_alpha": a.config.get("lora_alpha"), "use_rslora": bool(a.config.get("use_rslora")),
                      "sha256": _file_sha256(d / "adapter_model.safetensors")}
                     for d, name, a in zip(adapter_dirs, bases, adapters)]}, indent=1)
    opts.log(f"merging {len(adapters)} adapters ({recipe.method}, weights {recipe.weights}"
             + (f", densities {recipe.densities}" if recipe.method not in ("linear", "task_arithmetic") else "")
             + (f", lambda {recipe.lambda_:g}" if recipe.method != "linear" else "") + ")")

    def check(staging: Path, report: ExportReport) -> None:
        verify_against_merge(staging, base, merge, quantized, compute_dtype, out_dtype, report, opts.log)

    return write_export(out, opts, plan, [adapter_dirs[0], base.dir], check)


def _trained_4bit(run_config: Optional[Config]) -> bool:
    return run_config is not None and run_config.adapter.method == "qlora"


def _as_trained_on_4bit(adapter: Adapter, base: BaseModel) -> None:
    """Trained on a 4-bit base, a Conv1D (GPT-2) layer was a Linear4bit of the transposed weight, so its LoRA delta
    is in Linear layout; it is merged into the base's [in, out] layout."""
    for name in quantized_weight_names(base)[1] & set(adapter.pairs):
        adapter.pairs[name].fan_in_fan_out = True


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_checkpoint(checkpoint: Path, base_dir: Optional[str], out: Path, **options) -> ExportReport:
    """The model of a training checkpoint (a step dir) at `out`: consolidated from its ZeRO partitions, and
    merged onto the base for a LoRA run; options: ExportOptions' fields."""
    opts = ExportOptions(**options)
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: no such directory")
    run_config = _run_config(checkpoint)
    if run_config is None:
        raise ExportError(f"{checkpoint}: no ft_config.yaml (and no run config.yaml two levels up): not an ft "
                          "training checkpoint")
    try:
        zero = ZeroCheckpoint(checkpoint)
    except ConsolidationError as e:
        raise ExportError(str(e)) from None
    base = BaseModel(_resolve_base(base_dir or run_config.model.name_or_path, f"--checkpoint {checkpoint}", run_config,
                                   opts, _checkpoint_base_record(checkpoint)))
    if run_config.adapter.method in ("full", "freeze"):  # a freeze run saves every weight, like full fine-tuning
        return _export_full(checkpoint, zero, base, out, opts, run_config)
    # A LoRA run's checkpoint holds only the adapter (frozen weights are excluded): consolidate it, then merge.
    state = lora_state_to_adapter(dict(zero.iter_tensors(_consolidation_budget(opts))))
    config = {"peft_type": "LORA", "r": run_config.adapter.r, "lora_alpha": run_config.adapter.alpha,
              "use_rslora": False, "task_type": "SEQ_CLS" if is_classification(run_config) else "CAUSAL_LM"}
    try:
        adapter = build_adapter(config, state, str(checkpoint))
    except AdapterError as e:
        raise ExportError(str(e)) from None
    opts.log(f"consolidated {len(state)} adapter tensors from {zero.world_size} rank(s) of ZeRO-{zero.stage}")
    return _merge_adapter(base, adapter, out, opts, run_config, reference_adapter_dir=None, side_sources=[base.dir])


def _merge_adapter(base: BaseModel, adapter: Adapter, out: Path, opts: ExportOptions, run_config: Optional[Config],
                   reference_adapter_dir: Optional[Path], side_sources: list[Path]) -> ExportReport:
    trained_4bit = _trained_4bit(run_config)
    if trained_4bit:
        _as_trained_on_4bit(adapter, base)
    classifier = None
    if is_classification(run_config, adapter):
        classes = head_outputs({n: tuple(t.shape) for n, t in adapter.replacements.items()}, base, "adapter")
        classifier = build_classifier(base, run_config, classes, side_sources)
    check_adapter_fits(adapter, base, tied_embedding_names(base), classifier)
    out_dtype = DTYPES[opts.dtype] if opts.dtype else base.dtype
    quantized = trained_4bit if opts.merge_base == "auto" else opts.merge_base == "quantized"
    if trained_4bit and not quantized:
        opts.log("note: this adapter was trained on a 4-bit base; it is merged onto the original weights as asked, "
                 "so the export is not exactly the function that was trained (verification compares with base + "
                 "adapter on the original weights)")
    compute_dtype = DTYPES[run_config.model.dtype] if run_config else out_dtype
    plan = plan_merge(base, adapter, out_dtype, quantized, compute_dtype, classifier)

    def check(staging: Path, report: ExportReport) -> None:
        verify_against_adapter(staging, base, adapter, reference_adapter_dir, quantized, compute_dtype, out_dtype,
                               report, opts.log, classifier)

    return write_export(out, opts, plan, side_sources, check)


def _export_full(checkpoint: Path, zero: ZeroCheckpoint, base: BaseModel, out: Path, opts: ExportOptions,
                 run_config: Config) -> ExportReport:
    classifier = None
    if is_classification(run_config):
        classes = head_outputs({n: tuple(shape) for n, shape in zero.shapes().items()}, base, str(checkpoint))
        classifier = build_classifier(base, run_config, classes, [base.dir])
    out_dtype = DTYPES[opts.dtype] if opts.dtype else base.dtype
    shapes = zero.shapes()
    tied = set(zero.shared)  # e.g. lm_head.weight shared with the input embedding: stored once, as HF does
    entries = [Entry(n, tuple(shapes[n]), out_dtype) for n in zero.names() if n not in tied]
    budget = _consolidation_budget(opts)

    def tensors():
        return ((n, t) for n, t in zero.iter_tensors(budget) if n not in tied)

    def check(staging: Path, report: ExportReport) -> None:
        verify_full(staging, zero, base, out_dtype, budget, report, opts.log, classifier)

    config = output_config({**base.config, **(classifier.config if classifier else {})}, out_dtype)
    opts.log(f"consolidating {len(entries)} tensors from {zero.world_size} rank(s) of ZeRO-{zero.stage}")
    return write_export(out, opts, MergePlan(entries, tensors, config), [base.dir], check)


def _consolidation_budget(opts: ExportOptions) -> int:
    """Consolidation batches are independent of output shards (the writer streams tensor by tensor): kept small,
    so peak memory is a few hundred MB whatever the model (a single larger parameter is its own batch)."""
    return min(opts.shard_bytes, CONSOLIDATION_BATCH_BYTES)


def _run_config(directory: Path) -> Optional[Config]:
    """The ft config saved beside an adapter or checkpoint (ft_config.yaml, or the run's config.yaml two levels
    above a step dir), as the typed Config; None for an adapter ft did not train."""
    return run_config_beside(directory)  # (a ConfigError names the file and field; the command prints it)


def _checkpoint_base_record(checkpoint: Path) -> Optional[dict]:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("base_model")
    except (OSError, ValueError):
        return None


def _resolve_base(name: Optional[str], what: str, run_config: Optional[Config], opts: ExportOptions,
                  recorded: Optional[dict]) -> Path:
    """The base directory to merge onto. A GGUF base (or a built-in real model) is the dequantized copy training
    used, in the run's dtype, after checking the file is the one the run recorded (sha256)."""
    if not name:
        raise ExportError(f"{what}: no base model known; pass --base BASE_DIR")
    try:
        current = check_same_base(recorded, name, what)
        if name.startswith("builtin:") or current:
            dtype = run_config.model.dtype if run_config else "float32"
            name = resolve_model_path(name, dtype)
            if current:
                opts.log(f"base: {current['gguf']} (sha256 {current['sha256'][:16]}..."
                         f"{', the file the run trained on' if recorded else ''}), merged onto its {dtype} "
                         f"dequantization as trained: {name}")
    except (GGUFError, ValueError) as e:
        raise ExportError(str(e)) from None
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ExportError(f"--base {name}: not a local model directory")
    return path
