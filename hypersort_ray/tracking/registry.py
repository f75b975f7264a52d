"""Register a run's model in an MLflow model registry (``hypersort register``, end of training).

The tracking store is, in order: the explicit ``tracking_uri``, ``MLFLOW_TRACKING_URI``, the run folder's
embedded SQLite store (``sqlite:///RUN_DIR/mlflow.db``, where ``hypersort train`` logs by default) —
:func:`~hypersort_ray.tracking.mlflow_logger.resolve_tracking_uri`. The pyfunc model
(:mod:`hypersort_ray.tracking.pyfunc`) is logged into the training run when that run lives in the same
store (``train_summary.json`` names it), otherwise into a new run of the config's experiment; a version is
registered, aliases are set, and the version is tagged with what a reviewer needs to pick it: dataset
hash, latent_dim, styles, key training/analysis metrics.

Example:
    >>> register_run("runs/demo", "liver-hypersort", alias="champion")       # doctest: +SKIP
    {'name': 'liver-hypersort', 'version': '1', 'alias': 'champion',
     'model_uri': 'models:/liver-hypersort@champion', 'run_id': '...', 'tracking_uri': 'sqlite:///...'}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypersort_ray.config import ExperimentConfig, load_config
from hypersort_ray.errors import HypersortError, ModelError
from hypersort_ray.tracking.mlflow_logger import artifact_location, config_params, resolve_tracking_uri

__all__ = ["register_run", "auto_register", "mlflow_store", "check_reachable"]

log = logging.getLogger(__name__)

_TRAIN_METRICS = ("loss", "dice", "seg_loss", "auroc_latent_norm", "spearman_latent_norm", "latent_norm_mean")


@contextmanager
def mlflow_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``uri``; restore the previous state after.

    ``mlflow.set_tracking_uri`` also rewrites the ``MLFLOW_TRACKING_URI`` environment variable, so
    both the module state and the environment are put back.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable(uri: str) -> None:
    """One quick request to a tracking server: a dead server fails in seconds, not after minutes of the
    retries (with back-off) that MLflow makes by default for every call."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    with _environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _aliases(alias: str | Sequence[str] | None) -> list[str]:
    """Alias names, checked with MLflow's own rules *before* anything is logged or registered."""
    if alias is None:
        return []
    items = alias.split(",") if isinstance(alias, str) else list(alias)
    names = [a.strip() for a in items if a and a.strip()]
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    for name in names:
        try:
            _validate_model_alias_name(name)
            _validate_model_alias_name_reserved(name)
        except MlflowException as exc:
            raise ModelError(f"--alias {name!r}: {exc.message}") from None
    return names


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _numbers(data: Mapping[str, Any], prefix: str, keys: Sequence[str] | None = None) -> dict[str, str]:
    """Finite numeric entries (one level of nesting) as tag strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if keys is not None and key not in keys:
            continue
        if isinstance(value, Mapping) and keys is None:
            out.update(_numbers(value, f"{prefix}{key}.", None))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            # MLflow keys allow alphanumerics, _ - . space : / only (metrics.json has e.g. "dilated|eroded").
            name = re.sub(r"[^\w\-. :/]", "_", f"{prefix}{key}")
            out[name] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return out


def _last_history_row(path: Path) -> dict[str, Any]:
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _dataset_hash(cfg: ExperimentConfig, run_tags: Mapping[str, str]) -> str | None:
    """The training run's ``dataset_hash`` tag, else the hash of the datalist if its files are here."""
    if run_tags.get("dataset_hash"):
        return run_tags["dataset_hash"]
    if cfg.data.datalist is None or not Path(cfg.data.datalist).exists():
        return None
    from hypersort_ray.data.datalist import dataset_hash, load_datalist

    try:
        return dataset_hash(load_datalist(cfg.data.datalist))
    except (HypersortError, OSError) as exc:
        log.warning("dataset hash not computed (%s)", exc)
        return None


def _version_tags(run_dir: Path, cfg: ExperimentConfig, summary: Mapping[str, Any], run_tags: Mapping[str, str]) -> dict[str, str]:
    styles = _read_json(run_dir / "analysis" / "styles.json")
    tags = {
        "hypersort.latent_dim": str(cfg.model.hypernet.latent_dim),
        "hypersort.unet": json.dumps(cfg.model.unet.model_dump(mode="json"), sort_keys=True),
        "hypersort.run_dir": str(run_dir.resolve()),
        "hypersort.num_styles": str(1 + sum(1 for s in styles.get("styles", []) if str(s.get("id")) != str(styles.get("main_style")))),
    }
    if summary.get("epochs") is not None:
        tags["hypersort.epochs"] = str(summary["epochs"])
    digest = _dataset_hash(cfg, run_tags)
    if digest:
        tags["hypersort.dataset_hash"] = digest
    train = {**_last_history_row(run_dir / "history.csv"), **{k: v for k, v in summary.items() if k in _TRAIN_METRICS}}
    tags.update(_numbers(train, "train.", _TRAIN_METRICS))
    tags.update(_numbers(_read_json(run_dir / "analysis" / "metrics.json"), "analysis."))
    return tags


