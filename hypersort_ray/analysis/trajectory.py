"""λ-trajectory scores: how each case's latent moved during training (no extra training cost).

The final λ only says where a case came to rest. A wrong label pulls its λ out of the main mode early
(the shared network cannot fit it yet) even when H later memorises the label and λ drifts back; a clean
case wanders around 0. The run records every λ after every epoch (``RunDir.read_latent_trajectory``,
written by the trainer), and three scores summarise each case's path, higher = more suspicious:

* ``trajectory_mean_norm``: the mean of ‖λ_t‖ over the epochs, the area under the case's norm curve;
* ``trajectory_path_length``: Σ_t ‖λ_t − λ_{t−1}‖, how far λ travelled;
* ``trajectory_exit``: how early λ left the main cloud for good: ``(E − t + 1) / E`` for the first epoch
  ``t`` from which the case's ‖λ‖ stays beyond the cloud's edge (robust z ≥ :data:`EXIT_Z` among that
  epoch's norms), 0 when it never leaves.

Example:
    >>> import numpy as np
    >>> values = np.zeros((3, 2, 1)); values[:, 1, 0] = [0.0, 1.0, 2.0]
    >>> scores = trajectory_scores(values)
    >>> scores["trajectory_mean_norm"].tolist(), scores["trajectory_path_length"].tolist()
    ([0.0, 1.0], [0.0, 2.0])
"""

from __future__ import annotations

import numpy as np

from hypersort_ray.analysis.scores import robust_z

__all__ = ["EXIT_Z", "TRAJECTORY_COLUMNS", "trajectory_scores"]

TRAJECTORY_COLUMNS = ("trajectory_mean_norm", "trajectory_path_length", "trajectory_exit")
#: Beyond this robust z of its epoch's norms a case is outside the main cloud (the flag threshold).
EXIT_Z = 3.5


def trajectory_scores(values: np.ndarray) -> dict[str, np.ndarray]:
    """The three trajectory scores of every case.

    Args:
        values: ``[E, N, d]`` latents after each of E epochs (NaN where an epoch was not recorded for
            a case: those epochs are left out of its scores).

    Returns:
        ``{column: [N] scores}`` for :data:`TRAJECTORY_COLUMNS`.
    """
    z = np.asarray(values, dtype=np.float64)
    if z.ndim != 3 or z.shape[0] == 0:
        raise ValueError(f"trajectory: expected [epochs >= 1, cases, d], got shape {z.shape}")
    n_epochs = z.shape[0]
    norms = np.linalg.norm(z, axis=2)  # [E, N]; an unrecorded (NaN) epoch stays NaN
    with np.errstate(invalid="ignore"):
        mean_norm = np.nanmean(norms, axis=0)
    path = np.nansum(np.linalg.norm(np.diff(z, axis=0), axis=2), axis=0)
    outside = np.vstack([robust_z(row) >= EXIT_Z for row in norms])
    # stays_out[t]: outside at every epoch from t on (a reversed cumulative AND).
    stays_out = np.flip(np.logical_and.accumulate(np.flip(outside, axis=0), axis=0), axis=0)
    first = np.where(stays_out.any(axis=0), stays_out.argmax(axis=0), n_epochs)
    return {
        "trajectory_mean_norm": mean_norm,
        "trajectory_path_length": path,
        "trajectory_exit": (n_epochs - first) / n_epochs,
    }
