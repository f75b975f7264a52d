"""Cross-fitted latents: each case's λ fitted by a hyper-network that never saw its label.

In-sample λ is learned together with an H that can memorise a wrong label, so a subtle error may need
almost no λ at all. Cross-fitting removes that escape: the cases are dealt into K folds
(:func:`~hypersort_ray.analysis.baselines.assign_folds`, the baselines' own split), and

1. **K HyperSORT runs side by side**: fold k trains on the other folds' cases, an ordinary run folder
   (``RunDir.crossfit_fold(k)``, trained by :func:`~hypersort_ray.train.trainer.run_training`: Ray Train,
   the run's own config). All folds are launched at once from this driver, one Ray Train run per thread,
   as many at a time as the cluster's CPUs hold (:func:`parallel_folds`): on a cluster every fold
   trains at the same time, on a laptop they queue.
2. **λ out of fold**: with fold k's H frozen, every held-out case gets its own λ, fitted from λ = 0 by
   Adam on λ only with the training loss of eq. (1) (Dice + CE + w·‖λ‖₁, the fold's effective w) for
   ``steps`` steps (:func:`fit_latents`).

Scores (higher = more suspicious; ``RunDir.write_crossfit``, merged into the analysis as columns):

* ``crossfit_latent_norm``: ‖λ_oof‖;
* ``crossfit_loss_drop``: L(λ = 0) − L(λ_oof), how much a λ of its own explains the label better than
  the main style of a network that never saw it;
* ``crossfit_main_disagreement``: 1 − Dice(UNet_{λ=0}(image), label) with the out-of-fold main style.

Compute: K folds of ``epochs = round(E / (K − 1))`` on (K−1)/K of the cases make the run's own number
of sample passes (the baselines' equal-compute rule), plus ``steps`` forward/backward passes per case for
the λ fit. This module sits at the pipeline level: it trains (train) and scores (analysis).

Example:
    >>> df = run_crossfit("runs/demo", folds=3)                     # doctest: +SKIP
    >>> df.columns.tolist()                                          # doctest: +SKIP
    ['index', 'case_id', 'crossfit_latent_norm', 'crossfit_loss_drop', 'crossfit_main_disagreement']
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from hypersort_ray.analysis.baselines import EQUAL_COMPUTE_RULE, assign_folds, equal_compute_epochs
from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import evaluation_dataset, load_run_cases
from hypersort_ray.atomic import atomic_write_text
from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.errors import ConfigError
from hypersort_ray.ray_cluster import connect
from hypersort_ray.runs import RunDir
from hypersort_ray.train.trainer import run_training

__all__ = [
    "CROSSFIT_COLUMNS",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "fit_latents",
    "fold_config",
    "parallel_folds",
    "run_crossfit",
]

log = logging.getLogger(__name__)

CROSSFIT_COLUMNS = ("crossfit_latent_norm", "crossfit_loss_drop", "crossfit_main_disagreement")
#: Adam steps and learning rate of the out-of-fold λ fit: at most ``steps · lr`` of travel, about what
#: the training's one latent step per epoch (lr 3e-2, 40 epochs) allows in-sample.
DEFAULT_STEPS = 20
DEFAULT_LR = 0.05


# ------------------------------------------------------------------------------------------ folds
def fold_config(
    cfg: ExperimentConfig, run: RunDir, fold: int, *, epochs: int, seed: int, workers: int
) -> ExperimentConfig:
    """Fold ``fold``'s training config: the run's own, on the fold's datalist, in the fold's folder.

    Tracking, the analysis after training, truth and resuming are off: a fold is a means, not a run a
    user looks at.
    """
    update = {
        "output_dir": run.crossfit_fold(fold).path,
        "data": cfg.data.model_copy(update={"datalist": run.crossfit_datalist(fold), "truth": None}),
        "training": cfg.training.model_copy(
            update={
                "epochs": int(epochs),
                "seed": int(seed),
                "resume_from": None,
                "scaling": cfg.training.scaling.model_copy(update={"num_workers": int(workers)}),
            }
        ),
        "tracking": cfg.tracking.model_copy(update={"enabled": False, "register_as": None}),
        "analysis": cfg.analysis.model_copy(update={"run_after_training": False}),
    }
    return ExperimentConfig.model_validate(cfg.model_copy(update=update).model_dump())


def _write_datalist(path: os.PathLike[str], cases: Sequence[Case]) -> None:
    lines = ["DataPath\tLabelPath", *(f"{c.image}\t{c.label}" for c in cases)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fold_done(fold_run: RunDir, cfg: ExperimentConfig, cases: Sequence[Case]) -> bool:
    """A fold trained earlier with the same config and cases is reused (a retried cross-fit)."""
    if not fold_run.has_checkpoint():
        return False
    try:
        ckpt_cfg = fold_run.read_config()
        meta = fold_run.checkpoint_meta()
    except Exception:  # noqa: BLE001 - unreadable: train it again
        return False
    same = ckpt_cfg.model == cfg.model and ckpt_cfg.training.seed == cfg.training.seed
    same_cases = meta.get("case_ids") == [c.case_id for c in cases]
    return bool(same and same_cases and meta.get("epoch") == cfg.training.epochs)


def parallel_folds(folds: int, workers: int, cpus_per_worker: float) -> int:
    """How many folds train at once: as many as the cluster's CPUs hold (at least 1, at most all).

    Ray Train gives up on a worker group whose placement group waits longer than a minute, so folds
    that do not fit are queued here rather than handed to Ray all at once.
    """
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return int(max(1, min(folds, cpus // max(workers * cpus_per_worker, 1e-9))))


def _train_folds(configs: list[ExperimentConfig], address: str | None) -> None:
    """Train the folds' runs concurrently (one Ray Train run per thread) on one Ray."""
    if not configs:
        return
    scaling = configs[0].training.scaling
    handle = connect(address, num_cpus=scaling.num_workers * scaling.cpus_per_worker)
    try:
        at_once = parallel_folds(len(configs), scaling.num_workers, scaling.cpus_per_worker)
        log.info("cross-fitting: training %d fold(s), %d at a time", len(configs), at_once)
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="crossfit") as pool:
            for _ in pool.map(lambda c: run_training(c, progress=False), configs):
                pass
    finally:
        if handle.started:
            handle.close()