def _same_store_run(client, run_id: str | None) -> Any:
    """The training run if it exists in this store (run ids are UUIDs: found means same run)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _new_run(client, uri: str, run_dir: Path, cfg: ExperimentConfig) -> str:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(uri, run_dir))
    )
    run = client.create_run(
        exp_id,
        run_name=f"{cfg.name}-model",
        tags={"hypersort.run_dir": str(run_dir.resolve()), "hypersort.kind": "register"},
    )
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def register_run(
    run_dir: str | Path,
    name: str,
    alias: str | Sequence[str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log ``run_dir``'s pyfunc model, register a version under ``name``, set alias(es) and tags.

    Args:
        run_dir: a run folder from ``hypersort train``.
        name: registered model name.
        alias: an alias (``champion``), several (``"champion,latest"`` or a list), or None.
        tracking_uri: explicit store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db``.

    Returns:
        ``{"name", "version", "alias", "aliases", "model_uri", "run_id", "tracking_uri", "logged_model_uri"}``;
        ``model_uri`` is ``models:/NAME@ALIAS`` (first alias) or ``models:/NAME/VERSION``.

    Raises:
        ModelError: not a run folder, bad name, or the store refused (message names the store).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint").is_dir():
        raise ModelError(f"run folder {run_dir}: no checkpoint/ (is it a finished hypersort run folder?)")
    if not name or not name.strip():
        raise ModelError("--name: a registered model name is required")
    aliases = _aliases(alias)
    try:
        cfg = load_config(run_dir / "checkpoint" / "config.yaml")
    except HypersortError as exc:
        raise ModelError(f"{run_dir / 'checkpoint' / 'config.yaml'}: {exc}") from exc
    uri = resolve_tracking_uri(tracking_uri, run_dir)
    summary = _read_json(run_dir / "train_summary.json")

    from mlflow.exceptions import MlflowException

    try:
        return _register(run_dir, name, aliases, uri, cfg, summary)
    except MlflowException as exc:
        raise ModelError(f"MLflow store {uri}: registering {name!r} failed: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:  # connection refused, unreachable server, unwritable artifact folder
        raise ModelError(f"MLflow store {uri}: registering {name!r} failed: {exc}") from exc


def _register(
    run_dir: Path, name: str, aliases: list[str], uri: str, cfg: ExperimentConfig, summary: Mapping[str, Any]
) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from hypersort_ray.tracking.pyfunc import log_model

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    existing = _same_store_run(client, summary.get("mlflow_run_id"))
    run_id = existing.info.run_id if existing is not None else _new_run(client, uri, run_dir, cfg)
    run_tags = dict(existing.data.tags) if existing is not None else {}
    status = existing.info.status if existing is not None else "FINISHED"
    end_time = existing.info.end_time if existing is not None else None

    with mlflow_store(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
        try:
            with mlflow.start_run(run_id=run_id):
                info = log_model(run_dir, name="model", registered_model_name=name,
                                 metadata={"source_run_id": run_id})
        finally:
            # start_run/end_run marks a resumed run FINISHED now: put back the training run's own status
            # and end time (a run still RUNNING, e.g. registration before the trainer closes it, stays so).
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=status, end_time=end_time)

    version = str(info.registered_model_version)
    for key, value in _version_tags(run_dir, cfg, summary, run_tags).items():
        client.set_model_version_tag(name, version, key, value)
    for a in aliases:
        client.set_registered_model_alias(name, a, version)
    model_uri = f"models:/{name}@{aliases[0]}" if aliases else f"models:/{name}/{version}"
    return {
        "name": name,
        "version": version,
        "alias": aliases[0] if aliases else None,
        "aliases": aliases,
        "model_uri": model_uri,
        "run_id": run_id,
        "tracking_uri": uri,
        "logged_model_uri": info.model_uri,
    }


def auto_register(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """End-of-training registration when ``cfg.tracking.register_as`` is set (fail-soft).

    Uses ``cfg.tracking.tracking_uri`` (same resolution as training) and ``cfg.tracking.alias``. A
    registry failure must not lose a finished training run: it is logged as a warning and None is
    returned; so is a config with ``tracking.enabled: false``.
    """
    name = cfg.tracking.register_as
    if not name:
        return None
    if not cfg.tracking.enabled:
        warnings.warn(
            f"tracking.register_as={name!r} is ignored because tracking.enabled is false", RuntimeWarning, stacklevel=2
        )
        return None
    try:
        return register_run(run_dir, name, alias=cfg.tracking.alias, tracking_uri=cfg.tracking.tracking_uri)
    except HypersortError as exc:
        msg = f"registering the model as {name!r} failed: {exc}; the run folder is complete, retry with `hypersort register`"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return None
