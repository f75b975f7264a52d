"""The one NIfTI writer: masks, probabilities and corrected labels on the grid of the image they came from.

A mask must read back exactly like its source image in any viewer (3D Slicer, ITK-SNAP, FSL): same shape,
same voxel-to-world mapping, same *qform and sform* (kept apart: they may differ, and some tools read
one, some the other), same units. :class:`NiftiGeometry` captures that from a header; :func:`save_like`
writes a file atomically and :func:`encode_like` returns ``.nii.gz`` bytes (the endpoint).

Example:
    >>> import nibabel as nib, numpy as np, tempfile
    >>> src = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    >>> geom = NiftiGeometry.from_header(src.header)
    >>> path = save_like(tempfile.mkdtemp() + "/mask.nii.gz", np.ones((4, 4, 4), np.uint8), geom)
    >>> [float(z) for z in nib.load(path).header.get_zooms()]
    [2.0, 2.0, 3.0]
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.atomic import atomic_save_nifti
from hypersort_ray.errors import DataError

__all__ = ["NIFTI_EXTENSIONS", "NiftiGeometry", "encode_like", "image_like", "nifti_stem", "save_like"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """The file name without ``.nii.gz``/``.nii``.

    Example:
        >>> nifti_stem("/data/case_001.nii.gz")
        'case_001'
    """
    name = Path(path).name
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


@dataclass(frozen=True)
class NiftiGeometry:
    """The grid and header facts a derived image copies from its source.

    Attributes:
        shape: the source's stored shape (spatial axes, trailing singleton axes included).
        affine: the source's best affine (4x4); used when a form is not coded.
        qform, sform: the source's coded forms (None when their code is 0).
        qform_code, sform_code: their codes (None: let nibabel choose, for array inputs without a header).
        xyzt_units: spatial/temporal units.
        nifti2: the source is NIfTI-2 (the output keeps the version).
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    qform: np.ndarray | None = None
    sform: np.ndarray | None = None
    qform_code: int | None = None
    sform_code: int | None = None
    xyzt_units: int = 0
    nifti2: bool = False

    @classmethod
    def from_header(cls, header: Any, shape: tuple[int, ...] | None = None, source: str = "NIfTI header") -> NiftiGeometry:
        """The geometry of a nibabel NIfTI-1/2 header (``shape`` default: the header's own; ``source``
        names the file in errors).

        Raises:
            DataError: a coded qform or sform that no output could carry (NaN/inf, an invalid quaternion,
                a matrix that is not a rotation with voxel sizes): refused here, before any work is done
                for an image whose result could not be written.
        """
        import nibabel as nib

        try:
            qform, qcode = header.get_qform(coded=True)
            sform, scode = header.get_sform(coded=True)
            best = header.get_best_affine()
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a broken header
            raise DataError(f"{source}: its qform/sform cannot be read ({exc})") from None
        geometry = cls(
            shape=tuple(int(s) for s in (shape if shape is not None else header.get_data_shape())),
            affine=np.asarray(best, dtype=np.float64),
            qform=None if qform is None else np.asarray(qform, dtype=np.float64),
            sform=None if sform is None else np.asarray(sform, dtype=np.float64),
            qform_code=int(qcode or 0),
            sform_code=int(scode or 0),
            xyzt_units=int(header["xyzt_units"]),
            nifti2=isinstance(header, nib.Nifti2Header),
        )
        geometry.check_writable(source)
        return geometry

    def check_writable(self, source: str = "NIfTI header") -> None:
        """Raise :class:`DataError` (naming ``source``) unless an image on this geometry can be written:
        its forms applied to a one-voxel image, the very calls :func:`image_like` makes."""
        for name, form in (("affine", self.affine), ("qform", self.qform), ("sform", self.sform)):
            if form is not None and not np.isfinite(form).all():
                raise DataError(f"{source}: the {name} contains NaN or inf")
        try:
            _apply_forms(_new_image(np.zeros((1, 1, 1), np.uint8), self), self)
        except Exception as exc:  # noqa: BLE001 - nibabel's HeaderDataError, LinAlgError, ValueError
            raise DataError(f"{source}: its qform/sform cannot be written back ({exc})") from None

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> NiftiGeometry:
        """An array input's geometry: its affine, codes as nibabel sets them for a new image."""
        return cls(shape=tuple(int(s) for s in shape), affine=np.asarray(affine, dtype=np.float64))


def _fit(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``data`` on the source's stored shape: ``(*spatial)`` or ``(*spatial, K)`` (a trailing class axis)."""
    n = int(np.prod(shape))
    if data.size == n:
        return data.reshape(shape)
    if n and data.size % n == 0:
        return data.reshape(*shape, data.size // n)
    raise ValueError(f"data of shape {data.shape} does not fit the source grid {shape}")


def image_like(data: np.ndarray, geometry: NiftiGeometry, dtype: Any = None) -> Any:
    """A nibabel image of ``data`` on ``geometry``'s grid, with its qform, sform and units.

    Intensity scaling is reset (slope 1, intercept 0): values are stored as given.
    """
    dtype = np.dtype(dtype or data.dtype)
    arr = np.ascontiguousarray(_fit(np.asarray(data), geometry.shape)).astype(dtype, copy=False)
    img = _new_image(arr, geometry)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return _apply_forms(img, geometry)


def _new_image(arr: np.ndarray, geometry: NiftiGeometry) -> Any:
    import nibabel as nib

    klass = nib.Nifti2Image if geometry.nifti2 else nib.Nifti1Image
    return klass(arr, geometry.affine)


def _apply_forms(img: Any, geometry: NiftiGeometry) -> Any:
    """The source's qform, sform (each with its code) and units on ``img``."""
    if geometry.qform_code is not None:
        img.set_qform(geometry.qform if geometry.qform is not None else geometry.affine, code=geometry.qform_code)
    if geometry.sform_code is not None:
        img.set_sform(geometry.sform if geometry.sform is not None else geometry.affine, code=geometry.sform_code)
    if geometry.xyzt_units:
        img.header["xyzt_units"] = geometry.xyzt_units
    return img


def save_like(path: str | os.PathLike[str], data: np.ndarray, geometry: NiftiGeometry, dtype: Any = None) -> Path:
    """Write ``data`` on ``geometry``'s grid to ``path`` (``.nii.gz`` or ``.nii``) atomically."""
    path = Path(path)
    if not path.name.endswith(NIFTI_EXTENSIONS):
        raise ValueError(f"{path}: a NIfTI file name must end with .nii.gz or .nii")
    return atomic_save_nifti(image_like(data, geometry, dtype), path)


def encode_like(data: np.ndarray, geometry: NiftiGeometry, dtype: Any = np.uint8, compresslevel: int = 6) -> bytes:
    """``data`` on ``geometry``'s grid as ``.nii.gz`` bytes (deterministic: no gzip time stamp)."""
    return gzip.compress(image_like(data, geometry, dtype).to_bytes(), compresslevel=compresslevel, mtime=0)
