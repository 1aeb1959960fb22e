"""`ft export`: a fine-tuned model as a plain Hugging Face safetensors directory, on a machine that could not hold it.

Two inputs:
- an adapter (`--adapter DIR --base DIR`): the base is read one tensor at a time, each LoRA-targeted tensor gets
  its delta, and output shards are streamed to disk; memory is one tensor plus the adapter.
- a training checkpoint (`--checkpoint STEP_DIR`): the ZeRO partitions are consolidated out of core (zero.py);
  a full fine-tune is written as is, a LoRA run becomes an adapter that is merged onto the base as above.

Classification (`task: classification`, or a PEFT SEQ_CLS adapter): the export is the model's
*ForSequenceClassification: the language-model head is left out, the trained classification head (the adapter's
modules_to_save copy, or the checkpoint's) is written, and config.json gets the architecture, id2label/label2id
(from the run's data.labels) and the pad token id the head reads its prediction by.

QLoRA: an adapter trained on a 4-bit base learned a correction to dequant(NF4(W)), not to W. By default (when
the run's ft_config.yaml says qlora, or with `--merge-base quantized`) every weight that bitsandbytes quantized
is replaced by its NF4 round trip before the delta is added; `--merge-base original` merges onto W instead.

Output goes to a staging directory beside OUT and is renamed into place only when complete and verified.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml

from ftcore.durable import fsync_tree, replace_dir
from ftcore.export.lora import Adapter, AdapterError, build_adapter, expected_shape, load_adapter
from ftcore.export.st_io import SafetensorsError, ShardWriter, TensorInfo, read_header, read_tensor
from ftcore.export.zero import ConsolidationError, ZeroCheckpoint, lora_state_to_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits of the exported model vs the model as trained: max |difference| / max |reference logit|.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
NF4_BLOCKSIZE = 64
CONSOLIDATION_BATCH_BYTES = 256 << 20  # bitsandbytes' default, used by transformers' 4-bit loading


class ExportError(ValueError):
    """An export problem as one line naming the file or option."""


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise ExportError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB") from None


# ---------------------------------------------------------------------------------------------- base model
class BaseModel:
    """A HF model directory's safetensors tensors (by name, in file order) and its config."""

    def __init__(self, directory: Path):
        self.dir = directory
        from ftcore.model_files import BaseModelError, check_model_dir

        try:  # config.json and the weights agree, every shard is there (one line naming what is wrong)
            check_model_dir(directory)
        except BaseModelError as e:
            raise ExportError(str(e)) from None
        self.config = json.loads((directory / "config.json").read_text())
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ExportError(f"{directory}: no .safetensors weights (convert .bin weights first)")
        self.infos: dict[str, TensorInfo] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ExportError(f"{path}: missing (listed in model.safetensors.index.json)")
            try:
                infos, _ = read_header(path)
            except SafetensorsError as e:
                raise ExportError(str(e)) from None
            self.infos.update(infos)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.infos))
            if absent:
                raise ExportError(f"{directory}: {len(absent)} tensors in the index are in no shard "
                                  f"(first: {absent[0]})")

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name in DTYPES:
            return DTYPES[name]
        return next(iter(self.infos.values())).dtype

    def read(self, name: str) -> torch.Tensor:
        try:
            return read_tensor(self.infos[name])
        except SafetensorsError as e:
            raise ExportError(str(e)) from None


def tied_embedding_names(base: BaseModel) -> Optional[tuple[str, str]]:
    """(input embedding, lm_head) when the config ties them and the checkpoint stores only the embedding."""
    config = base.config.get("text_config", base.config)
    if not (config.get("tie_word_embeddings", base.config.get("tie_word_embeddings", False))):
        return None
    embed = next((n for n in base.infos if n.endswith(("embed_tokens.weight", "wte.weight",
                                                       "word_embeddings.weight"))), None)
    head = "lm_head.weight"
    return (embed, head) if embed and head not in base.infos else None


