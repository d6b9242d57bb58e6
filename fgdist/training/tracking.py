"""MLflow from rank 0. The embedded default is a SQLite store in the working directory; a
`mlflow server` URI works the same. Tracking never stops training: if the store goes away, the
tracker says so once, stops logging, and the run's local results are still written."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

DEFAULT_URI = "sqlite:///mlflow.db"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
log = logging.getLogger("fgdist.training.tracking")


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"} (MLflow params are flat strings)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class Tracker:
    """Logs on rank 0; a no-op elsewhere. `run_id` continues an existing run (resume)."""

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        system_metrics: bool = True,
    ):
        self.enabled = enabled
        self.uri = uri
        self.run_id = run_id
        self._mlflow = None
        if not enabled:
            return
        # MLflow's HTTP defaults retry for minutes before a call fails; a lost tracking server
        # would stall training that long. Bounded defaults (the user's environment wins).
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow

        self._mlflow = mlflow
        self._guard("start the run", lambda: self._start(experiment, run_name, system_metrics))

    def _start(self, experiment, run_name, system_metrics):
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(
            run_id=self.run_id, run_name=None if self.run_id else run_name, log_system_metrics=system_metrics
        )
        self.run_id = run.info.run_id

    def _guard(self, what: str, call: Callable[[], object]) -> None:
        """Run one MLflow call; on failure, warn once and stop tracking (training goes on).
        `call` is a closure, so where tracking is off (ranks other than 0, or after a failure)
        not even the mlflow attribute is looked up."""
        if not self.enabled:
            return
        try:
            call()
        except Exception as err:  # any transport or store error: tracking is best effort
            self.enabled = False
            log.warning(
                "MLflow at %s failed to %s (%s: %s); tracking is off for the rest of this run, training continues "
                "and results are written locally",
                self.uri,
                what,
                type(err).__name__,
                str(err)[:200],
            )

    def log_params(self, params: dict[str, str]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._guard("log params", lambda batch=dict(items[i : i + 100]): self._mlflow.log_params(batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._guard("log metrics", lambda: self._mlflow.log_metrics(metrics, step=step))

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        self._guard(f"log artifact {path}", lambda: self._mlflow.log_artifact(path, folder))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set tags", lambda: self._mlflow.set_tags(tags))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("end the run", lambda: self._mlflow.end_run(status))
