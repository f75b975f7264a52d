"""Where MLflow data lives, and the few calls every layer needs to reach it.

One resolver for every command (train, sweep, analyze, register, predict, serve):

1. an explicit ``--tracking-uri`` / ``tracking.tracking_uri``;
2. ``MLFLOW_TRACKING_URI``;
3. the *workspace store*: ``sqlite:///<working folder>/mlflow.db`` with artifacts in
   ``<working folder>/mlartifacts/``, which is what ``mlflow ui`` opens when started in the same folder.
   Every run, sweep and demo started from one folder lands in one store, so the UI compares them.

Readers (``models:/`` URIs) never create an empty store as a side effect: without 1 or 2 the workspace
store must already exist.

This module imports only the standard library at import time (MLflow lazily): it is the leaf that the
tracking, inference and serving layers share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from hypersort_ray.errors import ModelError

__all__ = [
    "WORKSPACE_DB",
    "artifact_location",
    "check_reachable",
    "download_artifacts",
    "existing_store_uri",
    "is_mlflow_uri",
    "resolve_tracking_uri",
    "using_store",
]

WORKSPACE_DB = "mlflow.db"
WORKSPACE_ARTIFACTS = "mlartifacts"
# A dead server must fail in seconds, not after minutes of MLflow's retries with back-off.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def is_mlflow_uri(text: str) -> bool:
    """``models:/``, ``runs:/``, ``mlflow-artifacts:/`` or any ``scheme://`` reference.

    Example:
        >>> is_mlflow_uri("models:/liver@champion"), is_mlflow_uri("runs/demo")
        (True, False)
    """
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) or bool(
        re.match(r"^[a-z][a-z0-9+.-]*://", text)
    )


def _workspace_uri(folder: Path | None = None) -> str:
    return f"sqlite:///{((folder or Path.cwd()).resolve() / WORKSPACE_DB).as_posix()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to write to: explicit, else ``MLFLOW_TRACKING_URI``, else the workspace store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or _workspace_uri()


def existing_store_uri(explicit: str | None = None) -> str:
    """The store to read a model from (as :func:`resolve_tracking_uri`, but never an empty new one).

    Raises:
        ModelError: no explicit store, no ``MLFLOW_TRACKING_URI`` and no ``./mlflow.db``.
    """
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(explicit)
    local = Path.cwd() / WORKSPACE_DB
    if local.is_file():
        return _workspace_uri()
    raise ModelError(
        f"an MLflow model URI needs a tracking store, and there is no {WORKSPACE_DB} in {Path.cwd()}: run the "
        "command from the folder you trained in, pass --tracking-uri, or set MLFLOW_TRACKING_URI "
        "(e.g. http://host:5000 or sqlite:////path/to/mlflow.db)"
    )


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside an SQLite store (``mlartifacts/`` next to the ``.db``); a server decides its own."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    db = Path(tracking_uri.split(":///", 1)[-1]) if ":///" in tracking_uri else Path(WORKSPACE_DB)
    return (db.resolve().parent / WORKSPACE_ARTIFACTS).as_uri()


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


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``uri``; restore the previous state after.

    ``mlflow.set_tracking_uri`` also rewrites the ``MLFLOW_TRACKING_URI`` environment variable, so both the
    module state and the environment are put back.
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


def check_reachable(uri: str) -> None:
    """One quick request to a tracking server (no-op for local stores): a dead server fails in seconds."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    with _environ(_QUICK_HTTP):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def download_artifacts(uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download a model (``models:/NAME@ALIAS``, ``runs:/ID/model``, ...) into ``dst``.

    Raises:
        ModelError: no store, store unreachable, model not found (the message names the store).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    store = existing_store_uri(tracking_uri)
    try:
        check_reachable(store)
        # MLflow 3.17 resolves models:/ URIs with the *global* registry URI even when download_artifacts
        # is given one (and would create ./mlflow.db), so the store is set globally for the call.
        with using_store(store):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
                )
            )
    except MlflowException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        missing = exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in first.lower()
        what = "not found in" if missing else "cannot be loaded from"
        raise ModelError(f"model {uri!r} {what} the MLflow store {store}: {first}") from exc
    except OSError as exc:
        raise ModelError(f"model {uri!r}: cannot download from {store} ({exc})") from exc