# ---------------------------------------------------------------------------------------------- classification
@dataclass
class Classifier:
    """What makes the export a sequence classifier: its tensor names and config.json settings."""

    names: set[str]  # every tensor the classification model has
    config: dict  # architectures, id2label, label2id, pad_token_id

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification


def is_classification(run_config: dict, adapter: Optional[Adapter] = None) -> bool:
    return run_config.get("task") == "classification" or (
        adapter is not None and adapter.config.get("task_type") == "SEQ_CLS")


def build_classifier(base: BaseModel, run_config: dict, num_labels: int, tokenizer_dirs: list[Path]) -> Classifier:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from ftcore.data.stream import pad_token_id

    labels = (run_config.get("data") or {}).get("labels") or [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ExportError(f"the classification head has {num_labels} outputs but the run's data.labels lists "
                          f"{len(labels)} classes")
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(base.config.get("model_type"))
    if architecture is None:
        raise ExportError(f"{base.dir}: transformers has no sequence-classification model for model_type "
                          f"{base.config.get('model_type')!r}")
    pad = base.config.get("pad_token_id")
    for directory in tokenizer_dirs:  # the id the run padded with (ftcore.data.stream.pad_token_id)
        if directory is not None and (directory / "tokenizer_config.json").is_file():
            pad = pad_token_id(AutoTokenizer.from_pretrained(directory))
            break
    settings = {"architectures": [architecture], "id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": pad}
    config = AutoConfig.from_pretrained(base.dir, num_labels=num_labels)
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config)
    return Classifier(set(model.state_dict()), settings)


def head_outputs(shapes: dict[str, tuple], base: BaseModel, where: str) -> int:
    """Classes of a classification head: the output size of the one 2-D weight (name -> shape) the base lacks."""
    heads = [n for n, shape in shapes.items() if n not in base.infos and n.endswith("weight") and len(shape) == 2]
    if len(heads) != 1:
        raise ExportError(f"{where}: expected one classification head weight beside the base's tensors, found "
                          f"{len(heads)}: {[n for n in shapes if n not in base.infos][:4]}")
    return shapes[heads[0]][0]


# ---------------------------------------------------------------------------------------------- QLoRA base
def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """dequant(NF4(W)) exactly as bitsandbytes computes it when transformers loads the base in 4 bit
    (double quantization, blocksize 64); this is the weight the QLoRA adapter was trained against."""
    import bitsandbytes.functional as bnbf

    w = weight.to(compute_dtype).contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state).to(compute_dtype)


def quantized_weight_names(base: BaseModel) -> tuple[set[str], set[str]]:
    """Names of the weights transformers' bitsandbytes 4-bit loading quantizes, decided by transformers' own
    rules (its default skips: output head, tied weights, last module; plus the model's keep-in-fp32 modules), and
    which of them are Conv1D weights (GPT-2's [in, out] layout: the 4-bit layer is a Linear of the transpose)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ftcore.model import quantized_module_names

    config = AutoConfig.from_pretrained(base.dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = {f"{name}.weight" for name in quantized_module_names(model)} & set(base.infos)
    conv1d = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return names, names & conv1d


# ---------------------------------------------------------------------------------------------- output
@dataclass
class Entry:
    name: str
    shape: tuple
    dtype: torch.dtype


def plan_shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.02 + (64 << 20):
        raise ExportError(f"{directory}: not enough disk space: the export needs {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")


def write_shards(staging: Path, entries: list[Entry], tensors: Iterator[tuple[str, torch.Tensor]],
                 shard_bytes: int) -> dict:
    """Stream (name, tensor) pairs, in `entries` order, into safetensors shards plus the index."""
    shards = plan_shards(entries, shard_bytes)
    weight_map, total = {}, 0
    source = iter(tensors)
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(staging / filename, [(e.name, e.dtype, e.shape) for e in shard])
        for e in shard:
            name, tensor = next(source)
            if name != e.name:
                raise ExportError(f"internal: tensor {name} arrived where {e.name} was planned")
            writer.write(name, tensor.to(e.dtype).reshape(e.shape))
            weight_map[name] = filename
        writer.close()
        total += writer.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


class StagedOutput:
    """OUT is written as .OUT.tmp-PID beside it and renamed into place when complete; nothing half-written
    ever sits at OUT. An existing OUT is refused unless force."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        if out.exists() and not force:
            raise ExportError(f"{out}: already exists (use --force to replace it)")
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = parent / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as e:
            raise ExportError(f"{parent}: cannot write the export there ({e.strerror})") from None

    def commit(self) -> None:
        fsync_tree(self.staging)
        replace_dir(self.staging, self.out)  # a replaced OUT is moved aside first, deleted after

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def copy_side_files(sources: list[Path], staging: Path, config: dict) -> None:
    """config.json (given), generation config and tokenizer files: the first source that has each wins."""
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        for directory in sources:
            if directory is not None and (directory / name).is_file():
                shutil.copy2(directory / name, staging / name)
                break