# ------------------------------------------------------------------------------------------ λ fit
def fit_latents(
    hyper: Any,
    image: Any,
    label: Any,
    *,
    l1_weight: float,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    betas: Sequence[float] = (0.7, 0.9),
) -> dict[str, np.ndarray]:
    """Fit one λ per case with H frozen: Adam from λ = 0 on Σ_n L_seg(U_{H(λ_n)}(x_n), y_n) + w·‖λ_n‖₁.

    Each case's loss depends only on its own λ, so one Adam over the ``[B, d]`` table is B independent
    fits.

    Args:
        hyper: the fold's :class:`~hypersort_ray.model.hypernet.HyperNetwork` (not modified).
        image: ``[B, C, *spatial]`` preprocessed images.
        label: ``[B, 1, *spatial]`` class indices.
        l1_weight: the fold's effective L1 weight ``w``.
        steps: Adam steps.
        lr: Adam learning rate.
        betas: Adam betas (the training's latent optimiser's).

    Returns:
        ``latent [B, d]``, ``loss_main [B]`` (the loss at λ = 0), ``loss_fit [B]`` (at the fitted λ,
        L1 included), ``pred_main [B, *spatial]`` (the λ = 0 class map).
    """
    import torch

    from hypersort_ray.model.functional import batched_forward
    from hypersort_ray.model.losses import seg_loss_terms

    was_training = hyper.training
    hyper.eval()
    params = [p.requires_grad for p in hyper.parameters()]
    hyper.requires_grad_(False)
    x = torch.as_tensor(image).float()
    y = torch.as_tensor(label)
    latent = torch.zeros(x.shape[0], hyper.latent_dim, requires_grad=True)

    def seg(lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = batched_forward(hyper.primary, hyper.unflatten(hyper(lat)), x)
        return seg_loss_terms(logits, y).seg, logits

    try:
        with torch.no_grad():
            loss_main, logits = seg(torch.zeros_like(latent))
            pred_main = logits.argmax(1).numpy()
        opt = torch.optim.Adam([latent], lr=lr, betas=tuple(betas))
        for _ in range(int(steps)):
            loss, _ = seg(latent)
            total = (loss + l1_weight * latent.abs().sum(dim=1)).sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            loss_fit = seg(latent)[0] + l1_weight * latent.abs().sum(dim=1)
    finally:
        for p, flag in zip(hyper.parameters(), params, strict=True):
            p.requires_grad_(flag)
        hyper.train(was_training)
    return {
        "latent": latent.detach().numpy().astype(np.float64),
        "loss_main": loss_main.numpy().astype(np.float64),
        "loss_fit": loss_fit.numpy().astype(np.float64),
        "pred_main": pred_main,
    }


def _fold_scores(
    run: RunDir, fold: int, cfg: ExperimentConfig, held_out: Sequence[Case], all_cases: Sequence[Case],
    *, steps: int, lr: float, device: str,
) -> list[dict[str, Any]]:
    """The out-of-fold scores of fold ``fold``'s held-out cases, in batches of the training batch size."""
    import torch

    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.unet import build_primary

    fold_run = run.crossfit_fold(fold)
    ckpt = fold_run.load_checkpoint()
    hn = cfg.model.hypernet
    hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)
    hyper.load_state_dict(ckpt.hyper_state)
    hyper = hyper.to(device)
    l1 = float(ckpt.meta.get("l1_weight_effective", cfg.training.l1_weight))
    k = cfg.model.unet.out_channels
    dataset = evaluation_dataset(all_cases, cfg.preprocessing, k, indices=[c.index for c in held_out])
    rows = []
    batch = max(1, cfg.training.batch_size)
    for start in range(0, len(held_out), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(held_out)))]
        image = torch.stack([torch.as_tensor(it["image"]).float() for it in items]).to(device)
        label = torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)
        betas = cfg.training.latent.betas
        got = fit_latents(hyper, image, label, l1_weight=l1, steps=steps, lr=lr, betas=betas)
        for j, it in enumerate(items):
            rows.append(
                {
                    "index": int(it["index"]),
                    "case_id": str(it["case_id"]),
                    "crossfit_latent_norm": float(np.linalg.norm(got["latent"][j])),
                    "crossfit_loss_drop": float(got["loss_main"][j] - got["loss_fit"][j]),
                    "crossfit_main_disagreement": 1.0
                    - dice_score(got["pred_main"][j], np.asarray(label[j, 0].cpu()), k),
                }
            )
    return rows


