"""The MLflow model end to end: registry (embedded SQLite and a real server over HTTP), a consumer in a
separate process that has only mlflow/numpy/nibabel (and not our package), and the plain-UNet exports.

Everything runs on 127.0.0.1; the server and every subprocess are stopped by fixture finalizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_model import make_tiny_run, tiny_image
from helpers_servers import free_port as _free_port
from helpers_servers import mlflow_server as start_mlflow_server

from hypersort_ray.errors import ModelError, ProvenanceError
from hypersort_ray.inference import export_cli, load_exported_unet, load_model, predict_cli
from hypersort_ray.runs import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

NAME = "tiny-hypersort"

# The consumer: imports mlflow, numpy and nibabel only. A meta-path guard hides every installed copy of
# hypersort_ray (editable or not) and lets it be imported only from an MLflow model's ``code/`` folder,
# proving that the model brings its own code (code_paths) and needs no hypersort-ray installed.
CONSUMER = textwrap.dedent(
    """
    import json, os, sys
    from importlib.machinery import PathFinder

    class ModelCodeOnly:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name != "hypersort_ray":
                return None
            dirs = [p for p in sys.path if os.path.basename(p.rstrip("/")) == "code"]
            spec = PathFinder.find_spec(name, dirs)
            if spec is None:
                raise ModuleNotFoundError("hypersort_ray is not installed in this consumer")
            return spec

    sys.meta_path.insert(0, ModelCodeOnly)
    try:
        import hypersort_ray  # noqa: F401
        raise SystemExit("the consumer must not see an installed hypersort_ray")
    except ModuleNotFoundError:
        pass
    import mlflow, numpy as np, nibabel as nib

    uri, image, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = mlflow.pyfunc.load_model(uri)
    img = nib.load(image)
    volume = img.get_fdata()  # float64: the signature must not reject it
    by_array = model.predict(volume, params={"style": "1", "affine": img.affine.reshape(-1).tolist()})
    by_dict = model.predict({"image": volume, "affine": img.affine}, params={"latent": [-1.5, 1.0]})
    by_path = model.predict(image)
    try:
        model.predict(image, params={"style": "nope"})
        bad = "no error"
    except Exception as exc:
        bad = f"{type(exc).__name__}: {exc}"
    np.savez(out, by_array=by_array, by_dict=by_dict, by_path=by_path)
    print(json.dumps({"module": sys.modules["hypersort_ray"].__file__, "bad_style": bad,
                      "metadata": model.metadata.metadata}))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra})
    return env


def _run(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _consume(uri: str, image: Path, tmp: Path, tracking_uri: str) -> tuple[dict, dict[str, np.ndarray]]:
    out = tmp / "consumer.npz"
    proc = _run([sys.executable, "-c", CONSUMER, uri, str(image), str(out)], cwd=tmp, MLFLOW_TRACKING_URI=tracking_uri)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as arrays:
        return info, {k: arrays[k] for k in arrays.files}


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def no_env_store(tmp_path_factory):
    """No store named: commands use the workspace store ``./mlflow.db`` of a folder of the module's own
    (a CI-wide MLFLOW_TRACKING_URI must not leak in). Yields that folder."""
    workspace = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.chdir(workspace)
        yield workspace


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("mlflow-model"), latent_dim=2, with_styles=True)


@pytest.fixture(scope="module")
def training(run_dir, no_env_store) -> dict:
    """What ``hypersort train`` leaves in the workspace store: a finished run named in the run's summary."""
    from hypersort_ray.mlflow_store import artifact_location, resolve_tracking_uri
    from hypersort_ray.tracking.mlflow_logger import RunLogger

    uri = resolve_tracking_uri(None)
    logger = RunLogger(uri)
    run_id = logger.start("hypersort", "tiny", artifact_location=artifact_location(uri),
                          tags={"dataset_hash": "feedc0ffee"})
    assert run_id, "the workspace store must accept a run"
    logger.end("FINISHED")
    run = RunDir(run_dir)
    run.write_summary({**run.read_summary(), "mlflow_run_id": run_id, "tracking_uri": uri})
    return {"run_id": run_id, "end_time": logger.client.get_run(run_id).info.end_time}