# ---------------------------------------------------------------------------------------------- merge
@dataclass
class ExportReport:
    out: Path
    tensors: int
    bytes: int
    merged: int
    replaced: int
    max_abs_diff: Optional[float] = None
    relative_diff: Optional[float] = None
    verified: str = "skipped"
    merge_base: str = "original"


def _check_adapter_fits(adapter: Adapter, base: BaseModel, tied: Optional[tuple[str, str]],
                        classifier: Optional[Classifier] = None) -> None:
    names = set(base.infos) | ({tied[1]} if tied else set())
    if classifier is not None:  # the new head's tensors come from the adapter
        names |= {n for n in adapter.replacements if n in classifier.names}
    for name, pair in adapter.pairs.items():
        if name not in names:
            raise ExportError(f"adapter targets {pair.module}, which the base {base.dir} does not have (is it the "
                              "base the adapter was trained on?)")
        have = base.infos[tied[0] if tied and name == tied[1] else name].shape
        if tuple(have) != expected_shape(pair):
            raise ExportError(f"adapter does not fit the base {base.dir}: {pair.module} is {list(have)} there, the "
                              f"adapter was trained on {list(expected_shape(pair))}")
    for name, tensor in adapter.replacements.items():
        if name not in names:
            raise ExportError(f"adapter replaces {name}, which the base {base.dir} does not have")
        if name not in base.infos and not (tied and name == tied[1]):
            continue  # a classification head: new, any shape
        have = base.infos[tied[0] if tied and name == tied[1] else name].shape
        if tuple(have) != tuple(tensor.shape):
            raise ExportError(f"adapter does not fit the base {base.dir}: {name} is {list(have)} there, "
                              f"{list(tensor.shape)} in the adapter")


def output_config(config: dict, out_dtype: torch.dtype) -> dict:
    """The base's config for a plain model in out_dtype (no quantization settings carried over)."""
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "quantization_config")}
    config["dtype"] = {v: k for k, v in DTYPES.items()}[out_dtype]
    return config


