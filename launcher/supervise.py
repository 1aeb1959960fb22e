"""Runs one node's training processes under accelerate's launcher and watches them.

`ft launch` runs `accelerate launch` inside its own process, which makes this process torch elastic's agent for
the node: it starts the ranks, notices when one exits, stops the rest, and raises ChildFailedError with every
failed rank's exit code. Around that, this module adds what a long run needs:

- Stop signals (USR1, TERM) are blocked in this process and taken by a thread, which forwards USR1 to the
  training processes. They inherit the block, so a signal that arrives while a rank is still importing waits
  until `ft train` has installed its handler (ftcore/preemption.py) instead of killing the rank.
- Exit status: 0 when training finished; 75 when the ranks checkpointed on a stop signal (requeue to resume);
  otherwise 1, after printing which rank failed first and the tail of its log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ftcore.preemption import LAUNCHER_PID_ENV, PREEMPTED_EXIT_STATUS, STOP_SIGNALS

TAIL_LINES = 25


@dataclass(frozen=True)
class NodeContext:
    """One node's launcher: its rank, process count and where the attempt's logs go."""
    node_rank: int
    nproc: int
    attempt_dir: Path     # output_dir/logs/<attempt>: per-rank logs (node<k>/...) and failure records
    tee: bool             # per-rank log files exist (output not going to a terminal)
    stop_grace_s: float = 30.0  # distributed.stop_grace_s: after a rank failed, how long the others may take
    job: str = "training"  # what the ranks run, as the messages name it ("evaluation": ft eval, nothing to resume)


def say(ctx: NodeContext, message: str) -> None:
    """A launcher message on stderr, prefixed with the node."""
    print(f"[node{ctx.node_rank} launcher] {message}", file=sys.stderr, flush=True)


def block_stop_signals() -> None:
    """First thing in `ft launch`, before any thread exists: every thread started later, and every rank, inherits
    the block (a thread that did not block them would take the default action: the whole process dies)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class StopForwarder:
    """Takes USR1/TERM for this process (sigwait in a thread) and forwards USR1 to every training process of the
    node."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        self.received: Optional[int] = None

    def start(self) -> None:
        """Start forwarding stop signals to the ranks (on a thread of its own)."""
        block_stop_signals()  # idempotent; the thread must start with them blocked to sigwait for them
        threading.Thread(target=self._loop, name="ft-stop-forwarder", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.forward(signal.sigwait(STOP_SIGNALS))

    def forward(self, signum: int) -> None:
        """Send `signum` to every rank of this node (once a rank has stopped, the rest follow)."""
        import psutil

        self.received = self.received or signum
        ranks = psutil.Process().children()
        for proc in ranks:
            try:
                proc.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass
        plural = "es" if len(ranks) != 1 else ""
        if self.ctx.job == "training":
            say(self.ctx, f"{signal.Signals(signum).name} received: asked {len(ranks)} training process{plural} "
                          "to checkpoint at the next step boundary and stop")
        else:
            say(self.ctx, f"{signal.Signals(signum).name} received: stopped {len(ranks)} {self.ctx.job} "
                          f"process{plural}")


class FailureWatchdog:
    """Ends a failed run in bounded time. Once any rank of the run has recorded a failure (write_failure_record:
    under output_dir, so on Slurm every node sees it), this node's ranks still running after
    distributed.stop_grace_s are killed. torch elastic stops the survivors of a failed rank with SIGTERM and 30 s
    of grace fixed in its code, and a hung rank (a stuck driver, a stopped process) does not answer SIGTERM."""

    POLL_S = 0.2

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        self.failures = ctx.attempt_dir / "failures"

    def start(self) -> None:
        """Watch for failure records on a thread of its own."""
        threading.Thread(target=self._loop, name="ft-failure-watchdog", daemon=True).start()

    def _loop(self) -> None:
        while not any(self.failures.glob("rank*.json")):
            time.sleep(self.POLL_S)
        time.sleep(self.ctx.stop_grace_s)
        self.kill_survivors()

    def kill_survivors(self) -> None:
        """SIGKILL this node's ranks that are still running."""
        import psutil

        killed = 0
        for proc in psutil.Process().children():  # this node's ranks
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
        if killed:
            say(self.ctx, f"a rank failed and {killed} process(es) of this node were still running "
                          f"{self.ctx.stop_grace_s:g} s later (distributed.stop_grace_s): killed them")