@pytest.fixture(scope="module")
def training_run(training) -> str:
    return training["run_id"]


@pytest.fixture(scope="module")
def registered(run_dir, training_run) -> dict:
    from hypersort_ray.tracking.registry import register_run

    return register_run(run_dir, NAME, alias="champion")


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with SQLite + proxied artifacts; stopped (process group) at the end."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), env=_env()) as server:
        yield server.url


# ------------------------------------------------------------------------------ embedded registry
def test_register_into_the_training_run(registered, training_run, training, run_dir, no_env_store):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(no_env_store / 'mlflow.db').resolve().as_posix()}"
    assert registered["tracking_uri"] == uri, "no store named: the workspace store ./mlflow.db"
    assert registered["run_id"] == training_run, "the model goes into the run that trained it"
    assert registered["version"] == "1"
    assert registered["model_uri"] == f"models:/{NAME}@champion"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "1" and version.run_id == training_run
    tags = version.tags
    assert tags["hypersort.dataset_hash"] == "feedc0ffee"
    assert tags["hypersort.latent_dim"] == "2"
    assert tags["hypersort.num_styles"] == "3"
    assert tags["hypersort.checkpoint_sha256"] == RunDir(run_dir).checkpoint_sha256(), "provenance"
    assert float(tags["train.loss"]) == pytest.approx(0.9)
    run = client.get_run(training_run)
    assert run.info.status == "FINISHED", "registering keeps the run's status"
    assert run.info.end_time == training["end_time"], "... and its end time"

    # A second registration: next version, several aliases, the alias moves.
    from hypersort_ray.tracking.registry import register_run

    again = register_run(run_dir, NAME, alias="champion,staging")
    assert again["version"] == "2" and again["aliases"] == ["champion", "staging"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    client.set_registered_model_alias(NAME, "champion", "1")  # later tests load version 1 by alias


def test_logged_model_holds_no_pickle(registered, run_dir, tmp_path):
    import mlflow
    import yaml

    from hypersort_ray.mlflow_store import using_store

    with using_store(registered["tracking_uri"]):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["model_uri"], dst_path=str(tmp_path)))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".joblib"))], files
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("model_code.py")
    assert pyfunc["code"] == "code" and (local / "code" / "hypersort_ray" / "inference" / "model.py").is_file()
    assert (local / "artifacts" / "hypersort" / "hypernet.safetensors").is_file()
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "monai", "nibabel", "safetensors", "numpy"}
    assert all("==" in r and "+" not in r for r in reqs), reqs
    sig = mlmodel["signature"]
    assert sig.get("inputs") is None and "outputs" in sig
    assert {p["name"] for p in json.loads(sig["params"])} == {"style", "latent", "affine", "probabilities"}
    assert (local / "input_example.json").is_file()


def test_model_uri_not_found(registered):
    with pytest.raises(ModelError, match="not found in the MLflow store"):
        load_model(f"models:/{NAME}@nope", tracking_uri=registered["tracking_uri"])
    with pytest.raises(ModelError, match="not found in the MLflow store"):
        load_model("models:/no-such-model/1", tracking_uri=registered["tracking_uri"])


def test_load_model_by_uri_forms(registered, model, run_dir):
    image = tiny_image(run_dir)
    expected = model.predict(image, style="2")["mask"]
    for uri in (registered["model_uri"], f"models:/{NAME}/1", f"runs:/{registered['run_id']}/model",
                registered["logged_model_uri"]):
        loaded = load_model(uri, tracking_uri=registered["tracking_uri"])
        assert [s.id for s in loaded.styles] == ["main", "1", "2"]
        np.testing.assert_array_equal(loaded.predict(image, style="2")["mask"], expected)


