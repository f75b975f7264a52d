"""Synthetic CT-like benchmark with known label perturbations (``hypersort synth``; paper §4.1 protocol).

AMOS cannot be downloaded here, so the paper's proof of concept is reproduced on phantoms. Each case is a
``size``³ int16 volume in HU-like units: air, a body outline with a subcutaneous fat ring and an abdominal
wall, soft-tissue background with fat patches, a spine and ribs, the target **organ** (a union of random
ellipsoids warped by a smooth displacement field, with vessels and texture) and several neighbouring
"organs" of similar intensity that touch it, all under a smooth bias field, partial-volume blur and noise.
The organ is not separable by a threshold: a model must use shape and context.

The clean label is the organ mask (1) on background (0). Perturbed labels (what training sees):

* ``paper``: ~7.5 % of the cases eroded and ~7.5 % dilated with 3, 4 or 5 iterations of a 3D cross
  (iterations scaled by ``size/64``, at least 1, never erasing the organ), 85 % untouched.
* ``subtle``: part-of-the-organ errors as annotators make them (``partial_eroded``, ``partial_dilated``
  in a half-space, a skipped ``slab`` of slices, a ``shift`` by 1-2 voxels), each changing 10-40 % of the
  organ volume; same total fraction.
* ``mixed``: ~7.5 % gross (eroded/dilated) and ~7.5 % subtle.

Which cases are perturbed is a seeded permutation of all cases. Each case's image and clean label come
from its own generator seeded by ``(seed, index)``, so case ``i`` is the same whatever ``cases`` is. Files
are bit-identical for identical arguments (nibabel writes gzip with mtime 0).

Example:
    >>> summary = generate_dataset(Path("synth"), cases=40, size=32, seed=0)  # doctest: +SKIP
    >>> summary["counts"]                                                       # doctest: +SKIP
    {'none': 34, 'eroded': 3, 'dilated': 3}
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hypersort_ray.data.anatomy import generate_anatomy_dataset
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
    "DATASETS",
    "PERTURBATIONS",
    "SUBTLE_KINDS",
    "generate_dataset",
    "perturb",
    "perturbation_plan",
    "synth_case",
]

PERTURBATIONS = ("paper", "subtle", "mixed")
# ``brain``: warped MNI152 brains with annotation protocols (hypersort_ray.data.anatomy, needs nilearn).
DATASETS = ("phantoms", "brain")
DEFAULT_SPACING = 2.0  # phantoms, mm
GROSS_KINDS = ("eroded", "dilated")
SUBTLE_KINDS = ("partial_eroded", "partial_dilated", "slab", "shift")
PAPER_ITERATIONS = (3, 4, 5)
PERTURBED_FRACTION = 0.075  # per family (eroded, dilated), paper §4.1
SUBTLE_RANGE = (0.10, 0.40)  # fraction of the organ volume a subtle error changes
CROSS = ndimage.generate_binary_structure(3, 1)

# Tags keep the three random streams apart (SeedSequence([a, b]) equals SeedSequence([a, b, 0])).
_TAG_CASE, _TAG_PERTURB, _TAG_PLAN = 0x1A6E, 0x9E27, 0x5E1E


# ---------------------------------------------------------------------------------------- phantom
def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# Bound on the smooth displacement (per component): the amplitude * sqrt(terms) of _smooth_field.
_MAX_WARP = 0.08 * math.sqrt(3)


def _box(center, reach: float, size: int) -> tuple[slice, slice, slice]:
    """Voxel slices covering ``center ± reach`` (normalised units) plus the largest warp."""
    half = size / 2
    lo = [max(0, math.floor((c - reach - _MAX_WARP + 1) * half) - 1) for c in center]
    hi = [min(size, math.ceil((c + reach + _MAX_WARP + 1) * half) + 1) for c in center]
    return tuple(slice(a, max(a, b)) for a, b in zip(lo, hi, strict=True))


def _ellipsoid(warped, center, radii, rot, size: int) -> np.ndarray:
    """Boolean mask of ``|R^T (p - c) / r|^2 < 1`` on warped coordinates, evaluated only in its box."""
    box = _box(center, float(np.max(radii)), size)
    d = [warped[i][box] - np.float32(center[i]) for i in range(3)]
    q = np.zeros(d[0].shape, dtype=np.float32)
    for k in range(3):
        a = (
            np.float32(rot[0, k]) * d[0] + np.float32(rot[1, k]) * d[1] + np.float32(rot[2, k]) * d[2]
        ) / np.float32(radii[k])
        q += a * a
    mask = np.zeros((size, size, size), dtype=bool)
    mask[box] = q < 1
    return mask


def _tube(warped, point, direction, radius, box) -> np.ndarray:
    """Boolean mask (within ``box``) of an infinite cylinder: a vessel."""
    d = [warped[i][box] - np.float32(point[i]) for i in range(3)]
    u = direction / np.linalg.norm(direction)
    c0 = d[1] * np.float32(u[2]) - d[2] * np.float32(u[1])
    c1 = d[2] * np.float32(u[0]) - d[0] * np.float32(u[2])
    c2 = d[0] * np.float32(u[1]) - d[1] * np.float32(u[0])
    return c0 * c0 + c1 * c1 + c2 * c2 < np.float32(radius**2)


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Tight slices around the True voxels of ``mask``."""
    out = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


