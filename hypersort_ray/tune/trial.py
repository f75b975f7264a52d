"""One sweep trial: a complete Ray Train run inside a Ray Tune *function* trainable.

Ray 2.60 (Train V2) does not accept ``Tuner(trainer)``. The supported pattern, used here::

    def trial(config):                                    # Tune function trainable (an actor)
        trainer = build_trainer(cfg, cases, callbacks=[..., TuneReportCallback()])
        trainer.fit()                                     # starts a Train controller + workers
        ray.tune.report(final_metrics)

``TuneReportCallback`` (``ray.tune.integration.ray_train``) runs on the Train controller and forwards
every worker ``ray.train.report`` (rank 0's metrics) to the trial as one Tune result, so ASHA sees the
per-epoch metrics while the trial trains. When ASHA stops a trial, Tune ends the trial actor; the Train
controller it owns dies with it and the workers with the controller; Train's detached
``PlacementGroupCleaner`` then removes the workers' placement group. The cleaner polls the State API:
a sweep therefore keeps the dashboard on and, for a local Ray, tells every worker its address
(``RAY_API_SERVER_ADDRESS``), since the cleaner's auto-detection fails when several Ray instances share
a host and the placement group then leaks (both seen here; see :func:`hypersort_ray.ray_cluster.connect`).

What a trial leaves in ``SWEEP/trials/<trial_id>/`` is an ordinary run folder
(:class:`~hypersort_ray.runs.RunDir`) plus ``data/`` (the trial's training sub-datalist and re-indexed
truth table), ``validation.json`` and ``validation_history.csv``: ``load_model`` and ``hypersort analyze``
work on it unchanged. After training, the trial runs the sweep's ``after_training`` hook (the pipeline's
analysis step, handed down by :mod:`hypersort_ray.pipeline`) so that ``val_dice_style`` sees the styles.

Validation (``base.data.validation_fraction`` > 0): the held-out cases (:func:`split_validation`) never
get a latent; they are segmented with λ = 0 (the main style) on every checkpoint epoch (``val_dice``,
computed on the Train controller from the persisted checkpoint) and once more at the end with every
style the model knows (``val_dice_style``: per case the style closest to its label, i.e. the best
style's Dice). ``val_dice_unperturbed`` averages λ = 0 Dice over the held-out cases a truth table marks
as unperturbed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.atomic import atomic_write_json, atomic_write_text
from hypersort_ray.config import ExperimentConfig, SweepConfig
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.data.transforms import map_label_values
from hypersort_ray.data.truth import perturbed_by_index, read_truth_csv, resolve_truth_path
from hypersort_ray.errors import ConfigError
from hypersort_ray.inference import load_model
from hypersort_ray.runs import RunDir
from hypersort_ray.tracking.mlflow_logger import RunLogger, config_params
from hypersort_ray.train.trainer import (
    LatentMapHook,
    build_trainer,
    finalize_run,
    make_run_folder_callback,
    prepare_run_folder,
)
from hypersort_ray.tune.space import split_validation, trial_experiment

__all__ = ["TrialContext", "evaluate_validation", "prepare_trial_data", "run_trial", "truth_path"]

log = logging.getLogger(__name__)
#: What the pipeline runs in a trial after training (e.g. the analysis): ``hook(run_dir, config)``.
AfterTraining = Callable[[Path, ExperimentConfig], Any]

# A trial whose worker group cannot start (e.g. starved of CPUs) fails after this many controller
# retries instead of retrying forever (Train's default is -1 = forever).
CONTROLLER_FAILURE_LIMIT = 1
TRIAL_RUN_NAME = "train"  # fixed, so a retried or resumed trial continues its Train run from checkpoint
MLFLOW_ID_FILE = "mlflow_run_id.txt"
VAL_HISTORY = "validation_history.csv"


# --------------------------------------------------------------------------------------- context
def trial_context(
    sweep: SweepConfig,
    sweep_dir: Path,
    tracking_uri: str,
    parent_run_id: str | None,
    *,
    after_training: AfterTraining | None = None,
    latent_map: LatentMapHook | None = None,
) -> dict[str, Any]:
    """What every trial needs besides its sampled values (passed with ``tune.with_parameters``).

    The hooks must be module-level functions (Ray ships them to the trial actors by reference).
    """
    return {
        "sweep": sweep.model_dump(mode="json"),
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "tracking_uri": tracking_uri,
        "parent_run_id": parent_run_id,
        "fault": os.environ.get("HYPERSORT_TEST_FAULT"),
        "after_training": after_training,
        "latent_map": latent_map,
    }


TrialContext = dict[str, Any]


# ------------------------------------------------------------------------------------------- data
def truth_path(cfg: ExperimentConfig) -> Path | None:
    """The dataset's truth table (``data.truth``, else the one beside the datalist), or None."""
    return resolve_truth_path(None, cfg.data.truth, cfg.data.datalist)


