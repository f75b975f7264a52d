"""Styles: the clusters of the latent map, found with HDBSCAN around an explicit main mode.

Why not default HDBSCAN on raw λ: the L1 prior pulls every clean case towards λ = 0, so the clean cases
form one *diffuse* cloud (spread 0.05–0.3) while label errors drift away from it in a few directions,
further for bigger errors (paper §3–4.1, Fig. 2). Density clustering on raw λ with small clusters either
shatters the clean cloud into many fragments (its density fluctuates as much as anything else) or grows
the main cluster along the path of a style that leaves it continuously. On simulated latents
(:mod:`.simulate`, 10 seeds each) ``HDBSCAN(min_cluster_size=5)`` on raw λ reaches a mean ARI against
normal/eroded/dilated of −0.06 to 0.15 at N = 60–100 (the prototype's ARI ≈ 0) and 0.35–0.77 at
N = 200–400, falling to ≈ 0 on some seeds; this method 0.60–0.83 on every (N, d) tried.

The method here (``METHOD``) keeps HDBSCAN for the density structure but gives it a space that encodes
what the paper says about the geometry:

1. **Main mode**: a robust location and scatter of the majority of cases (Minimum Covariance
   Determinant, shrunk towards isotropic when N is small relative to d, calibrated so that the median
   squared Mahalanobis distance is the χ²_d median). A case's *robust distance* r is its Mahalanobis
   distance; the main mode is the ellipsoid r ≤ R with R² = χ²_d(``main_quantile``). Working in these
   whitened units makes every later choice independent of the λ scale, of anisotropy and of d.
2. **Feature map** φ: inside the ellipsoid φ is the whitened vector itself; outside it the radius is
   moved out by a gap and compressed logarithmically, ``R + gap + R·log(r/R)``. The gap (twice the
   longest edge of the main mode's own mutual-reachability spanning tree, so it is larger than any
   distance at which the main mode holds together) stops HDBSCAN from growing the main cluster along a
   style's path; the log keeps a style that spreads with its radius (more iterations, further out)
   in one piece.
3. **HDBSCAN** on φ (``prediction_data=True``), then the clusters whose centroid lies inside the
   ellipsoid, and the unclustered cases inside it, are the main mode (they are fragments of one diffuse
   cloud, not styles). Every other cluster is a style. Cases outside the ellipsoid are never main:
   unclustered, or counted by HDBSCAN in a main-mode cluster only because they detached from it late,
   they are outliers (with their GLOSH outlier scores).
4. The **main style** is the style that contains λ = 0 (assigned through the same pipeline) or, if none
   does, the one whose centroid is nearest to it. It gets numeric id 0 and the key ``"main"``; other
   styles are numbered 1.. by decreasing size; outliers are -1 / ``"outlier"``.

Defaults scale with N: ``min_cluster_size = max(3, round(0.03 N))`` (the paper's error families are
~7.5 % of N each, and a style must survive losing its members closest to the main mode) and
``min_samples = 2`` (styles are small and sparse; the main mode no longer needs smoothing because
step 3 merges its fragments). The styles document records every setting and the fitted space.

GLOSH scores isolation *relative to the clusters*: a case inside a tight style scores low even when
the whole style is an error family; its style and ‖λ‖ carry that information.

Everything is deterministic (the MCD starts come from a fixed seed), so re-running on the same latents gives
the same styles; :func:`assign_styles` places new latents with ``hdbscan.approximate_predict``.

Example:
    >>> from hypersort_ray.analysis.simulate import simulate_latents
    >>> sim = simulate_latents(n_cases=120, latent_dim=2, seed=0)
    >>> model = discover_styles(sim.latents, sim.case_ids)
    >>> model.main.key, model.labels.shape
    ('main', (120,))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hdbscan
import numpy as np
from hdbscan.plots import CondensedTree
from hdbscan.prediction import PredictionData
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist
from scipy.stats import chi2

__all__ = [
    "MAIN_ID",
    "MAIN_KEY",
    "METHOD",
    "OUTLIER_ID",
    "OUTLIER_KEY",
    "MainModeSpace",
    "Style",
    "StyleModel",
    "assign_styles",
    "default_min_cluster_size",
    "default_min_samples",
    "discover_styles",
    "fit_main_mode_space",
    "style_key",
]

METHOD = "hdbscan-main-mode"
MAIN_ID, MAIN_KEY = 0, "main"
OUTLIER_ID, OUTLIER_KEY = -1, "outlier"
DEFAULT_MAIN_QUANTILE = 0.99
# The spanning tree that measures how the main mode holds together uses at most this many of its
# cases (O(n²) distances); a deterministic subsample is plenty to find its longest edges.
_MAX_CORE_POINTS = 1500
# Cases inside this χ² quantile are the main mode's core for that measurement.
_CORE_QUANTILE = 0.9
# The medoid is searched among this many members nearest the centroid (exact in practice, O(k·n)).
_MEDOID_CANDIDATES = 256


# ------------------------------------------------------------------------------------------ defaults
def default_min_cluster_size(n_cases: int) -> int:
    """Smallest style HDBSCAN may report: 3 % of the cases, at least 3.

    Args:
        n_cases: number of cases N.
    """
    return max(3, int(round(0.03 * n_cases)))


def default_min_samples(min_cluster_size: int) -> int:
    """Neighbours in HDBSCAN's core distance: 2, because styles are small and sparse.

    Args:
        min_cluster_size: the min_cluster_size in use (a style cannot need more neighbours than members).
    """
    return max(1, min(2, min_cluster_size))


def style_key(numeric_id: int) -> str:
    """``0 -> "main"``, ``-1 -> "outlier"``, ``k -> "k"`` (the ids the CLI accepts)."""
    if numeric_id == MAIN_ID:
        return MAIN_KEY
    if numeric_id == OUTLIER_ID:
        return OUTLIER_KEY
    return str(int(numeric_id))


# ------------------------------------------------------------------------------------- feature space
@dataclass(frozen=True)
class MainModeSpace:
    """The feature map φ of the module docstring, fitted on one set of latents.

    Attributes:
        center: robust centre of the main mode, shape (d,).
        whitening: W with robust distance ``‖W (λ - center)‖``, shape (d, d).
        radius: R, the main mode's boundary in robust-distance units.
        gap: how far cases outside the main mode are moved out (robust-distance units).
        connect: longest mutual-reachability edge that holds the main mode's core together.
        scatter: how the scatter was estimated (``mcd``, ``isotropic``).
    """

    center: np.ndarray
    whitening: np.ndarray
    radius: float
    gap: float
    connect: float
    scatter: str

    def whiten(self, latents: np.ndarray) -> np.ndarray:
        """Whitened coordinates ``W (λ - center)``.

        Args:
            latents: (n, d) latent vectors.
        """
        return (np.asarray(latents, dtype=np.float64) - self.center) @ self.whitening.T

    def robust_distance(self, latents: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each latent to the main mode.

        Args:
            latents: (n, d) latent vectors.
        """
        return np.linalg.norm(self.whiten(latents), axis=1)

    def transform(self, latents: np.ndarray) -> np.ndarray:
        """φ(λ): whitened inside the main mode; gap + log-compressed radius outside.

        Args:
            latents: (n, d) latent vectors.
        """
        z = self.whiten(latents)
        r = np.linalg.norm(z, axis=1)
        outside = r > self.radius
        scale = np.ones_like(r)
        ro = r[outside]
        scale[outside] = (self.radius + self.gap + self.radius * np.log(ro / self.radius)) / ro
        return z * scale[:, None]

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for the styles document."""
        return {
            "scatter": self.scatter,
            "center": _floats(self.center),
            "main_radius": round(float(self.radius), 6),
            "gap": round(float(self.gap), 6),
            "main_connectivity": round(float(self.connect), 6),
        }


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _c_steps(x: np.ndarray, subset: np.ndarray, h: int, max_steps: int = 30) -> tuple[float, np.ndarray]:
    """Concentration steps of FastMCD from one starting subset: (log det of the scatter, subset)."""
    logdet = np.inf
    for _ in range(max_steps):
        sub = x[subset]
        mean = sub.mean(axis=0)
        cov = np.cov(sub, rowvar=False).reshape(x.shape[1], x.shape[1])
        sign, new_logdet = np.linalg.slogdet(cov)
        if sign <= 0:
            return -np.inf, subset  # an exact fit: h cases on a hyperplane, nothing beats it
        diff = x - mean
        dist = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
        new_subset = np.sort(np.argpartition(dist, h - 1)[:h])
        if new_logdet >= logdet - 1e-12 and np.array_equal(new_subset, subset):
            break
        subset, logdet = new_subset, new_logdet
    return logdet, subset


def _mcd(x: np.ndarray, n_starts: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Minimum Covariance Determinant location and scatter (FastMCD C-steps, then one reweighting).

    A small, deterministic version: sklearn's ``MinCovDet`` spends ~1.5 s per call in input validation
    on these sizes. Starts: the half of the cases nearest the origin (the paper's prior for the main
    mode), nearest the coordinate-wise median, and random (d+1)-subsets from a fixed seed.
    """
    n, d = x.shape
    h = (n + d + 1) // 2
    rng = np.random.default_rng(0)
    starts = [
        np.sort(np.argsort(np.linalg.norm(x, axis=1))[:h]),
        np.sort(np.argsort(np.linalg.norm(x - np.median(x, axis=0), axis=1))[:h]),
    ]
    for _ in range(n_starts):
        seed_rows = rng.choice(n, size=min(d + 1, n), replace=False)
        mean = x[seed_rows].mean(axis=0)
        starts.append(np.sort(np.argsort(np.linalg.norm(x - mean, axis=1))[:h]))
    best_logdet, best = np.inf, starts[0]
    for start in starts:
        logdet, subset = _c_steps(x, start, h)
        if logdet < best_logdet:
            best_logdet, best = logdet, subset
    mean = x[best].mean(axis=0)
    cov = np.cov(x[best], rowvar=False).reshape(d, d)
    # Reweighting: every case within the 97.5 % ellipsoid of the raw estimate (after a median-based
    # consistency correction) contributes; this recovers efficiency lost by using half the cases.
    try:
        diff = x - mean
        dist = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
        dist *= chi2.median(d) / max(float(np.median(dist)), 1e-300)
        keep = dist <= chi2.ppf(0.975, d)
        if keep.sum() > d:
            mean = x[keep].mean(axis=0)
            cov = np.cov(x[keep], rowvar=False).reshape(d, d)
    except np.linalg.LinAlgError:
        pass
    return mean, cov


