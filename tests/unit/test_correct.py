"""``hypersort correct`` (``hypersort_ray.analysis.correct``) on a tiny random run: geometry, CSV,
selection, provenance, safety.

The model is random (tests/helpers_model.py), so corrections are meaningless; the tests check where
and how they are written, and that input labels can never be overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.analysis.correct import (
    CORRECTIONS_COLUMNS,
    CORRECTIONS_CSV,
    _corrected_label,
    correct_cases,
    select_cases,
)
from hypersort_ray.analysis.run import analyze_run
from hypersort_ray.config import LabelConfig
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.errors import DataError, ModelError, ProvenanceError, RunError
from hypersort_ray.inference import load_model
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import save_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:transform info of:UserWarning")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = make_tiny_run(tmp_path_factory.mktemp("correct"), n_cases=4)
    # One label stored as int16 with foreground value 7, shifted origin and its own qform/sform codes:
    # the corrected label must come back in exactly that geometry and type.
    case = load_datalist(run / "data" / "datalist.tsv")[1]
    src = nib.load(str(case.label))
    data = (np.asarray(src.dataobj) > 0).astype(np.int16) * 7
    img = nib.Nifti1Image(data, src.affine, header=src.header.copy())
    img.set_data_dtype(np.int16)
    img.set_qform(src.affine, code=1)
    img.set_sform(src.affine, code=2)
    nib.save(img, str(case.label))
    return run


@pytest.fixture(scope="module")
def cases(run_dir):
    return load_datalist(run_dir / "data" / "datalist.tsv")


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_correct_writes_labels_in_the_given_label_geometry(run_dir, model, cases, tmp_path):
    chosen = [cases[1], cases[3]]
    before = _digest(run_dir / "data" / "labels")
    out = tmp_path / "corrected"
    ids = ",".join(c.case_id for c in chosen)
    summary = correct_cases(run_dir, model, cases=ids, style="main", out_dir=out)

    assert summary["cases"] == 2 and summary["style"] == "main" and summary["latent"] == [0.0, 0.0]
    assert summary["case_ids"] == [c.case_id for c in chosen]
    assert _digest(run_dir / "data" / "labels") == before  # inputs untouched
    for case in chosen:
        given, written = nib.load(str(case.label)), nib.load(str(out / f"{case.case_id}.nii.gz"))
        assert written.shape == given.shape
        np.testing.assert_allclose(written.affine, given.affine)
        assert written.get_data_dtype() == given.get_data_dtype()
        assert int(written.header["qform_code"]) == int(given.header["qform_code"])
        assert int(written.header["sform_code"]) == int(given.header["sform_code"])
    # The int16 label with value 7 keeps its value for foreground.
    assert set(np.unique(np.asarray(nib.load(str(out / f"{cases[1].case_id}.nii.gz")).dataobj))) <= {0, 7}

    assert summary["corrections_csv"] == str(out / CORRECTIONS_CSV)
    with open(out / CORRECTIONS_CSV, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CORRECTIONS_COLUMNS
    assert [r["case_id"] for r in rows] == [c.case_id for c in chosen]
    for row, case in zip(rows, chosen, strict=True):
        assert int(row["index"]) == case.index and row["style"] == "main"
        assert 0.0 <= float(row["dice_given_vs_corrected"]) <= 1.0
        written = np.asarray(nib.load(row["path"]).dataobj)
        given = np.asarray(nib.load(str(case.label)).dataobj)
        assert int(row["voxels_given"]) == int((given > 0).sum())
        assert int(row["voxels_corrected"]) == int((written > 0).sum())
        assert int(row["voxels_changed"]) == int((written != given).sum())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_correct_refuses_to_write_into_the_labels_folder(run_dir, model, cases):
    labels = run_dir / "data" / "labels"
    before = _digest(labels)
    ids = cases[1].case_id
    for out in (labels, run_dir / "data", labels / ".." / "labels"):
        with pytest.raises(DataError, match="labels folder"):
            correct_cases(run_dir, model, cases=ids, out_dir=out)
    # An images folder whose files are named <case_id>.nii.gz would be overwritten too.
    with pytest.raises(DataError, match="overwrite an input file"):
        correct_cases(run_dir, model, cases=ids, out_dir=run_dir / "data" / "images")
    assert _digest(labels) == before


def test_top_k_needs_the_analysis(run_dir, model, cases, tmp_path):
    with pytest.raises(RunError, match="hypersort analyze"):
        correct_cases(run_dir, model, cases="top:2", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()

    analyze_run(run_dir)
    ranking = [index for index, _ in RunDir(run_dir).read_suspicion()]
    assert sorted(ranking) == [0, 1, 2, 3]
    assert [c.index for c in select_cases(run_dir, "top:2", cases)] == ranking[:2]
    assert [c.index for c in select_cases(run_dir, "top:10", cases)] == ranking
    with pytest.raises(DataError, match="positive integer"):
        select_cases(run_dir, "top:0", cases)


def test_top_k_of_an_older_checkpoint_is_refused(tmp_path):
    run = RunDir(make_tiny_run(tmp_path, n_cases=4))
    cases = load_datalist(run.path / "data" / "datalist.tsv")
    analyze_run(run)
    assert len(select_cases(run, "top:2", cases)) == 2
    before = load_model(run.checkpoint_dir)
    ckpt = run.load_checkpoint()
    save_checkpoint(  # the run is resumed: its ranking describes the old latents
        run.checkpoint_dir,
        latent_state=ckpt.latents,
        hyper_state=ckpt.hyper_state,
        config=ckpt.config,
        epoch=2,
        global_step=2,
        case_ids=ckpt.case_ids,
    )
    with pytest.raises(ProvenanceError, match="re-run `hypersort analyze"):
        select_cases(run, "top:2", cases)
    with pytest.raises(ProvenanceError, match="re-run `hypersort analyze"):
        correct_cases(run, load_model(run.checkpoint_dir), cases="top:2", out_dir=tmp_path / "out")
    with pytest.raises(ProvenanceError):  # loading the run's model refuses its saved styles as well
        load_model(run.path)
    # A model loaded before the resume is refused, before any label is written.
    with pytest.raises(ProvenanceError, match="load the model from"):
        correct_cases(run, before, cases=cases[0].case_id, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_case_ids_and_styles_are_errors(run_dir, model, cases, tmp_path):
    with pytest.raises(DataError, match="2 unknown case id.*nope, missing"):
        correct_cases(run_dir, model, cases=f"{cases[0].case_id},nope,missing", out_dir=tmp_path / "a")
    with pytest.raises(DataError, match="top:K or a comma-separated"):
        correct_cases(run_dir, model, cases=" , ", out_dir=tmp_path / "a")
    with pytest.raises(ModelError, match="unknown style"):
        correct_cases(run_dir, model, cases=cases[0].case_id, style="42", out_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(RunError, match="not found"):
        correct_cases(tmp_path / "no-run", model, cases="x", out_dir=tmp_path / "c")


def test_other_structures_and_label_values_are_kept():
    # Label: structure 5 is the model's foreground (foreground=[5]); structure 3 is something else.
    raw = np.array([0, 5, 5, 3, 3, 0, 5], dtype=np.uint8)
    pred = np.array([1, 1, 0, 0, 1, 0, 1], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corrected, stats = _corrected_label(raw, pred, LabelConfig(foreground=[5]), 2)
    assert corrected.tolist() == [5, 5, 0, 3, 5, 0, 5]
    assert corrected.dtype == raw.dtype
    assert stats == {
        "dice_given_vs_corrected": round(2 * 2 / (3 + 4), 6),
        "voxels_given": 3,
        "voxels_corrected": 4,
        "voxels_changed": 3,
    }
    # class_map: class 2 is written with the smallest value mapped to it.
    raw = np.array([0, 10, 20, 21], dtype=np.int16)
    pred = np.array([2, 1, 0, 2], dtype=np.uint8)
    corrected, _ = _corrected_label(raw, pred, LabelConfig(class_map={10: 1, 21: 2, 20: 2}), 3)
    assert corrected.tolist() == [20, 10, 0, 21]
