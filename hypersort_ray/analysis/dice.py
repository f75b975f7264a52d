"""The one Dice of the project, on integer class maps (analysis scores, sweep validation, correction).

Mean over the foreground classes ``1..K-1``. A class absent from both maps has no defined Dice; the
rule for it is a parameter (as MONAI's ``compute_dice(ignore_empty=...)`` does it):

* ``empty="skip"`` (default): it is left out of the mean; when no class is present anywhere the result
  is 1.0 (both maps agree that there is nothing).
* ``empty="one"``: it counts as a perfect 1.0 in the mean.

Every caller uses the default, so the sweep's objective and the analysis report agree on multi-class
labels with an absent class.

Example:
    >>> dice_score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    0.6666666666666666
    >>> dice_score(np.array([0, 1, 2]), np.array([0, 1, 1]), num_classes=4)
    0.5
    >>> dice_score(np.zeros(3), np.zeros(3))
    1.0
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["dice_score"]


def _as_labels(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64, copy=False).reshape(-1)


def dice_score(a: Any, b: Any, num_classes: int = 2, *, empty: Literal["skip", "one"] = "skip") -> float:
    """Mean Dice over foreground classes of two integer class maps of equal size.

    Args:
        a, b: class maps (numpy arrays or tensors; a leading channel of 1 is fine).
        num_classes: K (classes 1..K-1 are foreground).
        empty: what a class absent from both maps counts (module docstring).

    Raises:
        ValueError: the maps differ in size.
    """
    a, b = _as_labels(a), _as_labels(b)
    if a.shape != b.shape:
        raise ValueError(f"dice_score: shapes differ ({a.shape} vs {b.shape})")
    scores = []
    for c in range(1, max(int(num_classes), 2)):
        in_a, in_b = a == c, b == c
        denom = int(in_a.sum()) + int(in_b.sum())
        if denom:
            scores.append(2.0 * int(np.logical_and(in_a, in_b).sum()) / denom)
        elif empty == "one":
            scores.append(1.0)
    return float(np.mean(scores)) if scores else 1.0
