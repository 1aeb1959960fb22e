"""The merge plan: which tensors the export holds, in which order and dtype, and how each is made from the base
(+ the NF4 round trip for a QLoRA base, + the LoRA delta, or a replacement such as a trained head). Nothing is read
until the plan's tensors are iterated, one at a time, in the base's file order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ftcore.dtypes import dtype_name
from ftcore.export.base import BaseModel, quantized_weight_names, tied_embedding_names
from ftcore.export.classifier import Classifier
from ftcore.export.lora import Adapter, expected_shape
from ftcore.export.options import ExportError
from ftcore.export.st_io import Entry
from ftcore.nf4 import nf4_round_trip


@dataclass
class MergePlan:
    """What to write: the entries (in order), a generator of their tensors, the output config.json, counts."""

    entries: list[Entry]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    config: dict
    merged: int = 0
    replaced: int = 0
    merge_base: str = "original"
    notes: dict[str, str] = field(default_factory=dict)  # file name -> text written beside the weights


def check_adapter_fits(adapter: Adapter, base: BaseModel, tied: Optional[tuple[str, str]],
                        classifier: Optional[Classifier] = None) -> None:
    """Every tensor the adapter changes or replaces exists in the base at the shape it was trained on."""
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
    config["dtype"] = dtype_name(out_dtype)
    return config


def plan_merge(base: BaseModel, adapter: Optional[Adapter], out_dtype: torch.dtype, merge_quantized: bool,
               compute_dtype: torch.dtype, classifier: Optional[Classifier] = None) -> MergePlan:
    """The plan for base (+ adapter): merge_quantized takes every 4-bit-quantized weight through its NF4 round trip
    (and the rest at compute_dtype) before the delta, as a QLoRA run saw them."""
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

    return MergePlan(entries, produce, config,
                     merged=len(set(names) & set(adapter.pairs)) if adapter else 0,
                     replaced=len(set(names + new_heads) & set(adapter.replacements)) if adapter else 0,
                     merge_base="quantized (NF4 round trip)" if merge_quantized else "original")
