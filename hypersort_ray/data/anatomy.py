"""Real-anatomy benchmark: warped MNI152 brains labelled by several annotation protocols (``--dataset brain``).

The phantoms of :mod:`hypersort_ray.data.synthetic` have one clean label per case and random errors. Real
training sets also mix **annotation protocols**: groups of annotators who systematically label the same
structure differently. HyperSORT should map each protocol to its own style (a cluster in the latent map)
and the individual errors away from every style. This module builds such a set on real anatomy.

Source: the MNI152 2009a symmetric T1 template and its grey/white matter probability maps, shipped inside
the ``nilearn`` wheel (``pip install 'hypersort-ray[anatomy]'``) and read with nibabel from the installed
package folder; nothing is downloaded and nilearn itself is never imported.

Subjects: the template is cropped to the brain's bounding box and sampled on a ``size``³ grid whose spacing
makes the brain fit (or ``spacing`` mm). Each case gets its own small random affine (rotation of a few
degrees, scaling within ±5 %), a smooth low-frequency displacement field of a few millimetres, and its own
intensity changes (contrast gamma, gain, bias field, noise). The tissue maps go through the same warp.

Target structure: white matter (WM). Labels (what training sees) per kind:

* ``none`` (reference protocol): WM probability > 0.5. This is also ``labels_clean/`` for every case.
* protocols (styles): ``conservative`` (WM > 0.7, an eroded-like style), ``inclusive`` (WM > 0.35, a
  dilated-like style), ``smooth`` (WM probability smoothed by one voxel, then > 0.5: loses thin gyral
  strands) and ``deep_gm`` (also labels the deep grey nuclei, basal ganglia and thalamus, touching the WM).
* errors (individual, not styles): ``skipped_slices`` (a run of consecutive axial slices left unlabelled),
  ``shift`` (the label moved by 1-2 voxels along one axis) and ``missed_component`` (the WM of one lobe of
  one hemisphere left out, temporal, occipital or frontal, or the cerebellum's, a separate component).

Which case gets which kind is a seeded permutation; each case's subject comes from a generator seeded by
``(seed, index)``, so case ``i`` is the same whatever ``cases`` is. Files are bit-identical for identical
arguments.

Example:
    >>> summary = generate_anatomy_dataset(Path("brain"), cases=60, size=48)  # doctest: +SKIP
    >>> summary["counts"]["none"], summary["counts"]["conservative"]           # doctest: +SKIP
    (38, 4)
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hypersort_ray.data.synth_io import (
    FORMAT_VERSION,
    MAX_SIZE,
    MIN_SIZE,
    changed_voxels,
    grid,
    prepare_out,
    save_volume,
    smooth_field,
)
from hypersort_ray.errors import DataError

__all__ = [
    "ERRORS",
    "KINDS",
    "PROTOCOLS",
    "Subject",
    "anatomy_plan",
    "fit_spacing",
    "generate_anatomy_dataset",
    "label_case",
    "make_subject",
    "protocol_label",
    "template_dir",
]

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
INSTALL_HINT = "pip install 'hypersort-ray[anatomy]' (or pip install nilearn)"
PROTOCOLS = ("conservative", "inclusive", "smooth", "deep_gm")
ERRORS = ("skipped_slices", "shift", "missed_component")
KINDS = ("none", *PROTOCOLS, *ERRORS)
# 60 cases: 4 per protocol, 2 per error, 38 reference. Styles need a few cases each to form a cluster.
PROTOCOL_FRACTION, ERROR_FRACTION = 1 / 15, 1 / 30
WM_THRESHOLD = {"none": 0.5, "conservative": 0.7, "inclusive": 0.35}  # each changes ~1/3 of the WM at 48³
# Share of the reference label a skipped-slices or missed-component error changes: measurable, not gross.
ERROR_RANGE = (0.03, 0.30)
# Template-space boxes (MNI mm, lo/hi per axis). Deep grey nuclei: putamen, caudate, pallidum, thalamus.
DEEP_GM_BOX = ((-30.0, 30.0), (-35.0, 25.0), (-12.0, 22.0))
LOBES = {  # generous boxes: at 48³ each holds 5-9 % of the WM, the cerebellum (a separate component) 3-4 %
    "temporal_left": ((-90.0, -20.0), (-70.0, 30.0), (-60.0, 4.0)),
    "temporal_right": ((20.0, 90.0), (-70.0, 30.0), (-60.0, 4.0)),
    "occipital_left": ((-90.0, 0.0), (-130.0, -60.0), (-30.0, 70.0)),
    "occipital_right": ((0.0, 90.0), (-130.0, -60.0), (-30.0, 70.0)),
    "frontal_left": ((-90.0, 0.0), (25.0, 100.0), (-60.0, 90.0)),
    "frontal_right": ((0.0, 90.0), (25.0, 100.0), (-60.0, 90.0)),
    "cerebellum": ((-90.0, 90.0), (-110.0, -30.0), (-90.0, -20.0)),
}
MANIFEST_DATASET = "brain"

# Tags keep the random streams apart from each other and from the phantoms'.
_TAG_SUBJECT, _TAG_ERROR, _TAG_PLAN = 0xB2A1, 0xB2E4, 0xB2B1


# ------------------------------------------------------------------------------------------ template
def template_dir() -> Path:
    """The folder of the installed nilearn package that holds the MNI152 template files.

    Found through the import system without importing nilearn (its import pulls pandas, joblib, ...).

    Raises:
        DataError: nilearn is not installed, or its data folder lacks a template file.
    """
    spec = importlib.util.find_spec("nilearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(f"--dataset brain: needs the MNI152 template shipped with nilearn; {INSTALL_HINT}")
    folder = Path(locations[0]) / "datasets" / "data"
    for name in TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise DataError(
                f"--dataset brain: {folder / name} is missing from the installed nilearn; "
                f"reinstall it with {INSTALL_HINT}"
            )
    return folder


def _nilearn_version() -> str:
    """Recorded in the manifest: another release may ship other template bytes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nilearn")
    except PackageNotFoundError:  # pragma: no cover - found by find_spec but without metadata
        return "unknown"