def merged_tensors(base: BaseModel, adapter: Optional[Adapter], out_dtype: torch.dtype, merge_quantized: bool,
                   compute_dtype: torch.dtype, classifier: Optional[Classifier] = None
                   ) -> tuple[list[Entry], Callable[[], Iterator], dict, dict]:
    """Entries to write, a generator of merged tensors in that order, the output config, and counts."""
    config = dict(base.config)
    tied = tied_embedding_names(base)
    targets = adapter.targets() if adapter else set()
    names = sorted(base.infos, key=lambda n: (str(base.infos[n].path), base.infos[n].start))  # sequential reads
    new_heads: list[str] = []
    if classifier is not None:  # no language-model head; the trained classification head instead
        names = [n for n in names if n in classifier.names]
        new_heads = sorted(n for n in targets if n not in base.infos)
        config.update(classifier.config)
        tied = None
    untie = tied is not None and bool(targets & set(tied))
    if untie:
        # The adapter changes one side of a tied pair: the trained model used two different matrices, so the
        # export stores both and unties them (merging into a shared weight would change the other side too).
        names.append(tied[1])
        config["tie_word_embeddings"] = False
        if "text_config" in config:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    quantized, transposed = quantized_weight_names(base) if merge_quantized else (set(), set())
    config = output_config(config, out_dtype)
    entries = []
    for n in names:
        info = base.infos[tied[0] if untie and n == tied[1] else n]
        dtype = out_dtype if info.dtype.is_floating_point else info.dtype
        entries.append(Entry(n, info.shape, dtype))
    entries += [Entry(n, tuple(adapter.replacements[n].shape), out_dtype) for n in new_heads]
    counts = {"merged": len(set(names) & set(adapter.pairs)) if adapter else 0,
              "replaced": len(set(names + new_heads) & set(adapter.replacements)) if adapter else 0}

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for n in names:
            source = tied[0] if untie and n == tied[1] else n
            tensor = base.read(source)
            if n in transposed:
                tensor = nf4_round_trip(tensor.T, compute_dtype).T
            elif n in quantized:
                tensor = nf4_round_trip(tensor, compute_dtype)
            elif merge_quantized and tensor.is_floating_point():
                # A QLoRA run loads the rest of the base in its compute dtype (transformers' dtype=): the export is
                # the function that was trained, so those weights are taken as training saw them.
                tensor = tensor.to(compute_dtype)
            if adapter is not None and n in targets:
                tensor = adapter.apply(n, tensor)
            yield n, tensor
        for n in new_heads:
            yield n, adapter.replacements[n]

    return entries, produce, config, counts


