"""What the endpoint tells MLflow: one trace per request and a serving run per deployment.

A request is timed in the request path (:class:`RequestRecord`, :meth:`RequestRecord.span`: monotonic
clock reads, nothing else) and handed to :class:`Telemetry` with :meth:`Telemetry.submit`, which never
blocks: the record goes into a bounded queue, or is dropped and counted when the queue is full. A
background thread turns records into MLflow traces (``MlflowClient.start_trace``/``start_span`` with the
request's own timestamps, so the trace shows when each stage really ran) and, every
``metrics_interval_s``, logs the serving run's metrics: requests, errors by status code, p50/p95
latency, generated-UNet cache hit rate, dropped traces. A slow or dead tracking server only slows that
thread (it backs off and keeps counting); requests never wait on it.

What a trace holds (never image data, file names, or anything that could identify a patient):

* spans ``decode``, ``preprocess``, ``generate_unet`` (``cache_hit``), ``sliding_window``, ``encode``;
* tags: registered model name and version, ``style`` (a style id, or ``latent``), the latent when one was
  given, input shape and voxel spacing, HTTP status, ``request_id`` (the id of the error body, the
  ``X-Request-Id`` header and the server log line).

Example:
    >>> record = RequestRecord("req-1", "/v1/segment")
    >>> with record.span("decode"):
    ...     pass
    >>> [s.name for s in record.spans]
    ['decode']
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RequestRecord", "SpanRecord", "Telemetry", "TelemetryConfig"]

log = logging.getLogger(__name__)

SPAN_NAMES = ("decode", "preprocess", "generate_unet", "sliding_window", "encode")


@dataclass
class SpanRecord:
    """One stage of a request: wall-clock start/end (ns) and attributes."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """The timing and the non-identifying facts of one request (see the module docstring)."""

    request_id: str
    route: str
    start_ns: int = field(default_factory=time.time_ns)
    end_ns: int = 0
    status: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    spans: list[SpanRecord] = field(default_factory=list)
    cache_hit: bool | None = None

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict takes attributes known only at the end (e.g. ``cache_hit``)."""
        start = time.time_ns()
        attrs = dict(attributes)
        try:
            yield attrs
        finally:
            self.spans.append(SpanRecord(name, start, time.time_ns(), attrs))

    def finish(self, status: int) -> RequestRecord:
        self.status = int(status)
        self.end_ns = time.time_ns()
        return self

    @property
    def seconds(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class TelemetryConfig:
    """Where and how much to log.

    Attributes:
        tracking_uri: the MLflow store (the model's).
        experiment_id: the experiment traces and the serving run go to (the model's).
        serving_run_id: the deployment's serving run (metrics go there; None: no metrics).
        sample_rate: fraction of requests traced (metrics always count every request).
        queue_size: records waiting for the background thread; more are dropped (counted).
        metrics_interval_s: seconds between two metric points of the serving run.
        metric_suffix: appended to metric keys (one series per replica when there are several).
    """

    tracking_uri: str
    experiment_id: str | None
    serving_run_id: str | None = None
    sample_rate: float = 1.0
    queue_size: int = 1000
    metrics_interval_s: float = 30.0
    metric_suffix: str = ""


class _Window:
    """Counters of the current metrics interval, and totals since start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.codes: Counter[int] = Counter()
        self.cache = Counter()  # hit / miss
        self.requests = 0
        self.total_requests = 0

    def add(self, record: RequestRecord) -> None:
        with self.lock:
            self.requests += 1
            self.total_requests += 1
            self.codes[record.status] += 1
            self.latencies.append(record.seconds)
            if record.cache_hit is not None:
                self.cache["hit" if record.cache_hit else "miss"] += 1

    def drain(self) -> dict[str, float]:
        with self.lock:
            lat = np.asarray(self.latencies, dtype=np.float64)
            out: dict[str, float] = {"requests": float(self.requests), "requests_total": float(self.total_requests)}
            for code, n in self.codes.items():
                if code >= 400:
                    out[f"errors_{code}"] = float(n)
            out["errors"] = float(sum(n for c, n in self.codes.items() if c >= 400))
            if lat.size:
                out["latency_p50_s"] = float(np.percentile(lat, 50))
                out["latency_p95_s"] = float(np.percentile(lat, 95))
            seen = self.cache["hit"] + self.cache["miss"]
            if seen:
                out["cache_hit_rate"] = self.cache["hit"] / seen
            self.latencies.clear()
            self.codes.clear()
            self.cache.clear()
            self.requests = 0
            return out


class Telemetry:
    """Fail-soft, asynchronous request traces and serving metrics (module docstring).

    Args:
        config: :class:`TelemetryConfig`.
        client_factory: builds the MLflow client (tests pass a failing one); default ``MlflowClient``.
    """

    def __init__(self, config: TelemetryConfig, client_factory: Any = None) -> None:
        self.config = config
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=max(1, config.queue_size))
        self._window = _Window()
        self._client_factory = client_factory
        self._client = None
        self._stop = threading.Event()
        self._random = random.Random()
        self.dropped = 0
        self.failed = 0
        self.traced = 0
        self._failures_in_a_row = 0
        self._thread = threading.Thread(target=self._run, name="hypersort-telemetry", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ request path
    def submit(self, record: RequestRecord) -> None:
        """Count the request and queue its trace; never blocks, never raises."""
        try:
            self._window.add(record)
            if self.config.experiment_id is None or self._random.random() >= self.config.sample_rate:
                return
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - telemetry must never fail a request
            self.dropped += 1

    # ------------------------------------------------------------------------------ background
    @property
    def client(self):
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory(self.config.tracking_uri)
            else:
                import mlflow
                from mlflow import MlflowClient

                # MLflow exports traces to the process-wide store, whatever the client says: a replica
                # serves one model, so its process-wide store is that model's.
                mlflow.set_tracking_uri(self.config.tracking_uri)
                self._client = MlflowClient(tracking_uri=self.config.tracking_uri)
        return self._client

    def _run(self) -> None:
        next_metrics = time.monotonic() + self.config.metrics_interval_s
        while not self._stop.is_set():
            try:
                record = self._queue.get(timeout=0.5)
            except queue.Empty:
                record = None
            if record is not None:
                self._guarded("writing a request trace", self._write_trace, record)
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + self.config.metrics_interval_s
                self._guarded("logging serving metrics", self._write_metrics)

    def _guarded(self, what: str, fn: Any, *args: Any) -> None:
        """Run one MLflow write; on failure warn once, back off (a dead server is not hammered)."""
        try:
            fn(*args)
            self._failures_in_a_row = 0
        except Exception as exc:  # noqa: BLE001 - the endpoint keeps serving whatever MLflow does
            self.failed += 1
            self._failures_in_a_row += 1
            if self._failures_in_a_row == 1:
                log.warning("MLflow at %s failed while %s (%s); requests are unaffected, retrying later",
                            self.config.tracking_uri, what, type(exc).__name__)
            self._stop.wait(min(30.0, 0.5 * 2 ** min(self._failures_in_a_row, 6)))

    def _write_trace(self, record: RequestRecord) -> None:
        client = self.client
        tags = {"request_id": record.request_id, "route": record.route, "status_code": str(record.status),
                **record.tags}
        root = client.start_trace(
            "segment" if record.route.startswith("/v1/segment") else record.route.strip("/") or "request",
            span_type="CHAIN",
            attributes={"status_code": record.status, "route": record.route},
            tags=tags,
            experiment_id=self.config.experiment_id,
            start_time_ns=record.start_ns,
        )
        for span in record.spans:
            child = client.start_span(span.name, trace_id=root.trace_id, parent_id=root.span_id,
                                      attributes=span.attributes, start_time_ns=span.start_ns)
            client.end_span(root.trace_id, child.span_id, end_time_ns=span.end_ns)
        status = "OK" if record.status < 400 else "ERROR"
        client.end_trace(root.trace_id, outputs={"status_code": record.status}, status=status,
                         end_time_ns=record.end_ns or time.time_ns())
        self.traced += 1

    def _write_metrics(self) -> None:
        if not self.config.serving_run_id:
            return
        from mlflow.entities import Metric

        values = self._window.drain()
        values.update(dropped_traces=float(self.dropped), failed_writes=float(self.failed))
        now = int(time.time() * 1000)
        step = int(time.time())
        metrics = [Metric(f"{k}{self.config.metric_suffix}", v, now, step) for k, v in values.items()]
        self.client.log_batch(self.config.serving_run_id, metrics=metrics)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until the queued traces are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        import mlflow

        try:
            mlflow.flush_trace_async_logging()
        except Exception:  # noqa: BLE001
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Write the last metrics and stop the thread (never raises)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        try:
            self._write_metrics()
        except Exception:  # noqa: BLE001
            pass


def model_tags(identity: Mapping[str, Any]) -> dict[str, str]:
    """The registered model name/version tags of a trace (from the serve layer's model identity)."""
    out = {}
    if identity.get("registry_name"):
        out["model_name"] = str(identity["registry_name"])
    if identity.get("registry_version"):
        out["model_version"] = str(identity["registry_version"])
    out["model"] = str(identity.get("model_version") or "")
    return out


# -------------------------------------------------------------------------------- serving run
def model_experiment(model_ref: str, tracking_uri: str | None) -> tuple[str, str] | None:
    """``(store, experiment id)`` the model belongs to, or None when it has no MLflow home.

    A registered model (``models:/NAME@ALIAS``, ``models:/NAME/V``): the experiment of the run the version
    was logged from. A run folder: the experiment of its training run (in the store its summary names).
    Anything else (a bare model folder without a store): None, and the endpoint traces nothing.
    """
    from pathlib import Path

    from mlflow import MlflowClient

    from hypersort_ray.mlflow_store import check_reachable, existing_store_uri, is_mlflow_uri
    from hypersort_ray.runs import RunDir

    if is_mlflow_uri(model_ref):
        store = existing_store_uri(tracking_uri)
        check_reachable(store)
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        name, _, rest = model_ref.removeprefix("models:/").partition("/")
        if model_ref.startswith("models:/"):
            if "@" in model_ref:
                name, alias = model_ref.removeprefix("models:/").split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                version = client.get_model_version(name, rest)
            run_id = version.run_id
        elif model_ref.startswith("runs:/"):
            run_id = model_ref.removeprefix("runs:/").split("/", 1)[0]
        else:
            return None
        return store, client.get_run(run_id).info.experiment_id
    summary = RunDir(Path(model_ref)).read_summary() if Path(model_ref).is_dir() else {}
    store = tracking_uri or summary.get("tracking_uri")
    if not store or not summary.get("mlflow_run_id"):
        return None
    check_reachable(store)
    return store, MlflowClient(tracking_uri=store).get_run(summary["mlflow_run_id"]).info.experiment_id


def start_serving_run(model_ref: str, tracking_uri: str | None, params: Mapping[str, Any]) -> dict[str, str] | None:
    """Create the deployment's serving run in the model's experiment (fail-soft: None, with a warning).

    Returns ``{"tracking_uri", "experiment_id", "run_id"}`` for the replicas.
    """
    try:
        home = model_experiment(model_ref, tracking_uri)
        if home is None:
            log.info("serving %s: no MLflow experiment known for it, requests are not traced", model_ref)
            return None
        store, experiment_id = home
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=store)
        run = client.create_run(experiment_id, run_name=f"serving {model_ref}",
                                tags={"hypersort.kind": "serving", "hypersort.model": model_ref})
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        return {"tracking_uri": store, "experiment_id": experiment_id, "run_id": run.info.run_id}
    except Exception as exc:  # noqa: BLE001 - serving never depends on the tracking server
        log.warning("no serving run for %s (%s: %s); the endpoint serves without request traces",
                    model_ref, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
