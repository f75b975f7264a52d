"""λ-trajectory scores (``hypersort_ray.analysis.trajectory``) and the run's trajectory file."""

from __future__ import annotations

import numpy as np
import pytest

from hypersort_ray.analysis.trajectory import TRAJECTORY_COLUMNS, trajectory_scores
from hypersort_ray.errors import RunError
from hypersort_ray.runs import RunDir


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(scale=0.02, size=(10, 20, 2))  # a clean cloud wandering around 0
    values[3:, 0] = [1.0, 0.0]  # case 0 leaves at epoch 4 and stays out
    values[2:4, 1] = [1.0, 0.0]  # case 1 leaves at epoch 3, comes back at epoch 5
    return values


def test_scores_by_hand():
    scores = trajectory_scores(_values())
    assert tuple(scores) == TRAJECTORY_COLUMNS
    exit_ = scores["trajectory_exit"]
    assert exit_[0] == pytest.approx(7 / 10)  # out from epoch 4 of 10 on
    assert exit_[1] == 0 and (exit_[2:] == 0).all()  # a case that comes back has not left for good
    assert scores["trajectory_mean_norm"][0] > scores["trajectory_mean_norm"][1] > scores["trajectory_mean_norm"][2:].max()
    assert scores["trajectory_path_length"][1] > scores["trajectory_path_length"][0]  # out and back again


def test_unrecorded_epochs_are_left_out():
    values = _values()
    values[0, 5] = np.nan
    scores = trajectory_scores(values)
    assert all(np.isfinite(s).all() for s in scores.values())
    with pytest.raises(ValueError, match="epochs"):
        trajectory_scores(np.zeros((0, 3, 2)))


def test_run_folder_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.read_latent_trajectory() is None
    values = _values()
    ids = [f"c{i}" for i in range(20)]
    run.write_latent_trajectory(range(1, 11), ids, values)
    epochs, indices, back = run.read_latent_trajectory()
    assert epochs.tolist() == list(range(1, 11)) and indices.tolist() == list(range(20))
    np.testing.assert_allclose(back, values, rtol=1e-6, atol=1e-9)
    with pytest.raises(RunError, match="do not match"):
        run.write_latent_trajectory([1], ids, values)
    run.latent_trajectory_csv.write_text("epoch,index,case_id,z0\n1,0,a,0.1\n1,1,b,0.2\n2,0,a,0.3\n")
    with pytest.raises(RunError, match="malformed"):
        run.read_latent_trajectory()
