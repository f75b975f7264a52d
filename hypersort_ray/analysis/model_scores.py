"""Suspicion scores that use the trained hyper-network, not only the geometry of the latent map.

Why: ‖λ_n‖ and the mean latent distance only see how far a case had to travel from the main mode. On
*subtle* label errors (a shifted slab, a partial erosion) the hyper-UNet can fit the wrong label
with a small λ, because the UNet also memorises the image: the latent norm alone then ranks poorly
(AUROC 0.69 on the synthetic ``subtle`` benchmark) while out-of-fold baselines reach 0.97–1.00. The
hyper-network already holds the missing information, for the price of two forward passes per case:

* ``main_style_disagreement`` = 1 − Dice(UNet_main(image_n), label_n): how far the given label is from
  what the main annotation style predicts for that image. λ = 0 is shared by every clean case, so it
  is the closest thing to a consensus model the run has (it is *not* out of fold: a case the main
  mode absorbed may still be memorised; see :mod:`.baselines` for the out-of-fold reference).
* ``own_vs_main_disagreement`` = 1 − Dice(UNet_{λ_n}(image_n), UNet_main(image_n)): how much the case's
  own latent changes the segmentation, i.e. the effect of λ_n measured in voxels rather than in
  latent units (a large λ that changes nothing scores 0; a small λ that moves a boundary scores high).

Both are computed on the training grid (:func:`~.evaluation.evaluation_dataset`) with the one Dice
(:func:`~.dice.dice_score`). :func:`make_predictor` builds the ``predictor`` hook of
:func:`~.run.analyze_run` (main-style masks in each case's label grid, for its thumbnails).

The model is passed in (a :class:`~.evaluation.SegmentationModel`, e.g. what
``hypersort_ray.inference.load_model`` returns): this layer does not load models.

Example:
    >>> df = model_scores("runs/demo", load_model("runs/demo"))                 # doctest: +SKIP
    >>> df.sort_values("main_style_disagreement", ascending=False).head()       # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import (
    Predictor,
    SegmentationModel,
    evaluation_dataset,
    load_run_cases,
    progress_bar,
    read_run_latents,
    segment,
)
from hypersort_ray.analysis.scores import MAIN_STYLE_DISAGREEMENT, OWN_VS_MAIN_DISAGREEMENT
from hypersort_ray.errors import RunError
from hypersort_ray.runs import RunDir

__all__ = ["MODEL_SCORE_COLUMNS", "make_predictor", "model_scores"]

MODEL_SCORE_COLUMNS = (MAIN_STYLE_DISAGREEMENT, OWN_VS_MAIN_DISAGREEMENT)


def model_scores(
    run_dir: str | os.PathLike[str], model: SegmentationModel, progress: bool = False
) -> pd.DataFrame:
    """Model-based suspicion scores of every training case (module docstring).

    The main-style UNet is generated once; each case's own UNet costs one hyper-network forward pass.

    Args:
        run_dir: a trained run folder (or :class:`RunDir`).
        model: the run's loaded model (its UNets run on ``model.device``).
        progress: progress bar on stderr.

    Returns:
        ``DataFrame[index, case_id, main_style_disagreement, own_vs_main_disagreement]`` in index
        order; both scores in [0, 1], higher = more suspicious.

    Raises:
        RunError: not a trained run folder, latents that do not match the datalist or the model.
        DataError: missing/unreadable data files.
    """
    run = RunDir(run_dir)
    _, cases = load_run_cases(run)
    latents = read_run_latents(run, cases)
    if latents.shape[1] != model.latent_dim:
        raise RunError(
            f"{run.latents_csv}: latents have {latents.shape[1]} dims, the model {model.latent_dim}"
        )
    pre, k = model.config.preprocessing, model.num_classes
    main_net = model.unet_for(model.resolve("main")[0])
    dataset = evaluation_dataset(cases, pre, k)
    rows = []
    for pos in progress_bar(range(len(cases)), progress, "model scores", total=len(cases)):
        item = dataset[pos]
        label = np.asarray(item["label"])[0]
        main_mask = segment(main_net, item["image"], pre.roi_size, model.device).argmax(0).numpy()
        own_net = model.unet_for(tuple(float(v) for v in latents[pos]))
        own_mask = segment(own_net, item["image"], pre.roi_size, model.device).argmax(0).numpy()
        del own_net  # one generated UNet at a time beside the main one
        rows.append(
            {
                "index": cases[pos].index,
                "case_id": cases[pos].case_id,
                MAIN_STYLE_DISAGREEMENT: 1.0 - dice_score(main_mask, label, k),
                OWN_VS_MAIN_DISAGREEMENT: 1.0 - dice_score(own_mask, main_mask, k),
            }
        )
    return pd.DataFrame(rows, columns=["index", "case_id", *MODEL_SCORE_COLUMNS])


def make_predictor(run_dir: str | os.PathLike[str], model: SegmentationModel) -> Predictor:
    """The ``predictor`` hook of :func:`~.run.analyze_run`: segment training cases of this run.

    ``predictor(style_or_latent, indices) -> {index: class map}``, each map in the case's own image grid
    (= its label grid; ``model.predict(image, style=...)``: the run's preprocessing, sliding window,
    geometry replayed back). A string is a style (``"main"``, a style id); anything else is an explicit
    latent vector.

    Args:
        run_dir: the run folder (its config names the datalist).
        model: the run's loaded model.

    Raises:
        RunError / DataError: the run or its datalist cannot be read (at creation, not per call).
    """
    run = RunDir(run_dir)
    _, cases = load_run_cases(run)
    by_index = {c.index: c for c in cases}

    def predictor(style_or_latent: str | np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray]:
        if isinstance(style_or_latent, str):
            kwargs: dict[str, Any] = {"style": style_or_latent}
        else:
            kwargs = {"latent": [float(v) for v in np.asarray(style_or_latent, dtype=np.float64).reshape(-1)]}
        unknown = [int(i) for i in indices if int(i) not in by_index]
        if unknown:
            raise RunError(f"{run.path}: sample indices {unknown[:10]} are not in the run's datalist")
        return {int(i): model.predict(by_index[int(i)].image, **kwargs)["mask"] for i in indices}

    return predictor
