"""End-to-end sweep on real Ray (Tune over Train) and a real MLflow store (slow).

One sweep of 4 trials on 8 synthetic cases at 24³ (6 training + 2 held-out), 2 epochs each:
latent_dim ∈ {2, 4} × num_workers ∈ {1, 64}. The 64-worker trials are impossible (more workers than
training cases): they must be marked failed while the others finish. Every real trial crashes once at
the start of its second epoch (the trainer's test fault, Train retries disabled): Tune must retry it
and the retry must continue from the epoch-1 checkpoint. Then the finished sweep is resumed.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from hypersort_ray.config import SweepConfig
from hypersort_ray.errors import ConfigError
from hypersort_ray.runs import RunDir

pytestmark = pytest.mark.slow

PARAMS = ["model.hypernet.latent_dim", "training.scaling.num_workers"]


def _config(data_dir, out) -> SweepConfig:
    return SweepConfig.model_validate({
        "name": "test-sweep",
        "num_samples": 1,
        "search": "grid",
        "scheduler": "fifo",
        "metric": "val_dice",
        "workers_per_trial": 1,
        "max_concurrent_trials": 2,
        "max_failures_per_trial": 1,
        "space": {
            "model.hypernet.latent_dim": {"type": "grid", "values": [2, 4]},
            "training.scaling.num_workers": {"type": "grid", "values": [1, 64]},
        },
        "base": {
            "name": "test-sweep",
            "output_dir": str(out),
            "data": {"datalist": str(data_dir / "datalist.tsv"), "validation_fraction": 0.25},
            "preprocessing": {"roi_size": [16, 16, 16]},
            "model": {"unet": {"channels": 4, "n_down": 1, "n_fix": 1}, "hypernet": {"hidden": [16, 16]}},
            "training": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "log_every": 1, "max_failures": 0},
            "analysis": {"run_after_training": False},
        },
    })


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    from hypersort_ray import pipeline
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.train.trainer import FAULT_ENV

    root = tmp_path_factory.mktemp("sweep")
    generate_dataset(root / "data", cases=8, size=24, seed=0)
    cfg = _config(root / "data", root / "out")
    os.environ[FAULT_ENV] = "epoch=1,step=0,rank=0"
    try:
        summary = pipeline.sweep(cfg, address=None, resume=False)
    finally:
        os.environ.pop(FAULT_ENV, None)
        ray.shutdown()
    return cfg, summary, root / "out"


def test_results_table(sweep):
    cfg, summary, out = sweep
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:3]) == ["val_dice", *PARAMS]
    for col in ("auroc_latent_norm", "spearman_latent_norm", "status", "run_dir"):
        assert col in df.columns
    assert len(df) == 4 and summary["n_trials"] == 4
    assert sorted(df["status"]) == ["failed", "failed", "finished", "finished"]
    finished = df[df["status"] == "finished"]
    assert set(finished["training.scaling.num_workers"]) == {1}
    assert sorted(finished["model.hypernet.latent_dim"]) == [2, 4]
    assert finished["val_dice"].between(0, 1).all()
    assert list(df["status"][:2]) == ["finished", "finished"]  # failed trials (no objective) sort last
    assert df["val_dice"].iloc[0] >= df["val_dice"].iloc[1]
    failed = df[df["status"] == "failed"]
    assert failed["error"].str.contains("exceeds").all(), failed["error"].tolist()
    assert summary["best"]["trial_id"] == df["trial_id"].iloc[0]
    assert (out / "objective.png").stat().st_size > 1000
    assert summary["leaked_train_actors"] == []


def test_crashed_trials_were_retried_from_their_checkpoint(sweep):
    _, _, out = sweep
    df = pd.read_csv(out / "results.csv")
    for run_dir in df[df["status"] == "finished"]["run_dir"]:
        run = RunDir(out / "trials" / os.path.basename(run_dir))
        assert (run.path / ".fault_injected").is_file()  # the fault fired ...
        assert (run.path / ".attempts").read_text() == "2"  # ... and Tune ran the trial again
        hist = run.read_history()
        assert list(hist["epoch"]) == [1, 2]
        assert hist["val_dice"].notna().all()
        assert run.load_checkpoint().epoch == 2
        val = json.loads((run.path / "validation.json").read_text())
        assert val["val_cases"] == 2 and 0 <= val["val_dice"] <= 1
        # the held-out cases were never trained on: 6 latents for the 6 training cases
        assert len(run.read_latents()[0]) == 6


def test_mlflow_parent_and_child_runs(sweep):
    from mlflow.tracking import MlflowClient

    cfg, summary, out = sweep
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(cfg.base.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.run_name == cfg.name and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.metrics["n_trials"] == 4 and parent.data.metrics["n_failed"] == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "objective.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2  # one per trial that got as far as training, reused by the retry
    df = pd.read_csv(out / "results.csv")
    for child in children:
        row = df[df["mlflow_run_id"] == child.info.run_id].iloc[0]
        assert child.info.status == "FINISHED"
        assert child.data.params["model.hypernet.latent_dim"] == str(row["model.hypernet.latent_dim"])
        assert child.data.tags["hypersort.trial_status"] == "finished"
        assert child.data.metrics["val_dice"] == pytest.approx(row["val_dice"])
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]


def test_resume_of_a_finished_sweep_and_refusal_to_overwrite(sweep):
    import ray

    from hypersort_ray.tune.sweep import run_sweep

    cfg, summary, out = sweep
    before = pd.read_csv(out / "results.csv")
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(cfg, address=None, resume=False)
    try:
        again = run_sweep(cfg, address=None, resume=True)
    finally:
        ray.shutdown()
    assert again["resumed"] and again["parent_run_id"] == summary["parent_run_id"]
    after = pd.read_csv(out / "results.csv")
    assert sorted(after["trial_id"]) == sorted(before["trial_id"])
    assert sorted(after["status"]) == sorted(before["status"])


def test_resume_without_a_sweep_is_a_config_error(tmp_path):
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.tune.sweep import run_sweep

    generate_dataset(tmp_path / "data", cases=8, size=16, seed=0)
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(_config(tmp_path / "data", tmp_path / "none"), address=None, resume=True)
