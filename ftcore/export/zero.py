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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

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


@dataclass
class ParamSlot:
    name: str
    shape: torch.Size
    numel: int
    group: int = 0
    offset: int = 0  # ZeRO-1/2: in the group's full vector; ZeRO-3: in each rank's flat vector (fragment start)
    fragment: int = 0  # ZeRO-3: elements per rank


class ZeroCheckpoint:
    def __init__(self, path: Path):
        engine_dir = path / "engine" if (path / "engine").is_dir() else path
        self.dir = engine_dir
        model_files = sorted(engine_dir.glob("*_model_states.pt"), key=_natural)
        if not model_files:
            raise ConsolidationError(f"{path}: no DeepSpeed *_model_states.pt (not a training checkpoint)")
        self.model_files = model_files
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
            meta = _load(self.optim_files[0])[OPTIM_KEY]
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
            self.group_sizes = [t.numel() for t in meta[key]]
            self.paddings = meta.get("param_alignment_paddings")
            del meta
        self.slots = self._layout(groups)
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
        return list(self.buffers) + list(self.frozen_shapes) + [s.name for s in self.slots]

    def shapes(self) -> dict[str, torch.Size]:
        out = {k: v.shape for k, v in self.buffers.items()}
        out.update({k: torch.Size(v) for k, v in self.frozen_shapes.items()})
        out.update({s.name: s.shape for s in self.slots})
        return out

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
        for name, shape in self.frozen_shapes.items():
            parts = [_load(f)["frozen_param_fragments"][name].clone() for f in self.model_files]
            yield name, torch.cat(parts).narrow(0, 0, math.prod(shape)).view(shape)

    def _gather(self, batch: list[ParamSlot]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.stage == 0:
            module = _load(self._module_file)["module"]
            for slot in batch:
                yield slot.name, module[slot.name].float().clone().view(slot.shape)
            return
        if self.stage == 3:
            out = {s.name: torch.empty(s.fragment * self.world_size) for s in batch}
            for rank, path in enumerate(self.optim_files):
                flat = _load(path)[OPTIM_KEY]["fp32_flat_groups"]
                bounds = [0]
                for t in flat:
                    bounds.append(bounds[-1] + t.numel())
                for s in batch:
                    dest = out[s.name][rank * s.fragment:(rank + 1) * s.fragment]
                    _copy_span(flat, bounds, s.offset, s.fragment, dest)
                del flat
            for s in batch:
                yield s.name, out[s.name][: s.numel].view(s.shape)
            return
        out = {s.name: torch.empty(s.numel) for s in batch}
        for rank, path in enumerate(self.optim_files):
            wanted = [s for s in batch if _overlap(s, rank, self.group_sizes[s.group])]
            if not wanted:
                continue  # ZeRO-1/2 ranks hold contiguous ranges: most files are not needed for a batch
            parts = _load(path)[OPTIM_KEY]["single_partition_of_fp32_groups"]
            for s in wanted:
                length = self.group_sizes[s.group]
                lo, hi = max(s.offset, rank * length), min(s.offset + s.numel, (rank + 1) * length)
                out[s.name][lo - s.offset:hi - s.offset] = parts[s.group][lo - rank * length:hi - rank * length]
            del parts
        for s in batch:
            yield s.name, out[s.name].view(s.shape)


def _overlap(slot: ParamSlot, rank: int, length: int) -> bool:
    return slot.offset < (rank + 1) * length and slot.offset + slot.numel > rank * length


def _copy_span(groups: list[torch.Tensor], bounds: list[int], start: int, count: int, dest: torch.Tensor) -> None:
    """dest[:] = concat(groups)[start:start+count], touching only the groups it spans."""
    written = 0
    for g, tensor in enumerate(groups):
        lo, hi = max(start, bounds[g]), min(start + count, bounds[g + 1])
        if lo < hi:
            dest[written:written + hi - lo] = tensor[lo - bounds[g]:hi - bounds[g]]
            written += hi - lo
    if written != count:
        raise ConsolidationError(f"ZeRO-3 fragment [{start}, {start + count}) lies outside the flat partitions")


def lora_state_to_adapter(state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT module parameter names (`...lora_A.default.weight`) -> saved adapter names (`...lora_A.weight`)."""
    return {k.replace(f".{adapter_name}.", ".").replace(f".{adapter_name}", ""): v for k, v in state.items()}


def find_engine_dir(checkpoint: Path) -> Optional[Path]:
    for candidate in (checkpoint / "engine", checkpoint):
        if any(candidate.glob("*_model_states.pt")):
            return candidate
    return None