@dataclass(frozen=True)
class _Template:
    maps: dict[str, np.ndarray]  # t1, gm, wm in [0, 1], float32, cropped to the brain's bounding box
    to_voxel: np.ndarray  # 4x4: template mm -> voxel index of the cropped arrays
    zoom: float  # template voxel size in mm (largest of the three)
    centre: np.ndarray  # centre of the brain's bounding box, mm
    extent: np.ndarray  # edge lengths of the brain's bounding box, mm


@functools.lru_cache(maxsize=1)
def _load_template(folder: str) -> _Template:
    """Read the template and the tissue maps, crop them to the brain (GM + WM > 0.1) with a small margin.

    Args:
        folder: the folder returned by :func:`template_dir` (a string: the result is cached).
    """
    import nibabel as nib

    maps, affine = {}, None
    for key, name in TEMPLATE_FILES.items():
        path = Path(folder) / name
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj).astype(np.float32)
        except Exception as exc:  # nibabel raises several types for a damaged file
            raise DataError(f"--dataset brain: cannot read {path}: {exc}") from exc
        if affine is None:
            affine = img.affine
        elif data.shape != maps["t1"].shape or not np.allclose(img.affine, affine):
            raise DataError(f"--dataset brain: {path} is not on the grid of {TEMPLATE_FILES['t1']}")
        # The maps are stored as uint8 (0..255) in this release; scale by the maximum to stay exact.
        maps[key] = data / np.float32(max(float(data.max()), 1e-6))
    brain = (maps["gm"] + maps["wm"]) > 0.1
    if not brain.any():
        raise DataError(f"--dataset brain: {folder}: the tissue maps are empty")
    lo, hi = [], []
    for axis in range(3):
        hit = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    pad = 4  # room for the anti-aliasing blur; outside the brain the skull-stripped template is 0 anyway
    box = tuple(slice(max(0, a - pad), min(n, b + pad)) for a, b, n in zip(lo, hi, brain.shape, strict=True))
    offset = np.eye(4)
    offset[:3, 3] = [-s.start for s in box]
    corners = np.array([lo, hi], dtype=np.float64) - 0.5  # voxel-centre convention: edges at ±0.5
    mm = nib.affines.apply_affine(affine, corners)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return _Template(
        maps={k: np.ascontiguousarray(v[box]) for k, v in maps.items()},
        to_voxel=offset @ np.linalg.inv(affine),
        zoom=float(zooms.max()),
        centre=mm.mean(axis=0),
        extent=np.abs(mm[1] - mm[0]),
    )