def run_node(argv: Sequence[str], env: Mapping[str, str], ctx: NodeContext) -> int:
    """Run an `accelerate launch` argv ([python, -m, accelerate.commands.launch, ...]) in this process."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.clear()
    os.environ.update(env)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks die with this process (die_with_launcher)
    # torch elastic logs every non-zero rank exit as an error line; ft reports the outcome itself (below).
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    forwarder = StopForwarder(ctx)
    forwarder.start()
    FailureWatchdog(ctx).start()
    args = launch_command_parser().parse_args(list(argv[3:]))
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if ctx.job != "training" and forwarder.received is not None:  # nothing to checkpoint: the ranks end
            name = signal.Signals(forwarder.received).name
            say(ctx, f"{ctx.job} stopped by {name} before it finished: nothing was written; rerun it")
            return 128 + forwarder.received
        if first.exitcode == PREEMPTED_EXIT_STATUS:
            say(ctx, f"training checkpointed and stopped on a stop signal: exit status {PREEMPTED_EXIT_STATUS} "
                     "(rerun or requeue to resume)")
            return PREEMPTED_EXIT_STATUS
        report_failure(ctx, e.failures)
        return 1
    except SignalException as e:
        say(ctx, f"stopped by {e.sigval.name}")
        return 128 + int(e.sigval)
    if forwarder.received is not None:
        say(ctx, f"a stop signal arrived but {ctx.job} had already finished: nothing to resume")
    return 0


def report_failure(ctx: NodeContext, failures: Mapping[int, object]) -> None:
    """Name the rank that failed first, with the reason and the tail of its log.

    Ranks write a failure record (time, message) when they fail with an error; a rank killed by a signal cannot,
    and is itself the first failure (its peers fail after it, in the collective it left)."""
    records = []
    for path in sorted((ctx.attempt_dir / "failures").glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    local = {ctx.node_rank * ctx.nproc + rank: f for rank, f in failures.items()}
    # A rank ended by SIGTERM after another recorded its error was stopped by torch elastic (it stops the
    # survivors of a failed rank so), not the cause.
    killed = sorted((f.timestamp, rank, f) for rank, f in local.items()
                    if f.exitcode < 0 and not any(r["rank"] == rank for r in records)
                    and not (records and f.exitcode == -signal.SIGTERM))
    if killed:
        _, rank, failure = killed[0]
        reason = f"killed by {failure.signal_name()}"
    elif records:
        first = min(records, key=lambda r: r["time_ns"])
        rank, reason = first["rank"], first["message"]
    else:
        rank, failure = min(local.items(), key=lambda item: item[1].timestamp)
        reason = f"exit code {failure.exitcode}"
    codes = ", ".join(f"rank {r}: {_describe(f.exitcode)}" for r, f in sorted(local.items()))
    say(ctx, f"{ctx.job} failed; rank {rank} failed first: {reason} (this node's ranks: {codes})")
    log = _rank_log(ctx, rank)
    if log is None:
        say(ctx, f"no log found for rank {rank} under {ctx.attempt_dir}" if ctx.tee else
            f"rank {rank}'s output is above")
        return
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    say(ctx, f"last {len(lines)} lines of {log}:")
    for line in lines:
        print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


def _rank_log(ctx: NodeContext, rank: int) -> Optional[Path]:
    """torch elastic writes <log_dir>/<run id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log; ft train writes
    its errors to stderr. The node is found from the rank (ranks are numbered node by node)."""
    node, local_rank = divmod(rank, ctx.nproc)
    candidates = sorted((ctx.attempt_dir / f"node{node}").glob(f"*/attempt_*/{local_rank}/stderr.log"),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def write_failure_record(message: str) -> None:
    """Called by a failing rank (ft train): when and why, for the launcher's first-failure report."""
    directory = os.environ.get("FT_FAILURE_DIR")
    if not directory:
        return
    rank = int(os.environ.get("RANK", "0"))
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "time_ns": time.time_ns(), "message": message.splitlines()[0][:500] if message
                  else "error"}
        tmp = Path(directory) / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, Path(directory) / f"rank{rank}.json")
    except OSError:
        pass  # the report falls back on exit codes


def lost_peer_message(error: BaseException) -> Optional[str]:
    """A collective that failed because another rank died or hung, as one line (else None)."""
    text = str(error)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    if any(s in text for s in ("Timed out", "timed out", "Timeout", "Watchdog caught collective")):
        return (f"a collective timed out waiting for another rank (distributed.timeout_s): a peer hung or is far "
                f"behind; see which rank failed first ({first})")
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                               "NCCL communicator was aborted", "ProcessGroupGloo", "recvBytes")):
        return f"lost the connection to another rank in a collective (it died): {first}"
    return None
