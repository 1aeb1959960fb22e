"""The fine-tuning recipe: full or LoRA fine-tuning of a causal LM on accelerate + DeepSpeed ZeRO 0-3.

Features
    - Full fine-tuning or LoRA (peft) on every linear layer or chosen modules.
    - DeepSpeed ZeRO 0/1/2/3 with optional CPU offload; the DeepSpeed config is derived from this run's typed
      config (ftcore/ds_config.py), never written by hand.
    - Non-reentrant gradient checkpointing (works with LoRA: input grads are enabled).
    - Cosine schedule with linear warmup, AdamW, gradient clipping, gradient accumulation.
    - Loss normalised by the number of trained tokens in the whole optimizer step (all micro batches, all ranks),
      so accumulation and data parallelism give the same gradient as one big batch.
    - Eval loss and perplexity every train.eval_every steps and at the end.
    - Checkpoints every checkpoint.every_steps and at the end; automatic resume from output_dir.

Effective batch (samples per optimizer step)
    train.micro_batch_size * train.grad_accum_steps * world_size

Resume
    A run restarted with the same output_dir resumes from the newest complete checkpoint (`--resume PATH` picks
    one, `--resume none` starts fresh). Engine state (weights, optimizer, scheduler), step, every rank's data
    position and RNG are restored, so at the same world size the resumed losses equal the uninterrupted ones.
    A checkpoint written under a different config or world size is refused with the differences listed.

Commands
    workstation, 2 processes:   ft launch examples/demo.yaml --nproc 2
    already-started processes:  ft train examples/demo.yaml          (plain python, torchrun, accelerate launch)
    override any field:         ft launch cfg.yaml --nproc 8 --set train.lr=1e-4 --set distributed.zero_stage=3
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from rich.console import Console

from ftcore.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from ftcore.config import Config, dump_config
from ftcore.data.stream import (Batch, DataError, TrainStream, discover_labels, eval_batches, pad_eval_batches,
                                restore_states)
from ftcore.dist_env import DistEnvError, ensure_process_env
from ftcore.ds_config import build_ds_config
from ftcore.durable import fsync_tree, remove_leftovers, replace_dir
from ftcore.launch_settings import LaunchSettingsError, prepare_accelerate_env
from ftcore.metrics import (FlopCounter, MetricsSink, classification_scores, drop_partial_line, memory_now,
                            peak_flops_per_device, write_summary)
from ftcore.preemption import Preempted, stop_signal
from ftcore.preflight import check_device, check_inputs
from ftcore.builtin import resolve_model_path
from ftcore.model import (block_depths, classification_head_kwargs, count_parameters, expected_lora_shapes,
                          load_model, load_tokenizer, optimizer_grouping)

# Fields that must match between a checkpoint and the run resuming it (anything else may change, e.g. logging).
# How the effective batch is split (micro batch, accumulation, world size) may change: the data stream and the
# optimizer state carry over; the effective batch itself is checked separately.
FINGERPRINT_FIELDS = (
    "task", "model.name_or_path", "model.dtype", "adapter", "data.train", "data.labels", "data.max_seq_len", "data.train_on",
    "data.overflow", "data.packing", "data.packing_buffer", "data.on_error", "data.shuffle", "train.max_steps",
    "train.lr", "train.weight_decay", "train.warmup_steps", "train.seed", "train.layer_lr_decay", "train.base_kl",
    "distributed.zero_stage",
)


class TrainError(RuntimeError):
    """A failure of the run with its reason (wrong world size, non-finite loss, bad checkpoint...)."""


def config_fingerprint(cfg: Config) -> dict:
    dumped = cfg.model_dump(mode="json")
    out = {}
    for dotted in FINGERPRINT_FIELDS:
        node: Any = dumped
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def _fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Fields that differ. A field the checkpoint does not record (it was added to ft after that checkpoint was
    written) counts as its default, so a run upgraded mid-way resumes unless it changes that field."""
    defaults = config_fingerprint(Config())
    return [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, this run {current[k]!r}" for k in current
            if saved.get(k, defaults[k]) != current[k]]


