"""Ray Train for real on tiny data: run folder, MLflow, sharding equivalence, fault tolerance, resume,
runs never overwritten, path flags taken literally."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_model import TINY_NETWORK
from typer.testing import CliRunner

from hypersort_ray.config import load_config
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.errors import ConfigError, RunExistsError
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TINY = [*TINY_NETWORK, "training.scaling.threads_per_worker=1"]


@pytest.fixture(scope="module")
def ray_local():
    """One private Ray for the module: every run_training below joins it instead of starting its own."""
    from hypersort_ray.ray_cluster import connect

    handle = connect(None, num_cpus=2)
    assert handle.started
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_dataset(out, cases=8, size=16, seed=3)  # N >= 8: one eroded, one dilated
    return out / "datalist.tsv"


def _cfg(datalist: Path, out: Path, *extra: str):
    return load_config(None, [*TINY, *extra], {"data.datalist": datalist, "output_dir": out})


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to prove a run was left byte-identical)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_workers_write_a_complete_run_folder(ray_local, tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from hypersort_ray.train.trainer import run_training

    cfg = _cfg(tiny_data, tmp_path / "run", "training.epochs=2", "training.batch_size=2",
               "training.scaling.num_workers=2", "training.checkpoint_every=1")
    summary = run_training(cfg, progress=False)
    run = RunDir(tmp_path / "run")
    for path in (run.config_path, run.latents_csv, run.history_csv, run.summary_json):
        assert path.is_file(), path
    idx, ids, values = run.read_latents(latent_dim=2)
    assert idx.tolist() == list(range(8)) and values.shape == (8, 2)
    ck = run.load_checkpoint()  # loads without Ray
    assert ck.epoch == 2 and ck.meta["world_size"] == 2 and run.read_summary()["status"] == "finished"
    assert sorted(ck.latents["indices"].tolist()) == list(range(8))
    assert len(list(run.checkpoint_dir.glob("latents_rank*.safetensors"))) == 2
    np.testing.assert_allclose(values, ck.latents["values"].numpy(), rtol=0, atol=1e-7)
    # Each sample's own training loss, gathered from both workers: every case seen once per epoch.
    losses = run.sample_losses_csv.read_text().splitlines()
    assert losses[0] == "index,case_id,train_loss_mean,train_loss_last,epochs" and len(losses) == 9
    assert all(line.split(",")[4] == "2" and float(line.split(",")[2]) > 0 for line in losses[1:])

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    mrun = client.get_run(summary["mlflow_run_id"])
    assert mrun.data.params["model.hypernet.latent_dim"] == "2"
    assert mrun.data.tags["world_size"] == "2" and len(mrun.data.tags["dataset_hash"]) == 64
    history = client.get_metric_history(mrun.info.run_id, "seg_loss")
    assert [m.step for m in history] == [1, 2]
    assert "auroc_latent_norm" in mrun.data.metrics  # truth.csv sits beside the datalist
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    names = (run.latents_csv, run.history_csv, run.sample_losses_csv, run.checkpoint_dir)
    assert {p.name for p in names} <= artifacts
    assert mrun.info.status == "FINISHED"


def test_one_and_two_workers_take_the_same_step(ray_local, tiny_data, tmp_path):
    """Same seed and global batch (4 samples): 1 worker x batch 4 == 2 workers x batch 2."""
    from hypersort_ray.train.trainer import run_training

    four = generate_dataset(tmp_path / "four", cases=4, size=16, seed=5)
    datalist = Path(four["datalist"])
    common = ["training.epochs=1", "tracking.enabled=false", "analysis.run_after_training=false"]
    run_training(_cfg(datalist, tmp_path / "w1", *common, "training.batch_size=4", "training.scaling.num_workers=1"), progress=False)
    run_training(_cfg(datalist, tmp_path / "w2", *common, "training.batch_size=2", "training.scaling.num_workers=2"), progress=False)
    a, b = RunDir(tmp_path / "w1").load_checkpoint(), RunDir(tmp_path / "w2").load_checkpoint()
    for key, value in a.hyper_state.items():
        torch.testing.assert_close(value, b.hyper_state[key], rtol=1e-4, atol=1e-5, msg=key)
    order_a = torch.argsort(a.latents["indices"])
    order_b = torch.argsort(b.latents["indices"])
    torch.testing.assert_close(a.latents["values"][order_a], b.latents["values"][order_b], rtol=1e-4, atol=1e-6)
    assert torch.equal(a.latents["step"][order_a], b.latents["step"][order_b])


def test_worker_failure_resumes_from_checkpoint_with_every_latent_intact(ray_local, tiny_data, tmp_path, monkeypatch):
    from hypersort_ray.train.trainer import FAULT_ENV, run_training

    common = ["training.epochs=3", "training.batch_size=2", "training.scaling.num_workers=2",
              "training.checkpoint_every=1", "training.max_failures=2", "tracking.enabled=false"]
    clean = run_training(_cfg(tiny_data, tmp_path / "clean", *common), progress=False)
    monkeypatch.setenv(FAULT_ENV, "epoch=1,step=1,rank=1")  # mid-epoch 2 (0-based epoch 1), second step
    faulty = run_training(_cfg(tiny_data, tmp_path / "faulty", *common), progress=False)
    assert (tmp_path / "faulty" / ".fault_injected").is_file(), "the fault hook never fired"
    assert clean["epochs"] == faulty["epochs"] == 3

    ref, got = RunDir(tmp_path / "clean").load_checkpoint(), RunDir(tmp_path / "faulty").load_checkpoint()
    # nothing lost, nothing duplicated: every sample exactly once, one Adam step per epoch each
    assert sorted(got.latents["indices"].tolist()) == list(range(8))
    assert got.latents["step"].tolist() == [3] * 8
    # and the restart replayed epoch 2 from the epoch-1 checkpoint: same result as the clean run
    oa, ob = torch.argsort(ref.latents["indices"]), torch.argsort(got.latents["indices"])
    torch.testing.assert_close(ref.latents["values"][oa], got.latents["values"][ob], rtol=1e-5, atol=1e-6)
    epochs = [int(h["epoch"]) for h in got.extra["history"]]
    assert epochs == [1, 2, 3]


def test_resume_with_a_different_world_size(ray_local, tiny_data, tmp_path):
    from hypersort_ray.train.trainer import run_training

    first = _cfg(tiny_data, tmp_path / "a", "training.epochs=1", "training.batch_size=2",
                 "training.scaling.num_workers=2", "tracking.enabled=false")
    run_training(first, progress=False)
    second = _cfg(tiny_data, tmp_path / "b", "training.epochs=2", "training.batch_size=2",
                  "training.scaling.num_workers=1", "tracking.enabled=false",
                  f"training.resume_from={RunDir(tmp_path / 'a').checkpoint_dir}")
    summary = run_training(second, progress=False)
    ck = RunDir(tmp_path / "b").load_checkpoint()
    assert summary["epochs"] == 2 and ck.meta["world_size"] == 1
    assert sorted(ck.latents["indices"].tolist()) == list(range(8))
    assert ck.latents["step"].tolist() == [2] * 8
    assert [int(h["epoch"]) for h in ck.extra["history"]] == [1, 2]


def test_mlflow_server_down_warns_and_training_finishes(ray_local, tiny_data, tmp_path):
    import socket

    from hypersort_ray.train.trainer import run_training

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tiny_data, tmp_path / "run", "training.epochs=1", "training.scaling.num_workers=1",
               f"tracking.tracking_uri=http://127.0.0.1:{port}")
    with pytest.warns(RuntimeWarning, match="MLflow tracking at http://127.0.0.1"):
        summary = run_training(cfg, progress=False)
    assert summary["epochs"] == 1 and summary["mlflow_run_id"] is None
    assert RunDir(tmp_path / "run").history_csv.is_file() and RunDir(tmp_path / "run").latents_csv.is_file()


def test_more_workers_than_cases_is_a_config_error(tiny_data, tmp_path):
    from hypersort_ray.train.trainer import run_training

    with pytest.raises(ConfigError, match=r"num_workers = 9 exceeds the number of training cases \(8\)"):
        run_training(_cfg(tiny_data, tmp_path / "run", "training.scaling.num_workers=9"), progress=False)


def test_uneven_shards_keep_step_counts_equal():
    from hypersort_ray.train.loop import epoch_batches, global_valid_counts, shard_indices, steps_per_epoch

    n, w, b = 7, 3, 2
    steps = steps_per_epoch(n, w, b)
    assert steps == math.ceil(math.ceil(7 / 3) / 2) == 2
    shards = [shard_indices(n, w, r) for r in range(w)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    batches = [epoch_batches(s, b, steps, seed=0, epoch=0, rank=r) for r, s in enumerate(shards)]
    assert all(len(bs) == steps for bs in batches)
    assert global_valid_counts(n, w, b, steps) == [sum(len(bs[k]) for bs in batches) for k in range(steps)]
    assert sorted(i for bs in batches for batch in bs for i in batch) == list(range(n))


# ------------------------------------------------------------------------- runs are never overwritten
def _cli(*args: str):
    from hypersort_ray.cli import app

    result = CliRunner().invoke(app, list(args))
    return result


def test_train_refuses_a_folder_that_holds_a_run_and_resume_continues_it(ray_local, tiny_data, tmp_path):
    """Training into an existing run changes nothing; --resume continues it in the same MLflow run."""
    out = tmp_path / "exp #3"  # a YAML comment if it were parsed as YAML: it must be this very folder
    base = ["--datalist", str(tiny_data), "--set", "training.scaling.num_workers=1", "--set",
            "training.batch_size=4", "--set", "analysis.run_after_training=false", "--json"]
    tiny = [x for item in TINY for x in ("--set", item)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _cli("train", "--out", str(out), "--epochs", "1", "--tracking-uri", uri, *tiny, *base)
    assert first.exit_code == 0, first.output
    run = RunDir(out)
    assert run.has_checkpoint() and not (tmp_path / "exp").exists()
    before = _files(out)

    again = _cli("train", "--out", str(out), "--epochs", "1", "--tracking-uri", uri, *tiny, *base)
    assert again.exit_code != 0
    assert isinstance(again.exception, RunExistsError)
    message = str(again.exception)
    assert str(out) in message and "--resume" in message and "another --out" in message
    assert _files(out) == before, "a refused training must leave every file of the run byte-identical"

    resumed = _cli("train", "--resume", str(out), "--epochs", "2", "--json")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    ck = run.load_checkpoint()
    assert summary["epochs"] == ck.epoch == 2 and ck.latents["step"].tolist() == [2] * 8
    assert run.read_history()["epoch"].tolist() == [1, 2]
    assert summary["mlflow_run_id"] == json.loads(first.stdout)["mlflow_run_id"], "the same MLflow run goes on"
    nothing_more = _cli("train", "--resume", str(out), "--epochs", "2")
    assert nothing_more.exit_code != 0 and "already trained 2 epochs" in str(nothing_more.exception)


def test_resume_of_an_interrupted_run_and_job_retry(ray_local, tiny_data, tmp_path):
    """An interrupted run (only Ray Train's intermediate checkpoints) continues from the newest one;
    `--if-exists resume` (a RayJob retry) does the same instead of starting again from epoch 0."""
    from hypersort_ray.train.trainer import run_training

    cfg = _cfg(tiny_data, tmp_path / "run", "training.epochs=2", "training.checkpoint_every=1",
               "training.scaling.num_workers=1", "tracking.enabled=false", "training.keep_checkpoints=3")
    run_training(cfg, progress=False)
    run = RunDir(tmp_path / "run")
    import shutil

    shutil.rmtree(run.checkpoint_dir)  # what a job killed before the end leaves: no final checkpoint
    latest = run.latest_checkpoint()
    assert latest is not None and load_checkpoint(latest).epoch == 2
    retry = _cli("train", "--out", str(run.path), "--if-exists", "resume", "--epochs", "3", "--json")
    assert retry.exit_code == 0, retry.output
    assert json.loads(retry.stdout)["epochs"] == 3 and run.load_checkpoint().latents["step"].tolist() == [3] * 8
    empty = _cli("train", "--resume", str(tmp_path / "nothing"))
    assert empty.exit_code != 0 and "not a run folder" in str(empty.exception)


@pytest.mark.parametrize("name", ["null", "yes", "2024-01-01"])
def test_path_flags_reach_the_config_literally(name, tiny_data, tmp_path, monkeypatch):
    """`--out null|yes|2024-01-01` and `--datalist` are folder names, never YAML values."""
    from hypersort_ray import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "train", lambda cfg, address=None: seen.setdefault("cfg", cfg) and {})
    monkeypatch.chdir(tmp_path)
    result = _cli("train", "--out", name, "--datalist", str(tiny_data))
    assert result.exit_code == 0, result.output
    assert seen["cfg"].output_dir == Path(name) and seen["cfg"].data.datalist == tiny_data
