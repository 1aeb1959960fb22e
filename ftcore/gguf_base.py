"""A GGUF file as the base model: `model.name_or_path: path/model.gguf` (or a directory holding one .gguf).

Training needs float weights, so the file is dequantized once, through transformers' GGUF loader (which reads the
`gguf` package's quant formats), into an ordinary safetensors model directory with the tokenizer (and the GGUF's
chat template, when it carries one) under $FT_CACHE_DIR/gguf/<sha256[:16]>-<dtype>/. That directory is built in a
staging directory, marked complete by `ft_gguf.json` (written last) and renamed into place; a directory without a
matching marker is never used. One process builds it while the others on the machine wait on a file lock.

What was trained is that dequantized model: the run records the file's sha256 (`base_model.json` in output_dir and
final/, and in every checkpoint), `ft export` merges onto the same dequantized weights, and a GGUF that changed
since training is refused by resume and export alike.

Nothing here dequantizes to read shapes: `gguf_header` reads the metadata and the tensor table only (`ft plan`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftcore.cache import cache_dir
from ftcore.durable import atomic_write_text, fsync_tree

GGUF_SUFFIX = ".gguf"
MARKER = "ft_gguf.json"
BASE_RECORD = "base_model.json"  # beside a run (output_dir), its final/ and the export: which GGUF was trained on
_NATIVE_TYPES = ("F32", "F16", "BF16")  # read without dequantization


class GGUFError(ValueError):
    """A GGUF base that cannot be used, as one line naming the file and what is wrong."""


def _cache_root() -> Path:
    return cache_dir() / "gguf"


def gguf_file(name: str) -> Optional[Path]:
    """The .gguf file `name` points at (a .gguf path, or a directory with exactly one .gguf and no config.json);
    None when `name` is not a GGUF base. A directory with several .gguf files is an error naming them."""
    path = Path(name).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise GGUFError(f"{name} holds several .gguf files ({', '.join(p.name for p in found)}); name one of "
                            "them in model.name_or_path")
    return None


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) so a 40 GB file is hashed once, not on every start."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = _cache_root() / "sha256" / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, value)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return value


@dataclass
class GGUFHeader:
    """What a GGUF file says without reading its tensor data."""

    path: Path
    architecture: str
    tensor_types: dict[str, str]  # GGUF tensor name -> ggml type name (Q4_K, F32, ...)
    shapes: dict[str, tuple[int, ...]]  # GGUF tensor name -> shape in PyTorch order
    chat_template: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)  # key -> value (the vocabulary arrays left out)

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type."""
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# GGUF metadata value types (the GGUF spec): fixed sizes as struct formats; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a GGUF file; arrays the header does not need are skipped, not parsed (a 262k-token
    vocabulary is three such arrays: gguf's GGUFReader builds an object per element, tens of seconds)."""

    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise _Truncated()
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        n = self.take("Q")
        data = self.f.read(n)
        if len(data) != n:
            raise _Truncated()
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        element, count = self.take("I"), self.take("Q")
        if not keep:  # skipped: fixed-size elements in one seek, strings one length at a time
            if element in _SCALARS:
                self.f.seek(struct.calcsize("<" + _SCALARS[element]) * count, 1)
            else:
                for _ in range(count):
                    self.value(element, False)
            return None
        return [self.value(element, True) for _ in range(count)]


def gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, read as the GGUF spec lays them out (magic, version, counts,
    key/value pairs, tensor infos); no tensor data is read. Errors are one line naming the file: not GGUF,
    truncated, an architecture or a quant type transformers cannot read."""
    if not path.is_file():
        raise GGUFError(f"model.name_or_path: {path} does not exist")
    from gguf import GGMLQuantizationType

    metadata: dict[str, Any] = {}
    tensors: list[tuple[str, tuple[int, ...], int]] = []
    try:
        with open(path, "rb") as f:
            cur = _Cursor(f)
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic at the start")
            version = cur.take("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (ft reads versions 2 and 3)")
            tensor_count, kv_count = cur.take("Q"), cur.take("Q")
            for _ in range(kv_count):
                key = cur.string()
                kind = cur.take("I")
                keep = not key.startswith("tokenizer.ggml.") or key.endswith(("_id", ".model", ".pre"))
                metadata[key] = cur.value(kind, keep)
            for _ in range(tensor_count):
                name = cur.string()
                dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
                kind = cur.take("I")
                cur.take("Q")  # data offset
                tensors.append((name, dims, kind))
    except _Truncated:
        raise GGUFError(f"{path}: not a readable GGUF file (it ends inside its header: truncated?)") from None
    except (ValueError, UnicodeError, struct.error) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise GGUFError(f"{path}: the GGUF metadata has no general.architecture")

    def type_name(kind: int) -> str:
        try:
            return GGMLQuantizationType(kind).name
        except ValueError:
            return f"type {kind}"

    template = metadata.get("tokenizer.chat_template")
    header = GGUFHeader(
        path=path, architecture=architecture, tensor_types={n: type_name(k) for n, _, k in tensors},
        # GGUF lists dimensions innermost first; PyTorch's order is the reverse.
        shapes={n: tuple(reversed(d)) for n, d, _ in tensors},
        chat_template=template if isinstance(template, str) else None, metadata=metadata)
    _check_readable(header)
    return header


def _check_readable(header: GGUFHeader) -> None:
    """An architecture or a tensor type that transformers' GGUF loader cannot turn into float weights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = (set(GGUF_SUPPORTED_ARCHITECTURES) | {"mistral"}) - {"general", "tokenizer"}  # (not architectures)
    if header.architecture not in supported:
        raise GGUFError(f"{header.path}: GGUF architecture {header.architecture!r} cannot be read by transformers "
                        f"{_transformers_version()} (it reads: {', '.join(sorted(supported))})")
    readable = {t.name for t in _type_traits} | set(_NATIVE_TYPES)
    unreadable = sorted({t for t in header.tensor_types.values() if t not in readable})
    if unreadable:
        example = next(n for n, t in header.tensor_types.items() if t == unreadable[0])
        known = sorted(t.name for t in GGMLQuantizationType if t.name in readable)
        raise GGUFError(f"{header.path}: quant type {', '.join(unreadable)} (e.g. tensor {example}) cannot be "
                        f"dequantized by gguf {_gguf_version()}; readable types: {', '.join(known)}")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def gguf_facts(path: Path) -> dict[str, Any]:
    """What training and preflight need from a GGUF's header: architecture, tensor types (counted), chat template,
    and the limits preflight checks (context length, attention heads) under config.json's names."""
    header = gguf_header(path)  # one-line errors for what cannot be read
    md, arch = header.metadata, header.architecture
    limits = {"max_position_embeddings": md.get(f"{arch}.context_length"),
              "num_attention_heads": md.get(f"{arch}.attention.head_count"),
              "num_key_value_heads": md.get(f"{arch}.attention.head_count_kv")}
    return {"architecture": arch, "tensor_types": header.type_counts(), "chat_template": header.chat_template,
            "config": {k: v for k, v in limits.items() if isinstance(v, int)}}


def hf_config_dict(path: Path) -> dict[str, Any]:
    """The transformers config (as config.json would hold it) that a GGUF file describes, from its metadata only:
    what `ft plan` builds on the meta device. transformers parses the whole metadata for it (tens of seconds with a
    262k-token vocabulary), so it is remembered per file (sha256) and transformers version."""
    gguf_header(path)  # one-line errors first
    memo = _cache_root() / "facts" / f"{file_sha256(path)[:16]}-config-transformers-{_transformers_version()}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    config.pop("quantization_config", None)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps(config))
    except OSError:  # a read-only cache only costs the parse next time
        pass
    return config


def _complete(directory: Path, sha256: str, dtype: str) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha256 and marker.get("dtype") == dtype


def dequantized_dir(path: Path, dtype: str) -> Path:
    """The safetensors model directory of the GGUF `path` in `dtype`, built on first use (one process per machine
    builds it; the others wait on a lock and then find it complete)."""
    if not path.is_file():
        raise GGUFError(f"model.name_or_path: {path} does not exist")
    sha256 = file_sha256(path)
    target = _cache_root() / f"{sha256[:16]}-{dtype}"
    if _complete(target, sha256, dtype):
        return target
    facts = gguf_facts(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target, sha256, dtype):  # another process built it while this one waited
            return target
        if target.exists():  # a copy without a matching marker: half-written or from another file; never used
            shutil.rmtree(target)
        print(f"dequantizing {path.name} ({facts['architecture']}, "
              + ", ".join(f"{n} {t}" for t, n in facts["tensor_types"].items())
              + f") to {dtype} safetensors in {target} (once per file and dtype)", flush=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _dequantize_into(path, facts.get("chat_template"), dtype, staging)
            atomic_write_text(staging / MARKER, json.dumps(
                {"source": str(path.resolve()), "sha256": sha256, "dtype": dtype,
                 "architecture": facts["architecture"], "tensor_types": facts["tensor_types"]}, indent=1))
            fsync_tree(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize_into(path: Path, chat_template: Optional[str], dtype: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcore.dtypes import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if chat_template:  # transformers' GGUF tokenizer conversion leaves the template out
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=DTYPES[dtype])
    # The weights are plain float tensors now; only the loader's bookkeeping says "gguf", and it refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(path)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise GGUFError(f"dequantizing {path}: no weights were written to {out}")


def write_base_record(directory: Path, record: Optional[dict]) -> None:
    """Write `record` as directory/base_model.json (atomic); nothing when the base is not a GGUF."""
    if record:
        atomic_write_text(directory / BASE_RECORD, json.dumps(record, indent=1))


def read_base_record(*directories: Path) -> Optional[dict]:
    """The first base_model.json found in `directories`."""
    for d in directories:
        try:
            return json.loads((d / BASE_RECORD).read_text())
        except (OSError, ValueError):
            continue
    return None

