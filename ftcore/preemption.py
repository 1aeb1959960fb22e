"""Stop signals in the training processes: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM
(preemption, `kill`). The handler only records the signal; the recipe asks all ranks at the next step boundary
(one all-reduce, so no rank is left waiting in a collective), saves a checkpoint and exits with
PREEMPTED_EXIT_STATUS. No torch import: the launcher shares the constants.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL: "try again later" -- the job is requeued and resumes

_received: list[int] = []


class Preempted(Exception):
    """The run stopped at a step boundary on a stop signal, with its state checkpointed."""

    def __init__(self, step: int, checkpoint: Optional[str], signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}: {where}; exit status "
                         f"{PREEMPTED_EXIT_STATUS}, rerun the same command (or requeue) to resume")


def _record(signum: int, _frame) -> None:
    _received.append(signum)


def install_stop_handlers() -> None:
    """Record stop signals instead of dying on them. `ft launch` starts its processes with these signals blocked,
    so one that arrives while a process is still importing waits, pending, until this unblocks it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def end_on_stop_signals() -> None:
    """A process with nothing to save (an ft eval rank) ends on a stop signal, as by default: `ft launch`'s
    supervisor started it with them blocked, which would otherwise leave it deaf to USR1 and TERM."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore_stop_signals() -> None:
    """Once the run has finished or checkpointed, a late stop signal has nothing left to stop. CPython puts SIG_DFL
    back for its own handlers at interpreter shutdown, so a signal arriving while a process tears down (seconds,
    with torch and DeepSpeed) would kill it and turn a finished run into a failure; SIG_IGN is kept to the end."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_signal() -> Optional[int]:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


LAUNCHER_PID_ENV = "FT_LAUNCHER_PID"


def die_with_launcher() -> None:
    """A training process started by `ft launch` dies with it: if the launcher is killed (kill -9, OOM killer), the
    kernel sends this process SIGKILL (PR_SET_PDEATHSIG) instead of leaving it running, holding its GPU and waiting
    in a collective forever. The checkpoints stay consistent: a save is only complete once renamed into place."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the request took effect
        os._exit(1)
