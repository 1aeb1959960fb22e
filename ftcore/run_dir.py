"""The layout of a run's output_dir, in one place: every module that writes or reads a run's files asks RunDir
for the path instead of spelling the name.

    output_dir/
        config.yaml         the resolved config the run trained with (rank 0, at start)
        ds_config.json      the DeepSpeed config derived from it
        checkpoints/        step-NNNNNN/ dirs (ftcore/checkpoint.py)
        final/              the adapter or full model, written as final.tmp/ and renamed when complete
        metrics.jsonl       one object per step and eval (rank 0); metrics.png is drawn from it; rows past a resumed
                            checkpoint move to metrics.superseded.jsonl
        eval/               evaluation.generate's predictions per step
        tb/                 TensorBoard event files
        summary.json        the run's totals, written at the end
        data_report.json    what the data pipeline kept, truncated and skipped
        trackers.json       MLflow / W&B run ids and the last step each holds (ftcore/tracking)
        audit/              per-rank audit files (data.audit: samples, positions, engine bytes)
        logs/<attempt>/     per-rank logs and failure records of each launch attempt (launcher/supervise.py)
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """The paths of one run's files under `root` (its output_dir)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        """The resolved config the run trained with."""
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        """The DeepSpeed config derived from it."""
        return self.root / "ds_config.json"

    @property
    def checkpoints(self) -> Path:
        """step-NNNNNN/ checkpoint dirs (ftcore/checkpoint.py)."""
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        """The finished adapter or model."""
        return self.root / "final"

    @property
    def final_staging(self) -> Path:
        """Where final/ is written before the rename that makes it complete."""
        return self.root / "final.tmp"

    @property
    def metrics(self) -> Path:
        """One JSON object per step and eval, written by rank 0."""
        return self.root / "metrics.jsonl"

    @property
    def metrics_superseded(self) -> Path:
        """Rows an interrupted attempt logged past the checkpoint the next attempt resumed from (kept)."""
        return self.root / "metrics.superseded.jsonl"

    @property
    def metrics_plot(self) -> Path:
        """Loss, learning rate and tokens/s drawn from metrics.jsonl."""
        return self.root / "metrics.png"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files."""
        return self.root / "tb"

    @property
    def summary(self) -> Path:
        """The run's totals, written at the end."""
        return self.root / "summary.json"

    @property
    def data_report(self) -> Path:
        """What the data pipeline kept, truncated and skipped."""
        return self.root / "data_report.json"

    @property
    def trackers(self) -> Path:
        """MLflow / W&B run ids and the last step each holds."""
        return self.root / "trackers.json"

    @property
    def eval_predictions(self) -> Path:
        """eval/: every prediction of evaluation.generate, per step."""
        return self.root / "eval"

    @property
    def audit(self) -> Path:
        """Per-rank audit files (data.audit)."""
        return self.root / "audit"

    @property
    def logs(self) -> Path:
        """Per-attempt launch logs."""
        return self.root / "logs"

    def attempt(self, name: str) -> Path:
        """logs/<name>: one launch attempt's per-rank logs and failure records."""
        return self.logs / name
