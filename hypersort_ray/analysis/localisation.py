"""Where a label disagrees with the main style: connected components of the disagreement, per case.

A suspicion score says *that* a case is suspicious; a reviewer also needs *where*. The disagreement
between the given label and the main-style prediction (λ = 0, what the shared annotation mode expects
for this image), split into connected components (face connectivity, :data:`CONNECTIVITY`), points at
the error: the largest component's centre (voxel and mm, in the label's own grid and affine) and volume
(mL) go into ``suspicion.csv`` (:data:`LOCATION_COLUMNS`); the report draws three orthogonal slices
through that centre; ``hypersort analyze --maps`` writes the whole map (:func:`disagreement_map`) as NIfTI
in the label's geometry, for 3D Slicer or ITK-SNAP.

Map values (:data:`MAP_CODES`): 0 agree, 1 labelled but not predicted by the main style, 2 predicted
but not labelled, 3 both foreground with different classes.

Example:
    >>> import numpy as np
    >>> label = np.zeros((6, 6, 6), np.uint8); label[1:3, 1:3, 1:3] = 1
    >>> loc = localise(label, np.zeros_like(label), np.eye(4))
    >>> loc.voxel, loc.volume_ml, loc.components
    ((1.5, 1.5, 1.5), 0.008, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "CONNECTIVITY",
    "LOCATION_COLUMNS",
    "MAP_CODES",
    "Localisation",
    "disagreement_map",
    "largest_component",
    "localise",
    "location_text",
]

#: Face connectivity: a one-voxel-thick error along a boundary stays one component, while the scattered
#: single voxels where the main style is merely imprecise do not merge into it through their corners.
CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
MAP_CODES = {
    0: "agree",
    1: "labelled, not predicted by the main style",
    2: "predicted by the main style, not labelled",
    3: "both foreground, different classes",
}
#: Columns of ``suspicion.csv`` that locate the largest disagreement component (not scores).
LOCATION_COLUMNS = (
    "error_i",
    "error_j",
    "error_k",
    "error_x_mm",
    "error_y_mm",
    "error_z_mm",
    "error_volume_ml",
)


@dataclass(frozen=True)
class Localisation:
    """The largest disagreement component of one case.

    Attributes:
        voxel: its centre of mass in voxel coordinates of the label's grid (None: no disagreement).
        mm: the same centre in scanner coordinates (the label's affine), mm.
        volume_ml: its volume in mL (0 without disagreement).
        components: how many components the disagreement has.
        disagreement_ml: the whole disagreement's volume, mL.
    """

    voxel: tuple[float, float, float] | None
    mm: tuple[float, float, float] | None
    volume_ml: float
    components: int
    disagreement_ml: float

    def columns(self) -> dict[str, float]:
        """The :data:`LOCATION_COLUMNS` values (NaN without disagreement)."""
        voxel = self.voxel or (np.nan,) * 3
        mm = self.mm or (np.nan,) * 3
        return dict(zip(LOCATION_COLUMNS, (*voxel, *mm, self.volume_ml), strict=True))

    def slice_index(self) -> tuple[int, int, int] | None:
        """The voxel to slice through (the rounded centre), None without disagreement."""
        if self.voxel is None:
            return None
        i, j, k = (int(round(v)) for v in self.voxel)
        return i, j, k


def disagreement_map(label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Where the given label and the main-style prediction differ, coded as in :data:`MAP_CODES` (uint8).

    Args:
        label: the given label (class indices) in its own grid.
        prediction: the main-style prediction in the same grid.

    Raises:
        ValueError: the shapes differ.
    """
    label, prediction = np.asarray(label), np.asarray(prediction)
    if label.shape != prediction.shape:
        raise ValueError(f"label {label.shape} and prediction {prediction.shape} differ in shape")
    out = np.zeros(label.shape, dtype=np.uint8)
    lab, pred = label > 0, prediction > 0
    out[lab & ~pred] = 1
    out[pred & ~lab] = 2
    out[lab & pred & (label != prediction)] = 3
    return out


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected component of a boolean mask (None when the mask is empty).

    Ties go to the component found first in C order, so the answer is deterministic.
    """
    labelled, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_structure(np.ndim(mask)))
    if n == 0:
        return None
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def _structure(ndim: int) -> np.ndarray:
    return CONNECTIVITY if ndim == 3 else ndimage.generate_binary_structure(ndim, 1)


def localise(label: np.ndarray, prediction: np.ndarray, affine: np.ndarray) -> Localisation:
    """The largest component of the label/prediction disagreement: centre (voxel, mm), volume, count.

    Args:
        label: the given label in its own grid (3D).
        prediction: the main-style prediction in the same grid.
        affine: the label's voxel-to-mm affine (4x4).
    """
    diff = disagreement_map(label, prediction) > 0
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    labelled, n = ndimage.label(diff, structure=_structure(diff.ndim))
    if n == 0:
        return Localisation(None, None, 0.0, 0, 0.0)
    sizes = np.bincount(labelled.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    centre = np.asarray(ndimage.center_of_mass(labelled == biggest), dtype=np.float64)
    voxel = np.zeros(3)
    voxel[: centre.size] = centre
    mm = affine[:3, :3] @ voxel + affine[:3, 3]
    return Localisation(
        voxel=tuple(float(v) for v in voxel),  # type: ignore[arg-type]
        mm=tuple(float(v) for v in mm),  # type: ignore[arg-type]
        volume_ml=float(sizes[biggest - 1]) * voxel_ml,
        components=int(n),
        disagreement_ml=float(diff.sum()) * voxel_ml,
    )


def location_text(row: Mapping[str, float]) -> str:
    """One line for the report: ``(x, y, z) mm · voxel (i, j, k) · V mL``, or "no disagreement"."""
    values = [row.get(c) for c in LOCATION_COLUMNS]
    if any(v is None or not np.isfinite(v) for v in values):
        return "no disagreement"
    i, j, k, x, y, z, ml = values
    return f"({x:.0f}, {y:.0f}, {z:.0f}) mm · voxel ({i:.0f}, {j:.0f}, {k:.0f}) · {ml:.2f} mL"