def test_bad_alias_is_refused_before_logging(run_dir, training_run):
    from hypersort_ray.tracking.registry import register_run

    with pytest.raises(ModelError, match="'latest'.*reserved"):
        register_run(run_dir, NAME, alias="latest")


def test_auto_register(run_dir, training_run):
    from hypersort_ray.tracking.registry import auto_register

    cfg = RunDir(run_dir).read_config()
    assert cfg.tracking.register_as is None and auto_register(cfg, run_dir) is None

    def with_tracking(**kw):
        return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update=kw)})

    result = auto_register(with_tracking(enabled=True, register_as="auto-tiny"), run_dir)
    assert result["name"] == "auto-tiny" and result["alias"] == "champion" and result["run_id"] == training_run
    with pytest.warns(RuntimeWarning, match="tracking.enabled is false"):
        assert auto_register(with_tracking(enabled=False, register_as="auto-tiny"), run_dir) is None
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.warns(RuntimeWarning, match="retry with `hypersort register`"):
        assert auto_register(with_tracking(enabled=True, register_as="x", tracking_uri=dead), run_dir) is None


# ---------------------------------------------------------------------------------- consumer process
def test_consumer_process_equals_cli(registered, run_dir, tmp_path, monkeypatch):
    image = tiny_image(run_dir, 2)
    info, got = _consume(f"models:/{NAME}@champion", image, tmp_path, registered["tracking_uri"])
    assert "/code/hypersort_ray/" in info["module"], f"loaded from {info['module']}, not the model's code"
    assert "unknown style 'nope'" in info["bad_style"]
    assert info["metadata"]["latent_dim"] == 2

    # hypersort predict on the same file: by run folder (style 1, latent of style 2) and by model URI.
    predict_cli(str(run_dir), image=image, out=tmp_path / "style1.nii.gz", style="1")
    predict_cli(str(run_dir), image=image, out=tmp_path / "latent.nii.gz", latent="-1.5,1.0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    predict_cli(f"models:/{NAME}@champion", image=image, out=tmp_path / "main.nii.gz")
    src = nib.load(image)
    for key, cli in (("by_array", "style1"), ("by_dict", "latent"), ("by_path", "main")):
        assert got[key].shape == src.shape and got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], _mask(tmp_path / f"{cli}.nii.gz"), err_msg=key)
    assert not np.array_equal(got["by_array"], got["by_path"]), "styles must differ for this check to mean anything"


# ------------------------------------------------------------------------------- HTTP tracking server
def test_registry_on_mlflow_server(mlflow_server, run_dir, model, tmp_path, no_env_store):
    from mlflow.tracking import MlflowClient

    from hypersort_ray.tracking.registry import register_run

    result = register_run(run_dir, "tiny-http", alias="champion", tracking_uri=mlflow_server)
    assert result["tracking_uri"] == mlflow_server and result["version"] == "1"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias("tiny-http", "champion")
    assert version.run_id == result["run_id"] != RunDir(run_dir).read_summary()["mlflow_run_id"]
    assert version.tags["hypersort.latent_dim"] == "2"

    image = tiny_image(run_dir, 1)
    info, got = _consume("models:/tiny-http@champion", image, tmp_path, mlflow_server)
    assert "/code/hypersort_ray/" in info["module"]
    np.testing.assert_array_equal(got["by_path"], model.predict(image)["mask"])
    np.testing.assert_array_equal(got["by_array"], model.predict(image, style="1")["mask"])


