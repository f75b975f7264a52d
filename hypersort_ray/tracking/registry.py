"""Register a run's model in an MLflow model registry (``hypersort register``, end of training).

The tracking store is resolved by :func:`hypersort_ray.mlflow_store.resolve_tracking_uri` (explicit, else
``MLFLOW_TRACKING_URI``, else the workspace store). The pyfunc model (:mod:`hypersort_ray.tracking.pyfunc`)
is logged into the training run when that run lives in the same store (the run's training summary names
it), otherwise into a new run of the config's experiment; a version is registered, aliases are set, and
the version is tagged with what a reviewer needs to pick it: the checkpoint it was made from
(``hypersort.checkpoint_sha256``), dataset hash, latent_dim, styles, key training/analysis metrics.
Styles and analysis metrics made from another checkpoint are refused, never registered with it.

Example:
    >>> register_run("runs/demo", "liver-hypersort", alias="champion")       # doctest: +SKIP
    {'name': 'liver-hypersort', 'version': '1', 'alias': 'champion',
     'model_uri': 'models:/liver-hypersort@champion', 'run_id': '...', 'tracking_uri': 'sqlite:///...'}
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypersort_ray.config import ExperimentConfig
from hypersort_ray.errors import HypersortError, ModelError
from hypersort_ray.mlflow_store import artifact_location, check_reachable, resolve_tracking_uri, using_store
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.styles import PROVENANCE_KEY
from hypersort_ray.tracking.mlflow_logger import config_params
from hypersort_ray.tracking.pyfunc import log_model

__all__ = ["register_run", "auto_register"]

log = logging.getLogger(__name__)

_TRAIN_METRICS = ("loss", "dice", "seg_loss", "auroc_latent_norm", "spearman_latent_norm", "latent_norm_mean")


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


def _last_history_row(run: RunDir) -> dict[str, Any]:
    history = run.read_history()
    if history is None:
        return {}
    row = history.iloc[-1].to_dict()
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


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


def _version_tags(run: RunDir, cfg: ExperimentConfig, summary: Mapping[str, Any], run_tags: Mapping[str, str]) -> dict[str, str]:
    styles = run.read_styles() or {}
    tags = {
        "hypersort.latent_dim": str(cfg.model.hypernet.latent_dim),
        "hypersort.unet": json.dumps(cfg.model.unet.model_dump(mode="json"), sort_keys=True),
        "hypersort.run_dir": str(run.path.resolve()),
        f"hypersort.{PROVENANCE_KEY}": str(run.checkpoint_sha256()),
        "hypersort.num_styles": str(1 + sum(1 for s in styles.get("styles", []) if str(s.get("id")) != str(styles.get("main_style")))),
    }
    if summary.get("epochs") is not None:
        tags["hypersort.epochs"] = str(summary["epochs"])
    digest = _dataset_hash(cfg, run_tags)
    if digest:
        tags["hypersort.dataset_hash"] = digest
    train = {**_last_history_row(run), **{k: v for k, v in summary.items() if k in _TRAIN_METRICS}}
    tags.update(_numbers(train, "train.", _TRAIN_METRICS))
    if run.analysis.metrics_json.is_file():
        tags.update(_numbers(run.read_metrics(), "analysis."))
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
        else client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(uri))
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
        tracking_uri: explicit store; default ``MLFLOW_TRACKING_URI``, else the workspace store.

    Returns:
        ``{"name", "version", "alias", "aliases", "model_uri", "run_id", "tracking_uri", "logged_model_uri"}``;
        ``model_uri`` is ``models:/NAME@ALIAS`` (first alias) or ``models:/NAME/VERSION``.

    Raises:
        ModelError: not a run folder, bad name, or the store refused (message names the store).
        ProvenanceError: the run's styles or analysis were made from another checkpoint.
    """
    run = RunDir(run_dir)
    if not run.has_checkpoint():
        raise ModelError(f"run folder {run.path}: no complete checkpoint (is it a finished hypersort run folder?)")
    if not name or not name.strip():
        raise ModelError("--name: a registered model name is required")
    aliases = _aliases(alias)
    cfg = run.load_checkpoint().config
    run.read_styles()  # styles of another checkpoint: refused before anything is logged
    uri = resolve_tracking_uri(tracking_uri)
    summary = run.read_summary()

    from mlflow.exceptions import MlflowException

    try:
        return _register(run, name, aliases, uri, cfg, summary)
    except MlflowException as exc:
        raise ModelError(f"MLflow store {uri}: registering {name!r} failed: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:  # connection refused, unreachable server, unwritable artifact folder
        raise ModelError(f"MLflow store {uri}: registering {name!r} failed: {exc}") from exc


def _register(
    run: RunDir, name: str, aliases: list[str], uri: str, cfg: ExperimentConfig, summary: Mapping[str, Any]
) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    existing = _same_store_run(client, summary.get("mlflow_run_id"))
    run_id = existing.info.run_id if existing is not None else _new_run(client, uri, run.path, cfg)
    run_tags = dict(existing.data.tags) if existing is not None else {}
    status = existing.info.status if existing is not None else "FINISHED"
    end_time = existing.info.end_time if existing is not None else None

    with using_store(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
        try:
            with mlflow.start_run(run_id=run_id):
                info = log_model(run.path, name="model", registered_model_name=name,
                                 metadata={"source_run_id": run_id})
        finally:
            # start_run/end_run marks a resumed run FINISHED now: put back the training run's own status
            # and end time (a run still RUNNING, e.g. registration before the trainer closes it, stays so).
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=status, end_time=end_time)

    version = str(info.registered_model_version)
    for key, value in _version_tags(run, cfg, summary, run_tags).items():
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
