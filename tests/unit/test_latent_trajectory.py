"""The training loop records every λ after every epoch (``LatentTrajectory``), saves it with the
checkpoint, continues it on resume; the trainer's ``finalize_run`` writes it to the run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_model import TINY_NETWORK

from hypersort_ray.config import load_config
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import load_checkpoint
from hypersort_ray.train.loop import LatentTrajectory, WorkerContext, train_worker


def test_trajectory_rows_fill_by_index_and_round_trip():
    rec = LatentTrajectory(3, 2)
    rec.add_epoch(1, np.array([2, 0]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    rec.add_epoch(2, np.array([0, 1, 2]), np.ones((3, 2)))
    state = rec.state_dict()
    assert state["epochs"].tolist() == [1, 2] and tuple(state["values"].shape) == (2, 3, 2)
    assert state["values"][0, 2].tolist() == [1.0, 2.0] and state["values"][0, 1].isnan().all()
    again = LatentTrajectory(3, 2, state)
    np.testing.assert_array_equal(again.state_dict()["values"], state["values"])
    assert LatentTrajectory(4, 2, state).state_dict()["epochs"].tolist() == []  # another dataset: dropped
    rec.add_epoch(2, np.array([0]), np.array([[9.0, 9.0]]))  # a replayed epoch replaces its row
    assert rec.state_dict()["values"][1, 0].tolist() == [9.0, 9.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traj") / "synth"
    generate_dataset(out, cases=4, size=16, seed=5)
    return out


def test_loop_saves_and_resumes_the_trajectory(tiny, tmp_path):
    cases = load_datalist(tiny / "datalist.tsv")
    cfg = load_config(
        None,
        [*TINY_NETWORK, "training.batch_size=2", "tracking.enabled=false", "training.epochs=2",
         "training.checkpoint_every=1"],
        {"data.datalist": tiny / "datalist.tsv", "output_dir": tmp_path},
    )
    parts: list[Path] = []
    try:
        result = train_worker(cfg, cases, WorkerContext(report=lambda m, p: p and parts.append(p)))
        traj = result.latent_trajectory
        assert traj["epochs"].tolist() == [1, 2]
        # The last row is the final latents.
        np.testing.assert_allclose(traj["values"][-1].numpy(), result.latent_state["values"].numpy(), rtol=1e-6)
        ck = load_checkpoint(parts[-1])
        assert ck.extra["latent_trajectory"]["epochs"].tolist() == [1, 2]
        more = cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 3})})
        resumed = train_worker(more, cases, WorkerContext(resume_from=parts[-1]))
        assert resumed.latent_trajectory["epochs"].tolist() == [1, 2, 3]
        np.testing.assert_array_equal(resumed.latent_trajectory["values"][:2], traj["values"])
        run = RunDir(tmp_path / "run")
        ids = [c.case_id for c in cases]
        run.write_latent_trajectory(traj["epochs"].tolist(), ids, traj["values"].numpy())
        epochs, indices, values = run.read_latent_trajectory()
        assert epochs.tolist() == [1, 2] and indices.tolist() == [0, 1, 2, 3]
        np.testing.assert_allclose(values, traj["values"].numpy(), rtol=1e-6)
    finally:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
