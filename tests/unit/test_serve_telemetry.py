"""Request traces and serving metrics (no Ray): real MLflow store, bounded queue, fail-soft writes, and
the alias follower's swap and fail-soft reads."""

from __future__ import annotations

import time

import pytest

from hypersort_ray.serve.follow import AliasFollower, parse_alias_uri
from hypersort_ray.serve.telemetry import RequestRecord, Telemetry, TelemetryConfig


@pytest.fixture
def store(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serving", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, run_name="serving")
    previous = mlflow.get_tracking_uri()
    yield uri, exp, run.info.run_id
    mlflow.set_tracking_uri(previous)


def _record(i: int, status: int = 200) -> RequestRecord:
    rec = RequestRecord(f"req-{i}", "/v1/segment", tags={"style": "main", "input_shape": "[24, 20, 22]"})
    for name in ("decode", "preprocess", "generate_unet", "sliding_window", "encode"):
        with rec.span(name) as attrs:
            if name == "generate_unet":
                attrs["cache_hit"] = i > 0
    rec.cache_hit = i > 0
    return rec.finish(status)


def test_traces_and_serving_metrics_reach_mlflow(store):
    import mlflow
    from mlflow import MlflowClient

    uri, exp, run_id = store
    tel = Telemetry(TelemetryConfig(uri, exp, serving_run_id=run_id, metrics_interval_s=0.2))
    for i in range(4):
        tel.submit(_record(i, 200 if i < 3 else 413))
    tel.flush()
    time.sleep(0.6)
    tel.close()
    traces = mlflow.search_traces(locations=[exp], filter_string="tags.request_id = 'req-3'", return_type="list")
    assert len(traces) == 1
    trace = traces[0]
    assert trace.info.tags["status_code"] == "413" and trace.info.tags["style"] == "main"
    assert [s.name for s in trace.data.spans][1:] == ["decode", "preprocess", "generate_unet", "sliding_window",
                                                      "encode"]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["requests_total"] == 4 and metrics["errors_413"] == 1
    assert metrics["cache_hit_rate"] == pytest.approx(0.75) and metrics["latency_p95_s"] >= 0


def test_a_dead_server_never_blocks_a_request():
    class Dead:
        def __init__(self, uri):
            pass

        def __getattr__(self, name):
            def fail(*args, **kwargs):
                time.sleep(0.2)
                raise ConnectionError("refused")

            return fail

    tel = Telemetry(TelemetryConfig("http://127.0.0.1:9", "1", serving_run_id="r", queue_size=3,
                                    metrics_interval_s=0.1), client_factory=Dead)
    t0 = time.perf_counter()
    for i in range(50):
        tel.submit(_record(i))
    assert time.perf_counter() - t0 < 0.5, "submitting must not wait on MLflow"
    assert tel.dropped >= 40, "a full queue drops (and counts) instead of growing"
    time.sleep(0.5)
    assert tel.failed >= 1
    tel.close(timeout_s=2)


def test_sampling_keeps_metrics_complete(store):
    uri, exp, run_id = store
    tel = Telemetry(TelemetryConfig(uri, exp, serving_run_id=run_id, sample_rate=0.0, metrics_interval_s=60))
    for i in range(5):
        tel.submit(_record(i))
    assert tel._queue.qsize() == 0 and tel._window.total_requests == 5
    tel.close()


def test_alias_follower_swaps_to_the_new_version_and_survives_a_dead_registry():
    state = {"alias": "1", "fail": False}
    installed = []

    def resolve(name, alias, uri):
        if state["fail"]:
            raise ConnectionError("registry down")
        return state["alias"]

    follower = AliasFollower("liver", "champion", "http://x", "1", load=lambda v: f"model-{v}",
                             install=lambda v, m: installed.append((v, m)), interval_s=3600, resolve=resolve)
    try:
        assert follower.check() is False and installed == []
        state["alias"] = "2"
        assert follower.check() is True and installed == [("2", "model-2")] and follower.version == "2"
        state["fail"] = True
        assert follower.check() is False and follower.version == "2"
    finally:
        follower.close()
    assert parse_alias_uri("models:/liver@champion") == ("liver", "champion")
    assert parse_alias_uri("models:/liver/3") is None and parse_alias_uri("runs/x") is None


def test_a_version_that_cannot_load_keeps_the_old_one():
    def boom(version):
        raise RuntimeError("corrupt")

    follower = AliasFollower("m", "a", "u", "1", load=boom, install=lambda v, m: None, interval_s=3600,
                             resolve=lambda *a: "2")
    try:
        assert follower.check() is False and follower.version == "1"
    finally:
        follower.close()
