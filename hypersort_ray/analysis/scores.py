"""Suspicion scores per case and the ranked suspicion table (``RunDir.analysis.suspicion_csv``).

The paper's two predictors (§4.2) and the clustering's own:

* ``latent_norm``: ‖λ_n‖₂. The L1 prior puts the main annotation mode at λ = 0, so cases the shared
  network cannot fit in the main style are pushed away from the origin. Default ranking.
* ``mean_distance``: (1/N) Σ_m ‖λ_m − λ_n‖₂, how isolated a case is from all others.
* ``outlier_score``: GLOSH from the HDBSCAN fit (:mod:`.styles`), 0 deep inside a style, → 1 isolated.
* ``style``: the case's style key (``main``, ``1``, ..., ``outlier``).

Model-based scores (e.g. ``main_style_disagreement = 1 − Dice(UNet_main(image), label)``) are passed in
as extra columns. Convention for every score column: **higher = more suspicious**, so any of them can
rank the table.

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

import numpy as np
import pandas as pd

from hypersort_ray.atomic import atomic_write_text

__all__ = [
    "BASE_COLUMNS",
    "MAIN_STYLE_DISAGREEMENT",
    "OWN_VS_MAIN_DISAGREEMENT",
    "SCORE_COLUMNS",
    "TRAIN_LOSS",
    "latent_norm",
    "mean_distance",
    "rank_cases",
    "suspicion_table",
    "write_suspicion_csv",
]

SCORE_COLUMNS = ("latent_norm", "mean_distance", "outlier_score")
BASE_COLUMNS = ("index", "case_id", *SCORE_COLUMNS, "style")
DEFAULT_RANK_BY = "latent_norm"
# Extra score columns other modules compute (named once here, so the scorers and the report agree).
#: 1 − Dice(main-style prediction, given label) (:mod:`.model_scores`).
MAIN_STYLE_DISAGREEMENT = "main_style_disagreement"
#: 1 − Dice(the case's own UNet, the main-style UNet) (:mod:`.model_scores`).
OWN_VS_MAIN_DISAGREEMENT = "own_vs_main_disagreement"
#: each case's own training loss, averaged over the epochs (the run's per-sample loss table).
TRAIN_LOSS = "train_loss"
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


def rank_cases(table: pd.DataFrame, rank_by: str = DEFAULT_RANK_BY) -> pd.DataFrame:
    """Sort most suspicious first: ``rank_by`` descending, ties by sample index.

    Args:
        table: a suspicion table.
        rank_by: the score column to rank by (higher = more suspicious).

    Raises:
        ValueError: ``rank_by`` is not a numeric column of the table.
    """
    if rank_by not in table.columns or not pd.api.types.is_numeric_dtype(table[rank_by]):
        numeric = [c for c in table.columns if c != "index" and pd.api.types.is_numeric_dtype(table[c])]
        raise ValueError(f"cannot rank by {rank_by!r}; numeric score columns: {', '.join(numeric)}")
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
) -> pd.DataFrame:
    """Score every case and rank them.

    Args:
        indices: sample index per row.
        case_ids: case id per row.
        latents: (N, d) latents, row-aligned.
        outlier_scores: GLOSH score per row (``StyleModel.outlier_scores``).
        styles: style key per row (``StyleModel.keys``).
        extra: more score columns, name -> (N,) values, row-aligned (higher = more suspicious; NaN where
            not computed). Names must not clash with the base columns.
        rank_by: column to rank by (default ``latent_norm``).

    Returns:
        Columns ``index, case_id, latent_norm, mean_distance, outlier_score, style, *extra``, most
        suspicious first.

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
    for name, values in (extra or {}).items():
        if name in table.columns:
            raise ValueError(f"extra score {name!r} clashes with a base column")
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"extra score {name!r} has shape {values.shape}, expected ({n},)")
        table[name] = values
    return rank_cases(table, rank_by)


def write_suspicion_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the table (float scores with 6 significant digits) atomically.

    Args:
        table: from :func:`suspicion_table`.
        path: destination CSV.
    """
    return atomic_write_text(path, table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
