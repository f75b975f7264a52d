"""``hypersort analyze``: the whole analysis of a trained run, with the model-based scores.

:func:`analyze` composes the other modules: the model-based scores (:mod:`.model_scores`), optionally the
out-of-fold baselines at equal compute (:mod:`.baselines`; saved baselines of an earlier
``--baselines`` are reused as columns, and so are the cross-fitted scores of ``--crossfit``, which the
pipeline computes), then the latent analysis (:mod:`.run`) with those extra columns, the location of
every case's largest disagreement with the main style (and, with ``maps``, its map), written into the
run's analysis folder with its provenance last.

The model is loaded by the caller (inference sits above this layer) and must come from the run's own
checkpoint. The analysis only segments with λ = 0 and explicit latents, never with saved styles, so a
model loaded from the checkpoint folder alone (no styles) serves, even when the run's saved styles
belong to an older checkpoint.

Example:
    >>> from hypersort_ray.inference import load_model                       # doctest: +SKIP
    >>> run = RunDir("runs/demo")                                            # doctest: +SKIP
    >>> summary = analyze(run, load_model(run.checkpoint_dir), baselines=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hypersort_ray.analysis.baselines import run_baselines
from hypersort_ray.analysis.evaluation import SegmentationModel, check_model_provenance
from hypersort_ray.analysis.model_scores import make_predictor, model_scores
from hypersort_ray.analysis.run import compute_analysis, summarize, write_analysis
from hypersort_ray.runs import RunDir

__all__ = ["analyze"]

logger = logging.getLogger(__name__)


def analyze(
    run_dir: str | os.PathLike[str],
    model: SegmentationModel,
    *,
    truth: Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    baselines: bool = False,
    maps: bool = False,
) -> dict[str, Any]:
    """Latent-geometry and model-based scores, thumbnails with main-style predictions, metrics, report.

    Args:
        run_dir: the run folder (or :class:`RunDir`).
        model: the run's loaded model (its ``device`` also trains the baselines).
        truth: truth CSV (default: as :func:`~.run.analyze_run` finds it).
        overrides: ``key=value`` on the analysis settings.
        progress: progress bars on stderr.
        baselines: also train the k-fold plain UNets (Test-Dice and cleanlab columns); they are saved
            at once, so a later failure does not lose them.
        maps: also write each case's disagreement map (NIfTI in its label's geometry) to
            ``run.analysis.maps_dir``.

    Returns:
        The summary of :func:`~.run.summarize` (``files`` also lists fresh baselines).

    Raises:
        ProvenanceError: the model comes from another checkpoint than the run's.
        RunError / DataError / ConfigError: as :func:`~.run.analyze_run`.
    """
    run = RunDir(run_dir)
    check_model_provenance(run, model)
    logger.info("model-based scores of %s", run.path)
    extra = model_scores(run, model, progress=progress)
    written: dict[str, str] = {}
    if baselines:
        run.begin_analysis()  # the baselines are written now: the old analysis stops passing as current
        fresh = run_baselines(run, progress=progress, device=str(model.device))
        extra = extra.merge(fresh.drop(columns="case_id"), on="index")
        written = {p.name: str(p) for p in (run.analysis.baselines_csv, run.analysis.baselines_json)}
    else:
        extra = _with_saved(extra, run.read_baselines())
    extra = _with_saved(extra, run.read_crossfit())
    result = compute_analysis(
        run, truth, overrides, progress, make_predictor(run, model), extra_scores=extra, maps=maps
    )
    run.begin_analysis()
    files = {**write_analysis(run, result), **written}
    run.write_analysis_provenance(files)
    logger.info("wrote %s", run.analysis.folder)
    return summarize(result, files)


def _with_saved(scores: pd.DataFrame, saved: pd.DataFrame | None) -> pd.DataFrame:
    """The model scores plus the score columns saved by an earlier ``--baselines`` or ``--crossfit``.

    Both come from networks trained on the run's data, not from its checkpoint, so they stay valid when
    the run is resumed; cases they lack get NaN.
    """
    if saved is None:
        return scores
    keep = [c for c in saved.columns if c != "case_id"]
    return scores.merge(saved[keep], on="index", how="left")