class Recipe:
    """Setup in dependency order (distributed -> seed -> tokenizer/data -> model -> optimizer/schedule ->
    engine -> checkpointer -> resume), then a small train loop."""

    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        self.resume_arg = resume
        self.output_dir = Path(cfg.output_dir)
        self.console = Console()
        self.step = self.first_step = 0  # first_step: where this process started (a resume's checkpoint step)
        self.tokens_seen = 0
        self.trained_tokens_seen = 0

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self.checkpoints = CheckpointManager(self.output_dir, self.cfg.checkpoint.keep_last, self.rank,
                                             self.world_size)
        self._maybe_resume()

    def _setup_distributed(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed

        try:
            ensure_process_env()
        except DistEnvError as e:
            raise TrainError(str(e)) from None
        cfg = self.cfg
        check_inputs(cfg, world_size=int(os.environ["WORLD_SIZE"]))
        # Before the process group exists: a built-in model is materialised here (transformers saves weights on
        # distributed rank 0 only, so building after init would leave other ranks' copies without weights).
        self.model_dir = resolve_model_path(cfg.model.name_or_path)
        self.cuda = torch.cuda.is_available()
        check_device(cfg, self.cuda, self.cuda and torch.cuda.is_bf16_supported(),
                     torch.cuda.get_device_name() if self.cuda else "the CPU")
        backend = cfg.distributed.backend if cfg.distributed.backend != "auto" else ("nccl" if self.cuda else "gloo")
        if backend == "nccl" and not self.cuda:
            raise TrainError("distributed.backend=nccl needs CUDA GPUs; this machine has none (use auto or gloo)")
        from ftcore.preflight import model_config_json

        hidden = (model_config_json(self.model_dir) or {}).get("hidden_size")
        try:
            self.ds_config = build_ds_config(cfg.train, cfg.distributed, cfg.model.dtype, self.cuda,
                                             int(os.environ["WORLD_SIZE"]), hidden if isinstance(hidden, int) else None)
            # Whichever accelerate launcher started this (or none), the run is DeepSpeed with the config above.
            prepare_accelerate_env(os.environ, cfg.model.mixed_precision, self.cuda)
        except LaunchSettingsError as e:
            raise TrainError(str(e)) from None
        if cfg.distributed.zero_stage == 3:
            # Must exist before from_pretrained: transformers then loads straight into partitioned parameters.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        # Hung-peer watchdog: every process group must time out after distributed.timeout_s. DeepSpeed makes its
        # data-parallel group with new_group(), which takes torch's module default (30 min), not the timeout the
        # world group got; so the module default is set too, before any group exists.
        timeout = timedelta(seconds=cfg.distributed.timeout_s)
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        if isinstance(distributed_c10d.default_pg_nccl_timeout, timedelta):
            distributed_c10d.default_pg_nccl_timeout = timeout
        # The explicit process group backend matters on CPU: without it accelerate reports a world of 1 on
        # every rank (each would think it is the main process and read the same data).
        self.accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.ds_config),
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            mixed_precision=cfg.model.mixed_precision,
            kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)],
        )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        expected = int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized() or dist.get_world_size() != expected or self.world_size != expected:
            raise TrainError(
                f"world size mismatch: WORLD_SIZE={expected}, torch.distributed="
                f"{dist.get_world_size() if dist.is_initialized() else 'not initialised'}, "
                f"accelerate={self.world_size}")
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        set_seed(cfg.train.seed)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.model_dir)
        self.classification = cfg.task == "classification"
        if self.classification:
            # Recorded in the run's config (and so in checkpoints, final/ and the export's id2label).
            found = cfg.data.labels is None
            cfg.data.labels = discover_labels(cfg.data)
            self.log(f"classes ({len(cfg.data.labels)}{', found in the data' if found else ''}): "
                     + ", ".join(f"{i}={name}" for i, name in enumerate(cfg.data.labels)))
        self.train_stream = TrainStream(cfg.data, self.tokenizer, cfg.train.seed, self.rank, self.world_size,
                                        cfg.train.micro_batch_size)
        # Reads the first batch now: data with nothing to train on fails here, before the model is loaded.
        self.train_stream.prime()
        self.log("data.train: " + ", ".join(f"{g.spec_text} ({len(g):,} records in {len(g.files)} file"
                                            f"{'s' if len(g.files) > 1 else ''}, weight {g.weight:g})"
                                            for g in self.train_stream.groups))
        self.eval_set: list[Batch] = []
        if cfg.data.eval:
            mine = eval_batches(cfg.data, self.tokenizer, self.rank, self.world_size, cfg.train.micro_batch_size)
            most = torch.tensor([len(mine)], device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            self.eval_set = pad_eval_batches(mine, int(most.item()), self.train_stream.pad_id, self.classification)

    def _setup_model(self) -> None:
        cfg = self.cfg
        head = classification_head_kwargs(cfg.data.labels, self.train_stream.pad_id) if self.classification else None
        self.model = load_model(cfg.model, cfg.adapter, self.model_dir, self.cuda, cfg.train.seed,
                                zero_stage=cfg.distributed.zero_stage, device=self.device, classification=head)
        self.trainable, self.total_params = count_parameters(self.model)
        if self.trainable == 0:
            raise TrainError("no parameter requires grad: check adapter.target_modules")
        self.is_lora = cfg.adapter.method in ("lora", "qlora")  # an adapter is what trains and what is saved
        self.attn_implementation = self.model.config._attn_implementation
        architecture = (self.model.config.architectures or [type(self.model).__name__])[0]
        chosen = " (auto: the best this model supports here)" if cfg.model.attn_implementation == "auto" else ""
        self.log(f"model: {architecture}, attention {self.attn_implementation}{chosen}")
        self.compute_dtype = getattr(torch, cfg.model.dtype)
        self.expected_adapter_shapes = expected_lora_shapes(self.model) if self.is_lora else {}
        self.reference = None
        if cfg.train.base_kl and not self.is_lora:
            # Full/freeze fine-tuning changes the weights themselves: the base needs its own frozen copy.
            from transformers import AutoModelForCausalLM

            self.reference = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=self.compute_dtype, attn_implementation=self.attn_implementation)
            self.reference.requires_grad_(False).eval().to(self.device)
        config = self.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.flops = FlopCounter(self.model, config.num_hidden_layers, heads * head_dim)
        self.peak_flops = peak_flops_per_device(torch.cuda.get_device_name() if self.cuda else None,
                                                cfg.train.peak_tflops)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        named = dict(self.model.named_parameters())
        # ZeRO-3 placeholders are flat: the original shape says whether a weight is a matrix (decayed).
        described = [(n, len(getattr(p, "ds_shape", p.shape)), p.requires_grad) for n, p in named.items()]
        depths, num_blocks = block_depths(self.model) if t.layer_lr_decay is not None else (None, 0)
        grouping = optimizer_grouping(described, depths, num_blocks, t.layer_lr_decay)
        self.group_names = [names for _, _, names in grouping]  # the audit records which rate each weight got
        param_groups = [{"params": [named[n] for n in names], "weight_decay": t.weight_decay if is_matrix else 0.0,
                         "lr": t.lr * scale} for scale, is_matrix, names in grouping]
        if self.cfg.distributed.offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # the offloaded step runs on the host

            return DeepSpeedCPUAdam(param_groups, lr=t.lr, adamw_mode=True)
        # DeepSpeed's elastic ZeRO-1/2 checkpoint (what lets a run resume at another world size) records the step
        # from param_groups, where DeepSpeed's own optimizers keep it; torch's AdamW keeps it per parameter (and
        # that is what it uses). An inert group entry satisfies the checkpoint format.
        return torch.optim.AdamW([{**g, "step": 0} for g in param_groups], lr=t.lr)

    def _setup_engine(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        t = self.cfg.train
        optimizer = self._build_optimizer()
        self.engine, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        # The engine owns the schedule: it steps it once per optimizer step (at the accumulation boundary, and
        # not when fp16 overflow skips the step) and saves/loads it with its checkpoint. accelerate hands only
        # DeepSpeed-native schedulers to the engine, so it is attached here; it is built on the client optimizer,
        # whose param_groups DeepSpeed's ZeRO optimizer steps with.
        self.engine.lr_scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
        if self.world_size == 1 and self.cfg.distributed.zero_stage == 0:
            # Averaging gradients over a world of one is the identity; DeepSpeed would still copy every gradient
            # into flat buffers and back each step (ZeRO stages need their reduce epilogue, so only stage 0).
            self.engine.enable_backward_allreduce = False
        if self.cfg.data.audit:
            self._audit_world()
            drop_partial_line(self._audit_log())  # a killed attempt may have left half a line: never glue onto it
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            (self.output_dir / "config.yaml").write_text(dump_config(self.cfg))

    def _maybe_resume(self) -> None:
        if self.resume_arg == "none":
            self._start_timeline(None)
            return
        if self.resume_arg == "auto":
            path = self.checkpoints.latest()
            if path is None:
                return
        else:
            path = Path(self.resume_arg)
            if not path.is_dir():
                raise CheckpointError(f"--resume {path}: no such checkpoint directory")
        verify_checkpoint(path)
        saved = json.loads((path / "trainer_state.json").read_text())
        diff = _fingerprint_diff(saved.get("config_fingerprint", {}), config_fingerprint(self.cfg))
        if diff:
            raise CheckpointError(f"{path} was written by a different config: " + "; ".join(diff)
                                  + " (use a new output_dir, or --resume none)")
        effective = self.cfg.effective_batch_size(self.world_size)
        if saved.get("effective_batch_size", effective) != effective:
            raise CheckpointError(
                f"{path}: the effective batch was {saved['effective_batch_size']} samples per step, this run's is "
                f"{effective} (micro_batch_size {self.cfg.train.micro_batch_size} x grad_accum_steps "
                f"{self.cfg.train.grad_accum_steps} x {self.world_size} processes); set train.grad_accum_steps "
                "or train.micro_batch_size so that it stays the same")
        trainer_state, data_states = self.checkpoints.load(path, self.engine, exclude_frozen=self.is_lora,
                                                           zero_stage=self.cfg.distributed.zero_stage)
        # DeepSpeed's elastic optimizer-state restore brings back the moments and steps but not the param groups'
        # hyperparameters: put back the learning rate the restored schedule says the next step uses.
        scheduler = self.engine.lr_scheduler
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        try:
            states = restore_states(data_states, self.world_size)
            self.train_stream.load_state_dict(states[self.rank])
        except (DataError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/data_state.json: {e}") from None
        if len(data_states) != self.world_size:
            self.log(f"world size changed from {len(data_states)} to {self.world_size}: the data stream was "
                     "resharded (every sample not yet trained on is read once)")
        if self.resume_arg != "auto":
            self._start_timeline(path)
        self.step = self.first_step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.trained_tokens_seen = trainer_state["trained_tokens_seen"]
        self.log(f"resumed from {path} at step {self.step}")

    def _start_timeline(self, resumed: Path | None) -> None:
        """Checkpoints that a later automatic resume must not continue from are moved aside (kept)."""
        if self.is_main:
            moved = self.checkpoints.start_timeline(resumed)
            if moved:
                start = f"resuming from {resumed.name}" if resumed else "--resume none"
                self.log(f"{start} starts a new timeline: {', '.join(moved)} moved to "
                         f"{self.checkpoints.root / 'superseded'} (kept, never resumed from)")

    # ------------------------------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, soft_wrap=True)  # log lines stay whole in captured logs

    def _all_reduce(self, values: list[float], op: Any) -> list[float]:
        if self.world_size == 1:  # every step calls this: skip the no-op collective (and its device copy)
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def _barrier(self) -> None:
        dist.barrier()

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "trained_tokens_seen": self.trained_tokens_seen,
                "world_size": self.world_size, "effective_batch_size": self.cfg.effective_batch_size(self.world_size),
                "config_fingerprint": config_fingerprint(self.cfg)}

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro batches."""
        gas = self.cfg.train.grad_accum_steps
        batches = [self.train_stream.next_batch() for _ in range(gas)]
        local_trained = sum(b.trained_tokens for b in batches)
        local_tokens = sum(b.real_tokens for b in batches)
        local_flops = sum(self.flops.step_flops(b.real_tokens, b.sample_lengths()) for b in batches)
        global_trained, global_tokens, global_flops = self._all_reduce_sum([local_trained, local_tokens, local_flops])
        # Each micro loss is (sum of its token losses) / (trained tokens in the whole step, all ranks).
        # DeepSpeed divides by grad_accum_steps and averages over ranks; multiplying back makes the update the
        # gradient of the true per-token mean over the effective batch.
        rescale = gas * self.world_size
        lr = self.engine.lr_scheduler.get_last_lr()[0]  # the rate this step applies (the engine steps it after)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        beta = self.cfg.train.base_kl
        for batch in batches:
            # accumulate() tells accelerate (and through it DeepSpeed) which micro batch ends the step; outside it
            # every backward would be treated as a boundary and step the optimizer.
            with self.accelerator.accumulate(self.engine):
                inputs = self._inputs(batch)
                loss, out = self._forward(inputs, max(int(global_trained), 1))
                loss_sum += loss.detach().double()
                if beta:
                    kl = self._base_kl(inputs, out.logits) / max(global_trained, 1)
                    kl_sum += kl.detach().double()
                    loss = loss + beta * kl
                self.accelerator.backward(loss * rescale)
        if self.engine.global_steps != self.step + 1:
            raise TrainError(f"DeepSpeed took {self.engine.global_steps} optimizer steps where the recipe expects "
                             f"{self.step + 1}: gradient accumulation is out of step")
        step_loss, step_kl = self._all_reduce_sum([loss_sum.item(), kl_sum.item()])
        if not math.isfinite(step_loss):
            raise TrainError(f"non-finite loss {step_loss} at step {self.step + 1}; last good checkpoint: "
                             f"{self.checkpoints.latest()}")
        grad_norm = self.engine.get_global_grad_norm()
        # fp16's loss scaler skips overflowing steps by design; otherwise a non-finite norm has reached the weights.
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and self.cfg.model.dtype != "float16":
            raise TrainError(f"non-finite gradient norm {float(grad_norm)} at step {self.step + 1} (loss "
                             f"{step_loss:.4f}); the weights are no longer usable; last good checkpoint: "
                             f"{self.checkpoints.latest()}")
        self.step += 1
        self.tokens_seen += int(global_tokens)
        self.trained_tokens_seen += int(global_trained)
        if self.cfg.data.audit and self.step == self.first_step + 1:  # optimizer states exist from now on
            self._audit_engine_memory()
        if self.cfg.data.audit:
            self._audit({"step": self.step, "samples": [s for b in batches for s in b.sample_ids],
                         "positions": [q for b in batches for q in b.positions],
                         "local_trained_tokens": local_trained, "loss": step_loss})
        metrics = {"step": self.step, "loss": step_loss, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tokens": int(global_tokens), "trained_tokens": int(global_trained), "flops": global_flops}
        if beta:
            metrics["base_kl"] = step_kl  # KL(base || fine-tuned) per trained token; "loss" stays the task loss
        if self.cfg.data.packing:
            metrics["packing_efficiency"] = self.train_stream.packing_efficiency  # this rank's, cumulative
        return metrics

    def _forward(self, inputs: dict, normaliser: int) -> tuple[torch.Tensor, Any]:
        """(sum of this micro batch's losses / normaliser, model output). causal_lm: cross-entropy per trained
        token, computed by the model; classification: cross-entropy of each sample's class (labels -100 are
        padding rows)."""
        if not self.classification:
            out = self.engine(**inputs, num_items_in_batch=normaliser)
            return out.loss, out
        labels = inputs.pop("labels")
        out = self.engine(**inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels, ignore_index=-100, reduction="sum")
        return loss / normaliser, out

    def _base_kl(self, inputs: dict, logits: torch.Tensor) -> torch.Tensor:
        """Sum over this micro batch's trained tokens of KL(base || fine-tuned) between next-token distributions.
        The base logits come from the same weights with the adapter disabled (LoRA/QLoRA: no second copy), or from
        the frozen reference copy (full/freeze)."""
        without_labels = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            if self.reference is not None:
                base = self.reference(**without_labels).logits
            else:
                with self.accelerator.unwrap_model(self.engine).disable_adapter():
                    base = self.engine(**without_labels).logits
        trained = inputs["labels"][:, 1:] != -100  # logits at t predict the label at t + 1
        fine_log = torch.log_softmax(logits[:, :-1][trained].float(), dim=-1)
        base_log = torch.log_softmax(base[:, :-1][trained].float(), dim=-1)
        return (base_log.exp() * (base_log - fine_log)).sum()

    def _inputs(self, batch: Batch) -> dict:
        return batch.model_inputs(self.device, self.attn_implementation, self.compute_dtype)

    def _audit_world(self) -> None:
        """What this rank sees: world size per accelerate and torch.distributed, and how many parameter elements
        (and bytes of packed 4-bit weights) it holds locally (under ZeRO-3 a partition: about 1/world)."""
        params = list(self.accelerator.unwrap_model(self.engine).parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        quantized = [p for p in params if getattr(p, "quant_state", None) is not None]
        record = {"rank": self.rank, "accelerate_num_processes": self.world_size,
                  "accelerate_process_index": self.accelerator.process_index,
                  "dist_world_size": dist.get_world_size(), "local_param_numel": local,
                  "full_param_numel": self.total_params, "quantized_params": len(quantized),
                  "quantized_local_bytes": sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes
                                               for p in quantized),
                  "quantized_full_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                              for p in quantized),
                  "quantized_storage_dtype": str(quantized[0].dtype) if quantized else None,
                  "quant_types": sorted({f"{p.quant_state.quant_type}{'+double' if p.quant_state.nested else ''}"
                                         for p in quantized}),
                  "optimizer_groups": [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                                        "names": names}
                                       for g, names in zip(self.engine.lr_scheduler.optimizer.param_groups,
                                                           self.group_names)]}
        (self._audit_dir() / f"rank{self.rank}_world.json").write_text(json.dumps(record))

    def _audit_engine_memory(self) -> None:
        """Bytes DeepSpeed's engine holds on this rank after the first optimizer step (when the optimizer states
        exist): parameter storage (ZeRO-3: the partitions) and optimizer states (fp32 master partitions + AdamW
        moments). `ft plan` predicts both; a test compares."""
        params = list(self.accelerator.unwrap_model(self.engine).parameters())
        param_bytes = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in params)
        zero_optimizer = self.engine.optimizer
        masters = (getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
                   or getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [])
        inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
        moments = sum(t.nbytes for state in inner.state.values() for k, t in state.items()
                      if k in ("exp_avg", "exp_avg_sq"))
        record = {"rank": self.rank, "param_bytes": param_bytes,
                  "optimizer_bytes": sum(t.nbytes for t in masters) + moments,
                  "master_bytes": sum(t.nbytes for t in masters), "moment_bytes": moments}
        (self._audit_dir() / f"rank{self.rank}_memory.json").write_text(json.dumps(record))

    def _audit_dir(self) -> Path:
        audit_dir = self.output_dir / "audit"
        audit_dir.mkdir(parents=True, exist_ok=True)
        return audit_dir

    def _audit_log(self) -> Path:
        return self._audit_dir() / f"rank{self.rank}.jsonl"

    def _audit(self, record: dict) -> None:
        with open(self._audit_log(), "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        loss_sum = tokens = 0.0
        predictions: list[tuple[str, int, int]] = []  # classification: (sample id, label, predicted class)
        for batch in self.eval_set:
            loss, out = self._forward(self._inputs(batch), 1)  # -> sum over tokens (samples)
            loss_sum += loss.item()
            tokens += batch.trained_tokens
            if self.classification:
                predicted = out.logits.argmax(dim=-1).tolist()
                predictions += [(sample_id, int(label), int(p)) for sample_id, label, p
                                in zip(batch.sample_ids, batch.labels.tolist(), predicted) if label != -100]
        self.engine.train()
        loss_sum, tokens = self._all_reduce_sum([loss_sum, tokens])
        loss = loss_sum / max(tokens, 1)
        if not self.classification:
            return {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, predictions)
        everything = sorted((p for part in gathered for p in part), key=_file_order)  # the same at any world size
        scores = classification_scores([label for _, label, _ in everything], [p for _, _, p in everything],
                                       len(self.cfg.data.labels))
        if self.is_main:
            self._save_predictions(everything, scores)
        return {"step": self.step, "eval_loss": loss, "eval_accuracy": scores["accuracy"],
                "eval_macro_f1": scores["macro_f1"], "eval_samples": len(everything),
                "eval_confusion": scores["confusion"]}

    def _save_predictions(self, predictions: list[tuple[str, int, int]], scores: dict) -> None:
        """output_dir/eval/step{N}.json: every eval sample's label and prediction, with the scores made from them
        (so anyone can recompute them)."""
        labels = self.cfg.data.labels
        directory = self.output_dir / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        record = {"step": self.step, "labels": labels, **scores,
                  "predictions": [{"id": sample_id, "label": labels[label], "prediction": labels[p]}
                                  for sample_id, label, p in predictions]}
        write_summary(directory / f"step{self.step:06d}.json", record)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        last = cfg.train.stop_at_step or cfg.train.max_steps
        self.log(f"world size {self.world_size} | effective batch {cfg.effective_batch_size(self.world_size)} | "
                 f"trainable {self.trainable:,} / {self.total_params:,} params | ZeRO-{cfg.distributed.zero_stage}")
        if self.step >= last:
            self.log(f"nothing to train: checkpoint is at step {self.step}, the run stops at {last}")
        if self.peak_flops is None:
            self.log("MFU: not reported (no peak FLOP/s known for "
                     f"{torch.cuda.get_device_name() if self.cuda else 'a CPU'}; set train.peak_tflops to report it)")
        self.sink = MetricsSink(self.output_dir, cfg.train.report_to, self.step) if self.is_main else None
        self.totals = {"steps": 0, "tokens": 0, "trained_tokens": 0, "flops": 0.0, "step_time_s": 0.0,
                       "memory": [0.0, 0.0, 0.0]}
        loop_started = time.perf_counter()
        self.engine.train()
        started_at = saved_at = self.step
        with self._progress(last) as advance:
            while self.step < last:
                if self._stop_agreed():
                    self._stop_for_preemption(saved_at)
                started = time.perf_counter()
                metrics = self.train_step()
                self._add_throughput(metrics, time.perf_counter() - started)
                advance(metrics)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < last:
                    self._record(self.evaluate())
                every = cfg.checkpoint.every_steps
                if every and self.step % every == 0 and self.step < last:
                    self.save_checkpoint()
                    saved_at = self.step
        trained = self.step > started_at
        if trained and self.eval_set:
            self._record(self.evaluate())
        if trained:
            self._data_report()
        if saved_at != self.step or self.checkpoints.latest() is None:
            self.save_checkpoint()
        # A rerun of a finished run only writes final/ if an earlier attempt died before writing it.
        if self.step >= cfg.train.max_steps and (trained or not (self.output_dir / "final").is_dir()):
            self.save_final()
        if trained:
            self._summary(time.perf_counter() - loop_started)

    def close(self) -> None:
        """Flush what rank 0 writes, also when the run stops on an error or a preemption."""
        if getattr(self, "sink", None) is not None:
            self.sink.close()

    def _add_throughput(self, metrics: dict, step_time: float) -> None:
        """Speed, MFU and memory of the step just taken (memory: the maximum over ranks)."""
        memory = self._all_reduce(memory_now(self.cuda), dist.ReduceOp.MAX)
        metrics["step_time_s"] = step_time
        metrics["tokens_per_s"] = metrics["tokens"] / step_time
        metrics["trained_tokens_per_s"] = metrics["trained_tokens"] / step_time
        metrics["tokens_per_s_per_device"] = metrics["tokens_per_s"] / self.world_size
        if self.peak_flops is not None:
            metrics["mfu"] = metrics["flops"] / step_time / (self.peak_flops * self.world_size)
        if self.cuda:
            metrics["gpu_max_allocated_gib"], metrics["gpu_max_reserved_gib"] = memory[0], memory[1]
        metrics["host_rss_gib"] = memory[2]
        t = self.totals
        t["steps"] += 1
        t["step_time_s"] += step_time
        for key in ("tokens", "trained_tokens", "flops"):
            t[key] += metrics[key]
        t["memory"] = [max(a, b) for a, b in zip(t["memory"], memory)]

    def _summary(self, wall_time: float) -> None:
        """The end-of-run summary: printed, and written to output_dir/summary.json."""
        if not self.is_main:
            return
        t = self.totals
        summary = {
            "steps_trained": t["steps"], "last_step": self.step, "tokens": t["tokens"],
            "trained_tokens": t["trained_tokens"], "wall_time_s": wall_time, "step_time_s": t["step_time_s"],
            "mean_tokens_per_s": t["tokens"] / t["step_time_s"],
            "mean_trained_tokens_per_s": t["trained_tokens"] / t["step_time_s"],
            "mfu": (t["flops"] / t["step_time_s"] / (self.peak_flops * self.world_size)
                    if self.peak_flops is not None else None),
            "peak_gpu_allocated_gib": t["memory"][0] if self.cuda else None,
            "peak_gpu_reserved_gib": t["memory"][1] if self.cuda else None,
            "peak_host_rss_gib": t["memory"][2], "world_size": self.world_size,
            "outputs": {"final": str(self.output_dir / "final"), "checkpoints": str(self.output_dir / "checkpoints"),
                        "metrics": str(self.output_dir / "metrics.jsonl"),
                        "tensorboard": str(self.output_dir / "tb") if self.cfg.train.report_to == "tensorboard"
                        else None},
        }
        write_summary(self.output_dir / "summary.json", summary)
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
        memory = (f"peak GPU {summary['peak_gpu_allocated_gib']:.1f} GiB allocated / "
                  f"{summary['peak_gpu_reserved_gib']:.1f} GiB reserved, " if self.cuda else "")
        self.log(f"summary: {t['steps']} steps, {t['tokens']:,} tokens ({t['trained_tokens']:,} trained) in "
                 f"{wall_time:.1f} s; {summary['mean_tokens_per_s']:,.0f} tokens/s "
                 f"({summary['mean_trained_tokens_per_s']:,.0f} trained){mfu}; {memory}peak host RSS "
                 f"{summary['peak_host_rss_gib']:.1f} GiB")
        self.log(f"outputs: {self.output_dir / 'final'} | checkpoints {self.output_dir / 'checkpoints'} | metrics "
                 f"{self.output_dir / 'metrics.jsonl'}" + (f" | TensorBoard {self.output_dir / 'tb'}"
                                                           if self.cfg.train.report_to == "tensorboard" else "")
                 + f" | summary {self.output_dir / 'summary.json'}")

    def _stop_agreed(self) -> bool:
        """Did any rank receive a stop signal? Asked of all ranks at every step boundary (one all-reduce), so
        they all stop at the same step and none is left waiting in a collective."""
        self._agreed_signal = int(self._all_reduce([stop_signal() or 0], dist.ReduceOp.MAX)[0])
        return self._agreed_signal != 0

    def _stop_for_preemption(self, saved_at: int) -> None:
        if self.step > saved_at:
            self.save_checkpoint()
        latest = self.checkpoints.latest()
        checkpoint = str(latest) if latest is not None else None
        self._barrier()
        error = Preempted(self.step, checkpoint, self._agreed_signal)
        self.log(f"preemption: {error}")
        raise error

    def _data_report(self) -> None:
        """All ranks' data counters summed: what was read, trained, cut, dropped and skipped (with reasons)."""
        reports = [None] * self.world_size
        dist.all_gather_object(reports, self.train_stream.report())
        if not self.is_main:
            return
        keys = [k for k in reports[0] if isinstance(reports[0][k], int)]
        total = {k: sum(r[k] for r in reports) for k in keys}
        total["packing_efficiency"] = total["tokens"] / total["row_tokens"] if total["row_tokens"] else None
        total["error_examples"] = [e for r in reports for e in r["error_examples"]][:5]
        (self.output_dir / "data_report.json").write_text(json.dumps(total, indent=1))
        line = (f"data: {total['samples']:,} samples, {total['trained_tokens']:,} trained of {total['tokens']:,} "
                f"tokens; truncated {total['truncated']}, dropped (too long) {total['dropped_too_long']}, split "
                f"{total['split_records']}, skipped (malformed) {total['skipped_errors']}, skipped (nothing to "
                f"train) {total['skipped_no_trained_tokens']}")
        if self.cfg.data.packing:
            line += f"; packing efficiency {total['packing_efficiency']:.3f}"
        self.log(line)
        for example in total["error_examples"]:
            self.log(f"  skipped {example}")

    def save_checkpoint(self) -> None:
        path = self.checkpoints.save(self.step, self.engine, self.trainer_state(), self.train_stream.state_dict(),
                                     exclude_frozen=self.is_lora, barrier=self._barrier,
                                     config_text=dump_config(self.cfg))
        self.log(f"checkpoint saved: {path}")

    def _record(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self.sink.record(metrics)
        if "eval_accuracy" in metrics:
            self.log(f"step {metrics['step']}: eval loss {metrics['eval_loss']:.4f} accuracy "
                     f"{metrics['eval_accuracy']:.4f} macro-F1 {metrics['eval_macro_f1']:.4f} "
                     f"({metrics['eval_samples']} samples; predictions in {self.output_dir / 'eval'})")
        elif "eval_loss" in metrics:
            self.log(f"step {metrics['step']}: eval loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}")

    @contextlib.contextmanager
    def _progress(self, last: int) -> Iterator[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not self.is_main, transient=False)
        task = progress.add_task("train", total=last, completed=self.step, loss="-")

        def advance(metrics: dict) -> None:
            self._record(metrics)
            progress.update(task, completed=metrics["step"], loss=f"{metrics['loss']:.4f}")
            if self.is_main and (metrics["step"] % self.cfg.train.log_every == 0 or metrics["step"] == last):
                norm = metrics["grad_norm"]
                mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                gpu = (f" gpu {metrics['gpu_max_allocated_gib']:.1f}/{metrics['gpu_max_reserved_gib']:.1f} GiB"
                       if "gpu_max_allocated_gib" in metrics else "")
                progress.console.print(
                    f"step {metrics['step']}/{last} loss {metrics['loss']:.4f} "
                    + (f"base_kl {metrics['base_kl']:.4f} " if "base_kl" in metrics else "") + f"lr {metrics['lr']:.3e} "
                    f"grad_norm {'-' if norm is None else f'{norm:.3f}'} tok/s {metrics['tokens_per_s']:.0f} "
                    f"(trained {metrics['trained_tokens_per_s']:.0f}){mfu}{gpu} rss {metrics['host_rss_gib']:.1f} GiB"
                    + (f" packing {metrics['packing_efficiency']:.3f}" if "packing_efficiency" in metrics else ""),
                    soft_wrap=True)  # one line per step in captured logs, however long

        with progress:
            yield advance

    # ------------------------------------------------------------------------------------------ outputs
    def save_final(self) -> None:
        """output_dir/final/: PEFT adapter dir (LoRA) or HF safetensors model dir (full), plus the tokenizer.
        Written to final.tmp/ and renamed when complete and checked."""
        final = self.output_dir / "final"
        tmp = self.output_dir / "final.tmp"
        if self.is_main:
            remove_leftovers(self.output_dir, "final.tmp")
            tmp.mkdir(parents=True)
        self._barrier()
        unwrapped = self.accelerator.unwrap_model(self.engine)
        if self.is_lora:
            self._save_adapter(unwrapped, tmp)
        else:
            state_dict = self.accelerator.get_state_dict(self.engine)  # ZeRO-3: 16-bit gather onto rank 0
            if self.is_main:
                # A tied weight (input embedding = output head) is one parameter under two names; the gathered
                # state dict has a copy under each. Stored once, as transformers does, and re-tied on load.
                for name in tied_duplicate_names(unwrapped):
                    state_dict.pop(name, None)
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                check_full_model(tmp, self.total_params)
        if self.is_main:
            self.tokenizer.save_pretrained(tmp)
            (tmp / "ft_config.yaml").write_text(dump_config(self.cfg))
            fsync_tree(tmp)
            replace_dir(tmp, final)  # a rerun's final/ replaces the old one without a moment of a partial copy
            self.log(f"final {'adapter' if self.is_lora else 'model'} saved: {final}")
        self._barrier()

    def _save_adapter(self, unwrapped: torch.nn.Module, out: Path) -> None:
        import deepspeed

        named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
        # Under ZeRO-3 each rank holds a slice: gather the adapter (small) on every rank, copy on rank 0.
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().to("cpu", copy=True) for n, p in named} if self.is_main else {}
        if self.is_main:
            unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
            check_adapter(out, self.expected_adapter_shapes)


