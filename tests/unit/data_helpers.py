"""Tiny NIfTI cases for the data tests (a few kB each, written to pytest's tmp_path)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def affine_for(spacing=(2.0, 2.0, 2.0), origin=(-10.0, -12.0, 5.0), flip=()) -> np.ndarray:
    """Diagonal affine; axes listed in ``flip`` point the other way (e.g. (0, 1) gives LPS)."""
    aff = np.diag([*map(float, spacing), 1.0])
    for axis in flip:
        aff[axis, axis] *= -1
    aff[: len(origin), 3] = origin
    return aff


def blob_label(shape=(12, 12, 12), center=None, radius=3.5, value=1) -> np.ndarray:
    """A ball of ``value`` in a zero volume (uint8)."""
    center = [s / 2 for s in shape] if center is None else center
    grid = np.indices(shape, dtype=np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center, strict=True))
    return np.where(dist2 <= radius**2, value, 0).astype(np.uint8)


def ct_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """HU-ish int16 image: air, tissue, brighter organ where the label is set, a little noise."""
    rng = np.random.default_rng(seed)
    img = np.full(label.shape, 40.0) + 30.0 * (label > 0) + rng.normal(0, 5, label.shape)
    img[0] = -1000  # some air, so the percentile scaling has a range to work with
    return img.astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine_for() if affine is None else affine), str(path))
    return path


def write_case(
    folder: Path,
    name: str,
    shape=(12, 12, 12),
    affine: np.ndarray | None = None,
    label: np.ndarray | None = None,
    image: np.ndarray | None = None,
    image_name: str | None = None,
    label_name: str | None = None,
) -> tuple[Path, Path]:
    """Write ``images/<name>.nii.gz`` and ``labels/<name>.nii.gz``; return both paths."""
    label = blob_label(shape) if label is None else label
    image = ct_image(label) if image is None else image
    img = write_nifti(folder / "images" / (image_name or f"{name}.nii.gz"), image, affine)
    lab = write_nifti(folder / "labels" / (label_name or f"{name}.nii.gz"), label, affine)
    return img, lab


def write_tsv(folder: Path, pairs, header: str = "DataPath\tLabelPath", name: str = "datalist.tsv") -> Path:
    """Datalist with paths relative to ``folder`` where possible."""
    lines = [header] if header is not None else []
    for img, lab in pairs:
        lines.append(f"{_rel(img, folder)}\t{_rel(lab, folder)}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _rel(p: Path, folder: Path) -> str:
    try:
        return str(Path(p).relative_to(folder))
    except ValueError:
        return str(p)