# ------------------------------------------------------------------------------------------ entry
def run_crossfit(
    run_dir: str | os.PathLike[str],
    folds: int = 3,
    epochs: int | None = None,
    *,
    seed: int | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    workers_per_fold: int = 1,
    device: str = "cpu",
    address: str | None = None,
    write: bool = True,
) -> pd.DataFrame:
    """Cross-fitted latents and their scores for every training case of a run (module docstring).

    Args:
        run_dir: a run folder (its config and datalist; its checkpoint is not used).
        folds: K (at least 2).
        epochs: epochs per fold; default the equal-compute rule of the baselines.
        seed: folds and training seed; default ``training.seed``.
        steps, lr: the out-of-fold λ fit.
        workers_per_fold: Ray Train workers of each fold's run.
        device: where the λ fit runs (the folds train where the run's config says).
        address: the Ray cluster (None: ``RAY_ADDRESS``, else a private instance).
        write: save the table with :meth:`RunDir.write_crossfit` (settings in ``crossfit.json``).

    Returns:
        ``DataFrame[index, case_id, *CROSSFIT_COLUMNS]`` in index order; ``df.attrs`` the settings.

    Raises:
        ConfigError: fewer than 2 folds or steps < 1; RunError / DataError: as the baselines.
    """
    t0 = time.perf_counter()
    if steps < 1:
        raise ConfigError(f"crossfit steps must be at least 1, got {steps}")
    run = RunDir(run_dir).require()
    cfg, cases = load_run_cases(run)
    e_run = run.trained_epochs() or int(cfg.training.epochs)
    e_fold = equal_compute_epochs(e_run, folds) if epochs is None else int(epochs)
    seed = int(cfg.training.seed if seed is None else seed)
    fold_of = assign_folds(len(cases), folds, seed)
    configs, todo = [], []
    for fold in range(folds):
        train_cases = [c for c, f in zip(cases, fold_of, strict=True) if f != fold]
        fold_cfg = fold_config(cfg, run, fold, epochs=e_fold, seed=seed, workers=workers_per_fold)
        configs.append(fold_cfg)
        fold_run = run.crossfit_fold(fold)
        if _fold_done(fold_run, fold_cfg, train_cases):
            log.info("cross-fitting: fold %d already trained (%s)", fold, fold_run.path)
            continue
        if fold_run.path.exists():  # an unfinished or outdated fold: this module owns the folder
            shutil.rmtree(fold_run.path)
        _write_datalist(run.crossfit_datalist(fold), train_cases)
        todo.append(fold_cfg)
    t_train = time.perf_counter()
    _train_folds(todo, address)
    train_s = time.perf_counter() - t_train
    rows: list[dict[str, Any]] = []
    for fold in range(folds):
        held_out = [c for c, f in zip(cases, fold_of, strict=True) if f == fold]
        rows += _fold_scores(run, fold, configs[fold], held_out, cases, steps=steps, lr=lr, device=device)
    df = pd.DataFrame(rows, columns=["index", "case_id", *CROSSFIT_COLUMNS])
    df = df.sort_values("index", kind="stable").reset_index(drop=True)
    df.attrs.update(
        {
            "folds": int(folds),
            "epochs": int(e_fold),
            "run_epochs": int(e_run),
            "seed": seed,
            "fold": [int(f) for f in fold_of],
            "steps": int(steps),
            "lr": float(lr),
            "workers_per_fold": int(workers_per_fold),
            "rule": EQUAL_COMPUTE_RULE if epochs is None else "given",
            "train_seconds": round(train_s, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    if write:
        run.write_crossfit(df, df.attrs)
    return df
