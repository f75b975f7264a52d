"""The endpoint follows the registry and is logged via MLflow, against a real ``mlflow server``.

Version 1 of a tiny model is registered as ``@champion`` and served as ``models:/NAME@champion``:

* every request becomes an MLflow trace (found by its request id, with the stage spans and tags, and no
  file name in it), and the deployment's serving run gathers request/latency/cache metrics;
* version 2 is registered and the alias moved while a client sends requests continuously: every request
  succeeds, and within the follow interval the answers come from version 2 (header, ``/v1/model``, mask);
* the tracking server is stopped, and the endpoint keeps answering at the same latency.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_model import make_tiny_run, tiny_image
from helpers_servers import MlflowServer, free_port

from hypersort_ray.mlflow_store import using_store

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

NAME = "tiny-follow"
FOLLOW_S = 2.0


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-serving"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tracking):
    """Two tiny runs (different weights, so their masks differ); version 1 registered as @champion."""
    from hypersort_ray.tracking.registry import register_run

    root = tmp_path_factory.mktemp("runs")
    first, second = make_tiny_run(root, name="v1", seed=1), make_tiny_run(root, name="v2", seed=2)
    registered = register_run(first, NAME, alias="champion", tracking_uri=tracking.url)
    assert registered["version"] == "1"
    return first, second


@pytest.fixture(scope="module")
def endpoint(runs, tracking):
    from ray import serve

    from hypersort_ray.config import ServeSettings
    from hypersort_ray.ray_cluster import connect
    from hypersort_ray.serve.app import build_application, http_options

    port = free_port()
    settings = ServeSettings(model=f"models:/{NAME}@champion", tracking_uri=tracking.url, port=port,
                             follow_alias_s=FOLLOW_S, metrics_interval_s=2, insecure_no_auth=True,
                             style_cache_size=4, request_timeout_s=60)
    handle = connect(None, num_cpus=2)
    try:
        serve.start(http_options=http_options(settings))
        serve.run(build_application(settings), name="follow", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            yield client
    finally:
        try:
            serve.shutdown()
        finally:
            handle.close()


def _segment(client, image: Path):
    response = client.post("/v1/segment", files={"file": (image.name, image.read_bytes(), "application/gzip")},
                           data={"style": "main"})
    return response


def _mask(blob: bytes) -> np.ndarray:
    import gzip

    import nibabel as nib

    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(blob)).dataobj)


def _wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def test_requests_are_traced_and_the_serving_run_has_metrics(endpoint, runs, tracking):
    import mlflow
    from mlflow import MlflowClient

    image = tiny_image(runs[0])
    ids = []
    for _ in range(3):
        response = _segment(endpoint, image)
        assert response.status_code == 200 and response.headers["x-model-version"] == f"{NAME}/1"
        ids.append(response.headers["x-request-id"])
    bad = endpoint.post("/v1/segment", files={"file": ("x.nii.gz", b"junk", "application/gzip")})
    assert bad.status_code == 400

    client = MlflowClient(tracking.url)
    version = client.get_model_version_by_alias(NAME, "champion")
    experiment = client.get_run(version.run_id).info.experiment_id

    def traced():
        found = mlflow.search_traces(locations=[experiment], filter_string=f"tags.request_id = '{ids[-1]}'",
                                     return_type="list")
        return found[0] if found else None

    # search_traces reads the process-wide store: point it at the server for this search only (a leaked
    # MLFLOW_TRACKING_URI would send later tests to this server after it has stopped).
    with using_store(tracking.url):
        trace = _wait_for(traced, 60, "the request's trace")
    tags = trace.info.tags
    assert tags["model_name"] == NAME and tags["model_version"] == "1" and tags["status_code"] == "200"
    assert tags["style"] == "main" and tags["input_shape"].startswith("[") and tags["input_spacing"].startswith("[")
    spans = {s.name: s for s in trace.data.spans}
    assert {"decode", "preprocess", "generate_unet", "sliding_window", "encode"} <= set(spans)
    assert "cache_hit" in spans["generate_unet"].attributes
    assert image.name not in str(trace.to_json()), "no file name may reach MLflow"

    def serving_metrics():
        runs_ = client.search_runs([experiment], "tags.`hypersort.kind` = 'serving'")
        metrics = runs_[0].data.metrics if runs_ else {}
        return metrics if metrics.get("requests_total", 0) >= 4 else None

    metrics = _wait_for(serving_metrics, 60, "the serving run's metrics")
    assert metrics["errors_400"] >= 1 and metrics["latency_p50_s"] > 0 and "cache_hit_rate" in metrics


def test_alias_move_rolls_to_the_new_version_without_a_failed_request(endpoint, runs, tracking):
    from hypersort_ray.inference import load_model
    from hypersort_ray.tracking.registry import register_run

    image = tiny_image(runs[0])
    expected = {"1": load_model(runs[0]).predict(image, style="main")["mask"],
                "2": load_model(runs[1]).predict(image, style="main")["mask"]}
    assert not np.array_equal(expected["1"], expected["2"]), "the versions must differ for this test to mean anything"
    answers, failures, stop = [], [], threading.Event()

    def client_loop():
        while not stop.is_set():
            response = _segment(endpoint, image)
            if response.status_code != 200:
                failures.append(response.status_code)
                continue
            version = response.headers["x-model-version"].rsplit("/", 1)[-1]
            answers.append((time.monotonic(), version, np.array_equal(_mask(response.content), expected[version])))

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: len(answers) >= 2, 120, "answers from version 1")
        moved = register_run(runs[1], NAME, alias="champion", tracking_uri=tracking.url)
        assert moved["version"] == "2"
        t_moved = time.monotonic()
        _wait_for(lambda: any(v == "2" for _, v, _ in answers), 120, "an answer from version 2")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert failures == [], f"requests failed during the move: {failures}"
    assert all(correct for _, _, correct in answers), "every answer is the mask of the version it names"
    first_v2 = min(t for t, v, _ in answers if v == "2")
    # Within the follow interval plus loading and warming up the new version on a busy 2-core machine.
    assert first_v2 - t_moved < FOLLOW_S + 60
    assert endpoint.get("/v1/model").json()["registry_version"] == "2"


def test_a_dead_tracking_server_changes_nothing_for_requests(endpoint, runs, tracking):
    image = tiny_image(runs[0])

    def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert _segment(endpoint, image).status_code == 200
            out.append(time.perf_counter() - t0)
        return out

    before = statistics.median(latencies(5))
    tracking.stop()
    after = statistics.median(latencies(5))
    # A 2-core machine shared with other work: generous, but far below MLflow's 15 s request timeout.
    assert after < 2 * before + 0.5, f"p50 {before:.2f} s before, {after:.2f} s after the server stopped"
