"""Shared test fixtures. Tests build their own small data; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _mlflow_store(tmp_path_factory):
    """Without a store named, commands use the workspace store ./mlflow.db: tests get one of their own
    instead of writing into the repository (tests of that default unset the variable and chdir)."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _mlflow_store_restored():
    """A test that points MLflow's process-wide store elsewhere (``mlflow.set_tracking_uri`` also rewrites
    ``MLFLOW_TRACKING_URI``) must not send the next tests to it, e.g. to a tracking server it stopped."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    if all(os.environ.get(k) == v for k, v in before.items()):
        return
    import mlflow

    mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