def _template() -> _Template:
    """The cropped template of the installed nilearn (read once per process)."""
    return _load_template(str(template_dir()))


def _margin(size: int) -> int:
    """Voxels kept free on each side of the brain for the random affine and warp (3 at 48³).

    Args:
        size: volume edge in voxels.
    """
    return max(2, round(0.07 * size))


def fit_spacing(size: int) -> float:
    """Isotropic spacing (mm, rounded up to 0.01) at which the template brain fits a ``size``³ cube.

    Args:
        size: volume edge in voxels.
    """
    extent = float(_template().extent.max())
    return math.ceil(extent / (size - 2 * _margin(size)) * 100) / 100


@functools.lru_cache(maxsize=2)
def _prefiltered(folder: str, spacing: float) -> dict[str, np.ndarray]:
    """The template maps blurred for sampling at ``spacing`` mm: anti-aliasing and partial volume.

    Args:
        folder: template folder (cache key).
        spacing: target spacing in mm.
    """
    tpl = _load_template(folder)
    sigma = 0.4 * spacing / tpl.zoom  # about the width of a box filter of one target voxel
    if sigma < 0.3:
        return tpl.maps
    return {k: ndimage.gaussian_filter(v, sigma, mode="constant") for k, v in tpl.maps.items()}


def brain_affine(size: int, spacing: float) -> np.ndarray:
    """RAS affine of the output grid: ``spacing`` mm voxels centred on the template brain (MNI mm).

    Args:
        size: volume edge in voxels.
        spacing: isotropic spacing in mm.
    """
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = _template().centre - (size - 1) / 2 * spacing
    return aff


# ------------------------------------------------------------------------------------------ subjects
@dataclass
class Subject:
    """One warped subject on the output grid.

    Attributes:
        image: float32 T1-like image (arbitrary MR units).
        wm, gm: float32 tissue probabilities in [0, 1], warped like the image.
        mm: (3, s, s, s) float32 template (MNI) coordinates each voxel was sampled at: anatomical regions
            stay put under the warp.
    """

    image: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    mm: np.ndarray


def _random_linear(rng: np.random.Generator) -> np.ndarray:
    """Rotation of up to 4° about each axis times a scaling within ±5 % per axis."""
    angles = np.deg2rad(rng.uniform(-4.0, 4.0, size=3))
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i] = rot[j, j] = math.cos(angle)
        rot[i, j], rot[j, i] = -math.sin(angle), math.sin(angle)
        out = rot @ out
    return out @ np.diag(rng.uniform(0.95, 1.05, size=3))


def _sample_points(rng: np.random.Generator, size: int, spacing: float, centre: np.ndarray) -> np.ndarray:
    """Template mm coordinates (3, s, s, s) of every output voxel: affine about the brain centre + warp.

    Args:
        rng: the subject's generator.
        size: volume edge in voxels.
        spacing: output spacing in mm.
        centre: brain centre in mm (the affine's fixed point).
    """
    xyz = grid(size)
    linear = _random_linear(rng)
    # Physical units: the same anatomy deforms by the same millimetres whatever the grid.
    amp = rng.uniform(4.0, 6.0)  # per-component std ~ amp/sqrt(2) mm, peak ~ amp*sqrt(3) mm
    warp = [smooth_field(rng, xyz, 3, (0.5, 1.5), amp) for _ in range(3)]
    half = np.float32((size - 1) / 2)
    rel = [(np.arange(size, dtype=np.float32) - half) * np.float32(spacing)] * 3
    axes = (rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :])
    points = np.empty((3, size, size, size), dtype=np.float32)
    for k in range(3):
        lin = sum(np.float32(linear[k, a]) * axes[a] for a in range(3))
        points[k] = lin + warp[k] + np.float32(centre[k])
    return points