def _robust_scatter(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Robust centre and scatter of the majority of cases.

    MCD tolerates up to half the cases being off the main mode. With few cases per dimension its
    scatter is noisy, so it is shrunk towards isotropic (weight 2d/N); tiny runs or degenerate data
    fall back to an isotropic scatter around the coordinate-wise median.
    """
    n, d = latents.shape
    if n >= max(2 * d + 2, 8):
        try:
            center, cov = _mcd(latents)
            shrink = min(1.0, 2.0 * d / n)
            cov = (1.0 - shrink) * cov + shrink * (np.trace(cov) / d) * np.eye(d)
            if np.all(np.isfinite(cov)) and np.trace(cov) > 0:
                return center, cov, "mcd"
        except np.linalg.LinAlgError:
            pass
    center = np.median(latents, axis=0)
    var = float(np.median(np.sum((latents - center) ** 2, axis=1))) / max(d, 1)
    return center, np.eye(d) * var, "isotropic"


def _whitening(cov: np.ndarray) -> np.ndarray | None:
    """Symmetric inverse square root; tiny eigenvalues are floored so collapsed axes stay finite."""
    w, v = np.linalg.eigh(cov)
    if not np.isfinite(w).all() or w.max() <= 0:
        return None
    w = np.maximum(w, 1e-2 * w.max())
    return (v / np.sqrt(w)) @ v.T


def _main_connectivity(z: np.ndarray, r: np.ndarray, min_samples: int) -> float:
    """Longest edge of the mutual-reachability spanning tree of the main mode's core.

    Within the main mode, HDBSCAN's hierarchy splits at distances up to this value; a gap wider than it
    cannot be bridged by main-mode cases alone.
    """
    core = z[r <= np.sqrt(chi2.ppf(_CORE_QUANTILE, z.shape[1]))]
    if len(core) > _MAX_CORE_POINTS:
        core = core[np.linspace(0, len(core) - 1, _MAX_CORE_POINTS).astype(int)]
    if len(core) < 3:
        return 0.0
    dist = cdist(core, core)
    k = min(max(min_samples, 1), len(core) - 1)
    core_dist = np.sort(dist, axis=1)[:, k]
    reach = np.maximum(dist, np.maximum(core_dist[:, None], core_dist[None, :]))
    np.fill_diagonal(reach, 0.0)
    edges = minimum_spanning_tree(reach).data
    return float(edges.max()) if edges.size else 0.0


def fit_main_mode_space(
    latents: np.ndarray, min_samples: int, main_quantile: float = DEFAULT_MAIN_QUANTILE
) -> MainModeSpace:
    """Estimate the main mode and build φ.

    Args:
        latents: (N, d) latents.
        min_samples: HDBSCAN's min_samples (the connectivity uses the same core distance).
        main_quantile: the main mode is the χ²_d(main_quantile) ellipsoid of the robust distance.
    """
    latents = np.asarray(latents, dtype=np.float64)
    d = latents.shape[1]
    center, cov, scatter = _robust_scatter(latents)
    white = _whitening(cov)
    if white is None:  # every latent identical: any unit works, nothing will be outside
        white, scatter = np.eye(d), "degenerate"
    z = (latents - center) @ white.T
    # Calibrate so the median squared distance is the χ² median: makes R mean what it says even when
    # MCD's consistency factor is off (small N, shrinkage).
    m2 = float(np.median(np.sum(z**2, axis=1)))
    if m2 > 0:
        factor = np.sqrt(chi2.median(d) / m2)
        white, z = white * factor, z * factor
    r = np.linalg.norm(z, axis=1)
    radius = float(np.sqrt(chi2.ppf(main_quantile, d)))
    connect = _main_connectivity(z, r, min_samples)
    return MainModeSpace(center, white, radius, 2.0 * connect, connect, scatter)


# --------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Style:
    """One style (a cluster of the latent map).

    Attributes:
        numeric_id: 0 for the main style, 1.. by decreasing size.
        key: ``"main"`` or ``str(numeric_id)``: what the CLI's ``--style`` accepts.
        name: human label (``main``, ``style 1``).
        size: number of members.
        centroid: mean latent of the members.
        latent: the latent to segment with in this style: λ = 0 for the main style (the paper's
            canonical choice, where the L1 prior puts the main mode), the centroid otherwise.
        medoid_index: sample index of the member nearest to all others (a real, inspectable case).
        medoid_case_id: its case id.
        member_indices: sample indices of the members.
        members: case ids of the members.
        mean_norm: mean ‖λ‖₂ of the members.
    """

    numeric_id: int
    key: str
    name: str
    size: int
    centroid: list[float]
    latent: list[float]
    medoid_index: int
    medoid_case_id: str
    member_indices: list[int]
    members: list[str]
    mean_norm: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "numeric_id": self.numeric_id,
            "name": self.name,
            "size": self.size,
            "centroid": self.centroid,
            "latent": self.latent,
            "medoid_index": self.medoid_index,
            "medoid_case_id": self.medoid_case_id,
            "mean_norm": self.mean_norm,
            "member_indices": self.member_indices,
            "members": self.members,
        }


@dataclass
class StyleModel:
    """Styles of one set of latents, and what is needed to place new latents among them.

    Attributes:
        labels: numeric style id per case (row order of the input), -1 for outliers.
        outlier_scores: GLOSH outlier score per case (0 = deep inside a cluster, → 1 = isolated).
        probabilities: HDBSCAN membership strength per case.
        styles: the styles, main first, then by numeric id.
        method: ``METHOD`` (or ``"trivial"`` when there are too few cases to cluster).
        params: every setting used (defaults resolved), for the styles document and the report.
        space: the feature map (None for the trivial model).
        clusterer: the fitted HDBSCAN (None for the trivial model).
        label_map: HDBSCAN label -> numeric style id.
        main_mode_id: numeric id of the style that the main-mode ellipsoid forms.
    """

    labels: np.ndarray
    outlier_scores: np.ndarray
    probabilities: np.ndarray
    styles: list[Style]
    method: str
    params: dict[str, Any]
    space: MainModeSpace | None = None
    clusterer: hdbscan.HDBSCAN | None = None
    label_map: dict[int, int] = field(default_factory=dict)
    main_mode_id: int = MAIN_ID

    @property
    def main(self) -> Style:
        """The main style."""
        return self.style(MAIN_KEY)

    @property
    def n_outliers(self) -> int:
        return int(np.sum(self.labels == OUTLIER_ID))

    @property
    def keys(self) -> list[str]:
        """Style key per case (``main``, ``1``, ..., ``outlier``)."""
        return [style_key(int(v)) for v in self.labels]

    def style(self, key: str | int) -> Style:
        """Look a style up by key (``"main"``, ``"2"``) or numeric id.

        Args:
            key: style key or numeric id.

        Raises:
            KeyError: no such style (message lists the known keys).
        """
        wanted = (
            style_key(int(key))
            if isinstance(key, int | np.integer) or str(key).lstrip("-").isdigit()
            else key
        )
        for s in self.styles:
            if s.key == wanted:
                return s
        raise KeyError(f"style {key!r} not found; known styles: {', '.join(s.key for s in self.styles)}")

    def assign(self, latents: np.ndarray) -> np.ndarray:
        """Numeric style id of new latents (see :func:`assign_styles`)."""
        return assign_styles(self, latents)

    def to_json(self) -> dict[str, Any]:
        """The styles document (``RunDir.write_styles`` adds the checkpoint's identity)."""
        return {
            "method": self.method,
            "params": self.params,
            "main_style": MAIN_KEY,
            "main_numeric_id": MAIN_ID,
            "n_styles": len(self.styles),
            "n_outliers": self.n_outliers,
            "styles": [s.to_json() for s in self.styles],
        }


# ------------------------------------------------------------------------------------ hdbscan shim
def _selected_clusters(raw_tree: np.ndarray, labels: np.ndarray) -> list[int]:
    """The condensed-tree node of every label: the lowest common ancestor of its points' parents.

    hdbscan 0.8.44 takes the smallest parent id per label instead, which is wrong when the root is the
    selected cluster (``allow_single_cluster=True``): prediction data then maps a sub-cluster, and
    ``approximate_predict`` returns noise for most training points.
    """
    clusters = raw_tree[raw_tree["child_size"] > 1]
    parent_of = {int(c): int(p) for p, c in zip(clusters["parent"], clusters["child"], strict=True)}
    points = raw_tree[raw_tree["child_size"] == 1]
    point_labels = labels[points["child"]]
    selected = []
    for label in sorted(set(labels.tolist()) - {-1}):
        nodes = set(points["parent"][point_labels == label].tolist())
        # Children always have larger ids than their parents, so lifting the largest id first meets
        # at the common ancestor.
        while len(nodes) > 1:
            deepest = max(nodes)
            nodes.remove(deepest)
            nodes.add(parent_of[deepest])
        selected.append(nodes.pop())
    return selected


class _FixedSelectionTree(CondensedTree):
    def __init__(self, raw_tree: np.ndarray, labels: np.ndarray, selected: list[int]):
        super().__init__(raw_tree, labels)
        self._selected = selected

    def _select_clusters(self) -> list[int]:
        return list(self._selected)


def _repair_prediction_data(clusterer: hdbscan.HDBSCAN, features: np.ndarray, min_samples: int) -> None:
    """Rebuild prediction data with the right selected clusters (see :func:`_selected_clusters`)."""
    raw = clusterer.condensed_tree_._raw_tree
    labels = clusterer.labels_
    if not (labels >= 0).any():
        return
    tree = _FixedSelectionTree(raw, labels, _selected_clusters(raw, labels))
    clusterer.prediction_data_ = PredictionData(features, tree, min_samples, tree_type="kdtree")


# ------------------------------------------------------------------------------------------ fitting
def _medoid(latents: np.ndarray) -> int:
    """Row of the member with the smallest total distance to the others."""
    if len(latents) <= 2:
        return 0
    centroid = latents.mean(axis=0)
    candidates = np.argsort(np.linalg.norm(latents - centroid, axis=1))[:_MEDOID_CANDIDATES]
    totals = cdist(latents[candidates], latents).sum(axis=1)
    return int(candidates[int(np.argmin(totals))])


def _make_style(
    numeric_id: int, rows: np.ndarray, latents: np.ndarray, indices: np.ndarray, ids: list[str]
) -> Style:
    members = latents[rows]
    centroid = members.mean(axis=0)
    medoid = int(rows[_medoid(members)])
    key = style_key(numeric_id)
    latent = np.zeros_like(centroid) if numeric_id == MAIN_ID else centroid
    return Style(
        numeric_id=numeric_id,
        key=key,
        name="main" if numeric_id == MAIN_ID else f"style {numeric_id}",
        size=int(rows.size),
        centroid=_floats(centroid),
        latent=_floats(latent),
        medoid_index=int(indices[medoid]),
        medoid_case_id=ids[medoid],
        member_indices=[int(indices[i]) for i in rows],
        members=[ids[i] for i in rows],
        mean_norm=float(np.linalg.norm(members, axis=1).mean()),
    )


def _check_latents(latents: np.ndarray) -> np.ndarray:
    arr = np.asarray(latents, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"latents must be a non-empty (N, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("latents contain NaN or infinite values")
    return arr


def _trivial_model(
    latents: np.ndarray, indices: np.ndarray, ids: list[str], params: dict[str, Any]
) -> StyleModel:
    """Too few cases to cluster: one main style, no outliers."""
    n = len(latents)
    rows = np.arange(n)
    style = _make_style(MAIN_ID, rows, latents, indices, ids)
    return StyleModel(
        labels=np.zeros(n, dtype=int),
        outlier_scores=np.zeros(n),
        probabilities=np.ones(n),
        styles=[style],
        method="trivial",
        params={"reason": f"{n} cases are fewer than 2 x min_cluster_size", **params},
    )


def discover_styles(
    latents: np.ndarray,
    case_ids: Sequence[str] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    min_cluster_size: int | None = None,
    min_samples: int | None = None,
    cluster_selection_method: str = "eom",
    allow_single_cluster: bool = False,
    main_quantile: float = DEFAULT_MAIN_QUANTILE,
) -> StyleModel:
    """Find the styles of a latent map (method in the module docstring).

    Args:
        latents: (N, d) latents, any d >= 1.
        case_ids: case id per row (default ``case_<row>``).
        indices: sample index per row (default ``0..N-1``).
        min_cluster_size: smallest style; default :func:`default_min_cluster_size` (3 % of N, >= 3).
        min_samples: HDBSCAN core-distance neighbours; default :func:`default_min_samples` (2).
        cluster_selection_method: ``eom`` (default) or ``leaf``.
        allow_single_cluster: passed to HDBSCAN. Off by default: the main mode is made explicit after
            clustering, and with it on, excess-of-mass tends to select the root and swallow the styles.
        main_quantile: the main mode is the χ²_d(main_quantile) ellipsoid of the robust distance.

    Returns:
        A :class:`StyleModel`; ``model.labels[i]`` is the numeric style of row i.

    Raises:
        ValueError: malformed latents or settings.
    """
    latents = _check_latents(latents)
    n, d = latents.shape
    ids = [str(c) for c in case_ids] if case_ids is not None else [f"case_{i}" for i in range(n)]
    idx = np.asarray(indices if indices is not None else np.arange(n), dtype=np.int64)
    if len(ids) != n or idx.shape != (n,):
        raise ValueError(f"{n} latents but {len(ids)} case ids and {idx.size} indices")
    if cluster_selection_method not in ("eom", "leaf"):
        raise ValueError(
            f"cluster_selection_method must be 'eom' or 'leaf', got {cluster_selection_method!r}"
        )
    if not 0.5 < main_quantile < 1:
        raise ValueError(f"main_quantile must be in (0.5, 1), got {main_quantile}")
    mcs = int(min_cluster_size) if min_cluster_size is not None else default_min_cluster_size(n)
    ms = int(min_samples) if min_samples is not None else default_min_samples(mcs)
    if mcs < 2 or ms < 1:
        raise ValueError(f"min_cluster_size must be >= 2 and min_samples >= 1, got {mcs} and {ms}")
    params: dict[str, Any] = {
        "min_cluster_size": mcs,
        "min_cluster_size_default": min_cluster_size is None,
        "min_samples": ms,
        "min_samples_default": min_samples is None,
        "cluster_selection_method": cluster_selection_method,
        "allow_single_cluster": allow_single_cluster,
        "main_quantile": main_quantile,
        "n_cases": n,
        "latent_dim": d,
    }
    if n < 2 * mcs or n <= ms:
        return _trivial_model(latents, idx, ids, params)

    space = fit_main_mode_space(latents, ms, main_quantile)
    features = space.transform(latents)
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=mcs,
        min_samples=ms,
        cluster_selection_method=cluster_selection_method,
        allow_single_cluster=allow_single_cluster,
        prediction_data=True,
    ).fit(features)
    if allow_single_cluster:
        _repair_prediction_data(clusterer, features, ms)
    params["space"] = space.describe()

    raw = clusterer.labels_.astype(int)
    radius_inside = space.robust_distance(latents) <= space.radius
    # Clusters centred inside the main-mode ellipsoid are fragments of the one diffuse main cloud.
    main_mode_labels = {
        int(c)
        for c in np.unique(raw[raw >= 0])
        if np.linalg.norm(features[raw == c].mean(axis=0)) <= space.radius
    }
    # Provisional groups: "M" = main mode, else the HDBSCAN label; -1 = outlier.
    group_of = np.array(_groups(raw, radius_inside, main_mode_labels), dtype=object)
    groups = {g: np.flatnonzero(group_of == g) for g in set(group_of.tolist()) - {-1}}
    if not groups:  # nothing in the main mode and no cluster: no structure to report
        return _trivial_model(latents, idx, ids, {**params, "reason": "no cluster and no main mode found"})
    main_group = _main_group(groups, latents, space, clusterer, main_mode_labels)
    # Numeric ids: main 0, others by decreasing size (ties: nearer the origin first).
    others = sorted(
        (g for g in groups if g != main_group),
        key=lambda g: (-groups[g].size, float(np.linalg.norm(latents[groups[g]].mean(axis=0)))),
    )
    numeric = {main_group: MAIN_ID, **{g: k + 1 for k, g in enumerate(others)}}
    labels = np.array([numeric[g] if g != -1 else OUTLIER_ID for g in group_of.tolist()], dtype=int)
    main_mode_id = numeric.get("M", MAIN_ID)
    label_map = {lab: main_mode_id for lab in main_mode_labels}
    label_map.update({g: numeric[g] for g in groups if g != "M"})
    styles = [_make_style(numeric[g], groups[g], latents, idx, ids) for g in [main_group, *others]]

    scores = np.nan_to_num(np.asarray(clusterer.outlier_scores_, dtype=np.float64), nan=0.0, posinf=1.0)
    probs = np.asarray(clusterer.probabilities_, dtype=np.float64)
    return StyleModel(
        labels=labels,
        outlier_scores=scores,
        probabilities=probs,
        styles=styles,
        method=METHOD,
        params=params,
        space=space,
        clusterer=clusterer,
        label_map=label_map,
        main_mode_id=main_mode_id,
    )


def _approximate_labels(clusterer: hdbscan.HDBSCAN, features: np.ndarray) -> np.ndarray:
    """``hdbscan.approximate_predict`` labels; no clusters at all means every point is noise."""
    with warnings.catch_warnings():
        # Expected when every case sits in the main mode unclustered (e.g. identical latents).
        warnings.filterwarnings("ignore", message="Clusterer does not have any defined clusters")
        labels, _ = hdbscan.approximate_predict(clusterer, features)
    return np.asarray(labels, dtype=int)


def _groups(raw: np.ndarray, inside: np.ndarray, main_mode_labels: set[int]) -> list[Any]:
    """Main mode ("M"), style (HDBSCAN label) or outlier (-1) per case.

    The main mode is the ellipsoid: a case inside it that HDBSCAN left unclustered or put in a
    main-mode fragment belongs to it, a case outside it never does. HDBSCAN counts every point that
    detached from a cluster after the cluster's birth as a member, so without the second rule the main
    cluster would also claim isolated cases far out along a style's path.
    """
    out: list[Any] = []
    for lab, ins in zip(raw.tolist(), inside.tolist(), strict=True):
        main_like = lab < 0 or lab in main_mode_labels
        if main_like:
            out.append("M" if ins else -1)
        else:
            out.append(int(lab))
    return out


def _main_group(
    groups: dict[Any, np.ndarray],
    latents: np.ndarray,
    space: MainModeSpace,
    clusterer: hdbscan.HDBSCAN,
    main_mode_labels: set[int],
) -> Any:
    """The group that contains λ = 0, else the one whose centroid is nearest to it."""
    origin = np.zeros((1, latents.shape[1]))
    raw = _approximate_labels(clusterer, space.transform(origin))
    inside = space.robust_distance(origin) <= space.radius
    group = _groups(raw, inside, main_mode_labels)[0]
    if group in groups:
        return group
    return min(groups, key=lambda g: float(np.linalg.norm(latents[groups[g]].mean(axis=0))))


# ---------------------------------------------------------------------------------------- assigning
def assign_styles(model: StyleModel, new_latents: np.ndarray) -> np.ndarray:
    """Numeric style id of new latents, the way the training latents were labelled.

    ``hdbscan.approximate_predict`` places each latent in the fitted hierarchy (in φ-space); clusters
    that are main-mode fragments map to the main mode, and an unclustered latent inside the main-mode
    ellipsoid belongs to it, exactly as in :func:`discover_styles`.

    Args:
        model: a fitted :class:`StyleModel`.
        new_latents: (n, d) latents with the model's d.

    Returns:
        (n,) numeric style ids (-1 = outlier).

    Raises:
        ValueError: wrong latent dimension or non-finite values.
    """
    new = _check_latents(new_latents)
    d = int(model.params.get("latent_dim", new.shape[1]))
    if new.shape[1] != d:
        raise ValueError(f"latents have dimension {new.shape[1]}, the styles were fitted with {d}")
    if model.clusterer is None or model.space is None:
        return np.full(len(new), MAIN_ID, dtype=int)
    raw = _approximate_labels(model.clusterer, model.space.transform(new))
    inside = model.space.robust_distance(new) <= model.space.radius
    main_mode_labels = {lab for lab, sid in model.label_map.items() if sid == model.main_mode_id}
    numeric = {**model.label_map, "M": model.main_mode_id, -1: OUTLIER_ID}
    groups = _groups(raw, inside, main_mode_labels)
    return np.array([numeric.get(g, OUTLIER_ID) for g in groups], dtype=int)