def _run_config(directory: Optional[Path]) -> dict:
    """The ft config saved beside an adapter or checkpoint (ft_config.yaml), if any."""
    if directory is None:
        return {}
    for candidate in (directory / "ft_config.yaml", directory.parent.parent / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def resolve_merge_base(choice: str, run_config: dict) -> bool:
    trained_4bit = (run_config.get("adapter") or {}).get("method") == "qlora"
    if choice == "auto":
        return trained_4bit
    return choice == "quantized"


def _resolve_base(base: Optional[str], run_config: dict, what: str) -> Path:
    name = base or (run_config.get("model") or {}).get("name_or_path")
    if not name:
        raise ExportError(f"{what}: no base model known; pass --base BASE_DIR")
    if name.startswith("builtin:"):
        from ftcore.builtin import resolve_model_path

        name = resolve_model_path(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ExportError(f"--base {name}: not a local model directory")
    return path


def export_adapter(adapter_dir: Path, base_dir: Optional[str], out: Path, dtype: Optional[str] = None,
                   shard_size: str = "5GB", merge_base: str = "auto", verify: bool = True,
                   force: bool = False, log: Callable[[str], None] = print) -> ExportReport:
    try:
        adapter = load_adapter(adapter_dir)
    except (AdapterError, SafetensorsError) as e:
        raise ExportError(str(e)) from None
    run_config = _run_config(adapter_dir)
    base = BaseModel(_resolve_base(base_dir, run_config or {"model": {"name_or_path":
                                   adapter.config.get("base_model_name_or_path")}}, f"--adapter {adapter_dir}"))
    return _export(base, adapter, out, dtype, shard_size, merge_base, run_config, verify, force, log,
                   reference_adapter_dir=adapter_dir, side_sources=[adapter_dir, base.dir])


def export_checkpoint(checkpoint: Path, base_dir: Optional[str], out: Path, dtype: Optional[str] = None,
                      shard_size: str = "5GB", merge_base: str = "auto", verify: bool = True, force: bool = False,
                      log: Callable[[str], None] = print) -> ExportReport:
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: no such directory")
    run_config = _run_config(checkpoint)
    if not run_config:
        raise ExportError(f"{checkpoint}: no ft_config.yaml (and no run config.yaml two levels up): not an ft "
                          "training checkpoint")
    try:
        zero = ZeroCheckpoint(checkpoint)
    except ConsolidationError as e:
        raise ExportError(str(e)) from None
    base = BaseModel(_resolve_base(base_dir, run_config, f"--checkpoint {checkpoint}"))
    method = (run_config.get("adapter") or {}).get("method", "lora")
    budget = min(parse_size(shard_size), CONSOLIDATION_BATCH_BYTES)
    if method in ("full", "freeze"):  # a freeze run saves every weight, like full fine-tuning
        classifier = None
        if is_classification(run_config):
            classes = head_outputs({n: tuple(shape) for n, shape in zero.shapes().items()}, base, str(checkpoint))
            classifier = build_classifier(base, run_config, classes, [base.dir])
        return _export_full(zero, base, out, dtype, shard_size, verify, force, log, classifier)
    # A LoRA run's checkpoint holds only the adapter (frozen weights are excluded): consolidate it, then merge.
    state = lora_state_to_adapter(dict(zero.iter_tensors(budget)))
    adapter_cfg = run_config.get("adapter") or {}
    config = {"peft_type": "LORA", "r": adapter_cfg.get("r"), "lora_alpha": adapter_cfg.get("alpha"),
              "use_rslora": False, "task_type": "SEQ_CLS" if is_classification(run_config) else "CAUSAL_LM"}
    try:
        adapter = build_adapter(config, state, str(checkpoint))
    except AdapterError as e:
        raise ExportError(str(e)) from None
    log(f"consolidated {len(state)} adapter tensors from {zero.world_size} rank(s) of ZeRO-{zero.stage}")
    return _export(base, adapter, out, dtype, shard_size, merge_base, run_config, verify, force, log,
                   reference_adapter_dir=None, side_sources=[base.dir])


def _export(base: BaseModel, adapter: Adapter, out: Path, dtype: Optional[str], shard_size: str,
            merge_base: str, run_config: dict, verify: bool, force: bool, log: Callable[[str], None],
            reference_adapter_dir: Optional[Path], side_sources: list[Path]) -> ExportReport:
    tied = tied_embedding_names(base)
    if resolve_merge_base("auto", run_config):
        # Trained on a 4-bit base: a Conv1D (GPT-2) layer was a Linear4bit of the transposed weight, so its LoRA
        # delta is in Linear layout; it is merged into the base's [in, out] layout.
        for name in quantized_weight_names(base)[1] & set(adapter.pairs):
            adapter.pairs[name].fan_in_fan_out = True
    classifier = None
    if is_classification(run_config, adapter):
        classes = head_outputs({n: tuple(t.shape) for n, t in adapter.replacements.items()}, base, "adapter")
        classifier = build_classifier(base, run_config, classes, side_sources)
    _check_adapter_fits(adapter, base, tied, classifier)
    out_dtype = DTYPES[dtype] if dtype else base.dtype
    quantized = resolve_merge_base(merge_base, run_config)
    if resolve_merge_base("auto", run_config) and not quantized:
        log("note: this adapter was trained on a 4-bit base; it is merged onto the original weights as asked, so "
            "the export is not exactly the function that was trained (verification compares with base + adapter "
            "on the original weights)")
    compute_dtype = DTYPES.get((run_config.get("model") or {}).get("dtype"), torch.float32) \
        if run_config else out_dtype
    entries, produce, config, counts = merged_tensors(base, adapter, out_dtype, quantized, compute_dtype, classifier)
    shard_bytes = parse_size(shard_size)

    def check(staging: Path, report: ExportReport) -> None:
        _verify_against_adapter(staging, base, adapter, reference_adapter_dir, quantized, compute_dtype, out_dtype,
                                report, log, classifier)

    return _write_export(out, force, entries, produce(), shard_bytes, side_sources, config,
                         dict(merged=counts["merged"], replaced=counts["replaced"],
                              merge_base="quantized (NF4 round trip)" if quantized else "original"),
                         check if verify else None)


def _export_full(zero: ZeroCheckpoint, base: BaseModel, out: Path, dtype: Optional[str], shard_size: str,
                 verify: bool, force: bool, log: Callable[[str], None],
                 classifier: Optional[Classifier] = None) -> ExportReport:
    out_dtype = DTYPES[dtype] if dtype else base.dtype
    shapes = zero.shapes()
    tied = set(zero.shared)  # e.g. lm_head.weight shared with the input embedding: stored once, as HF does
    names = [n for n in zero.names() if n not in tied]
    entries = [Entry(n, tuple(shapes[n]), out_dtype) for n in names]
    shard_bytes = parse_size(shard_size)
    # Consolidation batches are independent of output shards (the writer streams tensor by tensor): keep them
    # small, so peak memory is a few hundred MB whatever the model (a single larger parameter is its own batch).
    budget = min(shard_bytes, CONSOLIDATION_BATCH_BYTES)
    tensors = ((n, t) for n, t in zero.iter_tensors(budget) if n not in tied)

    def check(staging: Path, report: ExportReport) -> None:
        _verify_full(staging, zero, base, out_dtype, budget, report, log, classifier)

    config = output_config({**base.config, **(classifier.config if classifier else {})}, out_dtype)
    log(f"consolidating {len(entries)} tensors from {zero.world_size} rank(s) of ZeRO-{zero.stage}")
    return _write_export(out, force, entries, tensors, shard_bytes, [base.dir], config,
                         dict(merged=0, replaced=0), check if verify else None)


def _write_export(out: Path, force: bool, entries: list[Entry], tensors: Iterator[tuple[str, torch.Tensor]],
                  shard_bytes: int, side_sources: list[Path], config: dict, counts: dict,
                  verify: Optional[Callable[[Path, ExportReport], None]]) -> ExportReport:
    """Stage, check space, stream the shards, add side files, verify, then put in place (or remove it all)."""
    staged = StagedOutput(out, force)
    try:
        check_disk_space(staged.staging, sum(math.prod(e.shape) * e.dtype.itemsize for e in entries))
        index = write_shards(staged.staging, entries, tensors, shard_bytes)
        copy_side_files(side_sources, staged.staging, config)
        report = ExportReport(out, len(entries), index["metadata"]["total_size"], **counts)
        if verify is not None:
            verify(staged.staging, report)
        staged.commit()
    except OSError as e:  # a full disk, most often: say so, and leave nothing behind
        staged.abort()
        try:
            free = f"{shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise ExportError(f"writing the export beside {out} failed: {e.strerror or e} ({free}); nothing was "
                          f"written to {out} (staging removed)") from None
    except BaseException:
        staged.abort()
        raise
    return report


# ---------------------------------------------------------------------------------------------- verification
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


def _verify_against_adapter(staging: Path, base: BaseModel, adapter: Adapter, adapter_dir: Optional[Path],
                            quantized: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                            report: ExportReport, log: Callable[[str], None],
                            classifier: Optional[Classifier] = None) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_class = classifier.model_class() if classifier else AutoModelForCausalLM

    size = sum(i.nbytes for i in base.infos.values())
    if not _fits_in_ram(size * 2 + report.bytes * 2):
        log(f"verify: skipped: the base and the export need about {(size * 2 + report.bytes * 2) / 1e9:.0f} GB of "
            "RAM to compare; run the export on a larger machine to verify")
        report.verified = "skipped (not enough RAM)"
        return
    kwargs: dict = {"dtype": torch.float32}
    if quantized:
        kwargs = {"dtype": compute_dtype, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)}
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


def _verify_full(staging: Path, zero: ZeroCheckpoint, base: BaseModel, out_dtype: torch.dtype, budget: int,
                 report: ExportReport, log: Callable[[str], None], classifier: Optional[Classifier] = None) -> None:
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
