"""Out-of-core consolidation of a DeepSpeed ZeRO checkpoint's fp32 master weights.

DeepSpeed's zero_to_fp32 loads every rank's partitions and concatenates them, so it needs the whole fp32 model
(and more) in RAM. Here parameters are produced in batches of at most `budget` bytes: for each batch, each rank's
optimizer file is memory-mapped in turn, only the slices that batch needs are copied out, and the file is
released before the next one. Peak memory is about one batch, whatever the model size or world size.

The layouts are DeepSpeed's (and the result is checked bit-exact against zero_to_fp32 in the tests):
- ZeRO-1/2: per param group, rank r holds elements [r*L, (r+1)*L) of the group's flat fp32 vector, whose
  parameters are laid end to end in `param_shapes` order (plus per-parameter alignment padding, when recorded).
- ZeRO-3: every parameter is split into world_size fragments of ceil(numel / world) elements; rank r's flat
  vector holds its fragment of each parameter, end to end in `param_shapes` order.
- ZeRO-0: no partitions; the weights are the module state in the model-states file.

Files are read through TorchFileReader: the pickle once, then only the slices a batch needs, with seeks.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

OPTIM_KEY = "optimizer_state_dict"


class ConsolidationError(ValueError):
    """A checkpoint that cannot be consolidated (missing ranks, not a DeepSpeed checkpoint); one line."""


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError/EOFError/UnpicklingError
        raise ConsolidationError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None


class _TensorRef:
    """Where a tensor's elements lie in a torch.save zip file (not loaded)."""

    __slots__ = ("key", "dtype", "offset", "shape")

    def __init__(self, storage: tuple, offset: int, shape: tuple, stride: tuple):
        # storage is torch's persistent id: ('storage', storage class, key, location, numel)
        with warnings.catch_warnings():  # the legacy storage classes warn on attribute access
            warnings.simplefilter("ignore")
            dtype = storage[1].dtype
        self.key, self.dtype, self.offset, self.shape = storage[2], dtype, offset, tuple(shape)
        expected = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        if len(shape) and tuple(stride) != expected:
            raise ConsolidationError("a non-contiguous tensor in a DeepSpeed checkpoint (unexpected layout)")

    def numel(self) -> int:
        return math.prod(self.shape)


