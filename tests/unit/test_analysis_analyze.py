"""``analyze`` (``hypersort_ray.analysis.analyze``), the whole analysis with a model, on a tiny random run.

The model is random (tests/helpers_model.py), so the scores are meaningless; the tests check the
columns, the files, the provenance, the reuse of saved baselines and the refusal of a foreign model.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.analysis.analyze import analyze
from hypersort_ray.analysis.model_scores import MODEL_SCORE_COLUMNS
from hypersort_ray.errors import ProvenanceError
from hypersort_ray.inference import load_model
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import save_checkpoint
from hypersort_ray.runs.styles import PROVENANCE_KEY

pytestmark = [pytest.mark.filterwarnings("ignore:transform info of:UserWarning")]


@pytest.fixture()
def run(tmp_path) -> RunDir:
    return RunDir(make_tiny_run(tmp_path, n_cases=6))


def _suspicion(run: RunDir) -> pd.DataFrame:
    return pd.read_csv(run.analysis.suspicion_csv)


def test_analyze_adds_the_model_scores_and_records_the_checkpoint(run):
    # The checkpoint alone: the analysis segments with λ = 0 and explicit latents, not saved styles.
    summary = analyze(run, load_model(run.checkpoint_dir), overrides=["top_k=3"])
    table = _suspicion(run)
    assert list(table.columns) == [
        "index", "case_id", "latent_norm", "mean_distance", "outlier_score", "style", *MODEL_SCORE_COLUMNS,
    ]
    assert table[list(MODEL_SCORE_COLUMNS)].apply(lambda c: c.between(0, 1)).all().all()
    assert len(table) == 6 and summary["n_cases"] == 6
    report = run.analysis.report_html.read_text()
    assert "Dice (main style vs given)" in report  # thumbnails carry the main-style prediction
    assert not any("predictor" in n for n in summary["notes"])
    provenance = json.loads(run.analysis.provenance_json.read_text())
    assert provenance[PROVENANCE_KEY] == run.checkpoint_sha256()
    assert provenance["files"] == sorted(summary["files"])
    assert run.read_styles()[PROVENANCE_KEY] == run.checkpoint_sha256()


def test_saved_baselines_become_score_columns(run):
    saved = pd.DataFrame(
        {"index": [0, 1, 2, 3, 4], "case_id": "x", "test_dice": np.linspace(0, 1, 5), "cleanlab": 0.5}
    )
    run.write_baselines(saved, {"folds": 3})
    summary = analyze(run, load_model(run.checkpoint_dir))
    table = _suspicion(run).set_index("index").sort_index()
    np.testing.assert_allclose(table["test_dice"].iloc[:5], saved["test_dice"], atol=1e-6)
    assert np.isnan(table.loc[5, "test_dice"])  # a case the saved baselines lack
    assert run.analysis.baselines_csv.name not in summary["files"]  # not rewritten, not re-certified


def test_a_model_of_another_checkpoint_is_refused(run):
    model = load_model(run.path)
    ckpt = run.load_checkpoint()
    save_checkpoint(  # the run is resumed: a new final checkpoint
        run.checkpoint_dir,
        latent_state=ckpt.latents,
        hyper_state=ckpt.hyper_state,
        config=ckpt.config,
        epoch=2,
        global_step=2,
        case_ids=ckpt.case_ids,
    )
    with pytest.raises(ProvenanceError, match="load the model from"):
        analyze(run, model)
    assert not run.analysis.provenance_json.exists()