def prepare_trial_data(cfg: ExperimentConfig, run_dir: Path) -> tuple[ExperimentConfig, list[dict[str, Any]]]:
    """Split the datalist into training and held-out cases and point the trial at its training part.

    With ``validation_fraction`` > 0, writes ``run_dir/data/datalist.tsv`` (training cases, absolute
    paths, new indices 0..N_train-1) and, when the datalist has a truth table, ``run_dir/data/truth.csv``
    with the same rows re-indexed (``source_index`` keeps the original index).

    Returns:
        The trial's config (``data.datalist``/``data.truth`` replaced) and the held-out cases as dicts
        ``{"index", "case_id", "image", "label", "perturbed"}`` (``perturbed`` None when unknown).
    """
    if cfg.data.datalist is None:
        raise ConfigError("base.data.datalist is not set: pass --datalist or set it in the sweep config")
    fraction = cfg.data.validation_fraction
    if fraction <= 0:
        return cfg, []
    cases = load_datalist(cfg.data.datalist)
    train_idx, val_idx = split_validation(len(cases), fraction)
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sub = data_dir / "datalist.tsv"
    lines = ["DataPath\tLabelPath"] + [f"{cases[i].image}\t{cases[i].label}" for i in train_idx]
    atomic_write_text(sub, "\n".join(lines) + "\n")

    truth_file = truth_path(cfg)
    perturbed: dict[int, bool] = {}
    new_truth = None
    if truth_file is not None:
        df = read_truth_csv(truth_file)
        if "index" in df.columns:
            perturbed = perturbed_by_index(df)
            position = {old: new for new, old in enumerate(train_idx)}
            part = df[df["index"].isin(position)].copy()
            part.insert(0, "source_index", part["index"].astype(int))
            part["index"] = part["source_index"].map(position)
            new_truth = data_dir / truth_file.name
            atomic_write_text(new_truth, part.sort_values("index").to_csv(index=False))
    data = cfg.data.model_copy(update={"datalist": sub, "truth": new_truth})
    held_out = [
        {"index": i, "case_id": cases[i].case_id, "image": str(cases[i].image), "label": str(cases[i].label),
         "perturbed": perturbed.get(i)}
        for i in val_idx
    ]
    atomic_write_json(data_dir / "validation_cases.json", held_out)
    return cfg.model_copy(update={"data": data}), held_out


# ------------------------------------------------------------------------------------- evaluation
def _mapped_label(path: str, cfg: ExperimentConfig) -> np.ndarray:
    import nibabel as nib

    return map_label_values(np.asanyarray(nib.load(path).dataobj), cfg.preprocessing.label)


def evaluate_validation(model_ref: str | Path, cases: Sequence[Mapping[str, Any]], *, all_styles: bool) -> dict[str, Any]:
    """Segment the held-out cases with λ = 0 (and every known style) and score them against their labels.

    Args:
        model_ref: a run folder, model folder or checkpoint folder (anything ``load_model`` takes).
        cases: held-out cases from :func:`prepare_trial_data`.
        all_styles: also try every style of the model (``val_dice_style``).

    Returns:
        ``{"val_dice", "val_dice_style", "val_dice_unperturbed", "val_cases", "val_styles", "per_case"}``
        (``val_dice_style``/``val_dice_unperturbed`` only when computed).
    """
    import torch

    if not cases:
        return {}
    torch.set_num_threads(1)  # runs beside training workers; never take every core
    model = load_model(model_ref, cache_size=8)
    styles = [s.id for s in model.styles] if all_styles else ["main"]
    if "main" not in styles:
        styles.insert(0, "main")
    per_case = []
    for case in cases:
        prepared = model.prepare(case["image"])
        label = _mapped_label(case["label"], model.config)
        scores = {s: dice_score(model.predict(prepared, style=s)["mask"], label, model.num_classes) for s in styles}
        best = max(scores, key=lambda s: scores[s])
        per_case.append({"case_id": case["case_id"], "index": case["index"], "perturbed": case.get("perturbed"),
                         "dice_main": scores["main"], "best_style": best, "dice_best_style": scores[best]})
    out: dict[str, Any] = {
        "val_dice": float(np.mean([c["dice_main"] for c in per_case])),
        "val_cases": len(per_case),
        "val_styles": len(styles),
        "per_case": per_case,
    }
    if all_styles:
        out["val_dice_style"] = float(np.mean([c["dice_best_style"] for c in per_case]))
    clean = [c["dice_main"] for c in per_case if c["perturbed"] is False]
    if clean:
        out["val_dice_unperturbed"] = float(np.mean(clean))
    return out


