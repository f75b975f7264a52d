"""The synthetic benchmark (``hypersort synth``): plan, files, truth, determinism, argument checks."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hypersort_ray.data.datalist import load_datalist, validate_cases
from hypersort_ray.data.synthetic import (
    SUBTLE_KINDS,
    generate_dataset,
    perturb,
    perturbation_plan,
    synth_case,
)
from hypersort_ray.errors import DataError

SIZE = 24  # small volumes keep the file well under the time budget


def _truth(folder: Path) -> list[dict]:
    with open(folder / "truth.csv") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize(("n", "each"), [(40, 3), (200, 15), (8, 1), (5, 0)])
def test_paper_counts(n, each):
    plan = perturbation_plan(n, seed=0, perturbations="paper")
    assert plan.count("eroded") == each and plan.count("dilated") == each
    assert plan.count("none") == n - 2 * each


@pytest.mark.parametrize("n", [40, 200])
def test_subtle_and_mixed_counts(n):
    each = round(0.075 * n)
    subtle = perturbation_plan(n, 0, "subtle")
    assert sum(k in SUBTLE_KINDS for k in subtle) == 2 * each and subtle.count("none") == n - 2 * each
    assert all(subtle.count(k) >= (2 * each) // 4 for k in SUBTLE_KINDS)
    mixed = perturbation_plan(n, 0, "mixed")
    assert mixed.count("eroded") + mixed.count("dilated") == each
    assert sum(k in SUBTLE_KINDS for k in mixed) == each


def test_plan_is_a_seeded_permutation():
    plan = perturbation_plan(200, 0)
    perturbed = [i for i, k in enumerate(plan) if k != "none"]
    assert perturbed != list(range(30))  # not simply the first rows
    assert perturbation_plan(200, 0) == plan and perturbation_plan(200, 1) != plan


def test_case_does_not_depend_on_n(tmp_path):
    a = generate_dataset(tmp_path / "a", cases=2, size=16, seed=5)
    b = generate_dataset(tmp_path / "b", cases=4, size=16, seed=5)
    for sub in ("images", "labels_clean"):
        assert (Path(a["out"]) / sub / "case_0001.nii.gz").read_bytes() == (
            Path(b["out"]) / sub / "case_0001.nii.gz"
        ).read_bytes()


# ---------------------------------------------------------------------------------- perturbations
@pytest.mark.parametrize("index", [0, 1])
def test_gross_perturbations_nest(index):
    _, clean = synth_case(0, index, SIZE)
    eroded, kind_e, it_e = perturb(clean, "eroded", 0, index, SIZE)
    dilated, kind_d, it_d = perturb(clean, "dilated", 0, index, SIZE)
    assert (kind_e, kind_d) == ("eroded", "dilated") and 1 <= it_e <= 2 and 1 <= it_d <= 2
    assert eroded.any() and eroded.sum() < clean.sum() < dilated.sum()
    assert not (eroded & ~clean).any() and not (clean & ~dilated).any()  # eroded ⊂ clean ⊂ dilated


@pytest.mark.parametrize("kind", SUBTLE_KINDS)
def test_subtle_changes_are_partial(kind):
    for index in range(3):
        _, clean = synth_case(1, index, SIZE)
        label, applied, iterations = perturb(clean, kind, 1, index, SIZE)
        frac = np.count_nonzero(label != clean) / clean.sum()
        assert 0.10 <= frac <= 0.40, (kind, applied, frac)
        assert iterations >= 1 and applied in SUBTLE_KINDS
        if applied == "partial_eroded":
            assert not (label & ~clean).any()
        if applied == "partial_dilated":
            assert not (clean & ~label).any()


def test_phantom_is_not_a_threshold_problem():
    image, clean = synth_case(0, 0, 32)
    assert image.dtype == np.int16 and clean.dtype == np.uint8 and set(np.unique(clean)) == {0, 1}
    organ = image[clean > 0]
    # Plenty of non-organ voxels share the organ's intensity range (neighbours, wall, bias, noise).
    lo, hi = np.percentile(organ, [10, 90])
    lookalike = np.count_nonzero((image >= lo) & (image <= hi) & (clean == 0))
    assert lookalike > clean.sum()


# ------------------------------------------------------------------------------------------ files
def test_files_truth_and_datalist(tmp_path):
    out = tmp_path / "synth"
    summary = generate_dataset(out, cases=12, size=SIZE, seed=3, perturbations="mixed", spacing=1.5)
    assert summary["n_cases"] == 12 and sum(summary["counts"].values()) == 12
    rows = _truth(out)
    assert [int(r["index"]) for r in rows] == list(range(12))
    assert sum(r["perturbation"] != "none" for r in rows) == 2  # 1 gross + 1 subtle at N=12
    for row in rows:
        name = f"{row['case_id']}.nii.gz"
        label, clean = _load(out / "labels" / name), _load(out / "labels_clean" / name)
        assert label.dtype == np.uint8 and _load(out / "images" / name).dtype == np.int16
        assert int(row["voxels_changed"]) == np.count_nonzero(label != clean)
        assert (row["perturbation"] == "none") == (int(row["voxels_changed"]) == 0 == int(row["iterations"]))
        if row["perturbation"] in SUBTLE_KINDS:
            assert 0.10 <= int(row["voxels_changed"]) / clean.sum() <= 0.40
    header = (out / "datalist.tsv").read_text().splitlines()
    assert (
        header[0] == "DataPath\tLabelPath" and header[1] == "images/case_0000.nii.gz\tlabels/case_0000.nii.gz"
    )
    cases = load_datalist(out / "datalist.tsv")
    report = validate_cases(cases)
    assert report["n_cases"] == 12 and report["label_values"] == [0, 1]
    assert report["shape_min"] == [SIZE] * 3 and report["spacing_min"] == [1.5] * 3
    affine = nib.load(str(out / "images" / "case_0000.nii.gz")).affine
    assert np.allclose(np.diag(affine)[:3], 1.5) and affine[2, 3] < -100  # realistic origin


def test_paper_mode_files_nest(tmp_path):
    out = tmp_path / "paper"
    generate_dataset(out, cases=10, size=16, seed=0)
    rows = {r["perturbation"]: r for r in _truth(out)}
    assert {"eroded", "dilated", "none"} <= rows.keys()
    for kind, inside in (("eroded", True), ("dilated", False)):
        name = f"{rows[kind]['case_id']}.nii.gz"
        label, clean = _load(out / "labels" / name), _load(out / "labels_clean" / name)
        small, big = (label, clean) if inside else (clean, label)
        assert small.any() and not (small & ~big).any() and small.sum() < big.sum()


def test_deterministic_bytes(tmp_path):
    args = {"cases": 3, "size": 16, "perturbations": "subtle"}
    generate_dataset(tmp_path / "a", seed=7, **args)
    generate_dataset(tmp_path / "b", seed=7, **args)
    generate_dataset(tmp_path / "c", seed=8, **args)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 3 + 3  # images, labels, labels_clean + datalist, truth, manifest
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    image = Path("images/case_0000.nii.gz")
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


# ---------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"cases": 0}, "--cases"),
        ({"size": 8}, "--size"),
        ({"seed": -1}, "--seed"),
        ({"perturbations": "gross"}, "--perturbations 'gross'"),
        ({"spacing": 0.0}, "--spacing"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, arg):
    with pytest.raises(DataError, match=arg):
        generate_dataset(tmp_path / "x", **{"cases": 2, "size": 16, **kwargs})
    assert not (tmp_path / "x").exists()


def test_output_folder_rules(tmp_path):
    out = tmp_path / "s"
    generate_dataset(out, cases=2, size=16)
    generate_dataset(out, cases=2, size=16)  # same arguments: allowed, same files
    with pytest.raises(DataError, match="other arguments"):
        generate_dataset(out, cases=3, size=16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and is not a previous synth output"):
        generate_dataset(foreign, cases=2, size=16)
    with pytest.raises(DataError, match="not a folder"):
        generate_dataset(foreign / "notes.txt", cases=2, size=16)
