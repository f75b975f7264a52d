"""The paths users take on a machine where a Ray cluster already runs (``ray start --head``).

The test starts a real head node on free ports (dashboard and client server on 127.0.0.1), then runs the
CLI in subprocesses, as a user would:

* without ``--address`` (and without ``RAY_ADDRESS``) every command starts a **private** local Ray and
  leaves the cluster alone (before, ``ray.init()`` attached and Ray rejected our resource arguments);
* with ``--address auto`` it **joins** the cluster, passing no resource arguments;
* the endpoint deletes only its own Serve application on exit: another application on the same cluster
  survives it.

The head node is stopped at the end, and the ``/tmp/ray/ray_current_cluster`` file it wrote is removed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_model import TINY_NETWORK, make_tiny_run

pytestmark = pytest.mark.slow

CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", **extra})
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node started like the README's "Scaling out"; yields its GCS address."""
    tmp = tmp_path_factory.mktemp("cluster")
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.is_file() else None
    port = _free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=2",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield {"tmp": tmp, "port": port}
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], env=_env(tmp),
                       capture_output=True, timeout=120)
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)


def _hypersort(args: list[str], tmp: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hypersort_ray.cli", "-v", *args], env=_env(tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def data(cluster):
    from hypersort_ray.data.synthetic import generate_dataset

    return Path(generate_dataset(cluster["tmp"] / "data", cases=6, size=16, seed=1)["datalist"])


def _train_args(data: Path, out: Path) -> list[str]:
    sets = [x for item in [*TINY_NETWORK, "training.epochs=1", "training.batch_size=3",
                           "analysis.run_after_training=false"] for x in ("--set", item)]
    return ["train", "--datalist", str(data), "--out", str(out), "--workers", "1", *sets, "--json"]


def test_train_private_and_joined(cluster, data):
    tmp = cluster["tmp"]
    private = _hypersort(_train_args(data, tmp / "private"), tmp)
    assert "started a private local Ray instance" in private.stderr
    assert json.loads(private.stdout)["epochs"] == 1
    joined = _hypersort([*_train_args(data, tmp / "joined"), "--address", "auto"], tmp)
    assert "joined the Ray cluster at auto" in joined.stderr
    assert json.loads(joined.stdout)["epochs"] == 1


def test_gpu_request_on_a_cpu_cluster_fails_fast(cluster, data):
    tmp = cluster["tmp"]
    args = [*_train_args(data, tmp / "gpu"), "--address", "auto", "--set", "training.scaling.use_gpu=true"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hypersort_ray.cli", *args], env=_env(tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "cannot be placed" in proc.stderr and "GPU" in proc.stderr and "the cluster has 0" in proc.stderr
    assert time.monotonic() - t0 < 120, "a missing GPU must fail before training starts"


def _sweep_args(data: Path, out: Path) -> list[str]:
    sets = [x for item in ["num_samples=1", "search=random", "scheduler=fifo", "metric=seg_loss",
                           "max_concurrent_trials=1", "space={\"training.l1_weight\": {\"type\": \"choice\", \"values\": [0.1]}}", "base.training.epochs=1",
                           "base.training.batch_size=3", "base.preprocessing.roi_size=[16,16,16]",
                           "base.model.unet.channels=4", "base.model.unet.n_down=1", "base.model.unet.n_fix=1",
                           "base.model.hypernet.hidden=[8,8]", "base.analysis.run_after_training=false"]
            for x in ("--set", item)]
    return ["sweep", "--datalist", str(data), "--out", str(out), *sets, "--json"]


def test_sweep_private_and_joined(cluster, data):
    tmp = cluster["tmp"]
    private = _hypersort(_sweep_args(data, tmp / "sweep_private"), tmp)
    assert "started a private local Ray instance" in private.stderr
    assert json.loads(private.stdout)["n_finished"] == 1
    joined = _hypersort([*_sweep_args(data, tmp / "sweep_joined"), "--address", "auto"], tmp)
    assert "joined the Ray cluster at auto" in joined.stderr
    assert json.loads(joined.stdout)["n_finished"] == 1


def _wait_http(url: str, timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout} s")


OTHER_APP = """
import sys, time, ray
from ray import serve

@serve.deployment
class Other:
    def __call__(self, request):
        return "other"

ray.init(address="auto")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(Other.bind(), name="other-team", route_prefix="/other")
print("ready", flush=True)
"""


def _serve(tmp: Path, run: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hypersort_ray.cli", "-v", "serve", "--model", str(run), "--port", str(port), *extra]
    return subprocess.Popen(cmd, env=_env(tmp), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    return out or ""


def test_serve_private_and_joined_leaves_other_apps_alone(cluster):
    import urllib.request

    tmp = cluster["tmp"]
    run = make_tiny_run(tmp, name="serve-run")
    http = _free_port()
    other = subprocess.run([sys.executable, "-c", OTHER_APP, str(http)], env=_env(tmp), capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 0 and "ready" in other.stdout, other.stderr[-3000:]
    _wait_http(f"http://127.0.0.1:{http}/other")

    private_port = _free_port()
    private = _serve(tmp, run, private_port)
    try:
        _wait_http(f"http://127.0.0.1:{private_port}/healthz")
    finally:
        log = _stop(private)
    assert "started a private local Ray instance" in log, log[-3000:]

    joined = _serve(tmp, run, http, "--address", "auto")
    try:
        _wait_http(f"http://127.0.0.1:{http}/healthz")
    finally:
        log = _stop(joined)
    assert "joined the Ray cluster at auto" in log, log[-3000:]
    # Our endpoint is gone; the other team's application on the cluster still answers.
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/other", timeout=30) as response:
        assert response.read().decode() == "other"