def _intensity(rng: np.random.Generator, t1: np.ndarray, size: int) -> np.ndarray:
    """Scanner-like variation of the sampled T1: contrast gamma, gain, smooth bias field, magnitude noise.

    Args:
        rng: the subject's generator.
        t1: sampled template T1 in [0, 1].
        size: volume edge in voxels.
    """
    img = np.clip(t1, 0.0, 1.0) ** np.float32(math.exp(rng.uniform(-0.3, 0.3)))
    bias = np.exp(smooth_field(rng, grid(size), 2, (0.3, 0.8), rng.uniform(0.08, 0.2)))
    img *= bias
    img *= np.float32(rng.uniform(700.0, 1300.0))
    sigma = np.float32(rng.uniform(0.01, 0.03) * 1000.0)
    # MR magnitude images carry Rician-like noise: the background is never exactly 0.
    img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.abs(img).astype(np.float32)


def make_subject(seed: int, index: int, size: int, spacing: float) -> Subject:
    """One subject: warped template image and tissue maps.

    Args:
        seed: dataset seed.
        index: case index (the subject depends only on ``seed``, ``index``, ``size`` and ``spacing``).
        size: volume edge in voxels.
        spacing: output spacing in mm.
    """
    folder = str(template_dir())
    tpl = _load_template(folder)
    maps = _prefiltered(folder, float(spacing))
    rng = np.random.default_rng([seed, index, _TAG_SUBJECT])
    mm = _sample_points(rng, size, float(spacing), tpl.centre)
    vox = np.einsum("ij,j...->i...", tpl.to_voxel[:3, :3].astype(np.float32), mm)
    vox += tpl.to_voxel[:3, 3].astype(np.float32)[:, None, None, None]
    sampled = {
        k: ndimage.map_coordinates(v, vox, order=1, mode="constant", cval=0.0, output=np.float32)
        for k, v in maps.items()
    }
    image = _intensity(rng, sampled["t1"], size)
    return Subject(image=image, wm=sampled["wm"], gm=sampled["gm"], mm=mm)