def _file_order(prediction: tuple[str, int, int]) -> tuple[str, int]:
    """Sample ids are `file:line` (or `file:row`): order by file, then line number."""
    where, _, number = prediction[0].rpartition(":")
    return (where, int(number)) if number.isdigit() else (prediction[0], 0)


def check_adapter(adapter_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """A saved adapter must hold every LoRA tensor at its full shape (ZeRO-3 is known to save empty ones)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainError(f"{adapter_dir}: adapter_model.safetensors was not written")
    with safe_open(path, "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k}: missing" for k in expected if k not in saved]
    problems += [f"{k}: shape {saved[k]}, expected {v}" for k, v in expected.items() if k in saved and saved[k] != v]
    if not saved or problems:
        raise TrainError(f"{path} is not a complete adapter ({len(saved)} tensors): " + "; ".join(problems[:5]))


def tied_duplicate_names(model: torch.nn.Module) -> list[str]:
    """Every name but the first of each parameter that the model registers under several names (tied weights)."""
    seen: set[int] = set()
    duplicates = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.append(name)
        seen.add(id(param))
    return duplicates


def check_full_model(model_dir: Path, total_params: int) -> None:
    """A saved full model must hold as many elements as the model has parameters (tied weights counted once)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    count = 0
    for path in files:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                count += math.prod(shape)
    if count != total_params:
        raise TrainError(f"{model_dir}: saved {count:,} weight elements, the model has {total_params:,}")


def run(cfg: Config, resume: str = "auto") -> None:
    recipe = Recipe(cfg, resume=resume)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()
