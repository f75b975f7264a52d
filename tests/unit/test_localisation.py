"""Where a label disagrees with the main style (``hypersort_ray.analysis.localisation``)."""

from __future__ import annotations

import numpy as np
import pytest

from hypersort_ray.analysis.localisation import (
    LOCATION_COLUMNS,
    disagreement_map,
    largest_component,
    localise,
    location_text,
)


def _affine(spacing=(2.0, 3.0, 1.5), origin=(-10.0, 5.0, 100.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def test_map_codes_tell_missing_extra_and_wrong_class_apart():
    label = np.array([[[0, 1, 1, 2]]])
    pred = np.array([[[1, 0, 1, 1]]])
    assert disagreement_map(label, pred).tolist() == [[[2, 1, 0, 3]]]
    with pytest.raises(ValueError, match="differ in shape"):
        disagreement_map(label, pred[..., :2])


def test_largest_component_uses_face_connectivity():
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # corner-touching only: three components
    mask[4, 1:4, 1] = True  # a face-connected run of three
    biggest = largest_component(mask)
    assert biggest.sum() == 3 and biggest[4, 1:4, 1].all()
    assert largest_component(np.zeros((3, 3, 3), bool)) is None


def test_localise_reports_the_largest_error_in_voxels_mm_and_ml():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:8, 2:8, 2:8] = 1
    pred = label.copy()
    pred[2:8, 2:8, 2:4] = 0  # two skipped slices: 6*6*2 = 72 voxels the main style does not predict
    pred[0, 0, 9] = 1  # a stray voxel elsewhere
    aff = _affine()
    loc = localise(label, pred, aff)
    assert loc.components == 2
    np.testing.assert_allclose(loc.voxel, (4.5, 4.5, 2.5))
    np.testing.assert_allclose(loc.mm, aff[:3, :3] @ [4.5, 4.5, 2.5] + aff[:3, 3])
    assert loc.volume_ml == pytest.approx(72 * 2.0 * 3.0 * 1.5 / 1000)
    assert loc.disagreement_ml == pytest.approx(73 * 9.0 / 1000)
    cols = loc.columns()
    assert tuple(cols) == LOCATION_COLUMNS
    assert loc.slice_index() == (4, 4, 2) or loc.slice_index() == (4, 4, 3)  # round half to even
    assert "mL" in location_text(cols)


def test_no_disagreement_gives_nan_columns():
    label = np.ones((4, 4, 4), np.uint8)
    loc = localise(label, label, np.eye(4))
    assert loc.voxel is None and loc.volume_ml == 0 and loc.components == 0
    cols = loc.columns()
    assert np.isnan(cols["error_i"]) and cols["error_volume_ml"] == 0
    assert location_text(cols) == "no disagreement"
    assert loc.slice_index() is None