# ----------------------------------------------------------------------------------------- protocols
def _in_box(mm: np.ndarray, box: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Voxels whose template coordinates lie inside ``box``.

    Args:
        mm: (3, ...) template coordinates in mm.
        box: ``((lo, hi), (lo, hi), (lo, hi))`` mm per axis.
    """
    inside = np.ones(mm.shape[1:], dtype=bool)
    for k, (lo, hi) in enumerate(box):
        inside &= (mm[k] >= lo) & (mm[k] < hi)
    return inside


def protocol_label(subject: Subject, kind: str) -> np.ndarray:
    """The WM label of ``subject`` as annotation protocol ``kind`` draws it (uint8).

    Args:
        subject: a subject from :func:`make_subject`.
        kind: ``none`` (reference) or one of :data:`PROTOCOLS`.
    """
    if kind in WM_THRESHOLD:
        return (subject.wm > WM_THRESHOLD[kind]).astype(np.uint8)
    if kind == "smooth":
        # An annotator who paints with a broad brush: thin gyral strands fall below the threshold.
        return (ndimage.gaussian_filter(subject.wm, 1.0, mode="constant") > 0.5).astype(np.uint8)
    if kind == "deep_gm":
        ref = subject.wm > WM_THRESHOLD["none"]
        near = ndimage.binary_dilation(ref, iterations=2)
        deep = (subject.gm > 0.5) & _in_box(subject.mm, DEEP_GM_BOX) & near
        return (ref | deep).astype(np.uint8)
    raise ValueError(f"unknown protocol {kind!r}")


# -------------------------------------------------------------------------------------------- errors
def _skipped_slices(ref: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """Unlabel a run of consecutive axial slices through the bulk of the WM (the annotator skipped them).

    Args:
        ref: reference label (x, y, z); axial slices are along z (the grid is RAS-aligned).
        rng: the error's generator.
        size: volume edge (``max(2, size/16)`` slices: 3 at 48³).

    Returns:
        ``(label, number of skipped slices)``.
    """
    volume = int(ref.sum())
    counts = ref.sum(axis=(0, 1)).astype(np.int64)
    bulk = np.nonzero(counts >= 0.5 * counts.max())[0]
    n_slices = max(2, round(size / 16))
    best = None
    for start in rng.permutation(bulk):
        stop = min(int(start) + n_slices, size)
        frac = counts[start:stop].sum() / volume
        if ERROR_RANGE[0] <= frac <= ERROR_RANGE[1]:
            best = (int(start), stop)
            break
        if best is None or frac < counts[best[0] : best[1]].sum() / volume:
            best = (int(start), stop)  # never reached the range: keep the smallest change seen
    new = ref.copy()
    new[:, :, best[0] : best[1]] = 0
    return new, best[1] - best[0]


def _shifted(ref: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``ref`` moved by ``step`` voxels along ``axis``; what leaves the grid is lost, what enters is 0.

    Args:
        ref: a label volume.
        axis: 0, 1 or 2.
        step: signed number of voxels.
    """
    new = np.zeros_like(ref)
    src, dst = [slice(None)] * 3, [slice(None)] * 3
    src[axis] = slice(max(0, -step), ref.shape[axis] - max(0, step))
    dst[axis] = slice(max(0, step), ref.shape[axis] - max(0, -step))
    new[tuple(dst)] = ref[tuple(src)]
    return new


def _shift(ref: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """Move the whole label by 1 voxel (1 or 2 from 96³ on) along a random axis: a misregistered annotation.

    WM is thin: one voxel already changes ~50 % of the label at 48³ (~30 % at 96³), so no range is enforced.

    Args:
        ref: reference label.
        rng: the error's generator.
        size: volume edge.

    Returns:
        ``(label, shift in voxels)``.
    """
    amount = 1 if size < 96 else int(rng.choice([1, 2]))
    axis = int(rng.integers(3))
    return _shifted(ref, axis, amount * int(rng.choice([-1, 1]))), amount


def _missed_component(ref: np.ndarray, mm: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Leave out the WM of one region of :data:`LOBES` (a connected part the annotator never reached).

    Regions are tried in a random order; the first whose share of the label lies in :data:`ERROR_RANGE`
    is removed (else the largest one below the range's top, so a tiny grid still gets an error).

    Args:
        ref: reference label.
        mm: the subject's template coordinates (:attr:`Subject.mm`): regions follow the warp.
        rng: the error's generator.

    Returns:
        ``(label, 0)``.
    """
    volume = int(ref.sum())
    names = list(LOBES)
    best, best_frac = None, -1.0
    for i in rng.permutation(len(names)):
        part = ref.astype(bool) & _in_box(mm, LOBES[names[int(i)]])
        frac = part.sum() / volume
        if ERROR_RANGE[0] <= frac <= ERROR_RANGE[1]:
            best = part
            break
        if frac > best_frac and frac <= ERROR_RANGE[1]:
            best, best_frac = part, frac
    new = ref.copy()
    if best is not None:
        new[best] = 0
    return new, 0


def label_case(subject: Subject, kind: str, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The training label of a case and its reference label.

    Args:
        subject: the case's subject.
        kind: one of :data:`KINDS`.
        seed, index: select the error's random stream (independent of the subject's).

    Returns:
        ``(label, reference, iterations)``: ``iterations`` is the number of skipped slices, the shift in
        voxels, else 0.
    """
    ref = protocol_label(subject, "none")
    if kind == "none":
        return ref, ref, 0
    if kind in PROTOCOLS:
        return protocol_label(subject, kind), ref, 0
    size = ref.shape[0]
    rng = np.random.default_rng([seed, index, _TAG_ERROR])
    if kind == "skipped_slices":
        label, iterations = _skipped_slices(ref, rng, size)
    elif kind == "shift":
        label, iterations = _shift(ref, rng, size)
    elif kind == "missed_component":
        label, iterations = _missed_component(ref, subject.mm, rng)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return label, ref, iterations


def anatomy_plan(n_cases: int, seed: int) -> list[str]:
    """The kind of every case (a seeded permutation decides which cases).

    Each protocol gets ``round(N/15)`` cases and each error ``round(N/30)`` (rounding half up; at least 1
    each once N >= 14, so that the reference stays the majority); the rest are ``none``.

    Args:
        n_cases: number of cases N.
        seed: dataset seed.
    """
    n_protocol = math.floor(n_cases * PROTOCOL_FRACTION + 0.5)
    n_error = math.floor(n_cases * ERROR_FRACTION + 0.5)
    if n_cases >= 2 * (len(PROTOCOLS) + len(ERRORS)):
        n_protocol, n_error = max(n_protocol, 1), max(n_error, 1)
    kinds = [k for k in PROTOCOLS for _ in range(n_protocol)] + [k for k in ERRORS for _ in range(n_error)]
    plan = ["none"] * n_cases
    order = np.random.default_rng([seed, n_cases, _TAG_PLAN]).permutation(n_cases)
    for case, kind in zip(order, kinds, strict=False):
        plan[int(case)] = kind
    return plan


# ------------------------------------------------------------------------------------------- output
def _check_args(cases: int, size: int, seed: int, spacing: float | None) -> None:
    """Raise :class:`DataError` naming the CLI option of the first unusable argument.

    Args:
        cases, size, seed, spacing: as in :func:`generate_anatomy_dataset`.
    """
    if not isinstance(cases, int) or cases < 1:
        raise DataError(f"--cases {cases!r}: must be an integer >= 1")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"--size {size!r}: must be an integer between {MIN_SIZE} and {MAX_SIZE}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"--seed {seed!r}: must be an integer >= 0")
    if spacing is not None and not (
        isinstance(spacing, int | float) and math.isfinite(spacing) and spacing > 0
    ):
        raise DataError(f"--spacing {spacing!r}: must be a positive number of mm (or unset: fit the brain)")


def generate_anatomy_dataset(
    out: Path,
    *,
    cases: int = 60,
    size: int = 48,
    seed: int = 0,
    spacing: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the real-anatomy benchmark.

    Same layout as the phantoms: ``out/images/<case>.nii.gz`` (float32), ``out/labels/`` (uint8, what
    training sees), ``out/labels_clean/`` (the reference protocol's label), ``out/datalist.tsv``,
    ``out/truth.csv`` (``index,case_id,perturbation,iterations,voxels_changed``; ``voxels_changed``
    counts voxels differing from the reference label) and ``out/synth.json``.

    Args:
        out: output folder (new, empty, or a previous output with identical arguments).
        cases: number of cases N.
        size: volume edge in voxels (16..512).
        seed: random seed; identical arguments give bit-identical files.
        spacing: isotropic spacing in mm; ``None`` fits the whole brain in the cube (a smaller spacing
            crops it).
        progress: progress bar on stderr.

    Returns:
        ``{"out", "dataset", "n_cases", "size", "spacing", "perturbations", "counts", "datalist", "truth",
        "seconds"}``.

    Raises:
        DataError: a bad argument, nilearn missing, or an output folder holding something else.
    """
    start = time.perf_counter()
    _check_args(cases, size, seed, spacing)
    template_dir()  # fail before creating anything when nilearn is missing
    resolved = float(spacing) if spacing is not None else fit_spacing(size)
    out = Path(out)
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": MANIFEST_DATASET,
        "source": f"nilearn=={_nilearn_version()} MNI152 2009a sym",
        "cases": cases,
        "size": size,
        "seed": seed,
        "spacing": resolved,
    }
    prepare_out(out, manifest)
    affine = brain_affine(size, resolved)
    plan = anatomy_plan(cases, seed)
    rows = []
    items: Any = range(cases)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="brain", unit="case", file=sys.stderr, leave=False)
    for index in items:
        case_id = f"case_{index:04d}"
        subject = make_subject(seed, index, size, resolved)
        label, ref, iterations = label_case(subject, plan[index], seed, index)
        name = f"{case_id}.nii.gz"
        save_volume(out / "images" / name, subject.image, affine)
        save_volume(out / "labels" / name, label, affine)
        save_volume(out / "labels_clean" / name, ref, affine)
        rows.append((index, case_id, plan[index], iterations, changed_voxels(label, ref)))

    with open(out / "datalist.tsv", "w", newline="") as f:
        f.write("DataPath\tLabelPath\n")
        for _, case_id, *_ in rows:
            f.write(f"images/{case_id}.nii.gz\tlabels/{case_id}.nii.gz\n")
    with open(out / "truth.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "case_id", "perturbation", "iterations", "voxels_changed"])
        writer.writerows(rows)
    counts = {kind: plan.count(kind) for kind in KINDS if kind in plan}
    return {
        "out": str(out),
        "dataset": MANIFEST_DATASET,
        "n_cases": cases,
        "size": size,
        "spacing": resolved,
        "perturbations": "protocols",
        "counts": counts,
        "datalist": str(out / "datalist.tsv"),
        "truth": str(out / "truth.csv"),
        "seconds": round(time.perf_counter() - start, 2),
    }