def _scalar_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _make_report_callback(held_out: list[dict[str, Any]], metric: str, run_dir: Path):
    """``TuneReportCallback`` that first adds ``val_dice`` (λ = 0, held-out cases) on checkpoint epochs.

    It runs on the Train controller and updates the reported metrics in place before forwarding them, so
    the run folder callback after it writes the same values to ``history.csv`` and MLflow. Epochs
    without a checkpoint report ``val_dice`` as NaN (the key must be present for Tune's metric check);
    the sweep aligns checkpoint epochs with ASHA's rungs (see ``sweep.effective_sweep``). The objective
    key is always present (NaN when an epoch could not compute it), as Tune's metric check requires.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def __init__(self, cases: list[dict[str, Any]], metric: str, run_dir: Path) -> None:
            super().__init__()
            self.cases = cases
            self.metric = metric
            self.history_csv = run_dir / VAL_HISTORY

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and self.cases:
                m = metrics[0]
                m["val_dice"] = math.nan
                if checkpoint is not None:
                    try:
                        with checkpoint.as_directory() as d:
                            res = evaluate_validation(Path(d), self.cases, all_styles=False)
                        m["val_dice"] = res["val_dice"]
                        if "val_dice_unperturbed" in res:
                            m["val_dice_unperturbed"] = res["val_dice_unperturbed"]
                        _append_csv(self.history_csv, {"epoch": m.get("epoch"), **{
                            k: v for k, v in m.items() if k.startswith("val_")}})
                    except Exception as exc:  # noqa: BLE001 - a failed evaluation must not stop training
                        log.warning("validation at epoch %s failed: %s", m.get("epoch"), exc)
            if metrics:
                metrics[0].setdefault(self.metric, math.nan)
            super().after_report(run_context, metrics, checkpoint)

    return ValidationReportCallback(held_out, metric, run_dir)


def _append_csv(path: Path, row: Mapping[str, Any]) -> None:
    import csv

    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _merge_validation_history(run: RunDir) -> None:
    """Add the per-epoch held-out Dice (computed on the controller) to the run's history."""
    import pandas as pd

    val_csv, hist = run.path / VAL_HISTORY, run.read_history()
    if not val_csv.is_file() or hist is None:
        return
    val = pd.read_csv(val_csv).drop_duplicates("epoch", keep="last")
    hist = hist.drop(columns=[c for c in val.columns if c != "epoch" and c in hist.columns])
    run.write_history(hist.merge(val, on="epoch", how="left").to_dict("records"))


# --------------------------------------------------------------------------------------- the trial
def _child_logger(ctx: TrialContext, cfg: ExperimentConfig, run_dir: Path, trial_id: str, sample: Mapping[str, Any]):
    """The trial's MLflow child run (reused when the trial is retried or the sweep resumed)."""
    logger = RunLogger(ctx["tracking_uri"], enabled=cfg.tracking.enabled)
    id_file = run_dir / MLFLOW_ID_FILE
    if id_file.is_file() and id_file.read_text().strip():
        logger.run_id = id_file.read_text().strip()
        logger.set_tags({"hypersort.trial_attempts": _bump_attempts(run_dir)})
        return logger
    name = f"{ctx['sweep']['name']}-{trial_id}"
    tags = {"hypersort.sweep": ctx["sweep"]["name"], "hypersort.trial_id": trial_id, "hypersort.run_dir": str(run_dir)}
    logger.start(cfg.tracking.experiment, name, tags=tags, parent_run_id=ctx.get("parent_run_id"))
    if logger.run_id:
        atomic_write_text(id_file, logger.run_id + "\n")
        logger.log_params(config_params(cfg))
        logger.set_tags({f"sampled.{k}": v for k, v in sample.items()})
    _bump_attempts(run_dir)
    return logger


