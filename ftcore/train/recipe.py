"""The recipe, in call order: setup (process group -> data -> model -> engine -> checkpoints -> resume), then the
loop (train -> train_step -> the objective; evaluate; save), then close. Each step is one call into a component
that gets its config section and the Runtime: reporting.py, audit.py, objective.py, evaluation.py, outputs.py,
state.py, optim.py here, and ftcore/checkpoint.py + ftcore/resume.py for checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from ftcore.builtin import base_record, resolve_model_path
from ftcore.checkpoint import CheckpointError, CheckpointManager
from ftcore.config import Config, dump_config
from ftcore.data.batch import Batch, ModelInputs, pad_eval_batches
from ftcore.data.stream import DataError, TrainStream, eval_batches, restore_states
from ftcore.dist_env import DistEnvError, ensure_process_env
from ftcore.dtypes import DTYPES
from ftcore.errors import TrainError
from ftcore.evaluation.generation import read_prompts
from ftcore.gguf_base import write_base_record
from ftcore.metrics import FlopCounter, peak_flops_per_device
from ftcore.model import load_model, load_reference, load_tokenizer
from ftcore.model_geometry import attention_width, count_parameters, expected_lora_shapes
from ftcore.preemption import Preempted, stop_signal
from ftcore.preflight import check_device, check_inputs
from ftcore.resume import check_resumable
from ftcore.run_dir import RunDir
from ftcore.tasks import task_for
from ftcore.tasks.base import ObjectiveSetup, RolloutSetup
from ftcore.train.audit import Audit
from ftcore.train.evaluation import Evaluator
from ftcore.train.optim import attach_schedule, build_optimizer, restore_rates
from ftcore.train.outputs import save_final
from ftcore.train.reporting import Reporter
from ftcore.train.runtime import Runtime, start_runtime
from ftcore.train.sequence_parallel import model_inputs, sequence_shard, start_sequence_parallel
from ftcore.train.state import RunState


class Recipe:
    """One training run of `cfg`; `resume`: auto (newest complete checkpoint), none, or a checkpoint dir."""

    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg, self.resume_arg = cfg, resume
        self.task = task_for(cfg)  # what is trained: every task-specific answer comes from it
        self.output_dir = Path(cfg.output_dir)
        self.run_dir = RunDir(self.output_dir)
        self.reporter: Optional[Reporter] = None
        self.rollouts = None  # the task's, when the policy generates its samples (Task.start_rollouts)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything the loop needs, in dependency order."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        try:
            ensure_process_env()
        except DistEnvError as e:
            raise TrainError(str(e)) from None
        check_inputs(cfg, world_size=int(os.environ["WORLD_SIZE"]))
        # Before the process group exists: a built-in model is materialised here (transformers saves weights on
        # distributed rank 0 only, so building after init would leave other ranks' copies without weights).
        # A GGUF base is dequantized here once per machine (the launcher usually did it before the ranks started).
        self.model_dir = resolve_model_path(cfg.model.name_or_path, cfg.model.dtype)
        cuda = torch.cuda.is_available()
        check_device(cfg, cuda, cuda and torch.cuda.is_bf16_supported(),
                     torch.cuda.get_device_name() if cuda else "the CPU")
        self.runtime: Runtime = start_runtime(cfg, self.model_dir)
        set_seed(cfg.train.seed)
        self.state = RunState(cfg, self.runtime.world_size, base_model=base_record(cfg.model.name_or_path))
        if self.runtime.is_main and self.state.base_model:  # which GGUF this run trains on, beside its outputs
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_base_record(self.output_dir, self.state.base_model)
            self.runtime.log(f"base: {self.state.base_model['gguf']} (sha256 {self.state.base_model['sha256'][:16]}"
                             f"...), dequantized to {cfg.model.dtype} in {self.model_dir}")
        self._setup_data()
        self.rss_before_model = psutil.Process().memory_info().rss / 2**30  # (data.audit records it)
        self._setup_model()
        self._setup_engine()
        self.checkpoints = CheckpointManager(self.output_dir, cfg.checkpoint, self.runtime)
        self._resume()
        self.first_step = self.state.step  # where this process started (a resume's checkpoint step)

    def _setup_data(self) -> None:
        cfg, rt = self.cfg, self.runtime
        self.tokenizer = load_tokenizer(self.model_dir)
        settled = self.task.prepare_data(cfg.data)  # (in the run's config, so in checkpoints and final/ too)
        if settled:
            rt.log(settled)
        # Under sequence parallelism the ranks of a sequence group read the same samples and split their tokens.
        self.train_stream = TrainStream(cfg.data, self.tokenizer, cfg.train.seed, rt.data_rank, rt.data_world,
                                        cfg.train.micro_batch_size, self.task)
        # Reads the first batch now: data with nothing to train on fails here, before the model is loaded.
        self.train_stream.prime()
        rt.log("data.train: " + ", ".join(f"{g.spec_text} ({len(g):,} records in {len(g.files)} file"
                                          f"{'s' if len(g.files) > 1 else ''}, weight {g.weight:g})"
                                          for g in self.train_stream.groups))
        self.eval_set: list[Batch] = []
        if cfg.data.eval:
            mine = eval_batches(cfg.data, self.tokenizer, rt.data_rank, rt.data_world, cfg.train.micro_batch_size,
                                self.task)
            most = int(rt.all_reduce([len(mine)], "max")[0])
            pad_id = self.train_stream.pad_id
            self.eval_set = [self._local(b) for b in
                             pad_eval_batches(mine, most, lambda: self.task.filler_batch(pad_id))]
        self.eval_prompts = (read_prompts(cfg.data, self.tokenizer, cfg.evaluation.max_new_tokens)[0]
                             if cfg.evaluation.generates else [])

    def _setup_model(self) -> None:
        cfg, rt = self.cfg, self.runtime
        head = self.task.head_settings(cfg.data, self.train_stream.pad_id)
        self.model = load_model(cfg, self.model_dir, rt.device, new_head=head)
        self.trainable, self.total_params = count_parameters(self.model)
        if self.trainable == 0:
            raise TrainError("no parameter requires grad: check adapter.target_modules")
        self.is_lora = cfg.adapter.method in ("lora", "qlora")  # an adapter is what trains and what is saved
        self.attn_implementation = self.model.config._attn_implementation
        architecture = (self.model.config.architectures or [type(self.model).__name__])[0]
        chosen = " (auto: the best this model supports here)" if cfg.model.attn_implementation == "auto" else ""
        rt.log(f"model: {architecture}, attention {self.attn_implementation}{chosen}")
        self.sequence = None  # the ranks sharing this rank's samples (sequence parallelism)
        if rt.sequence_parallel > 1:
            self.sequence = start_sequence_parallel(self.model, self.attn_implementation, rt.sequence_parallel,
                                                    self._rows(), rt.backend)
            rt.log(f"sequence parallel: {rt.sequence_parallel} ranks split each sample's tokens (Ulysses), "
                   f"{rt.data_world} data-parallel group{'s' * (rt.data_world > 1)}")
        self.compute_dtype = DTYPES[cfg.model.dtype]
        self.reference = self.reference_engine = None
        if self.task.needs_reference(cfg) and not self.is_lora:
            # Full/freeze fine-tuning changes the weights themselves: the base needs its own frozen copy
            # (partitioned under ZeRO-3, as the model is).
            self.reference, self.reference_engine = load_reference(
                self.model_dir, self.compute_dtype, self.attn_implementation, rt.device,
                rt.ds_config if cfg.distributed.zero_stage == 3 else None)
            held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                       for p in self.reference.parameters())
            total = count_parameters(self.reference)[1]
            rt.log(f"reference: a frozen copy of the base model, {held:,} of its {total:,} parameters on this rank"
                   + (" (partitioned by ZeRO-3)" if self.reference_engine is not None else ""))
        self.flops = FlopCounter(self.model, self.model.config.num_hidden_layers, attention_width(self.model.config))
        self.peak_flops = peak_flops_per_device(torch.cuda.get_device_name() if rt.cuda else None,
                                                cfg.logging.peak_tflops)

    def _setup_engine(self) -> None:
        cfg, rt = self.cfg, self.runtime
        self.adapter_shapes = expected_lora_shapes(self.model) if self.is_lora else {}  # before DeepSpeed wraps
        optimizer, group_names = build_optimizer(cfg.optimizer, cfg.distributed.offload, self.model)
        self.engine, self.optimizer = rt.accelerator.prepare(self.model, optimizer)
        attach_schedule(cfg.optimizer, cfg.train.max_steps, self.engine, optimizer)
        if rt.world_size == 1 and cfg.distributed.zero_stage == 0:
            # Averaging gradients over a world of one is the identity; DeepSpeed would still copy every gradient
            # into flat buffers and back each step (ZeRO stages need their reduce epilogue, so only stage 0).
            self.engine.enable_backward_allreduce = False
        self._setup_objective()
        self.audit = Audit(self.output_dir, rt.rank, cfg.data.audit, self.rss_before_model)
        self.audit.start(rt.accelerator, self.engine, self.total_params, group_names)
        if rt.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir.ds_config.write_text(json.dumps(rt.ds_config, indent=2))
            self.run_dir.config.write_text(dump_config(cfg))

    def _setup_objective(self) -> None:
        """The loss, once the engine exists: auto/chunked/fused first check on a probe that the chunked head's
        logits are the model's own (every rank runs it)."""
        cfg, rt = self.cfg, self.runtime
        unwrap = rt.accelerator.unwrap_model
        # Sized by bytes for this vocabulary (loss.chunk_mb) unless loss.chunk_tokens says otherwise.
        self.chunk_tokens = cfg.loss.tokens_per_chunk(self.model.config.get_text_config().vocab_size)
        self.objective, self.loss_words = self.task.build_objective(ObjectiveSetup(
            cfg, self.engine, unwrap, self.reference, self.chunk_tokens, rt.cuda, self._probe_rows(), rt.all_reduce,
            self.sequence))
        self.evaluator = Evaluator(cfg, rt, self.task, self.objective, self.eval_set, self._inputs, self.tokenizer,
                                   unwrap, self.eval_prompts or None)
        # A task whose samples the policy generates (rl) makes each step's batches from the stream's.
        self.rollouts = self.task.start_rollouts(RolloutSetup(cfg, rt, self.tokenizer, unwrap,
                                                              self.train_stream.pad_id, self.objective, self._inputs))

    def _resume(self) -> None:
        """Continue from a checkpoint (ftcore/resume.py says whether it may), or start fresh."""
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
        saved = self.checkpoints.read(path)
        world = self.runtime.world_size
        check_resumable(path, saved.run_state, self.cfg, world, self.state.base_model)
        self.checkpoints.restore_engine(saved, self.engine, exclude_frozen=self.is_lora,
                                        zero_stage=self.cfg.distributed.zero_stage)
        restore_rates(self.engine)
        try:
            data_world = self.runtime.data_world
            self.train_stream.load_state_dict(restore_states(saved.data_states, data_world)[self.runtime.data_rank])
        except (DataError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/data_state.json: {e}") from None
        streams = len(saved.data_states)  # one per data-parallel group that wrote it
        if saved.world_size != world or streams != data_world:
            groups = (f" ({streams} to {data_world} data-parallel groups)"
                      if streams != saved.world_size or data_world != world else "")
            how = (": the data stream was resharded (every sample not yet trained on is read once)"
                   if streams != data_world else "; the data stream continues as it was")
            self.runtime.log(f"world size changed from {saved.world_size} to {world}{groups}{how}")
        if self.rollouts is not None:
            try:
                self.rollouts.load_state_dict(saved.task_states(), saved.run_state["step"])
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
        if self.resume_arg != "auto":
            self._start_timeline(path)
        self.state.load_state_dict(saved.run_state)
        self.runtime.log(f"resumed from {path} at step {self.state.step}")

    def _start_timeline(self, resumed: Optional[Path]) -> None:
        """Checkpoints that a later automatic resume must not continue from are moved aside (kept)."""
        if self.runtime.is_main:
            moved = self.checkpoints.start_timeline(resumed)
            if moved:
                start = f"resuming from {resumed.name}" if resumed else "--resume none"
                self.runtime.log(f"{start} starts a new timeline: {', '.join(moved)} moved to "
                                 f"{self.checkpoints.root / 'superseded'} (kept, never resumed from)")

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        """Steps until train.max_steps (or train.stop_at_step), with evals and checkpoints on their schedules;
        then the last eval, data report, checkpoint, final/ and summary."""
        cfg, rt, state = self.cfg, self.runtime, self.state
        last = cfg.train.stop_at_step or cfg.train.max_steps
        self.reporter = Reporter(cfg, rt, self.task, self.peak_flops, state.step, tracker_runs=state.trackers,
                                 new_timeline=self.resume_arg != "auto")
        self.reporter.announce(self.trainable, self.total_params, self.loss_words, state.step, last)
        loop_started = time.perf_counter()
        self.engine.train()
        started_at = saved_at = state.step
        with self.reporter.progress(state.step, last) as advance:
            while state.step < last:
                if self._stop_agreed():
                    self._stop_for_preemption(saved_at)
                started = time.perf_counter()
                metrics = self.train_step()
                self.reporter.add_throughput(metrics, time.perf_counter() - started)
                advance(metrics)
                if cfg.evaluation.every and state.step % cfg.evaluation.every == 0 and state.step < last:
                    self.reporter.record(self.evaluator(self.engine, state.step))
                every = cfg.checkpoint.every_steps
                if every and state.step % every == 0 and state.step < last:
                    self.save_checkpoint()
                    saved_at = state.step
        trained = state.step > started_at
        if trained and self.evaluator:
            self.reporter.record(self.evaluator(self.engine, state.step))
        if trained:
            self.reporter.data_report(self.train_stream.report())
        if saved_at != state.step or self.checkpoints.latest() is None:
            self.save_checkpoint()
        # A rerun of a finished run only writes final/ if an earlier attempt died before writing it.
        if state.step >= cfg.train.max_steps and (trained or not self.run_dir.final.is_dir()):
            save_final(cfg, rt, self.engine, self.tokenizer, is_lora=self.is_lora, total_params=self.total_params,
                       adapter_shapes=self.adapter_shapes)
        if trained:
            self.reporter.summary(state.step, time.perf_counter() - loop_started)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro batches."""
        gas, rt = self.cfg.train.grad_accum_steps, self.runtime
        if self.rollouts is not None:  # (collective) the policy answers the stream's prompts; they train as scored
            whole = self.rollouts(self.train_stream.next_batch, gas, self.engine, self.state.step)
        else:
            whole = [self.train_stream.next_batch() for _ in range(gas)]
        batches = [self._local(b) for b in whole]  # this rank's part of each sample's tokens (sequence parallel)
        local_trained = sum(b.trained_tokens for b in batches)
        local_tokens = sum(b.real_tokens for b in batches)
        sp = rt.sequence_parallel  # a sequence group shares each sample's work
        local_flops = sum(self.flops.step_flops(b.real_tokens, b.sample_lengths()) for b in whole) / sp
        global_trained, global_tokens, global_flops, global_examples = rt.all_reduce(
            [local_trained, local_tokens, local_flops, sum(b.examples for b in batches)])
        # The task's mean over the whole effective batch: per trained token (causal LM), per example (preference
        # pairs, KTO samples). (The ranks of a sequence group hold the same examples: counted once.)
        normaliser = self.task.normaliser(self.cfg, global_examples / rt.sequence_parallel, global_trained)
        # Each micro loss is (sum of its token losses) / (trained tokens in the whole step, all ranks).
        # DeepSpeed divides by grad_accum_steps and averages over ranks; multiplying back makes the update the
        # gradient of the true per-token mean over the effective batch.
        rescale = gas * rt.world_size
        lr = self.engine.lr_scheduler.get_last_lr()[0]  # the rate this step applies (the engine steps it after)
        sums: dict[str, torch.Tensor] = {}
        micro_inputs = [self._inputs(batch) for batch in batches]
        self.objective.start_step(self.engine, micro_inputs)
        for inputs in micro_inputs:
            # accumulate() tells accelerate (and through it DeepSpeed) which micro batch ends the step; outside it
            # every backward would be treated as a boundary and step the optimizer.
            with rt.accelerator.accumulate(self.engine):
                result = self.objective(self.engine, inputs, normaliser)
                for name, value in result.terms.items():
                    sums[name] = sums[name] + value.double() if name in sums else value.double()
                rt.accelerator.backward(result.loss * rescale)
        terms = self.objective.report(dict(zip(sums, rt.all_reduce([v.item() for v in sums.values()]))))
        grad_norm = self._check_step(terms["loss"])
        self.state.advance(int(global_tokens), int(global_trained))
        if self.state.step == self.first_step + 1:  # optimizer states exist from now on
            self.audit.engine_memory(self.engine, rt.accelerator.unwrap_model(self.engine))
        self.audit.step({"step": self.state.step, "samples": [s for b in batches for s in b.sample_ids],
                         "positions": [q for b in batches for q in b.positions],
                         "local_trained_tokens": local_trained, "loss": terms["loss"]})
        metrics = {"step": self.state.step, "loss": terms.pop("loss"), "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tokens": int(global_tokens), "trained_tokens": int(global_trained), "flops": global_flops,
                   **terms}  # base_kl: KL(base || fine-tuned) per trained token
        if self.cfg.data.packing:
            metrics["packing_efficiency"] = self.train_stream.packing_efficiency  # this rank's, cumulative
        return metrics

    def _check_step(self, step_loss: float) -> Optional[float]:
        """The engine took exactly one optimizer step and the loss and gradient norm are finite; returns the norm."""
        step = self.state.step + 1
        if self.engine.global_steps != step:
            raise TrainError(f"DeepSpeed took {self.engine.global_steps} optimizer steps where the recipe expects "
                             f"{step}: gradient accumulation is out of step")
        if not math.isfinite(step_loss):
            raise TrainError(f"non-finite loss {step_loss} at step {step}; last good checkpoint: "
                             f"{self.checkpoints.latest()}")
        grad_norm = self.engine.get_global_grad_norm()
        # fp16's loss scaler skips overflowing steps by design; otherwise a non-finite norm has reached the weights.
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and self.cfg.model.dtype != "float16":
            raise TrainError(f"non-finite gradient norm {float(grad_norm)} at step {step} (loss "
                             f"{step_loss:.4f}); the weights are no longer usable; last good checkpoint: "
                             f"{self.checkpoints.latest()}")
        return grad_norm

    def save_checkpoint(self) -> None:
        """Collective: a checkpoint of the engine, the run state and every rank's data position."""
        path = self.checkpoints.save(self.engine, self.state, self.train_stream, exclude_frozen=self.is_lora,
                                     config_text=dump_config(self.cfg),
                                     task_state=self.rollouts.state_dict() if self.rollouts is not None else None)
        self.runtime.log(f"checkpoint saved: {path}")

    def close(self, error: Optional[BaseException] = None) -> None:
        """Flush what rank 0 writes, also when the run stops on an error or a preemption (`error`); the trackers
        learn how this attempt ended."""
        if self.rollouts is not None:
            self.rollouts.close()
        if self.reporter is not None:
            if error is not None and not isinstance(error, Preempted):
                status = "FAILED"
            else:
                status = "FINISHED" if error is None and self.state.step >= self.cfg.train.max_steps else "KILLED"
            self.reporter.close(status)

    # ------------------------------------------------------------------------------------------ helpers
    def _inputs(self, batch: Batch) -> ModelInputs:
        return model_inputs(batch, self.runtime.device, self.attn_implementation, self.compute_dtype)

    def _rows(self) -> int:
        """Rows of every forward: the micro batch's examples times the task's rows per example (a preference pair
        is two); one under sequence parallelism with packing (sequence_shard joins the packed rows into one
        varlen row)."""
        if self.cfg.data.packing and self.runtime.sequence_parallel > 1:
            return 1
        return self.cfg.train.micro_batch_size * self.task.rows_per_step_example(self.cfg)

    def _probe_rows(self) -> int:
        """Rows of the loss probe's forward: one, or under sequence parallelism the rows every forward has."""
        return self._rows() if self.runtime.sequence_parallel > 1 else 1

    def _local(self, batch: Batch) -> Batch:
        """This rank's part of `batch` under sequence parallelism (the whole batch otherwise)."""
        rt = self.runtime
        if rt.sequence_parallel == 1:
            return batch
        return sequence_shard(batch, rt.sequence_rank, rt.sequence_parallel, self._rows(),
                              one_row=self.cfg.data.packing)

    def _stop_agreed(self) -> bool:
        """Did any rank receive a stop signal? Asked of all ranks at every step boundary (one all-reduce), so
        they all stop at the same step and none is left waiting in a collective."""
        self._agreed_signal = int(self.runtime.all_reduce([stop_signal() or 0], "max")[0])
        return self._agreed_signal != 0

    def _stop_for_preemption(self, saved_at: int) -> None:
        if self.state.step > saved_at:
            self.save_checkpoint()
        latest = self.checkpoints.latest()
        self.runtime.barrier()
        error = Preempted(self.state.step, str(latest) if latest is not None else None, self._agreed_signal)
        self.runtime.log(f"preemption: {error}")
        raise error
