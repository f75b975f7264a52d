"""Out-of-fold baselines (Test-Dice, cleanlab) and the model-based HyperSORT scores on a tiny run.

Tiny UNet (4 channels, one down-sampling stage), 16³ volumes, 6 cases, one epoch per fold: the scores
are meaningless, the tests check folds, coverage, ranges, determinism and the cleanlab path.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.analysis.baselines import (
    assign_folds,
    cleanlab_suspicion,
    equal_compute_epochs,
    run_baselines,
)
from hypersort_ray.analysis.evaluation import load_run_cases, read_run_latents
from hypersort_ray.analysis.model_scores import MODEL_SCORE_COLUMNS, make_predictor, model_scores
from hypersort_ray.errors import ConfigError, DataError, RunError
from hypersort_ray.inference import load_model
from hypersort_ray.runs import RunDir

pytestmark = [pytest.mark.filterwarnings("ignore:transform info of:UserWarning")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> RunDir:
    return RunDir(make_tiny_run(tmp_path_factory.mktemp("baselines"), n_cases=6, with_styles=False))


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir.checkpoint_dir, cache_size=0)


# ------------------------------------------------------------------------------------------- folds
def test_folds_partition_the_cases_deterministically():
    for n, k in ((6, 3), (10, 3), (7, 2), (5, 5)):
        fold = assign_folds(n, k, seed=3)
        assert fold.shape == (n,) and set(fold.tolist()) == set(range(k))
        sizes = np.bincount(fold, minlength=k)
        assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
        np.testing.assert_array_equal(fold, assign_folds(n, k, seed=3))
    assert any(not np.array_equal(assign_folds(30, 3, seed=s), assign_folds(30, 3, seed=0)) for s in (1, 2))
    with pytest.raises(ConfigError, match="at least 2"):
        assign_folds(6, 1)
    with pytest.raises(DataError, match="needs at least 4 cases"):
        assign_folds(3, 4)


def test_equal_compute_rule():
    # k folds x (k-1)/k of N cases x E' epochs == N x E  =>  E' = E / (k - 1)
    assert equal_compute_epochs(60, 3) == 30
    assert equal_compute_epochs(200, 5) == 50
    assert equal_compute_epochs(1, 3) == 1
    assert equal_compute_epochs(3, 2) == 3


# ---------------------------------------------------------------------------------------- cleanlab
def test_cleanlab_suspicion_matches_cleanlab_and_orders_cases():
    from cleanlab.segmentation.rank import get_label_quality_scores

    rng = np.random.default_rng(0)
    label = (rng.random((4, 5, 6)) > 0.5).astype(np.int64)
    p1 = np.clip(label + rng.normal(0, 0.2, label.shape), 0.01, 0.99)
    probs = np.stack([1 - p1, p1])
    ours = cleanlab_suspicion(label, probs)
    quality, _ = get_label_quality_scores(label.reshape(1, 4, 30), probs.reshape(1, 2, 4, 30), verbose=False)
    assert ours == pytest.approx(1 - quality[0])
    flipped = label.copy()
    flipped[:2] = 1 - flipped[:2]
    assert cleanlab_suspicion(flipped, probs) > ours  # a label that disagrees with the model is worse
    assert 0.0 <= cleanlab_suspicion(label[0], probs[:, 0]) <= 1.0  # 2D case


# --------------------------------------------------------------------------------------- baselines
def test_run_baselines_out_of_fold_scores(run_dir):
    df = run_baselines(run_dir, folds=3, epochs=1, seed=5)
    assert list(df.columns) == ["index", "case_id", "test_dice", "cleanlab"]
    assert df["index"].tolist() == list(range(6))  # every case scored once
    np.testing.assert_array_equal(df.attrs["fold"], assign_folds(6, 3, seed=5))
    for col in ("test_dice", "cleanlab"):
        assert df[col].between(0.0, 1.0).all() and df[col].notna().all()
    assert df.attrs["epochs"] == 1 and df.attrs["folds"] == 3 and df.attrs["seed"] == 5

    written = run_dir.read_baselines()
    assert written["index"].tolist() == list(range(6))
    np.testing.assert_allclose(written["test_dice"], df["test_dice"], rtol=1e-5)
    assert list(written.columns) == list(df.columns)
    settings = json.loads(run_dir.analysis.baselines_json.read_text())
    assert settings["epochs"] == 1 and settings["fold"] == df.attrs["fold"]

    again = run_baselines(run_dir, folds=3, epochs=1, seed=5, write=False)
    pd.testing.assert_frame_equal(df, again)


def test_run_baselines_default_epochs_and_errors(run_dir, tmp_path):
    with pytest.raises(DataError, match="at least 7 cases"):
        run_baselines(run_dir, folds=7)
    with pytest.raises(RunError, match="not found"):
        run_baselines(tmp_path / "missing")
    # The fixture's run trained 1 epoch: the equal-compute rule gives 1 epoch per fold.
    df = run_baselines(run_dir, folds=2, write=False)
    assert (
        df.attrs["epochs"] == 1
        and df.attrs["run_epochs"] == 1
        and df.attrs["rule"].startswith("epochs_per_fold")
    )


def test_run_baselines_without_cleanlab_says_which_extra(run_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanlab" else real(name, *a))
    with pytest.raises(ConfigError, match=r"hypersort-ray\[baselines\]"):
        run_baselines(run_dir, folds=2, write=False)


# ------------------------------------------------------------------------------------ model scores
def test_model_scores(run_dir, model):
    df = model_scores(run_dir, model)
    assert list(df.columns) == ["index", "case_id", *MODEL_SCORE_COLUMNS]
    assert df["index"].tolist() == list(range(6))
    for col in MODEL_SCORE_COLUMNS:
        assert df[col].between(0.0, 1.0).all()
    # The fixture's latents are far from 0 (init std 0.8), so own UNets differ from the main one.
    assert df["own_vs_main_disagreement"].max() > 0

    # With every λ_n = 0 the own UNet *is* the main UNet.
    idx, ids, values = run_dir.read_latents()
    backup = run_dir.latents_csv.read_text()
    try:
        run_dir.write_latents(idx, ids, np.zeros_like(values))
        zero = model_scores(run_dir, model)
        assert (zero["own_vs_main_disagreement"] == 0).all()
        np.testing.assert_allclose(zero["main_style_disagreement"], df["main_style_disagreement"])
        run_dir.write_latents(idx[:4], ids[:4], values[:4])
        with pytest.raises(RunError, match="datalist has 6 cases"):
            model_scores(run_dir, model)
    finally:
        run_dir.latents_csv.write_text(backup)


def test_latent_case_id_mismatch_is_only_logged(run_dir, caplog):
    _, cases = load_run_cases(run_dir)
    renamed = [type(c)(c.index, f"x{c.index}", c.image, c.label) for c in cases]
    with caplog.at_level(logging.WARNING, logger="hypersort_ray.analysis.evaluation"):
        values = read_run_latents(run_dir, renamed)
    assert values.shape == (6, 2)
    assert "differ from the run's datalist" in caplog.text


def test_predictor_hook_segments_in_the_label_grid(run_dir, model):
    import nibabel as nib

    _, cases = load_run_cases(run_dir)
    predictor = make_predictor(run_dir, model)
    out = predictor("main", [0, 2])
    assert sorted(out) == [0, 2]
    for i, mask in out.items():
        assert mask.shape == nib.load(str(cases[i].label)).shape and mask.dtype == np.uint8
    same = predictor(np.zeros(2), [0])  # the main style is λ = 0
    np.testing.assert_array_equal(same[0], out[0])
    with pytest.raises(RunError, match="not in the run's datalist"):
        predictor("main", [99])
