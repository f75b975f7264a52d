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
from hypersort_ray.analysis.localisation import LOCATION_COLUMNS, MAP_CODES
from hypersort_ray.analysis.model_scores import MODEL_SCORE_COLUMNS
from hypersort_ray.analysis.scores import BASE_COLUMNS
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
        *BASE_COLUMNS, *MODEL_SCORE_COLUMNS, *LOCATION_COLUMNS,
    ]
    assert table[list(MODEL_SCORE_COLUMNS)].apply(lambda c: c.between(0, 1)).all().all()
    assert table["suspicion"].between(0, 1).all()
    assert table["suspicion"].is_monotonic_decreasing  # the default ranking
    assert len(table) == 6 and summary["n_cases"] == 6
    assert summary["rank_by"] == "suspicion"
    report = run.analysis.report_html.read_text()
    assert "Dice (main style vs given)" in report  # thumbnails carry the main-style prediction
    assert "slices through the largest disagreement" in report
    assert "What the scores mean" in report and "main-style prediction disagrees" in report
    assert not run.analysis.maps_dir.exists()  # only with maps=True
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


def test_maps_are_written_in_the_labels_geometry_and_removed_without_maps(run):
    import nibabel as nib

    from hypersort_ray.data.datalist import load_datalist

    summary = analyze(run, load_model(run.checkpoint_dir), maps=True)
    assert "maps" in summary["files"]
    assert "maps" in json.loads(run.analysis.provenance_json.read_text())["files"]
    table = _suspicion(run).set_index("case_id")
    for case in load_datalist(run.read_config().data.datalist):
        label = nib.load(case.label)
        written = nib.load(run.analysis.disagreement_map(case.case_id))
        np.testing.assert_allclose(written.affine, label.affine)
        assert written.shape == label.shape
        values = np.asarray(written.dataobj)
        assert set(np.unique(values).tolist()) <= set(MAP_CODES)
        # The table's largest component lies inside the map's disagreement.
        volume = table.loc[case.case_id, "error_volume_ml"]
        voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert volume <= (values > 0).sum() * voxel_ml + 1e-6
    assert not list(run.analysis.folder.glob(".maps.tmp-*"))  # the staging folder was swapped in
    analyze(run, load_model(run.checkpoint_dir))
    assert not run.analysis.maps_dir.exists()  # maps of an earlier analysis do not outlive it


def test_saved_crossfit_scores_become_columns(run):
    saved = pd.DataFrame({"index": range(6), "case_id": "x", "crossfit_latent_norm": np.linspace(0, 1, 6)})
    run.write_crossfit(saved, {"folds": 2})
    analyze(run, load_model(run.checkpoint_dir))
    table = _suspicion(run).set_index("index").sort_index()
    np.testing.assert_allclose(table["crossfit_latent_norm"], saved["crossfit_latent_norm"], atol=1e-6)


def test_trajectory_scores_come_from_the_runs_trajectory(run):
    ids = [f"case_{i:04d}" for i in range(6)]
    values = np.zeros((4, 6, 2))
    values[:, 5] = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]  # case 5 leaves at epoch 2 for good
    run.write_latent_trajectory([1, 2, 3, 4], ids, values)
    analyze(run, load_model(run.checkpoint_dir))
    table = _suspicion(run).set_index("index").sort_index()
    assert table["trajectory_path_length"].tolist() == [0, 0, 0, 0, 0, 3]
    assert table.loc[5, "trajectory_exit"] == pytest.approx(0.75)
    assert table["trajectory_exit"].iloc[:5].eq(0).all()


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
