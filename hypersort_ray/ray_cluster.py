"""Which Ray a command uses, and whether it can place what it asks for.

* No ``--address`` and no ``RAY_ADDRESS``: a **private local instance** (``ray.init(address="local")``),
  sized to this machine, even when a cluster already runs here; it is shut down when the command ends.
  It never attaches to a cluster it was not told about.
* ``--address auto``, ``--address HOST:6379``, ``ray://HOST:10001`` or ``RAY_ADDRESS``: **join** that
  cluster, passing no resource arguments (a cluster's resources are set when it starts); on exit only
  this driver disconnects.

Ray binds its own GCS, raylet and worker ports to the node's network address by design (``ray start``
rewrites 127.0.0.1 to it), and Ray 2.60 turns token authentication on for them: keep it on. The
dashboard of a private instance listens on 127.0.0.1 only (docs/cluster.md says what else listens).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from hypersort_ray.errors import ConfigError

__all__ = ["API_SERVER_ENV", "RayHandle", "check_placeable", "connect"]

log = logging.getLogger(__name__)
_QUIET = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


class RayHandle:
    """What :func:`connect` did: ``started`` a private instance (ours to shut down) or joined one."""

    def __init__(self, started: bool, address: str | None, saved_env: dict[str, str | None] | None = None) -> None:
        self.started = started
        self.address = address
        self._saved_env = saved_env or {}

    def close(self) -> None:
        """Shut a private instance down; leave a joined cluster running (only this driver disconnects)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    resources: Mapping[str, float] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
) -> RayHandle:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, or start a private local instance.

    Args:
        address: ``auto``, ``HOST:PORT``, ``ray://HOST:PORT``; None: ``RAY_ADDRESS``, else private.
        num_cpus: CPUs of a private instance (default: this machine's, at least this many).
        resources: custom resources of a private instance (e.g. Tune's trial slots).
        runtime_env: passed to ``ray.init`` in both cases (e.g. environment variables for workers).

    Returns:
        A handle; ``handle.started`` tells whether the instance is ours. Already initialised: joined.
    """
    import ray

    if ray.is_initialized():
        return RayHandle(started=False, address=None)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=dict(runtime_env) if runtime_env else None, **_QUIET)
        log.info("joined the Ray cluster at %s", address)
        return RayHandle(started=False, address=address)
    cpus = max(os.cpu_count() or 1, int(num_cpus or 0))
    # Ray Train's placement-group cleaner (a detached actor) finds the State API by auto-detecting the
    # local Ray instance, which fails when several run on one host (CI runners, shared machines, a cluster
    # next to us) and then leaks a finished run's placement group: tell the driver and every worker where
    # ours is. The dashboard hosts that API; loopback only.
    port = _free_port()
    api = f"http://127.0.0.1:{port}"
    saved = {API_SERVER_ENV: os.environ.get(API_SERVER_ENV)}
    os.environ[API_SERVER_ENV] = api
    env = dict(runtime_env or {})
    env["env_vars"] = {**dict(env.get("env_vars") or {}), API_SERVER_ENV: api}
    ray.init(
        address="local",
        num_cpus=cpus,
        resources=dict(resources) if resources else None,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env=env,
        **_QUIET,
    )
    log.info("started a private local Ray instance (%d CPUs)", cpus)
    return RayHandle(started=True, address=None, saved_env=saved)


def check_placeable(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, what: str) -> None:
    """Fail fast, before training starts, when the cluster cannot place the requested workers.

    Only totals are checked (the cluster may be busy now but free later; an autoscaling cluster may add
    nodes: then set ``RAY_AUTOSCALER`` expectations yourself), so this catches the impossible, e.g.
    ``use_gpu: true`` on a cluster without GPUs.

    Raises:
        ConfigError: naming what is missing and what the cluster has.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    need_cpu, need_gpu = num_workers * cpus_per_worker, num_workers * gpus_per_worker
    autoscaling = os.environ.get("HYPERSORT_ALLOW_AUTOSCALING", "").lower() in ("1", "true", "yes")
    if autoscaling:
        return
    problems = []
    if need_gpu > gpus:
        problems.append(f"{need_gpu:g} GPU(s) ({num_workers} × {gpus_per_worker:g}) but the cluster has {gpus:g}")
    if need_cpu > cpus:
        problems.append(f"{need_cpu:g} CPU(s) ({num_workers} × {cpus_per_worker:g}) but the cluster has {cpus:g}")
    if problems:
        raise ConfigError(
            f"{what} cannot be placed: it needs {'; '.join(problems)}. Lower training.scaling.num_workers / "
            "cpus_per_worker / gpus_per_worker, set use_gpu: false, or join a larger cluster with --address "
            "(on an autoscaling cluster set HYPERSORT_ALLOW_AUTOSCALING=1 to skip this check)"
        )