def _bump_attempts(run_dir: Path) -> int:
    path = run_dir / ".attempts"
    n = int(path.read_text()) + 1 if path.is_file() else 1
    atomic_write_text(path, str(n))
    return n


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(run_trial, ctx=...)``).

    Args:
        config: the sampled values, keyed by dotted config key (Tune's ``param_space``).
        ctx: :func:`trial_context`.
    """
    import ray.tune

    t0 = time.time()
    sweep = SweepConfig.model_validate(ctx["sweep"])
    sample = {k: config[k] for k in sweep.space if k in config}
    trial_id = ray.tune.get_context().get_trial_id()
    run = RunDir(Path(ctx["sweep_dir"]) / "trials" / trial_id)
    run.path.mkdir(parents=True, exist_ok=True)
    if ctx.get("fault"):
        os.environ["HYPERSORT_TEST_FAULT"] = ctx["fault"]  # test-only; read by build_trainer

    cfg = trial_experiment(sweep, sample)
    cfg = cfg.model_copy(update={"output_dir": run.path, "name": f"{sweep.name}-{trial_id}"})
    cfg, held_out = prepare_trial_data(cfg, run.path)
    # A retried trial reuses its folder: Ray Train continues from the trial's own checkpoints.
    cfg, cases = prepare_run_folder(cfg, if_exists="reuse")
    logger = _child_logger(ctx, cfg, run.path, trial_id, sample)
    try:
        final = _train_and_evaluate(ctx, cfg, run, cases, held_out, logger, sweep.metric, t0)
        logger.end("FINISHED")
    except BaseException:
        logger.end("FAILED")
        raise
    ray.tune.report(final)


def _train_and_evaluate(
    ctx: TrialContext, cfg: ExperimentConfig, run: RunDir, cases: list, held_out: list, logger: RunLogger,
    metric: str, t0: float,
) -> dict[str, Any]:
    """Train the trial, then score its held-out cases with every style; returns the final Tune result."""
    from ray.train import FailureConfig

    callbacks = [
        _make_report_callback(held_out, metric, run.path),
        make_run_folder_callback(run, cfg, logger, [c.case_id for c in cases], latent_map=ctx.get("latent_map")),
    ]
    trainer = build_trainer(cfg, cases, callbacks, name=TRIAL_RUN_NAME, storage_path=run.ray_results_dir)
    # Workers that crash are restarted from the trial's last checkpoint (training.max_failures); a
    # worker group that cannot even start fails the trial instead of retrying forever.
    trainer.run_config.failure_config = FailureConfig(
        max_failures=cfg.training.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {run.path.name}: training finished without a checkpoint")
    summary = finalize_run(run, result.checkpoint, cases, logger, seconds=time.time() - t0)
    _merge_validation_history(run)
    final = dict(result.metrics or {})
    final.pop("checkpoint_path", None)
    if held_out:
        hook = ctx.get("after_training")
        if hook is not None and cfg.analysis.run_after_training:
            try:
                hook(run.path, cfg)
            except Exception as exc:  # noqa: BLE001 - styles are a bonus; λ = 0 Dice is the objective
                log.warning("analysis of %s failed (%s); val_dice_style uses λ = 0 only", run.path, exc)
        evaluation = evaluate_validation(run.path, held_out, all_styles=True)
        atomic_write_json(run.path / "validation.json", evaluation)
        final.update({k: v for k, v in evaluation.items() if k != "per_case"})
    final.update({"seconds": round(time.time() - t0, 1), "trial_done": 1, "mlflow_run_id": logger.run_id or "",
                  "run_dir": str(run.path)})
    final.setdefault("epoch", summary.get("epochs"))
    logger.log_metrics({k: v for k, v in _scalar_metrics(final).items() if k.startswith("val_")},
                       step=int(final.get("epoch") or 0))
    return final