@dataclass
class _Anatomy:
    body_r: np.ndarray  # (X/ax)^2 + (Y/ay)^2: < 1 inside the body
    fat_inner: float  # body_r below this: inside the subcutaneous fat
    wall_inner: float  # body_r below this: inside the abdominal wall (organs live here)


def _organ(
    rng: np.random.Generator, warped, size: int, inside: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """The target organ: a main ellipsoid plus 1-3 lobes, on warped coordinates. Retries until it has a
    sensible size and keeps a margin to the volume border (dilation must not hit the edge)."""
    margin = max(2, math.ceil(5 * size / 64) + 1)
    for _ in range(50):
        center = np.array([rng.uniform(-0.35, -0.05), rng.uniform(-0.15, 0.2), rng.uniform(-0.2, 0.2)])
        radii = np.array([rng.uniform(0.38, 0.52), rng.uniform(0.28, 0.38), rng.uniform(0.30, 0.42)])
        rot = _rotation(rng)
        mask = _ellipsoid(warped, center, radii, rot, size)
        for _ in range(rng.integers(1, 4)):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            lobe_center = center + rot @ (radii * direction * rng.uniform(0.5, 0.8))
            mask |= _ellipsoid(
                warped, lobe_center, radii * rng.uniform(0.45, 0.75, size=3), _rotation(rng), size
            )
        mask &= inside
        frac = mask.mean()
        if not 0.015 <= frac <= 0.12:
            continue
        lab, n = ndimage.label(mask)
        if n > 1:  # keep the largest component: an organ is one piece
            mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        box = _bbox(mask)
        if not all(b.start >= margin and b.stop <= size - margin for b in box):
            continue
        # A gross erosion must never erase the organ: it has to be thick enough to survive one pass.
        if ndimage.binary_erosion(mask[box], CROSS).sum() >= 0.25 * mask.sum():
            return mask, {"center": center, "radii": radii, "rot": rot}
    raise RuntimeError("could not place the organ (phantom parameters are inconsistent)")  # pragma: no cover


def synth_case(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: an int16 HU-like image and the clean uint8 organ label.

    Args:
        seed: dataset seed.
        index: case index (the case depends only on ``seed``, ``index`` and ``size``).
        size: volume edge in voxels.
    """
    rng = np.random.default_rng([seed, index, _TAG_CASE])
    xyz = grid(size)
    # Smooth deformation shared by the body outline and the organs: nothing is a perfect ellipse.
    warped = tuple(c + smooth_field(rng, xyz, 3, (0.6, 1.6), rng.uniform(0.04, 0.08)) for c in xyz)
    x, y, z = warped

    ax, ay = rng.uniform(0.80, 0.92), rng.uniform(0.64, 0.76)
    body_r = (x / np.float32(ax)) ** 2 + ((y - np.float32(0.04)) / np.float32(ay)) ** 2
    fat_t, wall_t = rng.uniform(0.07, 0.12), rng.uniform(0.05, 0.08)
    anat = _Anatomy(body_r=body_r, fat_inner=(1 - fat_t) ** 2, wall_inner=(1 - fat_t - wall_t) ** 2)
    body = body_r < 1
    spine = _Spine(
        sx=rng.uniform(-0.05, 0.05), sy=-ay * rng.uniform(0.55, 0.7), radius=rng.uniform(0.08, 0.12)
    )
    spine_rr = np.sqrt((xyz[0] - np.float32(spine.sx)) ** 2 + (xyz[1] - np.float32(spine.sy)) ** 2)
    # Soft organs live inside the abdominal wall and keep clear of the spine.
    interior = (body_r < anat.wall_inner) & (spine_rr > np.float32(1.4 * spine.radius))

    organ, params = _organ(rng, warped, size, interior)

    tissue = rng.uniform(15, 35)
    organ_hu = rng.uniform(50, 70)
    img = np.full((size, size, size), -1000.0, dtype=np.float32)
    img[body] = rng.uniform(-110, -85)  # subcutaneous fat
    img[body & (body_r < anat.fat_inner)] = rng.uniform(40, 55)  # abdominal wall muscle
    texture = smooth_field(rng, xyz, 4, (1.5, 4.0), 1.0)
    inner = body_r < anat.wall_inner
    img[inner] = (tissue + 20 * texture)[inner]
    img[inner & (texture > 0.9)] = rng.uniform(-100, -70)  # mesenteric fat patches

    # Neighbouring "organs" of similar intensity, several touching the target: a threshold cannot
    # separate them, the boundary must come from shape and context.
    others = np.zeros_like(organ)
    for _ in range(rng.integers(3, 6)):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        reach = params["radii"].max() * rng.uniform(0.9, 1.4)
        center = params["center"] + direction * reach
        blob = _ellipsoid(warped, center, rng.uniform(0.12, 0.24, size=3), _rotation(rng), size)
        blob &= interior & ~organ & ~others
        img[blob] = organ_hu + rng.uniform(-25, 20) + 6 * texture[blob]
        others |= blob

    img[organ] = organ_hu + 8 * texture[organ]
    box = _bbox(organ)
    sub, organ_sub = img[box], organ[box]  # views: vessels are painted inside the organ's box only
    for _ in range(rng.integers(1, 4)):  # contrast-enhanced vessels
        point = params["center"] + rng.normal(scale=0.08, size=3)
        radius = rng.uniform(0.025, 0.05) * 64 / max(size, 32)
        vessel = _tube(warped, point, rng.normal(size=3), radius, box) & organ_sub
        sub[vessel] = organ_hu + rng.uniform(30, 60)

    _add_bones(rng, img, xyz, anat, spine, spine_rr)

    bias = smooth_field(rng, xyz, 2, (0.3, 0.8), rng.uniform(10, 25))
    img = np.where(body, img + bias, img)
    img = ndimage.gaussian_filter(img, sigma=0.7, mode="nearest")  # partial volume
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(8, 18))
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    return image, organ.astype(np.uint8)


@dataclass
class _Spine:
    sx: float
    sy: float
    radius: float


def _add_bones(rng, img: np.ndarray, xyz, anat: _Anatomy, spine: _Spine, spine_rr: np.ndarray) -> None:
    """Paint (in place) a spine with cortex, marrow and discs, and ribs inside the abdominal wall."""
    x, y, z = xyz
    full = np.broadcast_to(spine_rr, img.shape)
    disc = np.sin(z * np.float32(rng.uniform(5, 8) * np.pi) + np.float32(rng.uniform(0, 6.3))) > 0.75
    marrow = full < 0.7 * spine.radius
    img[marrow] = rng.uniform(150, 300)
    img[marrow & disc] = rng.uniform(70, 100)
    img[(full >= 0.7 * spine.radius) & (full < spine.radius) & ~disc] = rng.uniform(600, 900)

    shell = (anat.body_r >= (math.sqrt(anat.wall_inner) + 0.005) ** 2) & (
        anat.body_r < (math.sqrt(anat.fat_inner) - 0.01) ** 2
    )
    angle = np.float32(rng.uniform(6, 9) * np.pi)
    stripes = np.sin((z + np.float32(0.5) * np.abs(y)) * angle + np.float32(rng.uniform(0, 6.3))) > 0.55
    img[shell & stripes & (y > np.float32(spine.sy + spine.radius))] = rng.uniform(350, 600)


# ----------------------------------------------------------------------------------- perturbations
def _morph_stack(clean: np.ndarray, op: Callable, max_iter: int) -> list[np.ndarray]:
    """``[clean, op^1(clean), ..., op^max_iter(clean)]`` with a 3D cross, one iteration at a time."""
    out = [clean.astype(bool)]
    for _ in range(max_iter):
        out.append(op(out[-1], structure=CROSS))
    return out


def _scaled_iterations(k: int, size: int) -> int:
    """Paper iterations at 64³ and beyond scale with the volume: 3,4,5 -> 1,2,2 at 32³, 6,8,10 at 128³."""
    return max(1, int(k * size / 64))


def _gross(clean: np.ndarray, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    iterations = _scaled_iterations(int(rng.choice(PAPER_ITERATIONS)), size)
    op = ndimage.binary_erosion if kind == "eroded" else ndimage.binary_dilation
    stack = _morph_stack(clean, op, iterations)
    if kind == "eroded":
        # Never erase the organ: keep at least 10 % of it (and at least 1 iteration).
        volume = clean.sum()
        while iterations > 1 and stack[iterations].sum() < 0.1 * volume:
            iterations -= 1
    return stack[iterations].astype(np.uint8), iterations


def _in_range(changed: int, volume: int) -> bool:
    return SUBTLE_RANGE[0] <= changed / volume <= SUBTLE_RANGE[1]


def _partial(
    clean: np.ndarray, kind: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, int] | None:
    """Erode/dilate only the part of the organ on one side of a random plane."""
    op = ndimage.binary_erosion if kind == "partial_eroded" else ndimage.binary_dilation
    max_iter = max(3, round(4 * size / 64))
    stack = _morph_stack(clean, op, max_iter)
    pts = np.argwhere(clean).astype(np.float32)
    centre = pts.mean(axis=0)
    volume = int(clean.sum())
    grid = np.indices(clean.shape, dtype=np.float32)
    base = max(1, round(2 * size / 64))
    order = [base] + [k for k in (base + 1, base - 1, base + 2, base - 2, base + 3) if 1 <= k <= max_iter]
    for _ in range(20):
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        proj = sum(np.float32(normal[i]) * (grid[i] - centre[i]) for i in range(3))
        offset = rng.uniform(-0.4, 0.4) * float(((pts - centre) @ normal).std())
        half = proj > np.float32(offset)
        for k in order:
            new = np.where(half, stack[k], clean)
            if _in_range(changed_voxels(new, clean), volume):
                return new.astype(np.uint8), k
    return None


def _slab(clean: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int] | None:
    """Unlabel a few consecutive slices through the organ's bulk (a skipped slab): axial first."""
    volume = int(clean.sum())
    max_thickness = max(2, size // 8)  # "a few" slices, not a cut-off organ end
    for axis in [2, *rng.permutation([0, 1])]:
        counts = clean.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.int64)
        bulk = np.nonzero(counts >= 0.5 * counts.max())[0]
        for start in rng.permutation(bulk)[:20]:
            target = rng.uniform(0.15, 0.35) * volume
            stop, total = int(start), 0
            while stop < len(counts) and total < target and stop - start < max_thickness:
                total += counts[stop]
                stop += 1
            if _in_range(total, volume):
                new = clean.copy()
                index = [slice(None)] * 3
                index[axis] = slice(int(start), stop)
                new[tuple(index)] = 0
                return new, stop - int(start)
    return None


def _shift(clean: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int] | None:
    """Move the whole label by 1 voxel (2-3 at large sizes) along an axis: a misregistered annotation."""
    volume = int(clean.sum())
    amounts = [1, 2, 3] if size < 96 else [2, 1, 3]
    for amount in amounts:
        for axis in rng.permutation(3):
            step = int(amount * rng.choice([-1, 1]))
            new = np.zeros_like(clean)
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            src[axis] = slice(max(0, -step), clean.shape[axis] - max(0, step))
            dst[axis] = slice(max(0, step), clean.shape[axis] - max(0, -step))
            new[tuple(dst)] = clean[tuple(src)]
            if _in_range(changed_voxels(new, clean), volume):
                return new, amount
    return None


def _subtle(clean: np.ndarray, kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, int]:
    """A subtle error of ``kind``; falls back to a partial erosion/dilation when the organ's geometry
    cannot give 10-40 % with that kind (e.g. a shift of a very large organ)."""
    fallback = {"slab": "partial_eroded", "shift": "partial_dilated"}
    for attempt in (kind, fallback.get(kind), "partial_eroded", "partial_dilated"):
        if attempt is None:
            continue
        if attempt == "slab":
            res = _slab(clean, rng, size)
        elif attempt == "shift":
            res = _shift(clean, rng, size)
        else:
            res = _partial(clean, attempt, rng, size)
        if res is not None:
            return res[0], attempt, res[1]
    raise RuntimeError("no subtle perturbation within 10-40 % of the organ volume")  # pragma: no cover


def perturb(clean: np.ndarray, kind: str, seed: int, index: int, size: int) -> tuple[np.ndarray, str, int]:
    """Apply a perturbation of ``kind`` to a clean label.

    Args:
        clean: uint8 organ mask.
        kind: ``none``, ``eroded``, ``dilated`` or one of :data:`SUBTLE_KINDS`.
        seed, index: select the random stream (independent of the phantom's).
        size: volume edge (scales iteration counts).

    Returns:
        ``(label, applied kind, iterations)``; the applied kind differs from ``kind`` only when a subtle
        kind had to fall back.
    """
    if kind == "none":
        return clean, "none", 0
    rng = np.random.default_rng([seed, index, _TAG_PERTURB])
    if kind in GROSS_KINDS:
        label, iterations = _gross(clean, kind, rng, size)
        return label, kind, iterations
    return _subtle(clean, kind, rng, size)


def perturbation_plan(n_cases: int, seed: int, perturbations: str = "paper") -> list[str]:
    """The perturbation kind of every case (a seeded permutation decides which cases).

    ``paper``: ``round(0.075 N)`` eroded and as many dilated (at least 1 each when N >= 8; rounding half
    up). ``subtle``: the same total, cycling through :data:`SUBTLE_KINDS`. ``mixed``: the eroded share
    becomes gross errors (eroded/dilated alternating), the dilated share subtle ones.
    """
    _check_perturbations(perturbations)
    n_each = math.floor(PERTURBED_FRACTION * n_cases + 0.5)
    if n_cases >= 8:
        n_each = max(n_each, 1)
    if perturbations == "paper":
        kinds = ["eroded"] * n_each + ["dilated"] * n_each
    elif perturbations == "subtle":
        kinds = [SUBTLE_KINDS[i % len(SUBTLE_KINDS)] for i in range(2 * n_each)]
    else:
        kinds = [GROSS_KINDS[i % 2] for i in range(n_each)] + [
            SUBTLE_KINDS[i % len(SUBTLE_KINDS)] for i in range(n_each)
        ]
    plan = ["none"] * n_cases
    order = np.random.default_rng([seed, n_cases, _TAG_PLAN]).permutation(n_cases)
    for case, kind in zip(order, kinds, strict=False):
        plan[int(case)] = kind
    return plan


# ------------------------------------------------------------------------------------------ output
def _check_perturbations(value: str) -> None:
    if value not in PERTURBATIONS:
        raise DataError(f"--perturbations {value!r}: expected one of {', '.join(PERTURBATIONS)}")


def _check_args(cases: int, size: int, seed: int, perturbations: str, spacing: float) -> None:
    if not isinstance(cases, int) or cases < 1:
        raise DataError(f"--cases {cases!r}: must be an integer >= 1")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"--size {size!r}: must be an integer between {MIN_SIZE} and {MAX_SIZE}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"--seed {seed!r}: must be an integer >= 0")
    if not (isinstance(spacing, int | float) and math.isfinite(spacing) and spacing > 0):
        raise DataError(f"--spacing {spacing!r}: must be a positive number of mm")
    _check_perturbations(perturbations)


def _affine(size: int, spacing: float) -> np.ndarray:
    """RAS affine with diagonal spacing; x/y centred on the scanner axis, z in the abdomen's range."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    half = (size - 1) / 2 * spacing
    aff[:3, 3] = [-half, -half, -half - 150.0]
    return aff


def generate_dataset(
    out: Path,
    cases: int = 200,
    size: int = 64,
    seed: int = 0,
    perturbations: str = "paper",
    spacing: float | None = None,
    progress: bool = False,
    *,
    dataset: str = "phantoms",
) -> dict[str, Any]:
    """Write the synthetic benchmark.

    Writes ``out/images/<case>.nii.gz`` (int16), ``out/labels/`` (uint8, perturbed), ``out/labels_clean/``,
    ``out/datalist.tsv`` (``DataPath<TAB>LabelPath``, relative paths), ``out/truth.csv``
    (``index,case_id,perturbation,iterations,voxels_changed``) and ``out/synth.json`` (the arguments).

    Args:
        out: output folder (new, empty, or a previous output with identical arguments).
        cases: number of cases N.
        size: volume edge in voxels (16..512).
        seed: random seed; identical arguments give bit-identical files.
        perturbations: ``paper``, ``subtle`` or ``mixed`` (phantoms only: ``brain`` accepts the default).
        spacing: isotropic voxel spacing in mm; ``None``: 2.0 for phantoms, fitted to the brain for ``brain``.
        progress: progress bar on stderr.
        dataset: ``phantoms`` (this module) or ``brain``
            (:func:`hypersort_ray.data.anatomy.generate_anatomy_dataset`, same layout).

    Returns:
        ``{"out", "n_cases", "size", "perturbations", "counts", "datalist", "truth", "seconds"}`` (``brain``
        adds ``"dataset"`` and ``"spacing"``).
    """
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if dataset == "brain":
        if perturbations != "paper":
            raise DataError(
                f"--perturbations {perturbations!r}: applies to --dataset phantoms only; the brain "
                "benchmark has fixed protocols and errors (leave --perturbations at its default)"
            )
        return generate_anatomy_dataset(
            out, cases=cases, size=size, seed=seed, spacing=spacing, progress=progress
        )
    spacing = DEFAULT_SPACING if spacing is None else spacing
    start = time.perf_counter()
    _check_args(cases, size, seed, perturbations, spacing)
    out = Path(out)
    manifest = {
        "format": FORMAT_VERSION,
        "cases": cases,
        "size": size,
        "seed": seed,
        "perturbations": perturbations,
        "spacing": float(spacing),
    }
    prepare_out(out, manifest)
    affine = _affine(size, float(spacing))
    plan = perturbation_plan(cases, seed, perturbations)
    rows = []
    items = range(cases)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="synth", unit="case", file=sys.stderr, leave=False)
    for index in items:
        case_id = f"case_{index:04d}"
        image, clean = synth_case(seed, index, size)
        label, kind, iterations = perturb(clean, plan[index], seed, index, size)
        name = f"{case_id}.nii.gz"
        save_volume(out / "images" / name, image, affine)
        save_volume(out / "labels" / name, label.astype(np.uint8), affine)
        save_volume(out / "labels_clean" / name, clean, affine)
        rows.append((index, case_id, kind, iterations, changed_voxels(label, clean)))

    with open(out / "datalist.tsv", "w", newline="") as f:
        f.write("DataPath\tLabelPath\n")
        for _, case_id, *_ in rows:
            f.write(f"images/{case_id}.nii.gz\tlabels/{case_id}.nii.gz\n")
    with open(out / "truth.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "case_id", "perturbation", "iterations", "voxels_changed"])
        writer.writerows(rows)
    applied = [row[2] for row in rows]
    counts = {kind: applied.count(kind) for kind in ("none", *GROSS_KINDS, *SUBTLE_KINDS) if kind in applied}
    return {
        "out": str(out),
        "n_cases": cases,
        "size": size,
        "perturbations": perturbations,
        "counts": counts,
        "datalist": str(out / "datalist.tsv"),
        "truth": str(out / "truth.csv"),
        "seconds": round(time.perf_counter() - start, 2),
    }
