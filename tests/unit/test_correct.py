"""``hypersort correct`` (analysis/correct.py) on a tiny random run: geometry, CSV, selection, safety.

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

from hypersort_ray.analysis.correct import CORRECTIONS_COLUMNS, _corrected_label, correct_cases, select_cases
from hypersort_ray.config import LabelConfig
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.errors import DataError, ModelError, RunError

pytestmark = [
    pytest.mark.filterwarnings("ignore:transform info of:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*case id.*differ:UserWarning"),
]


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


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_correct_writes_labels_in_the_given_label_geometry(run_dir, cases, tmp_path):
    chosen = [cases[1], cases[3]]
    before = _digest(run_dir / "data" / "labels")
    out = tmp_path / "corrected"
    summary = correct_cases(run_dir, cases=",".join(c.case_id for c in chosen), style="main", out_dir=out)

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

    with open(out / "corrections.csv", newline="") as fh:
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


def test_correct_refuses_to_write_into_the_labels_folder(run_dir, cases):
    labels = run_dir / "data" / "labels"
    before = _digest(labels)
    ids = cases[1].case_id
    for out in (labels, run_dir / "data", labels / ".." / "labels"):
        with pytest.raises(DataError, match="labels folder"):
            correct_cases(run_dir, cases=ids, out_dir=out)
    # An images folder whose files are named <case_id>.nii.gz would be overwritten too.
    with pytest.raises(DataError, match="overwrite an input file"):
        correct_cases(run_dir, cases=ids, out_dir=run_dir / "data" / "images")
    assert _digest(labels) == before


def test_top_k_needs_the_analysis(run_dir, cases, tmp_path):
    with pytest.raises(RunError, match="hypersort analyze"):
        correct_cases(run_dir, cases="top:2", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()

    suspicion = run_dir / "analysis" / "suspicion.csv"
    order = [3, 0, 2, 1]
    lines = ["index,case_id,latent_norm,mean_distance,outlier_score,style"]
    lines += [f"{i},{cases[i].case_id},{1.0 - 0.1 * r},0.5,0.1,main" for r, i in enumerate(order)]
    suspicion.write_text("\n".join(lines) + "\n")
    try:
        assert [c.index for c in select_cases(run_dir, "top:2", cases)] == [3, 0]
        assert [c.index for c in select_cases(run_dir, "top:10", cases)] == order
        with pytest.raises(DataError, match="positive integer"):
            select_cases(run_dir, "top:0", cases)
    finally:
        suspicion.unlink()


def test_unknown_case_ids_and_styles_are_errors(run_dir, cases, tmp_path):
    with pytest.raises(DataError, match="2 unknown case id.*nope, missing"):
        correct_cases(run_dir, cases=f"{cases[0].case_id},nope,missing", out_dir=tmp_path / "a")
    with pytest.raises(DataError, match="top:K or a comma-separated"):
        correct_cases(run_dir, cases=" , ", out_dir=tmp_path / "a")
    with pytest.raises(ModelError, match="unknown style"):
        correct_cases(run_dir, cases=cases[0].case_id, style="42", out_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(RunError, match="not found"):
        correct_cases(tmp_path / "no-run", cases="x", out_dir=tmp_path / "c")


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
