"""logging.report_to: mlflow -- one MLflow run per training run, through MlflowClient (the REST API of a tracking
server, or a local store). Metrics are step-keyed; what a reopened run already holds is read back from the server,
so nothing is logged twice. Parameters are immutable in MLflow: a resume that changed a field logs only the new
ones and records the change as a tag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ftcore.tracking.tracker import Tracker, flat_params

MAX_PARAM_VALUE = 6000  # MLflow's limit on a parameter's value
MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_PER_CALL = 100


class MlflowRun(Tracker):
    """A training run's MLflow run (the `tracking.mlflow` settings, then MLflow's environment variables)."""

    name = "mlflow"

    def __init__(self, cfg: Any, run_name: str, output_dir: Path, attempt: dict):
        settings = cfg.tracking.mlflow
        self.output_dir = output_dir.resolve()
        self.default_store = not (settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.uri = (settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{self.output_dir / 'mlflow.db'}")
        self.experiment = settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ft"
        self.run_name, self.attempt = run_name, attempt
        self.params = {k: v[:MAX_PARAM_VALUE] for k, v in flat_params(cfg.model_dump(mode="json")).items()}
        self.run_id: Optional[str] = None
        self.note = ""
        # The feed retries on its own schedule: one failed request must not block for MLflow's default minutes of
        # retries. A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client: Any = None

    def open(self, run_id: Optional[str], delivered: dict[str, int]) -> tuple[str, dict[str, int]]:
        """Reopen `run_id` (status RUNNING again) or create the run; the steps it holds come from the server."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient  # (imported here, in the feed's thread: seconds of import)

        self.client = MlflowClient(tracking_uri=self.uri)

        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.note = f" (the checkpoint's run {run_id} is not on this server: a new run)"
        if run is None:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name,
                                         tags={"ft.output_dir": str(self.output_dir)})
        self.run_id = run.info.run_id
        held = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}
        attempts = int(run.data.tags.get("ft.attempts", "0")) + 1
        changed = sorted(k for k, v in self.params.items() if k in run.data.params and run.data.params[k] != v)
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in self.params.items() if k not in run.data.params]
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_CALL])
        story = ", ".join(f"{k} {v}" for k, v in self.attempt.items() if v is not None)
        if changed:
            story += "; changed: " + ", ".join(f"{k}={self.params[k]}" for k in changed)
        self.client.log_batch(self.run_id, tags=[RunTag("ft.attempts", str(attempts)),
                                                 RunTag(f"ft.attempt.{attempts}", story)])
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        return self.run_id, held

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        # The default local store keeps its artifacts beside it, in output_dir, not in the working directory.
        location = (self.output_dir / "mlartifacts").as_uri() if self.default_store else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        """One log_batch per 1000 metrics (MLflow's limit)."""
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(when * 1000), step) for step, when, values in rows
                   for key, value in values.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_CALL])

    def finish(self, summary: Optional[dict], artifacts: list[Path], status: str) -> None:
        """The summary's numbers as summary/ metrics at the last step, the artifacts, the status."""
        if summary:
            from mlflow.entities import Metric

            step = int(summary.get("last_step", 0))
            numbers = [Metric(f"summary/{k}", float(v), 0, step) for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            self.client.log_batch(self.run_id, metrics=numbers)
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)

    def where(self) -> str:
        """Server, experiment and run id."""
        run = f"run {self.run_id}" if self.run_id else "(the run is not open yet)"
        return f"{self.uri} experiment {self.experiment} {run}{self.note}"
