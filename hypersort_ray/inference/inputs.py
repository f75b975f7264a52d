"""Checking what a caller hands the model: latents, NIfTI files, arrays and affines.

Every check raises :class:`~hypersort_ray.errors.ModelError` with a message that names the input and
what is wrong with it (a 2D slice for a 3D model, NaN voxels, a singular affine, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.errors import ModelError

__all__ = ["channels_first", "check_affine", "parse_latent", "read_nifti", "to_float_array"]


def parse_latent(text: str | Sequence[float], dim: int) -> tuple[float, ...]:
    """``"0.1,-0.3"``, ``"[0.1, -0.3]"`` or a list of numbers → a validated latent of length ``dim``.

    Values must be finite in float32 (the precision the hyper-network runs in).

    Raises:
        ModelError: not numbers, wrong length, or NaN/inf (also after the cast to float32).

    Example:
        >>> parse_latent("0.5, -1", 2)
        (0.5, -1.0)
    """
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").strip("[]()").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError as exc:
            raise ModelError(f"latent {text!r}: expected comma-separated numbers, e.g. '0.1,-0.3'") from exc
    else:
        try:
            values = [float(v) for v in np.asarray(text, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelError(f"latent {str(text)[:80]!r}: expected a list of numbers") from exc
    if len(values) != dim:
        raise ModelError(f"latent has {len(values)} values but the model's latent_dim is {dim}")
    with np.errstate(over="ignore"):
        as32 = np.asarray(values, dtype=np.float32)
    if not all(math.isfinite(v) for v in values) or not np.isfinite(as32).all():
        raise ModelError(f"latent {values} contains NaN or inf (or values beyond float32)")
    return tuple(values)


def read_nifti(path: Path) -> tuple[np.ndarray, Any]:
    """A NIfTI file's voxels (float32) and its nibabel image.

    Raises:
        ModelError: no such file, or not a readable NIfTI.
    """
    import nibabel as nib

    if not path.is_file():
        raise ModelError(f"image {path}: no such file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise ModelError(f"image {path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    return data, img


def to_float_array(image: Any) -> np.ndarray:
    """An array-like (numpy, tensor, nested lists) as float32; numeric dtypes only."""
    try:
        arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"image: cannot be read as an array ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise ModelError(f"image: array dtype {arr.dtype} is not numeric")
    return arr.astype(np.float32, copy=False)


def check_affine(affine: Any, spatial_dims: int, source: str = "<array>") -> np.ndarray:
    """A ``(d+1, d+1)`` voxel-to-world affine: finite and invertible (flat input is reshaped; a 4x4
    NIfTI affine for a 2D model keeps its in-plane part)."""
    n = spatial_dims + 1
    try:
        arr = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"affine of {source}: not numbers ({exc})") from exc
    if arr.ndim == 1 and arr.size in (n * n, 16):
        side = n if arr.size == n * n else 4
        arr = arr.reshape(side, side)
    if arr.shape == (4, 4) and n == 3:
        arr = arr[np.ix_([0, 1, 3], [0, 1, 3])]
    if arr.shape != (n, n):
        raise ModelError(f"affine of {source}: shape {arr.shape}, expected ({n}, {n}) (or {n * n} values)")
    if not np.isfinite(arr).all():
        raise ModelError(f"affine of {source}: contains NaN or inf")
    if abs(np.linalg.det(arr[:-1, :-1])) < 1e-12:
        raise ModelError(f"affine of {source}: singular (zero voxel size or collapsed axes)")
    return arr


def channels_first(data: np.ndarray, channel_last: bool, source: str, spatial_dims: int, channels: int) -> np.ndarray:
    """``(C, *spatial)`` from ``(*spatial)``, ``(*spatial, C)`` (NIfTI files) or ``(C, *spatial)`` (arrays).

    Trailing singleton axes are dropped first.

    Raises:
        ModelError: a shape that does not fit the model (e.g. a 2D slice for a 3D model).
    """
    shape = tuple(data.shape)
    while data.ndim > spatial_dims and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == spatial_dims and channels == 1:
        data = data[None]
    elif data.ndim == spatial_dims + 1 and channel_last and data.shape[-1] == channels:
        data = np.moveaxis(data, -1, 0)
    elif not (data.ndim == spatial_dims + 1 and not channel_last and data.shape[0] == channels):
        layout = f"{'x'.join('N' * spatial_dims)}" + ("" if channels == 1 else f" with {channels} channels")
        raise ModelError(
            f"image {source}: shape {shape} does not fit the model, which segments {spatial_dims}D volumes "
            f"({layout}); a {len(shape)}D input cannot be used"
        )
    if any(s < 2 for s in data.shape[1:]):
        raise ModelError(
            f"image {source}: shape {shape} has a spatial axis of size 1 (a 2D slice?); the model "
            f"segments {spatial_dims}D volumes"
        )
    return np.ascontiguousarray(data)
