"""The latent analysis of a run folder: styles, suspicion ranking, metrics, maps and the curation report.

:func:`analyze_run` is ``hypersort analyze --latent-only``; :func:`~.analyze.analyze` adds the
model-based scores and composes the same steps. Both read the run through
:class:`~hypersort_ray.runs.RunDir` (its config, latents, per-epoch history and, when present, per-case
training losses: the ``train_loss`` score, each case's own Dice+CE loss averaged over the epochs) and
write its analysis folder (``run.analysis``):

=====================  ===============================================================================
``suspicion_csv``      ``index,case_id,suspicion,flagged_by,latent_norm,mean_distance,outlier_score,
                       style[,extra scores][,error_* location]``, most suspicious first (ranked by
                       ``suspicion`` unless told otherwise; :mod:`.scores`)
``maps_dir``           with ``maps=True``: each case's disagreement map (:mod:`.localisation`), NIfTI in
                       its label's geometry; removed when an analysis is made without maps
``styles_json``        the fitted styles (:meth:`~.styles.StyleModel.to_json`) + the checkpoint's identity
``metrics_json``       only with a truth CSV (:mod:`.metrics`); an older one is removed without truth
``latent_map_png``     static map; ``latent_map_html``: interactive, self-contained
``loss_curves_png``    from the history (skipped with a note when there is none)
``report_html``        the curation report (:mod:`.report`)
``provenance_json``    written last: the checkpoint the outputs were made from
=====================  ===============================================================================

The steps, one function each and in this order: :func:`read_inputs` → :func:`fit_styles` →
:func:`score_cases` → :func:`truth_metrics` → :func:`draw_figures` → :func:`render_report` (together
:func:`compute_analysis`, which writes nothing) → :func:`write_analysis` → :func:`summarize`.

Model-based parts come in through two hooks, so this module never loads a model:

* ``predictor`` (:data:`~.evaluation.Predictor`): segments training cases with a style or a latent. With
  it, every case's main-style prediction in its label's grid gives the largest disagreement component
  (centre and volume columns, :mod:`.localisation`; optionally the maps) and, unless given as an extra
  score, ``main_style_disagreement = 1 - Dice(main-style prediction, given label)``; the report shows
  slices through each suspicious case's disagreement with its main-style and own-style predictions.
* ``extra_scores``: more score columns computed elsewhere (e.g. :mod:`.model_scores`), as a DataFrame
  with an ``index`` column or a mapping name -> values in the latents' row order.

The λ-trajectory scores (:mod:`.trajectory`) come from the run's own latent trajectory when it has one.

Example:
    >>> summary = analyze_run("runs/demo", truth=Path("synth/truth.csv"))     # doctest: +SKIP
    >>> summary["n_styles"], summary["top_suspicious"][:2]                     # doctest: +SKIP
    (3, ['case_0042', 'case_0007'])
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from hypersort_ray.analysis import plots
from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import (
    Predictor,
    datalist_path,
    predict_cases,
    progress_bar,
    read_volume,
)
from hypersort_ray.analysis.figures import Figures, case_thumbnails, style_montages
from hypersort_ray.analysis.localisation import LOCATION_COLUMNS, disagreement_map, localise
from hypersort_ray.analysis.metrics import AlignedTruth, align_truth, compute_metrics
from hypersort_ray.analysis.report import ReportInputs, build_report
from hypersort_ray.analysis.scores import (
    DEFAULT_RANK_BY,
    MAIN_STYLE_DISAGREEMENT,
    OWN_VS_MAIN_DISAGREEMENT,
    SCORE_COLUMNS,
    SUSPICION,
    TRAIN_LOSS,
    score_columns,
    suspicion_table,
    write_suspicion_csv,
)
from hypersort_ray.analysis.styles import StyleModel, discover_styles
from hypersort_ray.analysis.trajectory import TRAJECTORY_COLUMNS, trajectory_scores
from hypersort_ray.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, replace_dir
from hypersort_ray.config import AnalysisConfig, ExperimentConfig, apply_overrides, format_validation_error
from hypersort_ray.data.datalist import Case, load_datalist
from hypersort_ray.data.nifti import NiftiGeometry, save_like
from hypersort_ray.data.truth import read_truth_csv, resolve_truth_path
from hypersort_ray.errors import ConfigError, DataError, RunError
from hypersort_ray.runs import RunDir

__all__ = [
    "LatentAnalysis",
    "RunInputs",
    "analysis_settings",
    "analyze_run",
    "compute_analysis",
    "draw_figures",
    "fit_styles",
    "read_inputs",
    "render_report",
    "score_cases",
    "styles_of_run",
    "summarize",
    "truth_metrics",
    "write_analysis",
]

logger = logging.getLogger(__name__)

# Cases handed to the predictor per call when scoring every case (bounds its memory).
PREDICT_CHUNK = 8
# Scores whose AUROC/Spearman the summary reports (when the metrics have them).
KEY_SCORES = (SUSPICION, *SCORE_COLUMNS, TRAIN_LOSS, MAIN_STYLE_DISAGREEMENT, OWN_VS_MAIN_DISAGREEMENT)


@dataclass
class RunInputs:
    """What the analysis reads from a run before any computing.

    Attributes:
        run: the run folder.
        cfg: its config.
        settings: the analysis settings (overrides applied).
        rank_by: the score column that ranks the suspicion table.
        indices, case_ids, latents: the latents table (sorted by sample index).
        history: the per-epoch history (None when unusable; a note says why).
        truth_path: the truth CSV used (None: no metrics).
        truth: the truth aligned to the run's cases.
        cases: datalist cases by sample index ({} when the datalist is unusable; a note says why).
        notes: what the reader of the report should know (skipped parts and why); later steps add to it.
    """

    run: RunDir
    cfg: ExperimentConfig
    settings: AnalysisConfig
    rank_by: str
    indices: np.ndarray
    case_ids: list[str]
    latents: np.ndarray
    history: pd.DataFrame | None
    truth_path: Path | None
    truth: AlignedTruth | None
    cases: dict[int, Case]
    notes: list[str]


@dataclass
class LatentAnalysis:
    """The computed analysis, not yet written.

    Attributes:
        inputs: what was read.
        styles: the fitted styles.
        table: the ranked suspicion table.
        metrics: the metrics document (None without truth).
        figures: maps, curves and thumbnails.
        report_html: the report page.
        maps_staging: the disagreement maps, written into a staging folder beside ``maps_dir`` (None:
            no maps asked for or possible); :func:`write_analysis` swaps it in whole.
    """

    inputs: RunInputs
    styles: StyleModel
    table: pd.DataFrame
    metrics: dict[str, Any] | None
    figures: Figures
    report_html: str
    maps_staging: Path | None = None


# ------------------------------------------------------------------------------------------ entry
def analyze_run(
    run_dir: str | os.PathLike[str],
    truth: Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    predictor: Predictor | None = None,
    *,
    rank_by: str | None = None,
    extra_scores: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
    maps: bool = False,
) -> dict[str, Any]:
    """Analyse a run folder and write its analysis folder (contents in the module docstring).

    Args:
        run_dir: the run folder written by ``hypersort train`` (or a :class:`RunDir`).
        truth: truth CSV; default ``data.truth`` of the run's config, else ``truth.csv`` beside the
            datalist, else none (no metrics).
        overrides: ``key=value`` on the analysis settings (``min_cluster_size=5``,
            ``cluster_selection_method=leaf``, ``top_k=20``; ``analysis.`` prefix optional).
        progress: progress bars on stderr (stage messages go to this module's logger).
        predictor: optional model hook (module docstring); None skips model-based parts.
        rank_by: score column ranking the suspicion table (default ``analysis.rank_by``).
        extra_scores: optional extra score columns (module docstring).
        maps: also write every case's disagreement map (needs ``predictor``).

    Returns:
        Summary (:func:`summarize`): output paths, number of styles, main style size, top-5 suspicious
        case ids, key metrics (AUROC/Spearman per score, ARI, eroded/dilated cosine) and notes.

    Raises:
        RunError: missing run folder/config/latents, latent dimension mismatch.
        ConfigError: bad override, config or ranking column.
        DataError: bad truth CSV (unknown ids, malformed), or a predictor output not matching a label.
    """
    run = RunDir(run_dir)
    result = compute_analysis(
        run, truth, overrides, progress, predictor, rank_by=rank_by, extra_scores=extra_scores, maps=maps
    )
    run.begin_analysis()
    files = write_analysis(run, result)
    run.write_analysis_provenance(files)
    logger.info("wrote %s", run.analysis.folder)
    return summarize(result, files)


def compute_analysis(
    run_dir: str | os.PathLike[str],
    truth: Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    predictor: Predictor | None = None,
    *,
    rank_by: str | None = None,
    extra_scores: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
    maps: bool = False,
) -> LatentAnalysis:
    """Every step of the analysis up to the files: read, fit, score, measure, draw, render.

    Nothing of the analysis is replaced, so a failure leaves the previous one as it was (maps are
    written into a staging folder, removed on failure). Arguments as for :func:`analyze_run`.
    """
    run = RunDir(run_dir)
    logger.info("reading %s", run.path)
    inputs = read_inputs(run, truth, overrides, rank_by)
    logger.info("styles of %d latents (d = %d)", len(inputs.indices), inputs.latents.shape[1])
    styles = fit_styles(inputs.latents, inputs.case_ids, inputs.indices, inputs.settings)
    staging = _maps_staging(inputs, predictor) if maps else None
    try:
        table = score_cases(inputs, styles, predictor, extra_scores, progress, maps_dir=staging)
        metrics = truth_metrics(inputs, table, styles)
        figures = draw_figures(inputs, styles, table, predictor)
        page = render_report(inputs, styles, table, metrics, figures, predictor is not None)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return LatentAnalysis(inputs, styles, table, metrics, figures, page, staging)


def _maps_staging(inputs: RunInputs, predictor: Predictor | None) -> Path | None:
    """A fresh folder beside the maps folder to write the maps into (None, noted, without a model)."""
    if predictor is None or not inputs.cases:
        inputs.notes.append("disagreement maps need the model and the datalist: none written")
        return None
    folder = inputs.run.analysis.folder
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{inputs.run.analysis.maps_dir.name}.tmp-", dir=folder))


# ----------------------------------------------------------------------------------------- inputs
def analysis_settings(cfg: ExperimentConfig, overrides: Sequence[str] | None) -> AnalysisConfig:
    """The run's analysis settings with ``key=value`` overrides applied and validated.

    Args:
        cfg: the run's config.
        overrides: ``min_cluster_size=5`` style strings; an ``analysis.`` prefix is accepted too.

    Raises:
        ConfigError: unknown key or invalid value (the message names it).
    """
    data = cfg.analysis.model_dump()
    cleaned = [
        o.split("analysis.", 1)[1] if o.strip().startswith("analysis.") else o for o in overrides or []
    ]
    apply_overrides(data, cleaned)
    try:
        return AnalysisConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "analyze --set")) from None


def read_inputs(
    run: RunDir, truth: Path | None, overrides: Sequence[str] | None, rank_by: str | None
) -> RunInputs:
    """Config, latents and settings (errors), then history, truth and cases (notes where optional).

    The truth is read before any expensive work, so a bad file fails fast.

    Args:
        run: the run folder.
        truth: an explicit truth CSV, or None (resolved from the config).
        overrides: analysis setting overrides.
        rank_by: the ranking column (None: ``analysis.rank_by``).
    """
    cfg = run.read_config()
    indices, case_ids, latents = run.read_latents(cfg.model.hypernet.latent_dim)
    settings = analysis_settings(cfg, overrides)
    notes: list[str] = []
    history = _read_history(run, notes)
    truth_path = resolve_truth_path(truth, cfg.data.truth, cfg.data.datalist, base=run.path)
    aligned = _read_truth(truth_path, indices, case_ids, notes) if truth_path is not None else None
    cases = _load_cases(cfg, run, indices, case_ids, notes)
    return RunInputs(
        run=run,
        cfg=cfg,
        settings=settings,
        rank_by=rank_by or settings.rank_by or DEFAULT_RANK_BY,
        indices=indices,
        case_ids=case_ids,
        latents=latents,
        history=history,
        truth_path=truth_path,
        truth=aligned,
        cases=cases,
        notes=notes,
    )


def _read_history(run: RunDir, notes: list[str]) -> pd.DataFrame | None:
    """The per-epoch history, or None with a note (a run without curves is still worth analysing)."""
    name = run.history_csv.name
    try:
        history = run.read_history()
    except RunError as exc:
        notes.append(f"{name} is not usable ({exc}): no training curves")
        return None
    if history is None:
        notes.append(f"{name} not found: no training curves")
    return history


def _read_truth(path: Path, indices: np.ndarray, case_ids: Sequence[str], notes: list[str]) -> AlignedTruth:
    """The truth aligned to the run's cases; alignment warnings become notes (and log lines)."""
    frame = read_truth_csv(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = align_truth(frame, indices, case_ids, source=str(path))
    for w in caught:
        notes.append(str(w.message))
        logger.warning("%s", w.message)
    return aligned


def _load_cases(
    cfg: ExperimentConfig, run: RunDir, indices: np.ndarray, case_ids: Sequence[str], notes: list[str]
) -> dict[int, Case]:
    """Datalist cases by sample index, or {} with a note saying why (then no thumbnails)."""
    datalist = datalist_path(cfg, run)
    if datalist is None:
        where = cfg.data.datalist or "data.datalist (not set)"
        notes.append(f"datalist {where} not found: no slice thumbnails")
        return {}
    try:
        cases = load_datalist(datalist)
    except DataError as exc:
        notes.append(f"datalist {datalist} unusable ({exc}): no slice thumbnails")
        return {}
    by_index = {c.index: c for c in cases}
    run_ids = {int(i): c for i, c in zip(indices, case_ids, strict=True)}
    latents_name = run.latents_csv.name
    if set(run_ids) - set(by_index):
        notes.append(
            f"datalist {datalist} has {len(cases)} cases but {latents_name} has sample indices up to "
            f"{max(run_ids)}: not the run's dataset, no slice thumbnails"
        )
        return {}
    clash = [i for i in run_ids if run_ids[i] != by_index[i].case_id]
    if len(clash) > max(1, len(run_ids) // 20):
        notes.append(
            f"datalist {datalist} does not match {latents_name} for {len(clash)} cases (e.g. index "
            f"{clash[0]}: {by_index[clash[0]].case_id!r} vs {run_ids[clash[0]]!r}): no slice thumbnails"
        )
        return {}
    if clash:
        notes.append(
            f"datalist case ids differ from {latents_name} for index {', '.join(map(str, clash))} "
            f"(e.g. {by_index[clash[0]].case_id!r} vs {run_ids[clash[0]]!r}); matched by sample index"
        )
    return by_index


# ----------------------------------------------------------------------------------------- styles
def fit_styles(
    latents: np.ndarray, case_ids: list[str], indices: np.ndarray, settings: AnalysisConfig
) -> StyleModel:
    """The one styles fit of a run (``analyze`` and :func:`styles_of_run` must agree).

    Args:
        latents: ``[N, d]`` latents.
        case_ids: their case ids.
        indices: their sample indices.
        settings: the analysis settings (HDBSCAN parameters).
    """
    return discover_styles(
        latents,
        case_ids,
        indices,
        min_cluster_size=settings.min_cluster_size,
        min_samples=settings.min_samples,
        cluster_selection_method=settings.cluster_selection_method,
    )


def styles_of_run(run_dir: str | os.PathLike[str], overrides: list[str] | None = None) -> StyleModel:
    """Re-fit the styles of a run (deterministic: the same as ``analyze`` wrote) for ``assign_styles``.

    Args:
        run_dir: the run folder.
        overrides: analysis overrides used for the analysis, if any.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    indices, case_ids, latents = run.read_latents(cfg.model.hypernet.latent_dim)
    return fit_styles(latents, case_ids, indices, analysis_settings(cfg, overrides))


# ----------------------------------------------------------------------------------------- scores
def score_cases(
    inputs: RunInputs,
    styles: StyleModel,
    predictor: Predictor | None,
    extra_scores: pd.DataFrame | Mapping[str, Sequence[float]] | None,
    progress: bool,
    maps_dir: Path | None = None,
) -> pd.DataFrame:
    """The ranked suspicion table: latent, outlier, trajectory, extra and model-based scores, the
    combined ``suspicion`` and, with a predictor, where each case's largest disagreement is.

    Args:
        inputs, styles, predictor, extra_scores, progress: as for :func:`compute_analysis`.
        maps_dir: write each case's disagreement map here (None: no maps).

    Raises:
        ConfigError: the ranking column is not a score of the table.
    """
    extra = _merge_extra_scores(extra_scores, inputs.indices)
    if TRAIN_LOSS not in extra:
        train_loss = _train_loss_score(inputs.run, inputs.indices, inputs.notes)
        if train_loss is not None:
            extra[TRAIN_LOSS] = train_loss
    if not any(c in extra for c in TRAJECTORY_COLUMNS):
        extra.update(_trajectory_scores(inputs.run, inputs.indices, inputs.notes))
    locations: dict[str, np.ndarray] = {}
    if predictor is None:
        inputs.notes.append("no model predictor given: model-based scores and prediction thumbnails skipped")
    elif not inputs.cases:
        inputs.notes.append(
            "a model predictor was given but the datalist is unavailable: model-based scores skipped"
        )
    else:
        disagreement, locations = _main_style_pass(
            predictor, inputs, progress, score=MAIN_STYLE_DISAGREEMENT not in extra, maps_dir=maps_dir
        )
        if disagreement is not None:
            extra[MAIN_STYLE_DISAGREEMENT] = disagreement
    try:
        return suspicion_table(
            inputs.indices, inputs.case_ids, inputs.latents, styles.outlier_scores, styles.keys, extra,
            rank_by=inputs.rank_by, locations=locations,
        )
    except ValueError as exc:
        raise ConfigError(f"analysis ranking: {exc}") from None


def _trajectory_scores(run: RunDir, indices: np.ndarray, notes: list[str]) -> dict[str, np.ndarray]:
    """The λ-trajectory scores in run order ({} for runs without a trajectory: older runs, imports)."""
    try:
        trajectory = run.read_latent_trajectory()
    except RunError as exc:
        notes.append(f"λ-trajectory scores skipped: {exc}")
        return {}
    if trajectory is None:
        return {}
    _, traj_indices, values = trajectory
    position = {int(i): p for p, i in enumerate(traj_indices)}
    if any(int(i) not in position for i in indices):
        name = run.latent_trajectory_csv.name
        notes.append(f"λ-trajectory scores skipped: {name} lacks some of the run's cases")
        return {}
    rows = [position[int(i)] for i in indices]
    return {name: values_[rows] for name, values_ in trajectory_scores(values).items()}


def _merge_extra_scores(
    extra: pd.DataFrame | Mapping[str, Sequence[float]] | None, indices: np.ndarray
) -> dict[str, np.ndarray]:
    """Extra score columns in the latents' row order (NaN where a case has no value)."""
    if extra is None:
        return {}
    if isinstance(extra, pd.DataFrame):
        if "index" not in extra.columns:
            raise ValueError("extra_scores DataFrame needs an 'index' column")
        frame = extra.set_index("index")
        cols = [c for c in frame.columns if c != "case_id" and pd.api.types.is_numeric_dtype(frame[c])]
        return {c: frame[c].reindex(indices).to_numpy(dtype=np.float64) for c in cols}
    return {str(k): np.asarray(v, dtype=np.float64) for k, v in extra.items()}


def _train_loss_score(run: RunDir, indices: np.ndarray, notes: list[str]) -> np.ndarray | None:
    """``train_loss`` in run order: each case's own Dice+CE loss averaged over the training epochs.

    Runs without a per-sample loss record (older runs, imported reference models) have no such column.
    """
    try:
        losses = run.read_sample_losses()
    except RunError as exc:
        notes.append(f"{TRAIN_LOSS} skipped: {exc}")
        return None
    if losses is None:
        return None
    values = np.array([losses.get(int(i), np.nan) for i in indices], dtype=np.float64)
    if np.isnan(values).all():
        notes.append(f"{TRAIN_LOSS} skipped: {run.sample_losses_csv} has no value for the run's cases")
        return None
    return values


def _main_style_pass(
    predictor: Predictor, inputs: RunInputs, progress: bool, *, score: bool, maps_dir: Path | None
) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Every case's main-style prediction in its label's grid, once: the largest disagreement component
    (location columns), optionally ``1 - Dice`` (the score) and the disagreement map.

    Returns:
        ``(main_style_disagreement or None, {location column: values})`` in run order (NaN where a case
        has no files or no disagreement).
    """
    from hypersort_ray.data.transforms import map_label_values  # lazy: torch/monai

    label_cfg = inputs.cfg.preprocessing.label
    values = np.full(len(inputs.indices), np.nan)
    locations = {c: np.full(len(inputs.indices), np.nan) for c in LOCATION_COLUMNS}
    todo = [(row, int(i)) for row, i in enumerate(inputs.indices) if int(i) in inputs.cases]
    chunks = [todo[start : start + PREDICT_CHUNK] for start in range(0, len(todo), PREDICT_CHUNK)]
    for chunk in progress_bar(chunks, progress, "main-style predictions", unit="chunk"):
        preds = predict_cases(predictor, "main", [i for _, i in chunk])
        for row, index in chunk:
            case = inputs.cases[index]
            img, raw = read_volume(case.label, "label", case.case_id)
            label = map_label_values(raw, label_cfg)
            pred = np.asarray(preds[index])
            if pred.shape != label.shape:
                raise DataError(
                    f"case {case.case_id}: prediction shape {pred.shape} differs from label {case.label} "
                    f"{label.shape}"
                )
            if score:
                values[row] = 1.0 - dice_score(pred, label, label_cfg.num_classes)
            if label.ndim == 3:
                for column, value in localise(label, pred, img.affine).columns().items():
                    locations[column][row] = value
            if maps_dir is not None:
                geometry = NiftiGeometry.from_header(img.header, source=f"case {case.case_id}: label {case.label}")
                path = inputs.run.analysis.disagreement_map(case.case_id, folder=maps_dir)
                save_like(path, disagreement_map(label, pred), geometry, dtype=np.uint8)
    return (values if score else None), locations


# ---------------------------------------------------------------------------------------- metrics
def truth_metrics(inputs: RunInputs, table: pd.DataFrame, styles: StyleModel) -> dict[str, Any] | None:
    """The metrics document against the truth (None without truth)."""
    if inputs.truth is None:
        return None
    logger.info("metrics vs %s", inputs.truth_path)
    return compute_metrics(
        table, inputs.truth, inputs.latents, styles.keys, np.asarray(styles.main.centroid),
        score_columns=score_columns(table),
    )


# ---------------------------------------------------------------------------------------- figures
def draw_figures(
    inputs: RunInputs, styles: StyleModel, table: pd.DataFrame, predictor: Predictor | None
) -> Figures:
    """Latent maps (the top-k cases highlighted), loss curves, case thumbnails and style montages."""
    logger.info("figures")
    top_k = min(inputs.settings.top_k, len(table))
    position = {int(i): r for r, i in enumerate(inputs.indices)}
    top_rows = [position[int(i)] for i in table["index"].head(top_k)]
    kinds = _kinds_in_run_order(inputs)
    cases, cfg, notes = inputs.cases, inputs.cfg, inputs.notes
    centres = _centres(table)
    thumbs = (
        case_thumbnails(
            top_rows, inputs.indices, cases, cfg, predictor, notes, latents=inputs.latents, centres=centres
        )
        if cases
        else {}
    )
    style_thumbs = style_montages(styles, cases, cfg, predictor, notes) if cases else {}
    map_png = plots.latent_map_png(
        inputs.latents, styles.keys, inputs.case_ids, highlight=top_rows, kinds=kinds
    )
    map_html = plots.latent_map_html(
        inputs.latents,
        table.set_index("index").loc[inputs.indices].reset_index(),  # back in the latents' row order
        thumbnails={i: plots.data_uri(t.png) for i, t in thumbs.items()},
        kinds=kinds,
        title=f"HyperSORT latent map: {cfg.name}",
        download_name=inputs.run.analysis.latent_map_png.stem,
    )
    curves = _loss_curves(inputs)
    return Figures(map_png, map_html, curves, thumbs, style_thumbs, top_k)


def _centres(table: pd.DataFrame) -> dict[int, tuple[int, int, int] | None]:
    """Sample index -> the largest disagreement's voxel (rounded), where the table has one."""
    cols = list(LOCATION_COLUMNS[:3])
    if not set(cols) <= set(table.columns):
        return {}
    out: dict[int, tuple[int, int, int] | None] = {}
    for index, *voxel in table[["index", *cols]].itertuples(index=False):
        ok = all(np.isfinite(v) for v in voxel)
        out[int(index)] = tuple(int(round(v)) for v in voxel) if ok else None  # type: ignore[assignment]
    return out


def _kinds_in_run_order(inputs: RunInputs) -> np.ndarray | None:
    """The truth's kind per latents row ("?" where a case has no truth), or None without kinds."""
    if inputs.truth is None or inputs.truth.kinds is None:
        return None
    kinds = np.full(len(inputs.indices), "?", dtype=object)
    kinds[inputs.truth.rows] = inputs.truth.kinds
    return kinds


def _loss_curves(inputs: RunInputs) -> bytes | None:
    if inputs.history is None:
        return None
    try:
        return plots.loss_curves_png(inputs.history)
    except ValueError as exc:
        inputs.notes.append(f"{inputs.run.history_csv.name}: {exc}")
        return None


# ----------------------------------------------------------------------------------------- report
def render_report(
    inputs: RunInputs,
    styles: StyleModel,
    table: pd.DataFrame,
    metrics: Mapping[str, Any] | None,
    figures: Figures,
    predictor_used: bool,
) -> str:
    """The curation report page (:mod:`.report`), linking the interactive map beside it."""
    cfg, files = inputs.cfg, inputs.run.analysis
    settings = {
        "analysis config": inputs.settings.model_dump(),
        "style method": styles.method,
        "style parameters": styles.params,
        "ranking column": inputs.rank_by,
        "truth": str(inputs.truth_path) if inputs.truth_path else "none",
        "model predictor": "yes" if predictor_used else "no",
    }
    return build_report(
        ReportInputs(
            run_dir=str(inputs.run.path),
            run_name=cfg.name,
            datalist=str(cfg.data.datalist) if cfg.data.datalist else None,
            truth=str(inputs.truth_path) if inputs.truth_path else None,
            styles=styles,
            table=table,
            top_k=figures.top_k,
            rank_by=inputs.rank_by,
            latent_map_png=figures.latent_map_png,
            latent_map_html=files.latent_map_html.name,
            loss_curves_png=figures.loss_curves_png,
            ranking_csv=files.suspicion_csv.name,
            history_csv=inputs.run.history_csv.name,
            metrics=metrics,
            thumbnails=figures.thumbnails,
            style_thumbnails=figures.style_thumbnails,
            settings=settings,
            notes=inputs.notes,
        )
    )


# ----------------------------------------------------------------------------------------- output
def write_analysis(run: RunDir, result: LatentAnalysis) -> dict[str, str]:
    """Write every output into ``run.analysis`` (each file atomically).

    The caller calls ``run.begin_analysis()`` before and ``run.write_analysis_provenance(files)`` after,
    so readers never take a half-rewritten folder for a complete one.

    Returns:
        ``{file name: path}`` of the files written.
    """
    out, figures = run.analysis, result.figures
    written = [
        write_suspicion_csv(result.table, out.suspicion_csv),
        run.write_styles(result.styles.to_json()),
    ]
    if result.metrics is not None:
        written.append(atomic_write_json(out.metrics_json, result.metrics))
    else:
        # A metrics document from an earlier analysis with truth would now describe other styles.
        out.metrics_json.unlink(missing_ok=True)
    written.append(atomic_write_bytes(out.latent_map_png, figures.latent_map_png))
    written.append(atomic_write_text(out.latent_map_html, figures.latent_map_html))
    if figures.loss_curves_png is not None:
        written.append(atomic_write_bytes(out.loss_curves_png, figures.loss_curves_png))
    written.append(atomic_write_text(out.report_html, result.report_html))
    if result.maps_staging is not None:
        written.append(replace_dir(result.maps_staging, out.maps_dir))
    else:
        # Maps of an earlier analysis would describe another model's predictions.
        shutil.rmtree(out.maps_dir, ignore_errors=True)
    return {Path(p).name: str(p) for p in written}


def summarize(result: LatentAnalysis, files: Mapping[str, str]) -> dict[str, Any]:
    """What ``hypersort analyze`` prints: outputs, style sizes, the top suspicious cases, key metrics.

    Args:
        result: the computed analysis.
        files: ``{file name: path}`` written.
    """
    inputs, styles, table = result.inputs, result.styles, result.table
    return {
        "analysis_dir": str(inputs.run.analysis.folder),
        "files": dict(files),
        "n_cases": int(len(inputs.indices)),
        "latent_dim": int(inputs.latents.shape[1]),
        "n_styles": len(styles.styles),
        "main_style_size": styles.main.size,
        "n_outliers": styles.n_outliers,
        "style_sizes": {s.key: s.size for s in styles.styles},
        "rank_by": inputs.rank_by,
        "top_suspicious": table["case_id"].head(5).tolist(),
        "truth": str(inputs.truth_path) if inputs.truth_path else None,
        "metrics": _key_metrics(result.metrics),
        "notes": inputs.notes,
    }


def _key_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """AUROC and Spearman of the key scores, the styles' ARI and the eroded/dilated cosine."""
    if not metrics:
        return {}
    scores = metrics.get("scores", {})
    out = {}
    for name in KEY_SCORES:
        if name in scores:
            out[f"auroc_{name}"] = scores[name].get("auroc")
            out[f"spearman_{name}"] = scores[name].get("spearman")
    out["ari_styles"] = metrics.get("styles", {}).get("ari")
    opposite = (metrics.get("directions") or {}).get("opposite_sides")
    if opposite:
        out["opposite_cosine"] = opposite["cosine"]
    return out
