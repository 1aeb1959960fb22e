"""data.audit: what each rank saw and held, written under output_dir/audit/ for tests and investigations.

    rank{R}.jsonl        one line per optimizer step: the samples and stream positions this rank trained on,
                         its trained tokens and the step's loss (a resumed run must continue it exactly)
    rank{R}_world.json   world size as accelerate and torch.distributed see it, local parameter elements (ZeRO-3:
                         a partition), packed 4-bit weights, optimizer groups with their rates
    rank{R}_memory.json  bytes the engine holds after the first optimizer step (what `ft plan` predicts), and the
                         process's RSS before the model was loaded, after that step, and at its peak so far

Off (the default), every method returns at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcore.metrics import drop_partial_line
from ftcore.run_dir import RunDir


class Audit:
    """The audit files of one rank; a no-op unless `enabled`."""

    def __init__(self, output_dir: Path, rank: int, enabled: bool, rss_before_model_gib: float = 0.0):
        self.directory, self.rank, self.enabled = RunDir(output_dir).audit, rank, enabled
        # This process's RSS before the model was loaded: what the model, engine and a step add is measured from
        # here (ft plan's per-rank prediction, on a CPU run).
        self.rss_before_model = rss_before_model_gib

    def start(self, accelerator: Any, engine: Any, total_params: int, group_names: list[list[str]]) -> None:
        """Record this rank's world and parameters; a killed attempt's half-written last line is dropped so
        the next line never glues onto it."""
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_world(accelerator, engine, total_params, group_names)
        drop_partial_line(self._log())

    def step(self, record: dict) -> None:
        """Append one optimizer step's record."""
        if not self.enabled:
            return
        with open(self._log(), "a") as f:
            f.write(json.dumps(record) + "\n")

    def engine_memory(self, engine: Any, unwrapped: Any) -> None:
        """Bytes DeepSpeed's engine holds on this rank after the first optimizer step (when the optimizer states
        exist): parameter storage (ZeRO-3: the partitions) and optimizer states (fp32 master partitions + AdamW
        moments). `ft plan` predicts both; a test compares."""
        if not self.enabled:
            return
        params = list(unwrapped.parameters())
        param_bytes = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in params)
        zero_optimizer = engine.optimizer
        masters = (getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
                   or getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [])
        inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
        moments = sum(t.nbytes for state in inner.state.values() for k, t in state.items()
                      if k in ("exp_avg", "exp_avg_sq"))
        import resource

        import psutil

        record = {"rank": self.rank, "param_bytes": param_bytes,
                  "optimizer_bytes": sum(t.nbytes for t in masters) + moments,
                  "master_bytes": sum(t.nbytes for t in masters), "moment_bytes": moments,
                  "rss_before_model_gib": self.rss_before_model,
                  "rss_after_first_step_gib": psutil.Process().memory_info().rss / 2**30,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
        (self.directory / f"rank{self.rank}_memory.json").write_text(json.dumps(record))

    def _write_world(self, accelerator: Any, engine: Any, total_params: int, group_names: list[list[str]]) -> None:
        import torch.distributed as dist

        params = list(accelerator.unwrap_model(engine).parameters())
        quantized = [p for p in params if getattr(p, "quant_state", None) is not None]
        groups = engine.lr_scheduler.optimizer.param_groups
        record = {"rank": self.rank, "accelerate_num_processes": accelerator.num_processes,
                  "accelerate_process_index": accelerator.process_index,
                  "dist_world_size": dist.get_world_size(),
                  "local_param_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                           for p in params),
                  "full_param_numel": total_params, "quantized_params": len(quantized),
                  "quantized_local_bytes": sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes
                                               for p in quantized),
                  "quantized_full_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                              for p in quantized),
                  "quantized_storage_dtype": str(quantized[0].dtype) if quantized else None,
                  "quant_types": sorted({f"{p.quant_state.quant_type}{'+double' if p.quant_state.nested else ''}"
                                         for p in quantized}),
                  "optimizer_groups": [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                                        "names": names} for g, names in zip(groups, group_names)]}
        (self.directory / f"rank{self.rank}_world.json").write_text(json.dumps(record))

    def _log(self) -> Path:
        return self.directory / f"rank{self.rank}.jsonl"
