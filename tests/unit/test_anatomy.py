"""The real-anatomy benchmark (``--dataset brain``): plan, files, protocols, errors, determinism, errors."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hypersort_ray.data import anatomy
from hypersort_ray.data.anatomy import ERRORS, KINDS, PROTOCOLS, anatomy_plan, generate_anatomy_dataset
from hypersort_ray.data.datalist import load_datalist, validate_cases
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.errors import DataError

pytest.importorskip("nilearn", reason="the brain benchmark reads the MNI152 template shipped with nilearn")

SIZE, CASES = 24, 14  # 14 cases: every protocol and error once, 7 reference cases


def _truth(folder: Path) -> list[dict]:
    with open(folder / "truth.csv") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _pair(folder: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    name = f"{row['case_id']}.nii.gz"
    return _load(folder / "labels" / name), _load(folder / "labels_clean" / name)


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brain") / "set"
    generate_anatomy_dataset(out, cases=CASES, size=SIZE, seed=1)
    return out


@pytest.fixture(scope="module")
def rows(brain) -> dict[str, dict]:
    return {r["perturbation"]: r for r in _truth(brain)}


# ------------------------------------------------------------------------------------------- plan
def test_plan_counts_scale_and_are_shuffled():
    plan = anatomy_plan(60, seed=0)
    assert plan.count("none") == 38
    assert all(plan.count(k) == 4 for k in PROTOCOLS) and all(plan.count(k) == 2 for k in ERRORS)
    assert [k for k in plan if k != "none"] != sorted(k for k in plan if k != "none")
    assert plan[:16] != [k for k in KINDS[1:] for _ in range(4)][:16]  # not blocks of indices
    big = anatomy_plan(120, seed=0)
    assert all(big.count(k) == 8 for k in PROTOCOLS) and all(big.count(k) == 4 for k in ERRORS)
    assert set(anatomy_plan(CASES, 0)) == set(KINDS) and anatomy_plan(CASES, 0).count("none") == 7
    assert anatomy_plan(60, 0) == plan and anatomy_plan(60, 1) != plan


# ------------------------------------------------------------------------------------------ files
def test_layout_truth_and_datalist(brain):
    truth = _truth(brain)
    assert list(truth[0]) == ["index", "case_id", "perturbation", "iterations", "voxels_changed"]
    assert [int(r["index"]) for r in truth] == list(range(CASES))
    assert sorted(r["perturbation"] for r in truth) == sorted(anatomy_plan(CASES, 1))
    lines = (brain / "datalist.tsv").read_text().splitlines()
    assert (
        lines[0] == "DataPath\tLabelPath" and lines[1] == "images/case_0000.nii.gz\tlabels/case_0000.nii.gz"
    )
    report = validate_cases(load_datalist(brain / "datalist.tsv"))
    assert report["n_cases"] == CASES and report["label_values"] == [0, 1]
    for row in truth:
        label, clean = _pair(brain, row)
        assert label.dtype == np.uint8 and clean.dtype == np.uint8
        assert int(row["voxels_changed"]) == np.count_nonzero(label != clean)
        assert (row["perturbation"] == "none") == (int(row["voxels_changed"]) == 0)
        assert clean.sum() > 0.02 * clean.size  # the reference WM is a real structure


def test_images_and_labels_share_grid(brain):
    spacing = anatomy.fit_spacing(SIZE)
    ref = nib.load(str(brain / "images" / "case_0000.nii.gz"))
    assert ref.shape == (SIZE,) * 3 and ref.get_data_dtype() == np.float32
    assert np.allclose(ref.header.get_zooms(), spacing)
    centre = ref.affine[:3, :3] @ np.full(3, (SIZE - 1) / 2) + ref.affine[:3, 3]
    assert np.all(np.abs(centre) < 40)  # MNI millimetres: the grid is centred on the brain
    for sub in ("images", "labels", "labels_clean"):
        for path in sorted((brain / sub).glob("*.nii.gz")):
            img = nib.load(str(path))
            assert img.shape == ref.shape and np.array_equal(img.affine, ref.affine), path
            assert np.array_equal(img.get_qform(), img.get_sform()), path


def test_images_differ_across_subjects(brain):
    images = [_load(p) for p in sorted((brain / "images").glob("*.nii.gz"))[:5]]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.allclose(images[i], images[j])
    cleans = [_load(p) for p in sorted((brain / "labels_clean").glob("*.nii.gz"))[:5]]
    assert len({c.tobytes() for c in cleans}) == len(cleans)  # the warp reaches the labels too


# ------------------------------------------------------------------------------- protocols/errors
def test_protocols_change_the_label_in_their_direction(brain, rows):
    none_label, none_clean = _pair(brain, rows["none"])
    assert np.array_equal(none_label, none_clean)
    for kind in ("conservative", "inclusive", "deep_gm"):
        label, clean = _pair(brain, rows[kind])
        small, big = (label, clean) if kind == "conservative" else (clean, label)
        assert small.any() and not (small & ~big).any() and small.sum() < big.sum(), kind
    label, clean = _pair(brain, rows["smooth"])
    assert 0 < np.count_nonzero(label != clean) < clean.sum()


def test_skipped_slices_are_local(brain, rows):
    row = rows["skipped_slices"]
    label, clean = _pair(brain, row)
    differs = np.nonzero((label != clean).any(axis=(0, 1)))[0]
    assert len(differs) == int(row["iterations"]) >= 2
    assert np.array_equal(differs, np.arange(differs[0], differs[-1] + 1))  # one consecutive run
    assert not label[:, :, differs].any()
    assert all(clean[:, :, z].any() for z in differs)  # only slices that had a label were skipped
    empty_in_label = {int(z) for z in np.nonzero(~label.any(axis=(0, 1)))[0]}
    empty_in_clean = {int(z) for z in np.nonzero(~clean.any(axis=(0, 1)))[0]}
    assert empty_in_label == empty_in_clean | set(differs.tolist())


def test_shift_moves_the_whole_label(brain, rows):
    row = rows["shift"]
    label, clean = _pair(brain, row)
    amount = int(row["iterations"])
    assert amount in (1, 2)
    assert any(
        np.array_equal(label, anatomy._shifted(clean, axis, sign * amount))
        for axis in range(3)
        for sign in (-1, 1)
    )


def test_missed_component_removes_one_region(brain, rows):
    label, clean = _pair(brain, rows["missed_component"])
    removed = clean.astype(bool) & ~label.astype(bool)
    assert not (label & ~clean).any() and removed.any()
    assert removed.sum() <= anatomy.ERROR_RANGE[1] * clean.sum()
    extent = [np.ptp(np.nonzero(removed)[a]) + 1 for a in range(3)]
    assert min(extent) < SIZE // 2  # a lobe of one hemisphere (or the cerebellum), not a global change


# ---------------------------------------------------------------------------- determinism, errors
def test_deterministic_bytes(tmp_path):
    args = {"cases": 3, "size": 16}
    generate_anatomy_dataset(tmp_path / "a", seed=7, **args)
    generate_anatomy_dataset(tmp_path / "b", seed=7, **args)
    generate_dataset(tmp_path / "c", seed=8, dataset="brain", **args)  # the dispatch gives the same files
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 3 + 3
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    image = Path("images/case_0000.nii.gz")
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()
    generate_anatomy_dataset(tmp_path / "a", seed=7, **args)  # same arguments: the folder is reused
    with pytest.raises(DataError, match="other arguments"):
        generate_anatomy_dataset(tmp_path / "a", seed=7, cases=3, size=16, spacing=5.0)


def test_dispatch_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="--dataset 'mri'"):
        generate_dataset(tmp_path / "x", cases=2, size=16, dataset="mri")
    with pytest.raises(DataError, match="--perturbations 'subtle'.*phantoms only"):
        generate_dataset(tmp_path / "x", cases=2, size=16, perturbations="subtle", dataset="brain")
    for kwargs, arg in (({"cases": 0}, "--cases"), ({"size": 8}, "--size"), ({"spacing": -1.0}, "--spacing")):
        with pytest.raises(DataError, match=arg):
            generate_anatomy_dataset(tmp_path / "x", **{"cases": 2, "size": 16, **kwargs})
    assert not (tmp_path / "x").exists()


def test_missing_nilearn_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        anatomy.importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install 'hypersort-ray\[anatomy\]'"):
        generate_dataset(tmp_path / "x", cases=2, size=16, dataset="brain")
    assert not (tmp_path / "x").exists()