class _RefUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: _TensorRef(storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, new_type, args, state: func(*args)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return pid


class TorchFileReader:
    """Reads slices of the tensors in a torch.save (zip) file with plain seeks: the pickle is parsed once into
    references, and only the elements asked for are read, into memory the caller owns. (torch.load's mmap keeps
    touched pages resident until the whole file is released, so a consolidation through it grows with the model.)
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            pkl = next(n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            self.root = pkl[: -len("data.pkl")]
            with self.zip.open(pkl) as f:
                self.obj = _RefUnpickler(f).load()
        except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, OSError) as e:
            raise ConsolidationError(f"{path}: unreadable or truncated checkpoint file ({type(e).__name__})") from None
        self.handle = open(path, "rb")
        self._data_start: dict[str, int] = {}

    def _start(self, key: str) -> int:
        if key not in self._data_start:
            info = self.zip.getinfo(f"{self.root}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ConsolidationError(f"{self.path}: compressed tensor data (not written by torch.save)")
            self.handle.seek(info.header_offset)
            header = self.handle.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._data_start[key] = info.header_offset + 30 + name_len + extra_len
        return self._data_start[key]

    def read_into(self, ref: _TensorRef, start: int, out: torch.Tensor) -> None:
        """out[:] = flattened ref[start:start + out.numel()]"""
        count = out.numel()
        if start < 0 or start + count > ref.numel():
            raise ConsolidationError(f"{self.path}: slice [{start}, {start + count}) outside a tensor of "
                                     f"{ref.numel()} elements")
        if out.dtype != ref.dtype:
            raise ConsolidationError(f"{self.path}: expected {out.dtype} data, found {ref.dtype}")
        itemsize = ref.dtype.itemsize
        self.handle.seek(self._start(ref.key) + (ref.offset + start) * itemsize)
        got = self.handle.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) if count else 0
        if got != count * itemsize:
            raise ConsolidationError(f"{self.path}: truncated (tensor data ends early)")

    def read(self, ref: _TensorRef) -> torch.Tensor:
        """The whole tensor `ref` points at."""
        out = torch.empty(ref.shape, dtype=ref.dtype)
        self.read_into(ref, 0, out)
        return out

    def close(self) -> None:
        """Close the file."""
        self.handle.close()
        self.zip.close()


@dataclass
class ParamSlot:
    """One parameter's place in DeepSpeed's flat fp32 partitions."""
    name: str
    shape: torch.Size
    numel: int
    group: int = 0
    offset: int = 0  # ZeRO-1/2: in the group's full vector; ZeRO-3: in each rank's flat vector (fragment start)
    fragment: int = 0  # ZeRO-3: elements per rank


class ZeroCheckpoint:
    """A DeepSpeed ZeRO checkpoint read out of core: parameters come back in batches of bounded size."""
    def __init__(self, path: Path):
        engine_dir = path / "engine" if (path / "engine").is_dir() else path
        self.dir = engine_dir
        model_files = sorted(engine_dir.glob("*_model_states.pt"), key=_natural)
        if not model_files:
            raise ConsolidationError(f"{path}: no DeepSpeed *_model_states.pt (not a training checkpoint)")
        self.model_files = model_files
        self._readers: dict[Path, TorchFileReader] = {}
        self.optim_files = sorted(engine_dir.glob("*_optim_states.pt"), key=_natural)
        states = _load(model_files[0])
        if "param_shapes" not in states:
            raise ConsolidationError(f"{model_files[0]}: not a DeepSpeed model-states file")
        module = states["module"]
        buffer_names = set(states.get("buffer_names") or [])
        self.buffers = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in module.items()
                        if k in buffer_names}
        self.shared = dict(states.get("shared_params") or {})
        self.frozen_shapes = states.get("frozen_param_shapes") or {}
        groups = states["param_shapes"]
        if not self.optim_files:
            self.stage, self.world_size = 0, 1
            self._module_file = model_files[0]
            # ZeRO-0 records no param_shapes: the parameters are the module state minus its buffers.
            groups = [{k: v.shape for k, v in module.items() if k not in buffer_names}]
            self.group_sizes, self.paddings = [], None
        else:
            meta = self._reader(self.optim_files[0]).obj[OPTIM_KEY]
            self.stage = int(meta.get("zero_stage", 1))
            count = meta.get("partition_count", len(self.optim_files))
            self.world_size = max(count) if isinstance(count, list) else int(count)
            found = {int(m.group(1)) for f in self.optim_files if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
            missing = sorted(set(range(self.world_size)) - found)
            if missing or len(self.optim_files) != self.world_size:
                raise ConsolidationError(
                    f"{engine_dir}: written by {self.world_size} ranks, but the optimizer state of rank(s) "
                    f"{', '.join(map(str, missing)) or '?'} is missing ({len(self.optim_files)} files)")
            key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
            self.group_sizes = [ref.numel() for ref in meta[key]]
            self.paddings = meta.get("param_alignment_paddings")
            del meta
        self.slots = self._layout(groups)
        self._slot_by_name = {s.name: s for s in self.slots}
        del states, module

    def _layout(self, groups: list[dict]) -> list[ParamSlot]:
        slots = []
        if self.stage == 3:
            offset = 0
            for g, shapes in enumerate(groups):
                for name, shape in shapes.items():
                    numel = math.prod(shape)
                    fragment = math.ceil(numel / self.world_size)
                    slots.append(ParamSlot(name, torch.Size(shape), numel, g, offset, fragment))
                    offset += fragment
            return slots
        for g, shapes in enumerate(groups):
            offset = 0
            pads = self.paddings[g] if self.paddings is not None and self.stage else None
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                slots.append(ParamSlot(name, torch.Size(shape), numel, g, offset))
                offset += numel + (pads[i] if pads is not None else 0)
        return slots

    # ------------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor name, in the model's order."""
        return list(self.buffers) + list(self.frozen_shapes) + [s.name for s in self.slots]

    def shapes(self) -> dict[str, torch.Size]:
        """Every tensor's shape."""
        out = {k: v.shape for k, v in self.buffers.items()}
        out.update({k: torch.Size(v) for k, v in self.frozen_shapes.items()})
        out.update({s.name: s.shape for s in self.slots})
        return out

    def read(self, name: str) -> torch.Tensor:
        """One fp32 buffer or trainable parameter by name, reading only the spans that hold it (frozen parameters
        are stored whole per rank file: read them with iter_tensors)."""
        if name in self.buffers:
            return self.buffers[name]
        slot = self._slot_by_name.get(name)
        if slot is None:
            raise ConsolidationError(f"{self.dir}: no parameter {name} in the checkpoint")
        return next(iter(self._gather([slot])))[1]

    def iter_tensors(self, budget_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fp32 tensor) for buffers, frozen parameters, then trainable parameters, in batches."""
        yield from self.buffers.items()
        yield from self._frozen()
        batch: list[ParamSlot] = []
        size = 0
        for slot in self.slots:
            if batch and size + slot.numel * 4 > budget_bytes:
                yield from self._gather(batch)
                batch, size = [], 0
            batch.append(slot)
            size += slot.numel * 4
        if batch:
            yield from self._gather(batch)

    def _frozen(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.frozen_shapes:
            return
        if self.stage <= 2:
            fragments = _load(self.model_files[0]).get("frozen_param_fragments", {})
            for name in self.frozen_shapes:
                yield name, fragments[name].clone()
            return
        per_rank = [_load(f)["frozen_param_fragments"] for f in self.model_files]  # each file opened once
        for name, shape in self.frozen_shapes.items():
            parts = [fragments[name] for fragments in per_rank]
            yield name, torch.cat(parts).narrow(0, 0, math.prod(shape)).view(shape)

    def _reader(self, path: Path) -> TorchFileReader:
        if path not in self._readers:
            self._readers[path] = TorchFileReader(path)
        return self._readers[path]

    def _gather(self, batch: list[ParamSlot]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.stage == 0:
            module = self._reader(self._module_file).obj["module"]
            for slot in batch:
                ref = module[slot.name]
                tensor = self._reader(self._module_file).read(ref)
                yield slot.name, tensor.float().view(slot.shape)
            return
        if self.stage == 3:
            out = {s.name: torch.empty(s.fragment * self.world_size) for s in batch}
            for rank, path in enumerate(self.optim_files):
                reader = self._reader(path)
                flat = reader.obj[OPTIM_KEY]["fp32_flat_groups"]
                bounds = [0]
                for ref in flat:
                    bounds.append(bounds[-1] + ref.numel())
                for s in batch:
                    dest = out[s.name][rank * s.fragment:(rank + 1) * s.fragment]
                    _copy_span(reader, flat, bounds, s.offset, s.fragment, dest)
            for s in batch:
                yield s.name, out[s.name][: s.numel].view(s.shape)
            return
        out = {s.name: torch.empty(s.numel) for s in batch}
        for rank, path in enumerate(self.optim_files):
            wanted = [s for s in batch if _overlap(s, rank, self.group_sizes[s.group])]
            if not wanted:
                continue  # ZeRO-1/2 ranks hold contiguous ranges: most files are not needed for a batch
            reader = self._reader(path)
            parts = reader.obj[OPTIM_KEY]["single_partition_of_fp32_groups"]
            for s in wanted:
                length = self.group_sizes[s.group]
                lo, hi = max(s.offset, rank * length), min(s.offset + s.numel, (rank + 1) * length)
                reader.read_into(parts[s.group], lo - rank * length, out[s.name][lo - s.offset:hi - s.offset])
        for s in batch:
            yield s.name, out[s.name].view(s.shape)


def _overlap(slot: ParamSlot, rank: int, length: int) -> bool:
    return slot.offset < (rank + 1) * length and slot.offset + slot.numel > rank * length


def _copy_span(reader: TorchFileReader, groups: list, bounds: list[int], start: int, count: int,
               dest: torch.Tensor) -> None:
    """dest[:] = concat(groups)[start:start+count], reading only the groups it spans."""
    written = 0
    for g, ref in enumerate(groups):
        lo, hi = max(start, bounds[g]), min(start + count, bounds[g + 1])
        if lo < hi:
            reader.read_into(ref, lo - bounds[g], dest[written:written + hi - lo])
            written += hi - lo
    if written != count:
        raise ConsolidationError(f"ZeRO-3 fragment [{start}, {start + count}) lies outside the flat partitions")


def lora_state_to_adapter(state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT module parameter names (`...lora_A.default.weight`, a classification head's
    `score.modules_to_save.default.weight`) -> saved adapter names (`...lora_A.weight`, `score.weight`)."""
    return {k.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")
            .replace(f".{adapter_name}", ""): v for k, v in state.items()}
