"""Experiment trackers (logging.report_to: mlflow, wandb): rank 0's metrics.jsonl, replicated to one tracker run per
training run by a background thread, so a slow or unreachable tracker never stalls or stops training.

One tracker run per training run. Its id is saved in every checkpoint (trainer_state.json "trackers") and in
output_dir/trackers.json (for an attempt killed before its first checkpoint), so a resumed attempt -- a rerun, a
Slurm requeue, another world size -- reopens the same tracker run. A new timeline (`--resume none` or `--resume
PATH`) starts a new tracker run.

Each tracker run is a replica of metrics.jsonl. When it opens it says which step it already holds for every metric
(MLflow: read back from the server; W&B: from trackers.json, which the feed updates after each delivery); the feed
then sends every row past that, in file order: first what an earlier attempt wrote but could not deliver, then
this attempt's rows as they are written. A row the tracker holds is never sent again, so the steps an interrupted
attempt logged after its last checkpoint -- trained again by the resumed attempt, to the same loss under exact
resume -- appear once, with the first attempt's values (its own step times). While a tracker is unreachable the
feed retries with backoff; the rows wait in metrics.jsonl, not in memory.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ftcore.durable import atomic_write_text
from ftcore.run_dir import RunDir
from ftcore.tracking.mlflow_run import MlflowRun
from ftcore.tracking.tracker import Tracker
from ftcore.tracking.wandb_run import WandbRun

BATCH_ROWS = 40  # rows per delivery call (MLflow takes at most 1000 metrics per request)

# metrics.jsonl keys -> tracker names, grouped as TensorBoard's tags are (train/, eval/, perf/, memory/, data/).
NAMES = {"loss": "train/loss", "base_kl": "train/base_kl", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens": "train/tokens", "trained_tokens": "train/trained_tokens", "flops": "perf/flops",
         "tokens_per_s": "perf/tokens_per_s", "trained_tokens_per_s": "perf/trained_tokens_per_s",
         "tokens_per_s_per_device": "perf/tokens_per_s_per_device", "mfu": "perf/mfu",
         "step_time_s": "perf/step_time_s", "packing_efficiency": "data/packing_efficiency",
         "gpu_max_allocated_gib": "memory/gpu_max_allocated_gib",
         "gpu_max_reserved_gib": "memory/gpu_max_reserved_gib", "host_rss_gib": "memory/host_rss_gib"}
NOT_METRICS = {"step", "time"}


def metric_name(key: str) -> str:
    """The tracker's name for a metrics.jsonl key: eval_loss -> eval/loss, loss -> train/loss, mfu -> perf/mfu."""
    if key in NAMES:
        return NAMES[key]
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def tracked_metrics(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row, by tracker name (None, lists and flags are not metrics)."""
    return {metric_name(k): float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def one_line(error: BaseException) -> str:
    """An exception as one short line (trackers' errors carry whole HTTP responses)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Ledger:
    """output_dir/trackers.json: each tracker's run id, where it is, and the last step it holds per metric."""

    def __init__(self, output_dir: Path):
        self.path = RunDir(output_dir).trackers
        self.lock = threading.Lock()
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def entry(self, name: str) -> dict:
        """The entry of one tracker (empty when it never opened here)."""
        return self.entries.get(name, {})

    def update(self, name: str, **fields: Any) -> None:
        """Set fields of a tracker's entry and write the file atomically."""
        with self.lock:
            self.entries.setdefault(name, {}).update(fields)
            atomic_write_text(self.path, json.dumps(self.entries, indent=1))

    def forget(self) -> None:
        """A new timeline: no tracker run of this directory is continued."""
        with self.lock:
            self.entries = {}
            if self.path.exists():
                atomic_write_text(self.path, "{}")


class Feed(threading.Thread):
    """Replicates metrics.jsonl to one tracker: opens its run, then delivers rows as the file grows, retrying with
    backoff while the tracker is unreachable. `log` prints one line (rank 0's console)."""

    POLL_S = 2.0
    MAX_BACKOFF_S = 60.0

    def __init__(self, tracker: Tracker, jsonl: Path, ledger: Ledger, run_id: Optional[str], log: Callable[[str], None],
                 on_open: Callable[[str, str], None]):
        super().__init__(name=f"ft-{tracker.name}-feed", daemon=True)  # a hung tracker never blocks the exit
        self.tracker, self.jsonl, self.ledger, self.log, self.on_open = tracker, jsonl, ledger, log, on_open
        self.run_id = run_id
        self.opened = False
        self.delivered: dict[str, int] = {}
        self.offset = 0  # bytes of metrics.jsonl read and delivered (or skipped as already held)
        self.failure: Optional[str] = None
        self.failing_since_step: Optional[int] = None
        self.first_try = threading.Event()  # set once the run opened, or the first try to open it failed
        self.wake = threading.Event()
        self.finishing = threading.Event()
        self.final: tuple[Optional[dict], list[Path], str] = (None, [], "KILLED")
        self.finished = False

    # ------------------------------------------------------------------ training thread
    def notify(self) -> None:
        """A row was appended to metrics.jsonl."""
        self.wake.set()

    def finish(self, summary: Optional[dict], artifacts: list[Path], status: str, timeout_s: float) -> Optional[str]:
        """Deliver what is left, then the summary, artifacts and status, waiting at most `timeout_s`. Returns None
        when all was delivered, else one line saying what was not."""
        self.final = (summary, artifacts, status)
        self.finishing.set()
        self.wake.set()
        self.join(timeout_s)
        if self.finished:
            return None
        pending = self.pending_steps()
        rows = f"steps {pending[0]}-{pending[1]} " if pending else ""
        why = f": {self.failure}" if self.failure else f" within tracking.finish_timeout_s={timeout_s:g}"
        return (f"{self.tracker.name}: {rows}not delivered{why}; they are in {self.jsonl}, and rerunning the same "
                f"command sends them to the same run")

    # ------------------------------------------------------------------ feed thread
    def run(self) -> None:
        """The feed thread: open, deliver, wait for rows (or back off after a failure), until finish()."""
        backoff = 1.0
        while True:
            try:
                self._step()
                if self.finishing.is_set():
                    self._step()  # rows written between the last delivery and finish()
                    self.tracker.finish(*self.final)
                    self.finished = True
                    return
            except Exception as e:  # noqa: BLE001 -- whatever the tracker raises, training goes on
                if self.failure is None:
                    self.failing_since_step = (self.pending_steps() or (None, None))[0]
                    self.log(f"{self.tracker.name}: not reachable ({one_line(e)}); training goes on, metrics.jsonl "
                             f"keeps every step, and the rows are sent when it is back")
                self.failure = one_line(e)
                self.first_try.set()
                if self.finishing.is_set():
                    return  # one last try was made; finish() reports what is left
                self.wake.wait(backoff)
                self.wake.clear()
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)
                continue
            if self.failure is not None:
                self.log(f"{self.tracker.name}: reachable again; the rows held back since step "
                         f"{self.failing_since_step} are delivered")
                self.failure = None
            backoff = 1.0
            self.wake.wait(self.POLL_S)
            self.wake.clear()

    def _step(self) -> None:
        if not self.opened:
            entry = self.ledger.entry(self.tracker.name)
            known = entry.get("delivered", {}) if entry.get("run_id") == self.run_id else {}
            self.run_id, self.delivered = self.tracker.open(self.run_id, dict(known))
            self.opened = True
            self.ledger.update(self.tracker.name, run_id=self.run_id, where=self.tracker.where(),
                               delivered=self.delivered)
            self.on_open(self.tracker.name, self.run_id)
            self.log(f"{self.tracker.name}: {self.tracker.where()}")
            self.first_try.set()
        while self._deliver_some():
            pass

    def _read_rows(self) -> tuple[list[dict], int]:
        """The next complete rows of metrics.jsonl after the offset (up to BATCH_ROWS), and the offset after them."""
        rows, offset = [], self.offset
        try:
            with open(self.jsonl, "rb") as f:
                f.seek(offset)
                while len(rows) < BATCH_ROWS:
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        break  # the end, or a line still being written
                    offset += len(line)
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue  # (a line cut by a kill is removed before a new attempt appends)
        except FileNotFoundError:
            pass
        return rows, offset

    def _deliver_some(self) -> bool:
        """Deliver the next batch; True when there may be more."""
        rows, offset = self._read_rows()
        if offset == self.offset:
            return False
        batch, delivered = [], dict(self.delivered)
        for row in rows:
            step = row.get("step")
            if not isinstance(step, int):
                continue
            metrics = {k: v for k, v in tracked_metrics(row).items() if step > delivered.get(k, 0)}
            if metrics:
                batch.append((step, float(row.get("time", time.time())), metrics))
                delivered.update(dict.fromkeys(metrics, step))
        if batch:
            self.tracker.log(batch)
        self.offset, self.delivered = offset, delivered
        if batch:
            self.ledger.update(self.tracker.name, delivered=delivered)
        return True

    def pending_steps(self) -> Optional[tuple[int, int]]:
        """First and last step of the rows not delivered yet, or None."""
        steps = []
        try:
            with open(self.jsonl, "rb") as f:
                f.seek(self.offset)
                for line in f:
                    try:
                        steps.append(json.loads(line)["step"])
                    except (ValueError, KeyError):
                        continue
        except OSError:
            return None
        return (min(steps), max(steps)) if steps else None


def wait_until_opened(feeds: list[Feed], timeout_s: float, log: Callable[[str], None]) -> None:
    """Hold the first step until every feed opened its run (its id is then in trackers.json, so a kill at any step
    continues it) or failed a first time, at most `timeout_s` in all; one line for each that did neither."""
    deadline = time.monotonic() + timeout_s
    for feed in feeds:
        if not feed.first_try.wait(max(deadline - time.monotonic(), 0.0)):
            log(f"{feed.tracker.name}: the run did not open within {timeout_s:g} s (tracking.open_timeout_s); "
                f"training starts, and the run is opened and fed in the background")


def build_trackers(names: list[str], cfg: Any, run_name: str, output_dir: Path, attempt: dict) -> list[Tracker]:
    """The tracker objects of logging.report_to (tensorboard is written in-process by MetricsSink)."""
    trackers: list[Tracker] = []
    if "mlflow" in names:
        trackers.append(MlflowRun(cfg, run_name, output_dir, attempt))
    if "wandb" in names:
        trackers.append(WandbRun(cfg, run_name, output_dir, attempt))
    return trackers


def start_feeds(cfg: Any, output_dir: Path, run_ids: dict[str, str], new_timeline: bool, attempt: dict,
                log: Callable[[str], None], on_open: Callable[[str, str], None]) -> list[Feed]:
    """Rank 0: one running Feed per tracker of logging.report_to. The run to continue is the checkpoint's
    (`run_ids`), else trackers.json's (an attempt that died before its first checkpoint); none on a new timeline."""
    names = [name for name in cfg.logging.report_to if name in ("mlflow", "wandb")]
    if not names:
        return []
    ledger = Ledger(output_dir)
    if new_timeline:
        ledger.forget()
        run_ids.clear()
    run_name = cfg.tracking.run_name or output_dir.resolve().name
    feeds = []
    for tracker in build_trackers(names, cfg, run_name, output_dir, attempt):
        run_id = run_ids.get(tracker.name) or ledger.entry(tracker.name).get("run_id")
        feed = Feed(tracker, RunDir(output_dir).metrics, ledger, run_id, log, on_open)
        feed.start()
        feeds.append(feed)
    return feeds
