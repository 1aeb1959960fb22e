"""The interface a tracker run implements for the feed (ftcore/tracking/__init__.py), and the config as tracker
parameters: what the MLflow and W&B runs share, below the feed that drives them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted parameters (lists as JSON): optimizer.lr -> '0.0002'."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class Tracker:
    """What the feed needs of a tracker run (MlflowRun, WandbRun)."""

    name = ""

    def open(self, run_id: Optional[str], delivered: dict[str, int]) -> tuple[str, dict[str, int]]:
        """Create the run (run_id None) or reopen it; returns its id and the last step it holds per metric
        (`delivered` is trackers.json's account, for trackers that cannot be asked)."""
        raise NotImplementedError

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        """Deliver (step, unix time, metrics) rows, in step order."""
        raise NotImplementedError

    def finish(self, summary: Optional[dict], artifacts: list[Path], status: str) -> None:
        """End this attempt: the summary and artifacts (at the end of a training run), then the run's status:
        FINISHED, FAILED, or KILLED (stopped to be resumed: preemption, a time slice)."""
        raise NotImplementedError

    def where(self) -> str:
        """Where the run is, for the log: server and run id, or the offline directory."""
        raise NotImplementedError
