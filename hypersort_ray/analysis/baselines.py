"""Out-of-fold baselines, so users see what the latent map adds: Test-Dice and cleanlab.

Both come from one k-fold cross-validation of a **plain UNet** with the primary network's architecture
(``build_primary(cfg.model.unet)``), trained on the run's own preprocessing (``build_dataset`` with the
run's config: same spacing, intensity scaling, label mapping, crop and augmentation), loss (Dice + CE)
and optimiser settings (Adam, ``training.lr``, ``training.weight_decay``, ``training.batch_size``).
Every case is predicted by the one model that did not see it (out of fold), on the same deterministic
training grid as :mod:`.model_scores` (:func:`~.evaluation.evaluation_dataset`), and scored twice:

* ``test_dice`` = 1 − Dice(out-of-fold prediction, given label). The paper (§4.2) calls this baseline
  "Test-Dice" [Lad & Mueller 2023]: there the UNet was trained on the cases *known* to be clean (it
  used the pseudo ground truth); without such knowledge k-fold cross-validation is the honest version.
* ``cleanlab`` = 1 − ``cleanlab.segmentation.rank.get_label_quality_scores(labels, pred_probs)``
  (cleanlab 2.9, ``method="softmin"``) on the same out-of-fold softmax probabilities. cleanlab's API is
  2D (``labels (N, H, W)``, ``pred_probs (N, K, H, W)``); its softmin image score only sees the
  flattened pixels, so a volume is passed as ``(1, D, H·W)`` — identical scores, one case at a time
  (constant memory, any volume shape).

Equal compute (the default ``epochs``): a HyperSORT run of E epochs makes N·E per-sample UNet
training passes. k folds, each training on (k−1)/k·N cases for E' epochs, make (k−1)·N·E' passes, so
E' = round(E / (k − 1)), at least 1 (3 folds: half the run's epochs per fold). The hyper-network's own
forward/backward is not counted, so the baselines get slightly *less* compute than HyperSORT.

Everything is seeded (``seed``, default the run's ``training.seed``): fold assignment, UNet
initialisation, batch order and augmentation; the same call gives the same scores on the same
machine and thread count.

Example:
    >>> df = run_baselines("runs/demo", folds=3)     # doctest: +SKIP
    >>> df.columns.tolist(), df.attrs["epochs"]       # doctest: +SKIP
    (['index', 'case_id', 'test_dice', 'cleanlab'], 30)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import evaluation_dataset, load_run_cases, progress_bar, segment
from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.errors import ConfigError, DataError
from hypersort_ray.runs import RunDir

__all__ = [
    "BASELINE_COLUMNS",
    "EQUAL_COMPUTE_RULE",
    "assign_folds",
    "cleanlab_suspicion",
    "equal_compute_epochs",
    "run_baselines",
]

BASELINE_COLUMNS = ("test_dice", "cleanlab")
EQUAL_COMPUTE_RULE = "epochs_per_fold = max(1, round(run_epochs / (folds - 1)))"


def equal_compute_epochs(run_epochs: int, folds: int) -> int:
    """Epochs per fold that match a HyperSORT run of ``run_epochs`` epochs (module docstring).

    Example:
        >>> equal_compute_epochs(60, 3), equal_compute_epochs(60, 5), equal_compute_epochs(1, 3)
        (30, 15, 1)
    """
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    return max(1, int(round(run_epochs / (folds - 1))))


def assign_folds(n_cases: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each case (``[n_cases]`` ints in 0..folds-1): a seeded permutation dealt round-robin,
    so fold sizes differ by at most one.

    Example:
        >>> sorted(np.bincount(assign_folds(10, 3, seed=1)).tolist())
        [3, 3, 4]
    """
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if n_cases < folds:
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} cases, the run has {n_cases}")
    order = np.random.default_rng([int(seed), 0xF01D]).permutation(n_cases)
    fold = np.empty(n_cases, dtype=np.int64)
    fold[order] = np.arange(n_cases) % folds
    return fold


def _require_cleanlab() -> None:
    """cleanlab is an optional extra: say how to get it instead of an ImportError deep in a fold."""
    import importlib.util

    if importlib.util.find_spec("cleanlab") is None:
        raise ConfigError(
            "the baselines (analyze --baselines) need cleanlab, an optional extra: "
            "pip install 'hypersort-ray[baselines]'"
        )


def cleanlab_suspicion(label: np.ndarray, probs: np.ndarray) -> float:
    """1 − cleanlab's softmin label quality of one case.

    Args:
        label: integer class map ``(*spatial)`` (2D or 3D).
        probs: class probabilities ``(K, *spatial)``.
    """
    from cleanlab.segmentation.rank import get_label_quality_scores

    label = np.asarray(label).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1:] != label.shape:
        raise ValueError(f"cleanlab_suspicion: probs {probs.shape} do not match label {label.shape}")
    if label.ndim == 2:
        lab2, prob2 = label[None], probs[None]
    else:  # (D, H, W, ...) -> (1, D, H*W...): the softmin score only sees flattened pixels
        lab2 = label.reshape(1, label.shape[0], -1)
        prob2 = probs.reshape(1, probs.shape[0], label.shape[0], -1)
    quality, _ = get_label_quality_scores(lab2, prob2, method="softmin", verbose=False)
    return float(np.clip(1.0 - quality[0], 0.0, 1.0))


