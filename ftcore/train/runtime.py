"""The process's place in the run, built once before anything else: rank, world, device, the accelerate
Accelerator with ft's DeepSpeed config, and the few collectives the recipe's components use. Components get their
config section and this object, never loose arguments or their own calls into torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from rich.console import Console

from ftcore.config import Config, DistributedConfig
from ftcore.dist_env import DistEnvError, ensure_process_env
from ftcore.ds_config import build_ds_config, build_inference_ds_config
from ftcore.errors import TrainError
from ftcore.launch_settings import LaunchSettingsError, prepare_accelerate_env
from ftcore.preflight import model_config_json

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass
class Runtime:
    """Rank, world and device of this process, with the engine's accelerator and DeepSpeed config."""

    rank: int
    world_size: int
    device: torch.device
    cuda: bool
    accelerator: Any
    ds_config: dict
    console: Console = field(default_factory=Console)
    # Under ZeRO-3 transformers reads this while loading the base (it must stay alive until then).
    hf_ds_config: Optional[Any] = None
    # distributed.sequence_parallel: groups of this many consecutive ranks split each sample's tokens.
    sequence_parallel: int = 1
    backend: str = "gloo"  # the process group's (nccl on CUDA; none: one process that joined no world)

    @property
    def data_rank(self) -> int:
        """Which data-parallel group this rank is in: the ranks of a sequence group read the same samples."""
        return self.rank // self.sequence_parallel

    @property
    def data_world(self) -> int:
        """How many data-parallel groups there are (world size / sequence parallel degree)."""
        return self.world_size // self.sequence_parallel

    @property
    def sequence_rank(self) -> int:
        """Which part of each sample's tokens this rank holds within its sequence group."""
        return self.rank % self.sequence_parallel

    @property
    def synced_forwards(self) -> bool:
        """Is every forward a collective (ZeRO-3 over several ranks gathers each layer from all of them)? Then a
        generate must keep the ranks stepping together (synced_gpus) and every rank must call it as often."""
        return self.world_size > 1 and self.ds_config.get("zero_optimization", {}).get("stage") == 3

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes run-level files and prints."""
        return self.rank == 0

    @property
    def device_name(self) -> str:
        """What the MFU and dtype messages call this device."""
        return torch.cuda.get_device_name() if self.cuda else "the CPU"

    def log(self, message: str) -> None:
        """Print on rank 0, one whole line in captured logs however long."""
        if self.is_main:
            self.console.print(message, soft_wrap=True)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of a few numbers over all ranks, in float64."""
        if self.world_size == 1:  # every step calls this: skip the no-op collective (and its device copy)
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=_OPS[op])
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank (bounded by distributed.timeout_s like every collective)."""
        if self.world_size > 1:
            dist.barrier()


def leave_world() -> None:
    """Tear the process group down (at the end of a job, also on an error): a rank that exits with it alive can
    hang in the interpreter's teardown waiting for peers that have gone."""
    if dist.is_initialized():
        dist.destroy_process_group()


def start_runtime(cfg: Config, model_dir: str) -> Runtime:
    """Join the process group and build the Accelerator on DeepSpeed with the config ft derives from `cfg`. The
    environment (RANK, WORLD_SIZE, ...) is already there: a launcher's, or ensure_process_env's for one process."""
    cuda = torch.cuda.is_available()
    expected = int(os.environ["WORLD_SIZE"])
    try:
        ds_config = build_ds_config(cfg.train, cfg.optimizer, cfg.distributed, cfg.model.dtype, cuda, expected,
                                    _hidden_size(model_dir))
    except LaunchSettingsError as e:
        raise TrainError(str(e)) from None
    return _join_world(cfg.distributed, ds_config, cfg.model.mixed_precision, cfg.train.grad_accum_steps, cuda,
                       expected)


def start_inference_runtime(dist_cfg: DistributedConfig, model_dir: str) -> Runtime:
    """The Runtime of a forward-only job (ft eval) on the ranks a launcher started: the same process group
    (backend, distributed.timeout_s, world-size check) and Accelerator as training, on the forward-only DeepSpeed
    config of distributed.zero_stage (build_inference_ds_config; ZeRO-3: from_pretrained loads straight into
    partitioned parameters). One process without a launcher joins no world."""
    if "WORLD_SIZE" in os.environ:
        try:
            ensure_process_env()  # a launcher's environment, complete (else one line saying what is missing)
        except DistEnvError as e:
            raise TrainError(str(e)) from None
    cuda = torch.cuda.is_available()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = build_inference_ds_config(dist_cfg, cuda, expected, _hidden_size(model_dir))
    if expected == 1 and dist_cfg.zero_stage == 0:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Runtime(rank=0, world_size=1, device=device, cuda=cuda, accelerator=None, ds_config=ds_config,
                       backend="none")
    return _join_world(dist_cfg, ds_config, "no", 1, cuda, expected)


def _hidden_size(model_dir: str) -> Optional[int]:
    hidden = (model_config_json(model_dir) or {}).get("hidden_size")
    return hidden if isinstance(hidden, int) else None


def _join_world(dist_cfg: DistributedConfig, ds_config: dict, mixed_precision: str, grad_accum_steps: int,
                cuda: bool, expected: int) -> Runtime:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    backend = _backend(dist_cfg, cuda)
    try:
        # Whichever accelerate launcher started this (or none), the run is DeepSpeed with the config above.
        prepare_accelerate_env(os.environ, mixed_precision, cuda)
    except LaunchSettingsError as e:
        raise TrainError(str(e)) from None
    hf_ds_config = None
    if dist_cfg.zero_stage == 3:
        # Must exist before from_pretrained: transformers then loads straight into partitioned parameters.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    timeout = _set_collective_timeout(dist_cfg.timeout_s)
    # The explicit process group backend matters on CPU: without it accelerate reports a world of 1 on
    # every rank (each would think it is the main process and read the same data).
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
        gradient_accumulation_steps=grad_accum_steps,
        mixed_precision=mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)],
    )
    world = accelerator.num_processes
    if not dist.is_initialized() or dist.get_world_size() != expected or world != expected:
        raise TrainError(
            f"world size mismatch: WORLD_SIZE={expected}, torch.distributed="
            f"{dist.get_world_size() if dist.is_initialized() else 'not initialised'}, accelerate={world}")
    return Runtime(rank=accelerator.process_index, world_size=world, device=accelerator.device, cuda=cuda,
                   accelerator=accelerator, ds_config=ds_config, hf_ds_config=hf_ds_config,
                   sequence_parallel=dist_cfg.sequence_parallel, backend=backend)


def _backend(dist_cfg: DistributedConfig, cuda: bool) -> str:
    backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise TrainError("distributed.backend=nccl needs CUDA GPUs; this machine has none (use auto or gloo)")
    return backend


def _set_collective_timeout(seconds: int) -> timedelta:
    """Hung-peer watchdog: every process group must time out after distributed.timeout_s. DeepSpeed makes its
    data-parallel group with new_group(), which takes torch's module default (30 min), not the timeout the world
    group got; so the module default is set too, before any group exists."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(distributed_c10d.default_pg_nccl_timeout, timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout
