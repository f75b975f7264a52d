"""The pipeline: train → analyze → register, composed once for the CLI, the demo and Tune trials.

The layers below know nothing of each other's order: the trainer trains (and calls a latent-map hook on
checkpoint epochs), the analysis analyses a run with a model it is handed, the registry registers a run
folder. This module wires them:

* :func:`train` / :func:`resume`: Ray Train, then (``analysis.run_after_training``) the analysis and
  (``tracking.register_as``) the registration; a failure after training warns and never loses the run.
* :func:`analyze`: loads the run's own model (inference) and runs the full analysis.
* :func:`sweep`: Ray Tune, each trial analysed by the same step (:func:`analyze_trial`).

Example:
    >>> summary = train(load_config("configs/demo.yaml", values={"output_dir": Path("runs/x")}))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypersort_ray.analysis.analyze import analyze as analyze_with_model
from hypersort_ray.analysis.correct import correct_cases
from hypersort_ray.analysis.plots import latent_map_png
from hypersort_ray.analysis.run import analyze_run
from hypersort_ray.atomic import atomic_write_bytes
from hypersort_ray.config import ExperimentConfig, SweepConfig
from hypersort_ray.crossfit import run_crossfit
from hypersort_ray.errors import ConfigError, HypersortError
from hypersort_ray.inference import load_model
from hypersort_ray.inference.devices import resolve_device
from hypersort_ray.runs import RunDir
from hypersort_ray.tracking.mlflow_logger import RunLogger
from hypersort_ray.tracking.registry import auto_register
from hypersort_ray.train.trainer import resume_config, run_training
from hypersort_ray.tune.sweep import run_sweep

__all__ = ["analyze", "analyze_trial", "correct", "draw_latent_map", "resume", "sweep", "train"]

log = logging.getLogger(__name__)


def draw_latent_map(run: RunDir, epoch: int) -> Path:
    """The latent map of a training epoch (the trainer's hook on checkpoint epochs)."""
    _, ids, values = run.read_latents()
    png = latent_map_png(values, ["all"] * len(ids), ids, title=f"Latents, epoch {epoch}")
    return atomic_write_bytes(run.latent_map_png(epoch), png)


def train(cfg: ExperimentConfig, address: str | None = None, *, progress: bool = True) -> dict[str, Any]:
    """A new training run (refuses a folder that holds one), then analysis and registration."""
    summary = run_training(cfg, address, progress=progress, latent_map=draw_latent_map)
    return {**summary, **_after_training(RunDir(summary["run_dir"]), cfg, progress)}


def resume(
    run_dir: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue a finished or interrupted run from its newest checkpoint, then analyse/register again.

    The analysis of the previous checkpoint no longer matches the run and is redone (readers refuse it).
    """
    cfg = resume_config(run_dir, epochs=epochs, overrides=overrides)
    summary = run_training(cfg, address, progress=progress, latent_map=draw_latent_map)
    return {**summary, **_after_training(RunDir(summary["run_dir"]), cfg, progress)}


def analyze(
    run_dir: str | os.PathLike[str],
    *,
    truth: Path | None = None,
    overrides: list[str] | None = None,
    baselines: bool = False,
    latent_only: bool = False,
    progress: bool = False,
    device: str = "cpu",
    maps: bool = False,
    crossfit: int | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """``hypersort analyze``: the latent analysis, plus (unless ``latent_only``) the model-based scores
    with the run's own checkpoint on ``device`` (and the out-of-fold baselines when asked), the
    disagreement maps (``maps``) and, with ``crossfit`` K, the cross-fitted latents of K fold runs
    trained in parallel first (:mod:`hypersort_ray.crossfit`) on the Ray cluster at ``address`` (None:
    ``RAY_ADDRESS``, else a private local instance)."""
    run = RunDir(run_dir).require()
    if latent_only:
        if maps or crossfit:
            raise ConfigError("--maps and --crossfit need the model: leave out --latent-only")
        return analyze_run(run.path, truth=truth, overrides=overrides, progress=progress)
    if crossfit:
        run.begin_analysis()  # new cross-fitted scores: the old analysis stops passing as current
        run_crossfit(run, folds=crossfit, device=device, address=address)
    # The checkpoint folder alone: the analysis refits the styles, so the run's saved ones (maybe of an
    # older checkpoint) are not needed to segment.
    model = load_model(run.checkpoint_dir, device=device, cache_size=0)
    return analyze_with_model(run, model, truth=truth, overrides=overrides, progress=progress,
                              baselines=baselines, maps=maps)


def correct(
    run_dir: str | os.PathLike[str], *, cases: str, style: str = "main", out: Path = Path("corrected"),
    device: str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """``hypersort correct``: the run's model (with its styles) re-segments the chosen training cases."""
    run = RunDir(run_dir).require()
    model = load_model(run.path, device=device)
    return correct_cases(run, model, cases=cases, style=style, out_dir=out, progress=progress)


def analyze_trial(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A sweep trial's analysis (its styles make ``val_dice_style``): the latent part only, to keep trials
    cheap; ``hypersort analyze`` on the trial folder adds the model-based scores."""
    analyze_run(Path(run_dir), progress=False)


def sweep(cfg: SweepConfig, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """``hypersort sweep``: Ray Tune over Ray Train trials, each analysed by :func:`analyze_trial`."""
    return run_sweep(cfg, address, resume, after_training=analyze_trial, latent_map=draw_latent_map)


def _after_training(run: RunDir, cfg: ExperimentConfig, progress: bool) -> dict[str, Any]:
    """Analysis and registration at the end of training; failures warn, never lose the run."""
    out: dict[str, Any] = {}
    summary = run.read_summary()
    logger = RunLogger(summary.get("tracking_uri") or "", run_id=summary.get("mlflow_run_id"),
                       enabled=cfg.tracking.enabled and bool(summary.get("mlflow_run_id")))
    if cfg.analysis.run_after_training:
        try:
            # On the driver's GPU when it has one (a GPU run's driver usually does).
            analysis = analyze(run, progress=progress, device=resolve_device("auto"))
            out["report"] = str(run.analysis.report_html)
            out["n_styles"] = analysis.get("n_styles")
            logger.log_artifact(run.analysis.folder, "analysis")
        except (HypersortError, OSError, ValueError, RuntimeError) as exc:  # the trained model is already safe
            log.warning("analysis after training failed (%s); run `hypersort analyze %s`", exc, run.path)
    if cfg.tracking.register_as:
        registered = auto_register(cfg, run.path)
        if registered:
            out["model_uri"] = registered.get("model_uri")
    return out
