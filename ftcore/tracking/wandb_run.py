"""logging.report_to: wandb -- one Weights & Biases run per training run: every attempt calls wandb.init with the
run's id and resume="allow", so the attempts of a requeued Slurm job are one run (online: one run's charts;
offline: one directory per attempt with the same run id, which `wandb sync` uploads as one run)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

from ftcore.tracking.tracker import Tracker


class WandbRun(Tracker):
    """A training run's W&B run (the `tracking.wandb` settings, then W&B's environment variables)."""

    name = "wandb"

    def __init__(self, cfg: Any, run_name: str, output_dir: Path, attempt: dict):
        settings = cfg.tracking.wandb
        self.project = settings.project or os.environ.get("WANDB_PROJECT") or "ft"
        self.entity = settings.entity or os.environ.get("WANDB_ENTITY")
        self.mode = settings.mode or os.environ.get("WANDB_MODE") or "online"
        self.dir = Path(settings.dir or os.environ.get("WANDB_DIR") or output_dir).resolve()
        self.config = cfg.model_dump(mode="json")
        self.run_name, self.attempt = run_name, attempt
        self.run: Any = None

    def open(self, run_id: Optional[str], delivered: dict[str, int]) -> tuple[str, dict[str, int]]:
        """wandb.init with the run's id (a new one, or $WANDB_RUN_ID, for a new run). W&B cannot be asked offline
        which steps a run holds: trackers.json's account (`delivered`) is what it holds."""
        import wandb

        resumed = run_id is not None
        run_id = run_id or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(6)
        self.dir.mkdir(parents=True, exist_ok=True)
        # console off: rank 0's own lines stay as they are (W&B would wrap stdout); silent: ft prints where it is.
        self.run = wandb.init(project=self.project, entity=self.entity, name=self.run_name, id=run_id,
                              resume="allow", dir=str(self.dir), mode=self.mode, config=self.config,
                              settings=wandb.Settings(console="off", silent=True))
        if resumed:
            self.run.config.update(self.config, allow_val_change=True)  # a resume may change e.g. stop_at_step
        attempts = int(self.run.summary.get("ft/attempts", 0) or 0) + 1
        self.run.summary.update({"ft/attempts": attempts,
                                 f"ft/attempt_{attempts}": {k: v for k, v in self.attempt.items() if v is not None}})
        return run_id, delivered

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        """One wandb.log per step (rows of one step, train and eval, merge into W&B's row for it)."""
        for step, _, metrics in rows:
            self.run.log(metrics, step=step)

    def finish(self, summary: Optional[dict], artifacts: list[Path], status: str) -> None:
        """The summary into the run's summary, the artifacts into the run's files, then wandb's finish (a run stopped to
        be resumed is marked preempting first)."""
        if summary:
            self.run.summary.update({f"summary/{k}": v for k, v in summary.items() if not isinstance(v, dict)})
        for path in artifacts:  # copied, not linked: each attempt's files as they were when it ended
            if path.is_file():
                shutil.copyfile(path, Path(self.run.dir) / path.name)
        if status == "KILLED":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if status == "FAILED" else 0)

    def where(self) -> str:
        """The run's page (online) or its offline directory and how to upload it."""
        if self.run is None:
            return f"project {self.project} ({self.mode}; the run is not open yet)"
        if self.mode == "offline":
            run_dir = Path(self.run.dir).parent
            return f"offline run {self.run.id} in {run_dir} (upload: wandb sync {run_dir})"
        return f"run {self.run.id} {self.run.url or ''}".rstrip()
