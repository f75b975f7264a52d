"""A latent simulator that mimics what HyperSORT training produces on the synthetic benchmark.

Trained latents are slow to get (a training run per fixture), so the analysis is developed and tested
on simulated ones whose geometry follows the paper (Fig. 2, §4.1) and what our own prototype runs on the
synthetic phantoms measured (docs/benchmarks.md):

- clean cases form a *diffuse* cloud around the origin (the L1 term pulls the main mode to λ = 0), with a
  per-axis spread of 0.05–0.3 and a random orientation (the main mode uses secondary directions for
  secondary variability), slightly off-centre because the L1 pull is not exact;
- a few "hard" clean cases sit slightly outside that cloud in random directions (paper: the most
  eccentric clean cases are challenging anatomy, not label errors);
- eroded cases drift along one direction u at a radius of about 0.5–2 that grows with the number of
  erosion iterations, and spread sideways in proportion to their radius;
- dilated cases drift the same way along a direction v on the opposite side (cos(u, v) ≈ −0.6).

The truth table has the columns ``hypersort synth`` writes (``index,case_id,perturbation,iterations,
voxels_changed``) so simulated runs exercise exactly the code path of real runs.

Example:
    >>> sim = simulate_latents(n_cases=100, latent_dim=2, seed=0)
    >>> sim.latents.shape, sorted(set(sim.truth["perturbation"]))
    ((100, 2), ['dilated', 'eroded', 'none'])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SimulatedRun:
    """Latents and the truth table of one simulated run.

    Attributes:
        latents: (N, d) latent vectors, row i is the case with index i.
        truth: ``index,case_id,perturbation,iterations,voxels_changed`` (one row per case).
        case_ids: case identifiers, ``case_0000`` ...
    """

    latents: np.ndarray
    truth: pd.DataFrame
    case_ids: list[str]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random orthogonal matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _opposite_direction(u: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector with the given cosine to ``u`` (a random orthogonal complement in d > 1)."""
    if u.size == 1:
        return -u
    w = rng.normal(size=u.size)
    w = _unit(w - (w @ u) * u)
    return cosine * u + np.sqrt(1.0 - cosine**2) * w


def _drifted(
    direction: np.ndarray, iterations: np.ndarray, radius_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Cases pushed along ``direction``; the radius grows with iterations, the spread with the radius."""
    lo, hi = radius_range
    levels = np.unique(iterations)
    # Map the lowest iteration count to ``lo`` and the highest to ``hi`` (one level: the middle).
    if levels.size > 1:
        frac = (iterations - levels.min()) / (levels.max() - levels.min())
    else:
        frac = np.full(iterations.shape, 0.5)
    radius = lo + (hi - lo) * frac
    radius = radius * rng.uniform(0.85, 1.15, size=radius.shape)
    sideways = rng.normal(size=(iterations.size, direction.size)) * (0.12 * radius)[:, None]
    sideways -= (sideways @ direction)[:, None] * direction  # keep the radial part exact
    return radius[:, None] * direction + sideways


def simulate_latents(
    n_cases: int = 200,
    latent_dim: int = 2,
    seed: int = 0,
    eroded_fraction: float = 0.075,
    dilated_fraction: float = 0.075,
    iterations: tuple[int, ...] = (3, 4, 5),
    spread_range: tuple[float, float] = (0.05, 0.3),
    radius_range: tuple[float, float] = (0.5, 2.0),
    opposite_cosine: float = -0.6,
    hard_fraction: float = 0.03,
    offset: float = 0.3,
) -> SimulatedRun:
    """Simulate trained latents and the matching truth table.

    Args:
        n_cases: number of cases N.
        latent_dim: latent dimension d (any d >= 1).
        seed: random seed; the same seed gives the same run.
        eroded_fraction: fraction of eroded cases (paper: ~7.5 %).
        dilated_fraction: fraction of dilated cases (paper: ~7.5 %).
        iterations: morphological iteration counts drawn per perturbed case (paper: 3, 4, 5).
        spread_range: per-axis standard deviations of the clean cloud are drawn log-uniformly here.
        radius_range: radius of the perturbed cases at the lowest and highest iteration count.
        opposite_cosine: cosine between the eroded and the dilated direction.
        hard_fraction: fraction of clean cases pushed slightly out of the clean cloud.
        offset: the clean cloud's centre is off the origin by this fraction of its spread.

    Returns:
        A :class:`SimulatedRun`.
    """
    rng = np.random.default_rng(seed)
    n_eroded = int(round(eroded_fraction * n_cases))
    n_dilated = int(round(dilated_fraction * n_cases))
    n_clean = n_cases - n_eroded - n_dilated
    if n_clean < 1:
        raise ValueError(f"fractions leave no clean case (n_cases={n_cases})")

    # Clean cloud: anisotropic Gaussian in a random orientation, slightly off the origin.
    scales = np.exp(rng.uniform(np.log(spread_range[0]), np.log(spread_range[1]), size=latent_dim))
    rotation = _random_rotation(latent_dim, rng)
    clean = (rng.normal(size=(n_clean, latent_dim)) * scales) @ rotation.T
    centre = offset * float(np.median(scales)) * _unit(rng.normal(size=latent_dim))
    clean += centre
    n_hard = int(round(hard_fraction * n_clean))
    if n_hard:
        hard_dirs = rng.normal(size=(n_hard, latent_dim))
        hard_dirs /= np.linalg.norm(hard_dirs, axis=1, keepdims=True)
        clean[:n_hard] = centre + hard_dirs * rng.uniform(2.5, 3.5, size=(n_hard, 1)) * scales.max()

    u = _unit(rng.normal(size=latent_dim))
    v = _opposite_direction(u, opposite_cosine, rng)
    it_eroded = rng.choice(np.asarray(iterations), size=n_eroded)
    it_dilated = rng.choice(np.asarray(iterations), size=n_dilated)
    eroded = _drifted(u, it_eroded, radius_range, rng) + centre
    dilated = _drifted(v, it_dilated, radius_range, rng) + centre

    latents = np.vstack([clean, eroded, dilated])
    kinds = ["none"] * n_clean + ["eroded"] * n_eroded + ["dilated"] * n_dilated
    iters = np.concatenate([np.zeros(n_clean, int), it_eroded, it_dilated])
    # Voxels changed grow with the iteration count (roughly a shell per iteration), with per-case noise.
    voxels = np.where(iters > 0, (iters * 800 * rng.uniform(0.7, 1.3, size=iters.size)).astype(int), 0)

    # Shuffle so that the perturbed cases are not the last rows (the datalist order is arbitrary).
    order = rng.permutation(n_cases)
    latents = latents[order]
    case_ids = [f"case_{i:04d}" for i in range(n_cases)]
    truth = pd.DataFrame(
        {
            "index": np.arange(n_cases),
            "case_id": case_ids,
            "perturbation": np.asarray(kinds)[order],
            "iterations": iters[order],
            "voxels_changed": voxels[order],
        }
    )
    return SimulatedRun(latents=latents, truth=truth, case_ids=case_ids)
