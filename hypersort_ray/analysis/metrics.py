"""How well the latent map finds known label problems (the document ``RunDir.analysis.metrics_json``).

A truth CSV names cases by ``index`` and/or ``case_id`` and carries a numeric column (e.g.
``voxels_changed``, the paper's V1→V2 measure) and/or a categorical one (e.g. ``perturbation`` kind or
a rater). ``hypersort synth`` writes ``index,case_id,perturbation,iterations,voxels_changed``.

For every score column (higher = more suspicious) the metrics are: Spearman correlation with the
numeric column (paper: 0.2166 for ‖λ‖ on TotalSegmentator), AUROC and average precision for
perturbed-vs-clean, and AUROC per perturbation kind (that kind vs clean cases). For the styles: the
adjusted Rand index against the kind, which style each kind mostly landed in, and the geometry check of
the paper's Fig. 2: the mean direction of each kind relative to the main style's centroid, and whether
eroded and dilated sit on opposite sides (cosine < 0). Undefined numbers (one class only, constant
scores) are ``null`` with a note, never an error.

The document::

    {"truth": {source, joined_on, kind_column, numeric_column, numeric_columns, clean_value,
               n_evaluated, n_missing_truth, missing_truth_case_ids},
     "counts": {kind: n}, "n_perturbed": int, "n_clean": int,
     "scores": {column: {n, auroc, average_precision, spearman, spearman_p,
                         spearman_by_column: {numeric column: {rho, p}}, auroc_by_kind: {kind: auroc}}},
     "styles": {target, ari, ari_without_outliers, crosstab: {kind: {style: n}},
                majority_style: {kind: style}, eroded_dilated_separated: bool},
     "directions": {reference, cosines: {"a|b": cos}, opposite_sides: {kinds, cosine, opposite} | null},
     "notes": [str]}

Example:
    >>> import pandas as pd
    >>> truth = pd.DataFrame({"index": [0, 1, 2], "perturbation": ["none", "eroded", "none"]})
    >>> aligned = align_truth(truth, [0, 1, 2], ["a", "b", "c"])
    >>> aligned.kind_column, aligned.perturbed.tolist()
    ('perturbation', [False, True, False])
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

from hypersort_ray.data.truth import listing as _listing
from hypersort_ray.data.truth import perturbed_flags, truth_columns
from hypersort_ray.errors import DataError

__all__ = [
    "AlignedTruth",
    "align_truth",
    "compute_metrics",
    "direction_cosines",
]

# Pairs of kinds the paper expects on opposite sides of the main style.
OPPOSITE_PAIRS = (("eroded", "dilated"), ("partial_eroded", "partial_dilated"))


# ------------------------------------------------------------------------------------------- align
@dataclass
class AlignedTruth:
    """Truth rows matched to the run's cases.

    Attributes:
        rows: run row positions that have truth (into the run's index/case_id arrays).
        indices: the sample index of each of those rows.
        frame: truth values for those rows, same order as ``rows``.
        joined_on: ``index`` or ``case_id``.
        kind_column: categorical column used for kinds (None if none).
        numeric_columns: numeric columns (primary first).
        clean_value: the kind value meaning "clean" (None if the kinds have none).
        perturbed: bool per aligned row (None when the truth cannot say clean vs perturbed).
        missing_case_ids: run cases without truth.
        source: file name for messages.
    """

    rows: np.ndarray
    indices: np.ndarray
    frame: pd.DataFrame
    joined_on: str
    kind_column: str | None
    numeric_columns: list[str]
    clean_value: str | None
    perturbed: np.ndarray | None
    missing_case_ids: list[str] = field(default_factory=list)
    source: str = "truth"

    @property
    def numeric_column(self) -> str | None:
        return self.numeric_columns[0] if self.numeric_columns else None

    @property
    def kinds(self) -> np.ndarray | None:
        """Kind per aligned row (str), or clean/perturbed when there is no kind column."""
        if self.kind_column is not None:
            return self.frame[self.kind_column].astype(str).to_numpy()
        if self.perturbed is not None:
            return np.where(self.perturbed, "perturbed", "clean")
        return None


def align_truth(
    truth: pd.DataFrame,
    indices: Sequence[int] | np.ndarray,
    case_ids: Sequence[str],
    source: str = "truth",
) -> AlignedTruth:
    """Match truth rows to the run's cases (by ``index`` if the truth has it, else by ``case_id``).

    Args:
        truth: from :func:`hypersort_ray.data.truth.read_truth_csv`.
        indices: the run's sample indices (row order of the run).
        case_ids: the run's case ids, row-aligned.
        source: file name used in messages.

    Returns:
        An :class:`AlignedTruth` over the run cases that have truth (a warning lists the others).

    Raises:
        DataError: truth names cases the run does not have, or index and case_id disagree with the run.
    """
    idx = [int(i) for i in indices]
    ids = [str(c) for c in case_ids]
    if "index" in truth.columns:
        joined_on, keys, run_keys = "index", truth["index"].astype(int).tolist(), idx
    else:
        joined_on, keys, run_keys = "case_id", truth["case_id"].astype(str).tolist(), ids
    position = {k: row for row, k in enumerate(run_keys)}
    unknown = [k for k in keys if k not in position]
    if unknown:
        raise DataError(f"{source}: {len(unknown)} {joined_on} value(s) not in the run: {_listing(unknown)}")
    rows = np.array([position[k] for k in keys], dtype=np.int64)
    if joined_on == "index" and "case_id" in truth.columns:
        clash = [
            f"index {i}: truth {t!r} vs run {ids[r]!r}"
            for i, t, r in zip(keys, truth["case_id"].astype(str), rows, strict=True)
            if t != ids[r]
        ]
        # Most ids disagreeing means another dataset's truth; a few means a naming quirk (e.g. a
        # datalist that strips an nnU-Net "_0000" suffix from "case_0000").
        if len(clash) > len(keys) // 2:
            raise DataError(
                f"{source}: case_id disagrees with the run for {len(clash)} of {len(keys)} cases: "
                f"{_listing(clash)}; is this the truth of another dataset?"
            )
        if clash:
            warnings.warn(
                f"{source}: joined on index; case_id differs for {len(clash)} case(s): {_listing(clash)}",
                stacklevel=2,
            )
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    frame = truth.iloc[order].reset_index(drop=True)
    missing = [ids[r] for r in sorted(set(range(len(ids))) - set(rows.tolist()))]
    if missing:
        warnings.warn(
            f"{source}: no truth for {len(missing)} of {len(ids)} run case(s) ({_listing(missing)}); "
            "metrics use the cases that have truth",
            stacklevel=2,
        )
    kind, numeric = truth_columns(frame)
    perturbed, clean = perturbed_flags(frame, kind, numeric)
    sample_indices = np.asarray([idx[r] for r in rows], dtype=np.int64)
    return AlignedTruth(
        rows, sample_indices, frame, joined_on, kind, numeric, clean, perturbed, missing, source
    )


# ----------------------------------------------------------------------------------------- metrics
def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    if y.size == 0 or y.all() or not y.any():
        return None
    return _finite(roc_auc_score(y, score))


def _average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    if y.size == 0 or y.all() or not y.any():
        return None
    return _finite(average_precision_score(y, score))


def _spearman(score: np.ndarray, target: np.ndarray) -> tuple[float | None, float | None]:
    ok = np.isfinite(score) & np.isfinite(target)
    if ok.sum() < 3 or np.ptp(score[ok]) == 0 or np.ptp(target[ok]) == 0:
        return None, None
    res = spearmanr(score[ok], target[ok])
    return _finite(res.statistic), _finite(res.pvalue)


def _score_metrics(score: np.ndarray, truth: AlignedTruth) -> dict[str, Any]:
    """AUROC/AP/Spearman of one score column on the aligned rows (NaN scores dropped)."""
    ok = np.isfinite(score)
    out: dict[str, Any] = {"n": int(ok.sum())}
    if truth.perturbed is not None:
        y = truth.perturbed[ok]
        out["auroc"] = _auroc(y, score[ok])
        out["average_precision"] = _average_precision(y, score[ok])
    else:
        out["auroc"] = out["average_precision"] = None
    by_column = {}
    for column in truth.numeric_columns:
        target = pd.to_numeric(truth.frame[column], errors="coerce").to_numpy(dtype=np.float64)
        rho, p = _spearman(score, target)
        by_column[column] = {"rho": rho, "p": p}
    primary = by_column.get(truth.numeric_column or "", {})
    out["spearman"] = primary.get("rho")
    out["spearman_p"] = primary.get("p")
    out["spearman_by_column"] = by_column
    if truth.kind_column is not None and truth.perturbed is not None:
        kinds = truth.kinds
        clean = ~truth.perturbed
        per_kind = {}
        for kind in sorted(set(kinds[truth.perturbed].tolist())):
            sel = ok & (clean | (kinds == kind))
            per_kind[kind] = _auroc((kinds == kind)[sel], score[sel])
        out["auroc_by_kind"] = per_kind
    return out


def direction_cosines(
    latents: np.ndarray, kinds: np.ndarray, reference: np.ndarray, exclude: str | None = None
) -> dict[str, float | None]:
    """Cosine between the mean directions of every pair of kinds, relative to a reference point.

    Each case's direction is the unit vector from ``reference`` (the main style's centroid) to its
    latent; a kind's direction is the mean of its cases' unit vectors.

    Args:
        latents: (n, d) latents of the aligned cases.
        kinds: kind per case.
        reference: (d,) point the directions start from.
        exclude: a kind to leave out (the clean value).

    Returns:
        ``{"a|b": cosine}`` for each pair of kinds (sorted names), None when a mean direction vanishes.
    """
    diff = np.asarray(latents, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    unit = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
    means = {}
    for kind in sorted(set(kinds.tolist()) - {exclude}):
        means[kind] = unit[kinds == kind].mean(axis=0)
    out: dict[str, float | None] = {}
    for a, b in itertools.combinations(sorted(means), 2):
        na, nb = np.linalg.norm(means[a]), np.linalg.norm(means[b])
        out[f"{a}|{b}"] = _finite(means[a] @ means[b] / (na * nb)) if na > 0 and nb > 0 else None
    return out


def _style_metrics(styles: np.ndarray, truth: AlignedTruth, main_key: str) -> dict[str, Any]:
    kinds = truth.kinds
    if kinds is None:
        return {"ari": None, "note": "the truth has no kind and no clean/perturbed distinction"}
    out: dict[str, Any] = {"target": truth.kind_column or "perturbed"}
    out["ari"] = _finite(adjusted_rand_score(kinds, styles))
    clustered = styles != "outlier"
    out["ari_without_outliers"] = (
        _finite(adjusted_rand_score(kinds[clustered], styles[clustered])) if clustered.sum() > 1 else None
    )
    table = pd.crosstab(pd.Series(kinds, name="kind"), pd.Series(styles, name="style"))
    out["crosstab"] = {k: {s: int(v) for s, v in row.items() if v} for k, row in table.iterrows()}
    majority = {k: str(row.idxmax()) for k, row in table.iterrows()}
    out["majority_style"] = majority
    for a, b in OPPOSITE_PAIRS:
        if a in majority and b in majority:
            # "Separated": each family mostly outside the main style, and not in the same group.
            out[f"{a}_{b}_separated"] = bool(
                majority[a] != main_key and majority[b] != main_key and majority[a] != majority[b]
            )
    return out


def compute_metrics(
    table: pd.DataFrame,
    truth: AlignedTruth,
    latents: np.ndarray,
    styles: Sequence[str],
    main_centroid: np.ndarray,
    score_columns: Sequence[str] | None = None,
    main_key: str = "main",
) -> dict[str, Any]:
    """All metrics of the run against the truth.

    Args:
        table: the suspicion table (any row order; matched on ``index``).
        truth: from :func:`align_truth` (its ``rows`` index the run's row order).
        latents: (N, d) latents in the run's row order.
        styles: style key per run row.
        main_centroid: (d,) centroid of the main style (reference for directions).
        score_columns: columns to evaluate (default: every numeric column except ``index``).
        main_key: the main style's key.

    Returns:
        The metrics document (see the module docstring); undefined values are None.
    """
    latents = np.asarray(latents, dtype=np.float64)
    styles = np.asarray([str(s) for s in styles])
    rows = truth.rows
    # The table is ranked; look its rows up by sample index in the truth's order.
    by_index = table.set_index("index")
    missing = sorted(set(truth.indices.tolist()) - set(by_index.index.tolist()))
    if missing:
        raise ValueError(f"suspicion table lacks sample indices {_listing(missing)}")
    aligned_table = by_index.loc[truth.indices]
    if score_columns is None:
        score_columns = [c for c in aligned_table.columns if pd.api.types.is_numeric_dtype(aligned_table[c])]
    notes: list[str] = []
    n_eval = len(rows)
    doc: dict[str, Any] = {
        "truth": {
            "source": truth.source,
            "joined_on": truth.joined_on,
            "kind_column": truth.kind_column,
            "numeric_column": truth.numeric_column,
            "numeric_columns": truth.numeric_columns,
            "clean_value": truth.clean_value,
            "n_evaluated": n_eval,
            "n_missing_truth": len(truth.missing_case_ids),
            "missing_truth_case_ids": truth.missing_case_ids[:50],
        }
    }
    kinds = truth.kinds
    if kinds is not None:
        doc["counts"] = {str(k): int(v) for k, v in pd.Series(kinds).value_counts().sort_index().items()}
    if truth.perturbed is not None:
        doc["n_perturbed"] = int(truth.perturbed.sum())
        doc["n_clean"] = int((~truth.perturbed).sum())
        if doc["n_perturbed"] == 0 or doc["n_clean"] == 0:
            notes.append(
                "only one class (all clean or all perturbed): AUROC and average precision are undefined"
            )
    else:
        notes.append(
            "the truth cannot tell clean from perturbed cases: AUROC and average precision are undefined"
        )
    if not truth.numeric_columns:
        notes.append("no numeric truth column: no Spearman correlation")

    doc["scores"] = {
        column: _score_metrics(aligned_table[column].to_numpy(dtype=np.float64), truth)
        for column in score_columns
    }
    aligned_styles = styles[rows]
    doc["styles"] = _style_metrics(aligned_styles, truth, main_key)
    if kinds is not None:
        clean = truth.clean_value if truth.kind_column is not None else "clean"
        cosines = direction_cosines(latents[rows], kinds, main_centroid, exclude=clean)
        opposite = None
        for a, b in OPPOSITE_PAIRS:
            key = f"{a}|{b}" if a < b else f"{b}|{a}"
            if cosines.get(key) is not None:
                opposite = {"kinds": [a, b], "cosine": cosines[key], "opposite": bool(cosines[key] < 0)}
                break
        doc["directions"] = {
            "reference": "main style centroid",
            "cosines": cosines,
            "opposite_sides": opposite,
        }
    doc["notes"] = notes
    return doc
