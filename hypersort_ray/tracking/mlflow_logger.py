"""MLflow run logging that never takes training down.

Training must survive a tracking server that is down, slow or refusing: every call goes through
:class:`RunLogger`, which warns once on the first failure and then stops trying (the run folder keeps
``history.csv``, ``latents.csv`` and the checkpoints either way).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypersort_ray.config import ExperimentConfig, flatten

log = logging.getLogger(__name__)

# A dead server must not stall training for minutes of retries: keep MLflow's HTTP client brief
# unless the user chose otherwise.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class RunLogger:
    """A fail-soft handle on one MLflow run (create on the driver, use anywhere by run id).

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: an existing run to log into, or None until :meth:`start` creates one.
        enabled: False turns every call into a no-op.
    """

    def __init__(self, tracking_uri: str, run_id: str | None = None, enabled: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.enabled = enabled
        self._warned = False
        self._client = None

    # The client is created lazily so the object pickles cleanly into Ray actors.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _fail(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            msg = (
                f"MLflow tracking at {self.tracking_uri} failed while {what} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); training continues, metrics stay in the "
                "run folder; further MLflow errors are silenced for this run"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
        self._warned = True
        self.enabled = False

    def start(
        self,
        experiment: str,
        run_name: str,
        *,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Create the run (in ``experiment``, created on first use) and return its id."""
        if not self.enabled:
            return None
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
            all_tags = dict(tags or {})
            all_tags["mlflow.runName"] = run_name
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            return self.run_id
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("creating the run", exc)
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._batch(params=items, what="logging params")

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v  # drop NaN
        ]
        self._batch(metrics=items, what="logging metrics")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._batch(tags=[RunTag(k, str(v)) for k, v in tags.items()], what="setting tags")

    def _batch(self, *, what: str, **kwargs: Any) -> None:
        if not self.enabled or not self.run_id:
            return
        try:
            # log_batch takes at most 1000 metrics / 100 params per call.
            for key, limit in (("metrics", 1000), ("params", 100), ("tags", 100)):
                items = kwargs.get(key) or []
                for i in range(0, len(items), limit):
                    self.client.log_batch(self.run_id, **{key: items[i : i + limit]})
        except Exception as exc:  # noqa: BLE001
            self._fail(what, exc)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not self.run_id:
            return
        try:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"uploading {path.name}", exc)

    def set_status(self, status: str) -> None:
        """Set the run's status (e.g. ``RUNNING`` again when a finished run is resumed)."""
        if not self.enabled or not self.run_id:
            return
        try:
            self.client.update_run(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("updating the run status", exc)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or not self.run_id:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("closing the run", exc)


def config_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened config as MLflow params (lists rendered as strings)."""
    return {k: v for k, v in flatten(cfg.model_dump(mode="json")).items()}