def test_register_errors(tmp_path, no_env_store):
    from hypersort_ray.tracking.registry import register_run

    with pytest.raises(ModelError, match="no complete checkpoint"):
        register_run(tmp_path, NAME)
    run = make_tiny_run(tmp_path, with_styles=False)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=rf"MLflow store {dead}: registering '{NAME}' failed"):
        register_run(run, NAME, tracking_uri=dead)
    assert time.monotonic() - t0 < 60, "a dead server must fail fast, not after minutes of retries"
    # Styles fitted on another checkpoint are refused before anything reaches the registry.
    other = RunDir(make_tiny_run(tmp_path, name="other", seed=5))
    RunDir(run).analysis.styles_json.parent.mkdir(exist_ok=True)
    RunDir(run).analysis.styles_json.write_bytes(other.analysis.styles_json.read_bytes())
    with pytest.raises(ProvenanceError, match="re-run `hypersort analyze"):
        register_run(run, NAME, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    assert not (tmp_path / "other.db").exists(), "nothing was logged"


# -------------------------------------------------------------------------------------------- export
def test_export_state_dict_loads_into_the_primary_class(run_dir, model, tmp_path):
    import torch
    from safetensors import safe_open

    from hypersort_ray.model.unet import UNet

    out = tmp_path / "unet_style1.safetensors"
    summary = export_cli(str(run_dir), style="1", out=out, fmt="state_dict")
    assert summary["style"] == "1" and summary["latent"] == [1.5, -1.0]
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "hypersort-unet" and json.loads(meta["preprocessing"])["roi_size"] == [16, 16, 16]
    net = load_exported_unet(out)
    assert type(net) is UNet
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.unet_for(model.style("1").latent)(x)
        np.testing.assert_allclose(net(x).numpy(), expected.numpy(), atol=1e-6)
        assert not torch.allclose(model.unet_for(model.style("main").latent)(x), expected), "styles must differ"

    latent_out = tmp_path / "unet_latent.safetensors"
    assert export_cli(str(run_dir), style="0.3,-0.2", out=latent_out, fmt="state_dict")["style"] == "latent"
    with pytest.raises(ModelError, match="unknown style 'zzz'"):
        export_cli(str(run_dir), style="zzz", out=tmp_path / "x.safetensors", fmt="state_dict")
    with pytest.raises(ModelError, match="--format 'tflite'"):
        export_cli(str(run_dir), style="1", out=tmp_path / "x.tflite", fmt="tflite")


def test_export_torchscript_runs_in_a_fresh_process(registered, model, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    out = tmp_path / "unet_style2.pt"
    export_cli(registered["model_uri"], style="2", out=out, fmt="torchscript")
    x = torch.randn(1, 1, 32, 16, 24, generator=torch.Generator().manual_seed(1))  # not the ROI shape
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(
        """
        import sys, numpy as np, torch
        extra = {"hypersort.json": ""}
        net = torch.jit.load(sys.argv[1], _extra_files=extra)
        with torch.no_grad():
            y = net(torch.from_numpy(np.load(sys.argv[2])))
        np.save(sys.argv[3], y.numpy())
        print(extra["hypersort.json"].decode() if isinstance(extra["hypersort.json"], bytes) else extra["hypersort.json"])
        """
    )
    proc = _run([sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], cwd=tmp_path)
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["style"] == "2" and meta["format"] == "hypersort-unet"
    with torch.no_grad():
        expected = model.unet_for(model.style("2").latent)(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
    assert isinstance(load_exported_unet(out), torch.jit.ScriptModule)


def test_export_torch_export_and_onnx_reproduce_the_style(run_dir, model, tmp_path):
    """torch.export (TorchScript's successor) and ONNX: dynamic batch and spatial size, same logits."""
    import torch

    x = torch.randn(3, 1, 24, 16, 32, generator=torch.Generator().manual_seed(2))  # not the ROI shape
    with torch.no_grad():
        expected = model.unet_for(model.style("2").latent)(x).numpy()
    program = tmp_path / "unet.pt2"
    assert export_cli(str(run_dir), style="2", out=program, fmt="torch_export")["format"] == "torch_export"
    with torch.no_grad():
        np.testing.assert_allclose(load_exported_unet(program)(x).numpy(), expected, atol=1e-5)

    onnxruntime = pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "unet.onnx"
    export_cli(str(run_dir), style="2", out=onnx_file, fmt="onnx")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]  # onnxruntime's kernels: logits to 1e-3 of their scale
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999
