"""Suspicion scores per case and the ranked suspicion table (``RunDir.analysis.suspicion_csv``).

The paper's two predictors (§4.2) and the clustering's own:

* ``latent_norm``: ‖λ_n‖₂. The L1 prior puts the main annotation mode at λ = 0, so cases the shared
  network cannot fit in the main style are pushed away from the origin.
* ``mean_distance``: (1/N) Σ_m ‖λ_m − λ_n‖₂, how isolated a case is from all others.
* ``outlier_score``: GLOSH from the HDBSCAN fit (:mod:`.styles`), 0 deep inside a style, → 1 isolated.
* ``style``: the case's style key (``main``, ``1``, ..., ``outlier``).

Model-based scores (e.g. ``main_style_disagreement = 1 − Dice(UNet_main(image), label)``) are passed in
as extra columns. Convention for every score column: **higher = more suspicious**, so any of them can
rank the table.

The default ranking, ``suspicion`` (:data:`DEFAULT_SUSPICION`), combines the two kinds of evidence, each
blind where the other sees: the **model evidence** (``main_style_disagreement``: what the main style
predicts for the image disagrees with the given label, which also catches errors that are not a style,
e.g. skipped slices, that stay near λ = 0) and the **λ evidence** (``latent_norm`` of a case whose λ
left the main style: a style of its own or a gross error). Each score becomes its percentile rank among
the run's cases (scale-free, so no set-specific weights) and a case takes the larger of its model rank
and, outside the main style, its ‖λ‖ rank (:func:`combine_scores`). Inside the main style ‖λ‖ is mostly
noise (hard clean images move λ too): counting it there lowered the ranking on three of the four
benchmark sets (docs/benchmarks.md, where the rule was chosen on the whole matrix, never on one set).
Without a model only the λ evidence ranks (every case). ``flagged_by`` says which evidence flagged a
case (:func:`flagged_by`). Location columns (:data:`~.localisation.LOCATION_COLUMNS`) are not scores.

Example:
    >>> import numpy as np
    >>> z = np.array([[0.0, 0.0], [3.0, 4.0]])
    >>> latent_norm(z).tolist(), mean_distance(z).tolist()
    ([0.0, 5.0], [2.5, 2.5])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hypersort_ray.analysis.localisation import LOCATION_COLUMNS
from hypersort_ray.atomic import atomic_write_text

__all__ = [
    "BASE_COLUMNS",
    "CANDIDATES",
    "DEFAULT_SUSPICION",
    "FLAGGED_BY",
    "LAMBDA_FLAG",
    "MAIN_STYLE_DISAGREEMENT",
    "MODEL_FLAG",
    "NON_SCORE_COLUMNS",
    "OWN_VS_MAIN_DISAGREEMENT",
    "SCORE_COLUMNS",
    "SCORE_MEANINGS",
    "SUSPICION",
    "TRAIN_LOSS",
    "combine_scores",
    "flagged_by",
    "latent_norm",
    "mean_distance",
    "percentile_rank",
    "rank_cases",
    "robust_z",
    "score_columns",
    "suspicion_table",
    "write_suspicion_csv",
]

SCORE_COLUMNS = ("latent_norm", "mean_distance", "outlier_score")
#: The combined default ranking and the column that says which evidence flagged a case.
SUSPICION = "suspicion"
FLAGGED_BY = "flagged_by"
BASE_COLUMNS = ("index", "case_id", SUSPICION, FLAGGED_BY, *SCORE_COLUMNS, "style")
DEFAULT_RANK_BY = SUSPICION
# Extra score columns other modules compute (named once here, so the scorers and the report agree).
#: 1 − Dice(main-style prediction, given label) (:mod:`.model_scores`).
MAIN_STYLE_DISAGREEMENT = "main_style_disagreement"
#: 1 − Dice(the case's own UNet, the main-style UNet) (:mod:`.model_scores`).
OWN_VS_MAIN_DISAGREEMENT = "own_vs_main_disagreement"
#: each case's own training loss, averaged over the epochs (the run's per-sample loss table).
TRAIN_LOSS = "train_loss"
#: Numeric columns of the table that are not scores (never ranked by, never evaluated as one).
NON_SCORE_COLUMNS = ("index", *LOCATION_COLUMNS)
#: One sentence per score for the report (higher = more suspicious for each).
SCORE_MEANINGS = {
    SUSPICION: "the default ranking: the larger of the case's percentile rank of main_style_disagreement "
    "and, when its λ left the main style, of latent_norm, so a case stands high when the main style "
    "disagrees with its label or when it needed a style of its own far from λ = 0.",
    "latent_norm": "‖λ‖, how far training had to move the case's latent from the main annotation mode "
    "(λ = 0) to explain its label.",
    "mean_distance": "the mean distance of the case's λ to every other case's λ, how isolated it is.",
    "outlier_score": "HDBSCAN's GLOSH score: 0 deep inside a style, towards 1 for a case no style holds.",
    TRAIN_LOSS: "the case's own Dice + cross-entropy loss, averaged over the training epochs.",
    MAIN_STYLE_DISAGREEMENT: "1 − Dice between the given label and what the main style (λ = 0) predicts "
    "for the image.",
    OWN_VS_MAIN_DISAGREEMENT: "1 − Dice between the case's own-λ prediction and the main-style "
    "prediction, how much its λ changes the segmentation.",
    "test_dice": "1 − Dice between the given label and an out-of-fold plain UNet's prediction "
    "(--baselines).",
    "cleanlab": "1 − cleanlab's label quality on the same out-of-fold probabilities (--baselines).",
    "trajectory_mean_norm": "‖λ_t‖ averaged over the training epochs, the area under the case's norm "
    "curve.",
    "trajectory_path_length": "the length of the path λ travelled over the epochs.",
    "trajectory_exit": "how early λ left the main cloud for good (1: from the first epoch, 0: never).",
    "crossfit_latent_norm": "‖λ‖ fitted out of fold: the case's λ under a hyper-network that never saw "
    "it (--crossfit).",
    "crossfit_loss_drop": "how much that out-of-fold λ lowers the case's loss below the main style's "
    "(--crossfit).",
    "crossfit_main_disagreement": "1 − Dice between the given label and the out-of-fold main style's "
    "prediction (--crossfit).",
}
#: Which evidence flagged a case (the ``flagged_by`` column; empty: neither stands out).
LAMBDA_FLAG = "own style far from λ = 0"
MODEL_FLAG = "main-style prediction disagrees"
#: A score stands out at this robust z (Iglewicz & Hoaglin's outlier cut on the median/MAD scale).
FLAG_Z = 3.5
#: The evidence each combination may use: the λ evidence first, then the model evidence.
LAMBDA_EVIDENCE = "latent_norm"
MODEL_EVIDENCE = MAIN_STYLE_DISAGREEMENT
#: Combinations measured on the benchmark matrix (benchmarks/detection.py); the default is one of them.
CANDIDATES: dict[str, dict[str, Any]] = {
    "rank_max(latent_norm, main)": {"columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE), "method": "rank_max"},
    "rank_mean(latent_norm, main)": {"columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE), "method": "rank_mean"},
    "z_max(latent_norm, main)": {"columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE), "method": "z_max"},
    "z_mean(latent_norm, main)": {"columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE), "method": "z_mean"},
    "rank_max(latent_norm, main, own)": {
        "columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE, OWN_VS_MAIN_DISAGREEMENT),
        "method": "rank_max",
    },
    "rank_mean(latent_norm, main, own)": {
        "columns": (LAMBDA_EVIDENCE, MODEL_EVIDENCE, OWN_VS_MAIN_DISAGREEMENT),
        "method": "rank_mean",
    },
    "rank_max(mean_distance, main)": {"columns": ("mean_distance", MODEL_EVIDENCE), "method": "rank_max"},
    "rank_max(main, latent_norm outside the main style)": {
        "columns": (MODEL_EVIDENCE, LAMBDA_EVIDENCE),
        "method": "rank_max",
        "outside_main": (LAMBDA_EVIDENCE,),
    },
}
DEFAULT_SUSPICION = CANDIDATES["rank_max(main, latent_norm outside the main style)"]
# Rows of the pairwise-distance block computed at once in mean_distance (bounds memory to ~chunk·N).
_CHUNK = 1024


def latent_norm(latents: np.ndarray) -> np.ndarray:
    """‖λ_n‖₂ per case.

    Args:
        latents: (N, d) latents.
    """
    return np.linalg.norm(np.asarray(latents, dtype=np.float64), axis=1)


def mean_distance(latents: np.ndarray) -> np.ndarray:
    """(1/N) Σ_m ‖λ_m − λ_n‖₂ per case (the sum includes m = n, as in the paper's formula).

    Computed in row blocks so memory stays O(chunk·N) for large datasets.

    Args:
        latents: (N, d) latents.
    """
    z = np.asarray(latents, dtype=np.float64)
    n = len(z)
    out = np.empty(n)
    sq = np.sum(z**2, axis=1)
    for start in range(0, n, _CHUNK):
        block = z[start : start + _CHUNK]
        d2 = sq[start : start + _CHUNK, None] + sq[None, :] - 2.0 * block @ z.T
        # Cancellation can leave tiny negatives on (near-)identical rows.
        out[start : start + _CHUNK] = np.sqrt(np.maximum(d2, 0.0)).sum(axis=1) / n
    return out


def robust_z(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """(x − median) / (1.4826 · MAD) per case, NaN-aware: how far a score stands out from the bulk.

    A zero MAD (more than half the cases tied) falls back to the mean absolute deviation, then to 1.

    Example:
        >>> robust_z([1.0, 2.0, 3.0, 4.0, 100.0]).round(2).tolist()
        [-1.35, -0.67, 0.0, 0.67, 65.43]
    """
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    out = np.full(x.shape, np.nan)
    if not ok.any():
        return out
    med = float(np.median(x[ok]))
    scale = 1.4826 * float(np.median(np.abs(x[ok] - med)))
    if scale <= 0:
        scale = 1.2533 * float(np.mean(np.abs(x[ok] - med)))
    out[ok] = (x[ok] - med) / (scale if scale > 0 else 1.0)
    return out


def percentile_rank(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """Rank / n of each case in (0, 1] (ties share their mean rank; NaN stays NaN).

    Example:
        >>> percentile_rank([0.3, 0.1, 0.3, 0.9]).tolist()
        [0.625, 0.25, 0.625, 1.0]
    """
    x = pd.Series(np.asarray(values, dtype=np.float64))
    return (x.rank(method="average") / max(int(x.notna().sum()), 1)).to_numpy(dtype=np.float64)


def combine_scores(
    table: pd.DataFrame,
    columns: Sequence[str],
    method: str = "rank_max",
    outside_main: Sequence[str] = (),
) -> np.ndarray:
    """Combine score columns into one (higher = more suspicious); columns absent or all-NaN are left out.

    Methods: ``rank_max`` / ``rank_mean``, the largest / the mean of the per-column percentile ranks;
    ``z_max`` / ``z_mean``, the same on robust z-scores (:func:`robust_z`). A case missing one column's
    value is combined from the others; without any column every value is NaN.

    Args:
        table: the suspicion table (or any frame with the columns).
        columns: the score columns.
        method: see above.
        outside_main: columns that count only for cases outside the main style (``style`` ≠ ``main``);
            when no other column is usable they count for every case.

    Raises:
        ValueError: an unknown method.
    """
    transform = {"rank": percentile_rank, "z": robust_z}.get(method.partition("_")[0])
    reduce = {"max": np.nanmax, "mean": np.nanmean}.get(method.partition("_")[2])
    if transform is None or reduce is None:
        raise ValueError(f"unknown combination {method!r}; expected rank_max, rank_mean, z_max or z_mean")
    usable = [
        c for c in columns if c in table.columns and np.isfinite(table[c].to_numpy(dtype=np.float64)).any()
    ]
    gate = bool(set(usable) - set(outside_main)) and "style" in table.columns
    inside = table["style"].astype(str).to_numpy() == "main" if gate else np.zeros(len(table), bool)
    parts = []
    for c in usable:
        values = transform(table[c].to_numpy(dtype=np.float64))
        if c in outside_main:
            # Left out (NaN), not zero: inside the main style the column says nothing either way.
            values = np.where(inside, np.nan, values)
        parts.append(values)
    if not parts:
        return np.full(len(table), np.nan)
    stacked = np.vstack(parts)
    out = np.full(len(table), np.nan)
    some = np.isfinite(stacked).any(axis=0)
    out[some] = reduce(stacked[:, some], axis=0)
    return out


def flagged_by(table: pd.DataFrame, threshold: float = FLAG_Z) -> list[str]:
    """Which evidence flagged each case: :data:`LAMBDA_FLAG` when the case's λ left the main style (its
    style is another one or ``outlier``; without styles: its ``latent_norm`` stands out),
    :data:`MODEL_FLAG` when its ``main_style_disagreement`` stands out (robust z ≥ ``threshold``), both
    joined by "; ", or "" for neither.

    Args:
        table: the suspicion table.
        threshold: the robust z a score must reach.
    """
    def stands_out(column: str) -> np.ndarray:
        return np.nan_to_num(robust_z(table[column].to_numpy(dtype=np.float64)), nan=-np.inf) >= threshold

    flags = []
    if "style" in table.columns:
        flags.append((table["style"].astype(str).to_numpy() != "main", LAMBDA_FLAG))
    elif LAMBDA_EVIDENCE in table.columns:
        flags.append((stands_out(LAMBDA_EVIDENCE), LAMBDA_FLAG))
    if MODEL_EVIDENCE in table.columns:
        flags.append((stands_out(MODEL_EVIDENCE), MODEL_FLAG))
    return ["; ".join(text for hit, text in flags if hit[row]) for row in range(len(table))]


def score_columns(table: pd.DataFrame) -> list[str]:
    """The score columns of a suspicion table: numeric and not in :data:`NON_SCORE_COLUMNS`."""
    return [
        c
        for c in table.columns
        if c not in NON_SCORE_COLUMNS and pd.api.types.is_numeric_dtype(table[c])
    ]


def rank_cases(table: pd.DataFrame, rank_by: str = DEFAULT_RANK_BY) -> pd.DataFrame:
    """Sort most suspicious first: ``rank_by`` descending, ties by sample index.

    Args:
        table: a suspicion table.
        rank_by: the score column to rank by (higher = more suspicious).

    Raises:
        ValueError: ``rank_by`` is not a numeric column of the table.
    """
    if rank_by not in score_columns(table):
        raise ValueError(f"cannot rank by {rank_by!r}; score columns: {', '.join(score_columns(table))}")
    # NaN (a model-based score not computed for a case) sorts last rather than first.
    return table.sort_values(
        [rank_by, "index"], ascending=[False, True], na_position="last", kind="mergesort"
    ).reset_index(drop=True)


def suspicion_table(
    indices: Sequence[int] | np.ndarray,
    case_ids: Sequence[str],
    latents: np.ndarray,
    outlier_scores: np.ndarray,
    styles: Sequence[str],
    extra: Mapping[str, np.ndarray | Sequence[float]] | None = None,
    rank_by: str = DEFAULT_RANK_BY,
    locations: Mapping[str, np.ndarray | Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Score every case, combine the evidence into ``suspicion``, and rank them.

    Args:
        indices: sample index per row.
        case_ids: case id per row.
        latents: (N, d) latents, row-aligned.
        outlier_scores: GLOSH score per row (``StyleModel.outlier_scores``).
        styles: style key per row (``StyleModel.keys``).
        extra: more score columns, name -> (N,) values, row-aligned (higher = more suspicious; NaN where
            not computed). Names must not clash with the base columns.
        rank_by: column to rank by (default ``suspicion``).
        locations: non-score columns (:data:`NON_SCORE_COLUMNS`, e.g. the largest disagreement's
            centre), row-aligned, appended last.

    Returns:
        Columns ``index, case_id, suspicion, flagged_by, latent_norm, mean_distance, outlier_score,
        style, *extra, *locations``, most suspicious first.

    Raises:
        ValueError: lengths differ, a name clashes, or ``rank_by`` is unknown.
    """
    n = len(latents)
    table = pd.DataFrame(
        {
            "index": np.asarray(indices, dtype=np.int64),
            "case_id": [str(c) for c in case_ids],
            "latent_norm": latent_norm(latents),
            "mean_distance": mean_distance(latents),
            "outlier_score": np.asarray(outlier_scores, dtype=np.float64),
            "style": [str(s) for s in styles],
        }
    )
    if not (len(table) == n == len(case_ids) == len(styles) == len(outlier_scores)):
        raise ValueError("indices, case ids, latents, outlier scores and styles differ in length")
    for name, values in {**(extra or {}), **(locations or {})}.items():
        if name in table.columns or name in (SUSPICION, FLAGGED_BY):
            raise ValueError(f"extra score {name!r} clashes with a base column")
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"extra score {name!r} has shape {values.shape}, expected ({n},)")
        table[name] = values
    table.insert(2, SUSPICION, combine_scores(table, **DEFAULT_SUSPICION))
    table.insert(3, FLAGGED_BY, flagged_by(table))
    return rank_cases(table, rank_by)


def write_suspicion_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the table (float scores with 6 significant digits) atomically.

    Args:
        table: from :func:`suspicion_table`.
        path: destination CSV.
    """
    return atomic_write_text(path, table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