def _train_fold(
    dataset: Any,
    positions: Sequence[int],
    cfg: Any,
    *,
    epochs: int,
    seed: int,
    fold: int,
    device: str,
    bar: Any,
):
    """Train a plain primary UNet on the dataset items at ``positions``; returns it in eval mode."""
    import torch

    from hypersort_ray.model.losses import seg_loss_terms
    from hypersort_ray.model.unet import build_primary

    fold_seed = int(np.random.SeedSequence([int(seed), int(fold), 0xBA5E]).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fold_seed)
        net = build_primary(cfg.model.unet).to(device)
    tcfg = cfg.training
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=fold_seed % 2**32)
    net.train()
    for epoch in range(epochs):
        order = np.random.default_rng([fold_seed, epoch]).permutation(len(positions))
        for start in range(0, len(order), tcfg.batch_size):
            items = [dataset[positions[j]] for j in order[start : start + tcfg.batch_size]]
            image = torch.stack([torch.as_tensor(it["image"]) for it in items]).float().to(device)
            label = torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)
            loss = seg_loss_terms(net(image), label).seg.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.update(1)
    return net.eval().requires_grad_(False)


def _out_of_fold_scores(
    run: RunDir,
    cfg: ExperimentConfig,
    cases: Sequence[Case],
    fold_of: np.ndarray,
    *,
    epochs: int,
    seed: int,
    device: str,
    bar: Any,
) -> list[dict[str, Any]]:
    """Train one plain UNet per fold; score its held-out cases with it (Test-Dice, cleanlab).

    Args:
        run: the run folder (its disk cache).
        cfg: the run's config.
        cases: the datalist.
        fold_of: each case's fold.
        epochs: epochs per fold.
        seed: the seed of folds, initialisation, batch order and augmentation.
        device: where the UNets train.
        bar: a progress bar advanced once per fold epoch, or None.
    """
    import torch

    from hypersort_ray.data.transforms import build_dataset

    pre, k = cfg.preprocessing, cfg.model.unet.out_channels
    # One training dataset for all folds: each case is preprocessed (and cached) once.
    cache_dir = cfg.data.cache_dir or run.cache_dir
    train_ds = build_dataset(cases, pre, k, cache=cfg.data.cache, cache_dir=cache_dir)
    eval_ds = evaluation_dataset(cases, pre, k)
    rows: list[dict[str, Any]] = []
    for fold in range(int(fold_of.max()) + 1):
        train_pos = [i for i in range(len(cases)) if fold_of[i] != fold]
        net = _train_fold(
            train_ds, train_pos, cfg, epochs=epochs, seed=seed, fold=fold, device=device, bar=bar
        )
        for pos in (i for i in range(len(cases)) if fold_of[i] == fold):
            item = eval_ds[pos]
            label = np.asarray(item["label"])[0].astype(np.int64)
            probs = segment(net, item["image"], pre.roi_size, device).numpy()
            rows.append(
                {
                    "index": cases[pos].index,
                    "case_id": cases[pos].case_id,
                    "test_dice": 1.0 - dice_score(probs.argmax(0), label, k),
                    "cleanlab": cleanlab_suspicion(label, probs),
                }
            )
        del net
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def run_baselines(
    run_dir: str | os.PathLike[str],
    folds: int = 3,
    epochs: int | None = None,
    progress: bool = False,
    *,
    seed: int | None = None,
    device: str = "cpu",
    write: bool = True,
) -> pd.DataFrame:
    """Test-Dice and cleanlab suspicion of every training case from k-fold out-of-fold predictions.

    Args:
        run_dir: a run folder or :class:`RunDir` (its config names the datalist and the preprocessing).
        folds: k (at least 2, at most the number of cases).
        epochs: epochs per fold; default :func:`equal_compute_epochs` of the epochs the run's checkpoint
            holds (else ``training.epochs``).
        progress: progress bars on stderr.
        seed: seeds folds, initialisation, batch order and augmentation; default ``training.seed``.
        device: ``cpu`` or ``cuda[:i]``.
        write: save them with :meth:`RunDir.write_baselines` (the table and ``df.attrs``, the settings).

    Returns:
        ``DataFrame[index, case_id, test_dice, cleanlab]`` in index order; scores in [0, 1], higher =
        more suspicious. ``df.attrs`` holds the settings: folds, epochs (per fold), run_epochs, seed,
        fold (each case's fold, in index order), rule, network, seconds.

    Raises:
        RunError / DataError: not a run folder, missing data, fewer cases than folds.
    """
    t0 = time.perf_counter()
    _require_cleanlab()  # before the folds train, not after
    run = RunDir(run_dir)
    cfg, cases = load_run_cases(run)
    e_run = run.trained_epochs() or int(cfg.training.epochs)
    e_fold = equal_compute_epochs(e_run, folds) if epochs is None else int(epochs)
    if e_fold < 1:
        raise ConfigError(f"baseline epochs must be at least 1, got {epochs}")
    seed = int(cfg.training.seed if seed is None else seed)
    fold_of = assign_folds(len(cases), folds, seed)
    bar = None
    if progress:
        bar = progress_bar(iter(()), True, "baselines (fold epochs)", total=folds * e_fold, unit="epoch")
    try:
        rows = _out_of_fold_scores(
            run, cfg, cases, fold_of, epochs=e_fold, seed=seed, device=device, bar=bar
        )
    finally:
        if bar is not None:
            bar.close()
    # Only score columns: consumers (analyze_run's extra_scores, metrics) treat every numeric column as
    # a score, so the fold assignment goes to attrs (saved with the table's settings) instead.
    df = pd.DataFrame(rows, columns=["index", "case_id", *BASELINE_COLUMNS])
    df = df.sort_values("index", kind="stable").reset_index(drop=True)
    df.attrs.update(
        {
            "folds": int(folds),
            "epochs": int(e_fold),
            "run_epochs": int(e_run),
            "seed": seed,
            "fold": [int(f) for f in fold_of],
            "rule": EQUAL_COMPUTE_RULE if epochs is None else "given",
            "network": cfg.model.unet.model_dump(mode="json"),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    if write:
        run.write_baselines(df, df.attrs)
    return df
