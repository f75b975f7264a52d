"""Cross-fitting for real: two HyperSORT folds trained side by side by Ray Train, λ fitted out of fold,
the scores in the analysis (``hypersort analyze --crossfit 2``)."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers_model import TINY_NETWORK

from hypersort_ray.config import load_config
from hypersort_ray.crossfit import CROSSFIT_COLUMNS
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.runs import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:transform info of:UserWarning")]


def test_crossfit_trains_the_folds_in_parallel_and_feeds_the_analysis(tmp_path):
    from hypersort_ray import pipeline
    from hypersort_ray.ray_cluster import connect
    from hypersort_ray.train.trainer import run_training

    generate_dataset(tmp_path / "data", cases=8, size=16, seed=3)
    cfg = load_config(
        None,
        [*TINY_NETWORK, "training.epochs=1", "training.batch_size=2", "training.scaling.num_workers=1",
         "training.scaling.threads_per_worker=1", "tracking.enabled=false", "analysis.run_after_training=false"],
        {"data.datalist": tmp_path / "data" / "datalist.tsv", "output_dir": tmp_path / "run"},
    )
    handle = connect(None, num_cpus=2)
    try:
        run_training(cfg, progress=False)
        summary = pipeline.analyze(tmp_path / "run", crossfit=2, maps=True)
    finally:
        handle.close()
    run = RunDir(tmp_path / "run")
    for fold in range(2):
        fold_run = run.crossfit_fold(fold)
        assert fold_run.has_checkpoint() and fold_run.trained_epochs() == 1  # equal compute: round(1 / (2 - 1))
    table = pd.read_csv(run.analysis.suspicion_csv)
    assert set(CROSSFIT_COLUMNS) <= set(table.columns) and table[list(CROSSFIT_COLUMNS)].notna().all().all()
    assert {"trajectory_mean_norm", "trajectory_path_length", "trajectory_exit"} <= set(table.columns)
    assert summary["rank_by"] == "suspicion"
    assert len(list(run.analysis.maps_dir.glob("*.nii.gz"))) == 8
