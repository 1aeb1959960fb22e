"""How every benchmark starts a command: `ft` is always this interpreter's (`sys.executable -m launcher.cli`), never
whatever `ft` comes first on PATH (a benchmark run as `.venv/bin/python benchmarks/x.py` without an activated venv
has none), and a command that fails raises with its exit code and the end of its output, not a bare exit status."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def ft(*args: str) -> list[str]:
    """argv of `ft ARGS...` run by this interpreter, as the tests run it."""
    return [sys.executable, "-m", "launcher.cli", *args]


class CommandFailed(RuntimeError):
    """A benchmark's command exited non-zero; the message holds the command and the tail of its output."""


def run_checked(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run argv to completion, capturing its output; raise CommandFailed saying why when it fails."""
    proc = subprocess.run(list(argv), cwd=cwd, env=None if env is None else dict(env), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        shown = " ".join(str(a) for a in argv)
        raise CommandFailed(f"{shown[:300]} exited {proc.returncode}\n--- stdout (end)\n{proc.stdout[-2000:]}"
                            f"\n--- stderr (end)\n{proc.stderr[-4000:]}")
    return proc


def write_peak_rss(path: Path) -> None:
    """This process's peak RSS so far, as {"peak_rss_gib": ...} in `path` (a worker reports it to its benchmark)."""
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    path.write_text(json.dumps({"peak_rss_gib": peak_gib}))
