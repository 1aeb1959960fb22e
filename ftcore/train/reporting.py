"""What a run tells its user: the progress bar and one line per logged step, speed/MFU/memory per step, metrics to
metrics.jsonl (and TensorBoard; MLflow and W&B through ftcore/tracking/), eval lines, the data report and the
end-of-run summary (printed and written to output_dir/summary.json). Rank 0 writes and prints; the collectives it
needs run on every rank."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from ftcore.config import Config
from ftcore.metrics import MetricsSink, memory_now, write_summary
from ftcore.run_dir import RunDir
from ftcore.tasks.base import Task
from ftcore.tools.plot import PlotError, plot_run
from ftcore.tracking import Feed, start_feeds, wait_until_opened
from ftcore.train.runtime import Runtime


class Reporter:
    """Metrics and messages of one run (torchtitan's MetricsProcessor, in ft's words)."""

    def __init__(self, cfg: Config, runtime: Runtime, task: Task, peak_flops: Optional[float], start_step: int,
                 tracker_runs: Optional[dict[str, str]] = None, new_timeline: bool = False):
        """`task`: the run's (it words its eval lines); `tracker_runs`: the run ids of MLflow/W&B runs to continue
        (from the checkpoint), updated in place when a tracker opens; `new_timeline`: --resume none / PATH, which
        starts new tracker runs."""
        self.cfg, self.runtime, self.task, self.peak_flops = cfg, runtime, task, peak_flops
        self.output_dir = Path(cfg.output_dir)
        self.run_dir = RunDir(self.output_dir)
        self.sink = MetricsSink(self.output_dir, cfg.logging.report_to, start_step) if runtime.is_main else None
        self.feeds: list[Feed] = []
        self.last_summary: Optional[dict] = None
        if runtime.is_main:
            runs = tracker_runs if tracker_runs is not None else {}
            attempt = {"from_step": start_step, "world_size": runtime.world_size, "host": socket.gethostname(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID"),
                       "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}
            self.feeds = start_feeds(cfg, self.output_dir, runs, new_timeline, attempt, runtime.log,
                                     on_open=runs.__setitem__)
            wait_until_opened(self.feeds, min(cfg.tracking.open_timeout_s, cfg.distributed.timeout_s / 2),
                              runtime.log)
        self.totals = {"steps": 0, "tokens": 0, "trained_tokens": 0, "flops": 0.0, "step_time_s": 0.0,
                       "memory": [0.0, 0.0, 0.0]}

    def announce(self, trainable: int, total_params: int, loss: str, step: int, last: int) -> None:
        """The run's shape before its first step: world, batch, trainable parameters, ZeRO stage, which loss
        runs (`loss`, in words); and why MFU or any step at all will be missing."""
        cfg, rt = self.cfg, self.runtime
        rt.log(f"world size {rt.world_size} | effective batch {cfg.effective_batch_size(rt.world_size)} | "
               f"trainable {trainable:,} / {total_params:,} params | ZeRO-{cfg.distributed.zero_stage} | loss {loss}")
        if step >= last:
            rt.log(f"nothing to train: checkpoint is at step {step}, the run stops at {last}")
        if self.peak_flops is None:
            rt.log(f"MFU: not reported (no peak FLOP/s known for {rt.device_name if rt.cuda else 'a CPU'}; set "
                   "logging.peak_tflops to report it)")

    def add_throughput(self, metrics: dict, step_time: float) -> None:
        """Speed, MFU and memory of the step just taken (memory: the maximum over ranks), added to `metrics`."""
        memory = self.runtime.all_reduce(memory_now(self.runtime.cuda), "max")
        world = self.runtime.world_size
        metrics["step_time_s"] = step_time
        metrics["tokens_per_s"] = metrics["tokens"] / step_time
        metrics["trained_tokens_per_s"] = metrics["trained_tokens"] / step_time
        metrics["tokens_per_s_per_device"] = metrics["tokens_per_s"] / world
        if self.peak_flops is not None:
            metrics["mfu"] = metrics["flops"] / step_time / (self.peak_flops * world)
        if self.runtime.cuda:
            metrics["gpu_max_allocated_gib"], metrics["gpu_max_reserved_gib"] = memory[0], memory[1]
        metrics["host_rss_gib"] = memory[2]
        t = self.totals
        t["steps"] += 1
        t["step_time_s"] += step_time
        for key in ("tokens", "trained_tokens", "flops"):
            t[key] += metrics[key]
        t["memory"] = [max(a, b) for a, b in zip(t["memory"], memory)]

    def record(self, metrics: dict) -> None:
        """A step's or an eval's metrics into the sinks; an eval also as one line."""
        if not self.runtime.is_main:
            return
        self.sink.record(metrics)
        for feed in self.feeds:
            feed.notify()
        if any(name.startswith("eval_") for name in metrics):  # an eval: the task says what its line shows
            generated = "".join(f" {k[9:]} {v:.4f}" for k, v in metrics.items()
                                if k.startswith("eval_gen_") and k != "eval_gen_samples")
            if generated:
                generated = f";{generated} (generated, {metrics['eval_gen_samples']} samples)"
            self.runtime.log(f"step {metrics['step']}: {self.task.eval_line(metrics, self.run_dir)}{generated}")

    @contextlib.contextmanager
    def progress(self, step: int, last: int) -> Iterator[Callable[[dict], None]]:
        """A progress bar from `step` to `last`; yields `advance(metrics)`, which records a step and prints its
        line every logging.every steps."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.runtime.console, disable=not self.runtime.is_main, transient=False)
        task = progress.add_task("train", total=last, completed=step, loss="-")

        def advance(metrics: dict) -> None:
            self.record(metrics)
            progress.update(task, completed=metrics["step"], loss=f"{metrics['loss']:.4f}")
            if self.runtime.is_main and (metrics["step"] % self.cfg.logging.every == 0 or metrics["step"] == last):
                # One line per step in captured logs, however long.
                progress.console.print(step_line(metrics, last, self.task.step_words(metrics)), soft_wrap=True)

        with progress:
            yield advance

    def data_report(self, stream_report: dict) -> None:
        """All ranks' data counters summed: what was read, trained, cut, dropped and skipped (with reasons), to
        output_dir/data_report.json and one line."""
        # The ranks of a sequence group read one stream: count it once.
        reports = self.runtime.all_gather_object(stream_report)[::self.runtime.sequence_parallel]
        if not self.runtime.is_main:
            return
        keys = [k for k in reports[0] if isinstance(reports[0][k], int)]
        total = {k: sum(r[k] for r in reports) for k in keys}
        total["packing_efficiency"] = total["tokens"] / total["row_tokens"] if total["row_tokens"] else None
        total["error_examples"] = [e for r in reports for e in r["error_examples"]][:5]
        self.run_dir.data_report.write_text(json.dumps(total, indent=1))
        line = (f"data: {total['samples']:,} samples, {total['trained_tokens']:,} trained of {total['tokens']:,} "
                f"tokens; truncated {total['truncated']}, dropped (too long) {total['dropped_too_long']}, split "
                f"{total['split_records']}, skipped (malformed) {total['skipped_errors']}, skipped (nothing to "
                f"train) {total['skipped_no_trained_tokens']}")
        if self.cfg.data.packing:
            line += f"; packing efficiency {total['packing_efficiency']:.3f}"
        self.runtime.log(line)
        for example in total["error_examples"]:
            self.runtime.log(f"  skipped {example}")

    def summary(self, last_step: int, wall_time: float) -> None:
        """The end-of-run summary: printed, and written to output_dir/summary.json."""
        if not self.runtime.is_main:
            return
        summary = self.last_summary = self._summary_record(last_step, wall_time)
        write_summary(self.run_dir.summary, summary)
        t, cuda = self.totals, self.runtime.cuda
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ""
        memory = (f"peak GPU {summary['peak_gpu_allocated_gib']:.1f} GiB allocated / "
                  f"{summary['peak_gpu_reserved_gib']:.1f} GiB reserved, " if cuda else "")
        self.runtime.log(f"summary: {t['steps']} steps, {t['tokens']:,} tokens ({t['trained_tokens']:,} trained) "
                         f"in {wall_time:.1f} s; {summary['mean_tokens_per_s']:,.0f} tokens/s "
                         f"({summary['mean_trained_tokens_per_s']:,.0f} trained){mfu}; {memory}peak host RSS "
                         f"{summary['peak_host_rss_gib']:.1f} GiB")
        out = self.run_dir
        tensorboard = f" | TensorBoard {out.tensorboard}" if "tensorboard" in self.cfg.logging.report_to else ""
        self.runtime.log(f"outputs: {out.final} | checkpoints {out.checkpoints} | metrics "
                         f"{out.metrics}{tensorboard} | summary {out.summary}")

    def _summary_record(self, last_step: int, wall_time: float) -> dict:
        t, cuda, world, out = self.totals, self.runtime.cuda, self.runtime.world_size, self.run_dir
        return {
            "steps_trained": t["steps"], "last_step": last_step, "tokens": t["tokens"],
            "trained_tokens": t["trained_tokens"], "wall_time_s": wall_time, "step_time_s": t["step_time_s"],
            "mean_tokens_per_s": t["tokens"] / t["step_time_s"],
            "mean_trained_tokens_per_s": t["trained_tokens"] / t["step_time_s"],
            "mfu": (t["flops"] / t["step_time_s"] / (self.peak_flops * world)
                    if self.peak_flops is not None else None),
            "peak_gpu_allocated_gib": t["memory"][0] if cuda else None,
            "peak_gpu_reserved_gib": t["memory"][1] if cuda else None,
            "peak_host_rss_gib": t["memory"][2], "world_size": world,
            "outputs": {"final": str(out.final), "checkpoints": str(out.checkpoints),
                        "metrics": str(out.metrics),
                        "tensorboard": str(out.tensorboard) if "tensorboard" in self.cfg.logging.report_to else None,
                        "trackers": {feed.tracker.name: feed.tracker.where() for feed in self.feeds}},
        }

    def close(self, status: str = "KILLED") -> None:
        """Flush what rank 0 writes, also when the run stops on an error or a preemption; end this attempt in each
        tracker (FINISHED, FAILED, or KILLED: stopped to be resumed), with the summary, metrics.png and the config
        when the attempt trained. Says what a tracker did not take."""
        if self.sink is not None:
            self.sink.close()
        if not self.feeds:
            return
        artifacts = []
        if self.last_summary is not None:
            try:
                plot_run(self.output_dir, self.run_dir.metrics_plot)
            except PlotError:
                pass
            artifacts = [self.run_dir.summary, self.run_dir.metrics_plot, self.run_dir.config]
        deadline = time.monotonic() + self.cfg.tracking.finish_timeout_s
        for feed in self.feeds:
            left = feed.finish(self.last_summary, artifacts, status, max(deadline - time.monotonic(), 0.0))
            if left:
                self.runtime.log(left)


def step_line(metrics: dict, last: int, task_words: str = "") -> str:
    """The line printed for a logged step (`task_words`: the task's own numbers, after the loss)."""
    norm = metrics["grad_norm"]
    mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    gpu = (f" gpu {metrics['gpu_max_allocated_gib']:.1f}/{metrics['gpu_max_reserved_gib']:.1f} GiB"
           if "gpu_max_allocated_gib" in metrics else "")
    base_kl = f"base_kl {metrics['base_kl']:.4f} " if "base_kl" in metrics else ""
    packing = f" packing {metrics['packing_efficiency']:.3f}" if "packing_efficiency" in metrics else ""
    return (f"step {metrics['step']}/{last} loss {metrics['loss']:.4f} {base_kl}{task_words}lr {metrics['lr']:.3e} "
            f"grad_norm {'-' if norm is None else f'{norm:.3f}'} tok/s {metrics['tokens_per_s']:.0f} "
            f"(trained {metrics['trained_tokens_per_s']:.0f}){mfu}{gpu} rss {metrics['host_rss_gib']:.1f} GiB"
            f"{packing}")
