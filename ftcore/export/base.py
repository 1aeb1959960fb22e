"""The base model as ft export reads it: safetensors headers only (tensors are read one at a time, on demand),
its config, which weights are tied, and which weights transformers' 4-bit loading would quantize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ftcore.dtypes import DTYPES
from ftcore.export.options import ExportError
from ftcore.export.st_io import SafetensorsError, read_model_headers, read_tensor
from ftcore.model_files import BaseModelError, check_model_dir
from ftcore.model_geometry import meta_skeleton, quantized_module_names


class BaseModel:
    """A HF model directory's safetensors tensors (by name, in file order) and its config."""

    def __init__(self, directory: Path):
        self.dir = directory
        try:  # config.json and the weights agree, every shard is there (one line naming what is wrong)
            check_model_dir(directory)
        except BaseModelError as e:
            raise ExportError(str(e)) from None
        self.config = json.loads((directory / "config.json").read_text())
        try:
            self.infos, weight_map = read_model_headers(directory)
        except SafetensorsError as e:
            raise ExportError(str(e)) from None
        if not self.infos:
            raise ExportError(f"{directory}: no .safetensors weights (convert .bin weights first)")
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.infos))
            if absent:
                raise ExportError(f"{directory}: {len(absent)} tensors in the index are in no shard "
                                  f"(first: {absent[0]})")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype config.json names, else the first tensor's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name in DTYPES:
            return DTYPES[name]
        return next(iter(self.infos.values())).dtype

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard."""
        try:
            return read_tensor(self.infos[name])
        except SafetensorsError as e:
            raise ExportError(str(e)) from None


# The input embedding's tensor name in the families' checkpoints (a tied head is stored once, as it).
EMBEDDING_WEIGHTS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def tied_embedding_names(base: BaseModel) -> Optional[tuple[str, str]]:
    """(input embedding, lm_head) when the config ties them and the checkpoint stores only the embedding."""
    config = base.config.get("text_config", base.config)
    if not (config.get("tie_word_embeddings", base.config.get("tie_word_embeddings", False))):
        return None
    embed = next((n for n in base.infos if n.endswith(EMBEDDING_WEIGHTS)), None)
    head = "lm_head.weight"
    return (embed, head) if embed and head not in base.infos else None


def quantized_weight_names(base: BaseModel) -> tuple[set[str], set[str]]:
    """Names of the weights transformers' bitsandbytes 4-bit loading quantizes, decided by transformers' own
    rules (its default skips: output head, tied weights, last module; plus the model's keep-in-fp32 modules), and
    which of them are Conv1D weights (GPT-2's [in, out] layout: the 4-bit layer is a Linear of the transpose)."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    model = meta_skeleton(AutoConfig.from_pretrained(base.dir))
    names = {f"{name}.weight" for name in quantized_module_names(model)} & set(base.infos)
    conv1d = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return names, names & conv1d
