"""``hypersort analyze RUN_DIR``: styles, suspicion ranking, metrics, maps and the curation report.

Reads the run folder written by the trainer (``config.yaml``, ``latents.csv``, ``history.csv`` and,
when present, ``sample_losses.csv``, which adds the ``train_loss`` score: each case's own Dice+CE loss
averaged over the training epochs) and writes ``RUN_DIR/analysis/``:

====================  ==================================================================================
``suspicion.csv``     ``index,case_id,latent_norm,mean_distance,outlier_score,style[,extra scores]``, most
                      suspicious first (ranked by ``latent_norm`` unless told otherwise)
``styles.json``       ``{method, params, main_style, main_numeric_id, n_styles, n_outliers, styles: [{id,
                      numeric_id, name, size, centroid, latent, medoid_index, medoid_case_id, mean_norm,
                      member_indices, members}]}``
``metrics.json``      only with a truth CSV (:mod:`.metrics`)
``latent_map.png``    static map; ``latent_map.html``: interactive, self-contained
``loss_curves.png``   from ``history.csv`` (skipped with a note when there is none)
``report.html``       the curation report (:mod:`.report`)
====================  ==================================================================================

Each file is written to a temporary name and renamed, so a crash never leaves a truncated file.

Model-based parts are optional and come in through two hooks, so this module never imports torch:

* ``predictor(style_or_latent, case_indices) -> {index: label map}``: segments the given training
  cases with a style (``"main"``, a style key, or an explicit latent vector) and returns integer class
  maps in each case's label grid. With it, ``main_style_disagreement = 1 - Dice(main-style
  prediction, given label)`` becomes a score column, and the report's thumbnails show the prediction.
* ``extra_scores``: more score columns computed elsewhere (e.g. ``analysis.model_scores``), as a
  DataFrame with an ``index`` column or a mapping name -> values in latents.csv row order.

Example:
    >>> summary = analyze_run(Path("runs/demo"), truth=Path("synth/truth.csv"))   # doctest: +SKIP
    >>> summary["n_styles"], summary["top_suspicious"][:2]                         # doctest: +SKIP
    (3, ['case_0042', 'case_0007'])
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from hypersort_ray.analysis import plots
from hypersort_ray.analysis.metrics import align_truth, compute_metrics, read_truth_csv
from hypersort_ray.analysis.report import CaseThumbnail, ReportInputs, build_report
from hypersort_ray.analysis.scores import DEFAULT_RANK_BY, suspicion_table, write_suspicion_csv
from hypersort_ray.analysis.styles import StyleModel, discover_styles
from hypersort_ray.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from hypersort_ray.config import (
    AnalysisConfig,
    ExperimentConfig,
    apply_overrides,
    format_validation_error,
    load_config,
)
from hypersort_ray.errors import ConfigError, DataError, RunError

__all__ = [
    "ANALYSIS_DIR",
    "Predictor",
    "analysis_settings",
    "analyze_run",
    "dice",
    "resolve_truth_path",
    "styles_of_run",
]

ANALYSIS_DIR = "analysis"
# A predictor segments training cases: (style key or latent vector, sample indices) -> {index: class map}.
#: score column: mean over epochs of each case's own training loss (``sample_losses.csv``)
TRAIN_LOSS = "train_loss"

Predictor = Callable[[str | np.ndarray, Sequence[int]], Mapping[int, np.ndarray]]
# Cases handed to the predictor per call when scoring every case (bounds its memory).
PREDICT_CHUNK = 8


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"analyze: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- run folder
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


def _load_run(run_dir: Path) -> tuple[ExperimentConfig, np.ndarray, list[str], np.ndarray]:
    """Config and latents of a run folder, checked against each other."""
    from hypersort_ray.train.latents_io import read_latents_csv

    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run folder not found")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunError(f"{config_path}: not found; is {run_dir} a run folder written by `hypersort train`?")
    cfg = load_config(config_path)
    latents_path = run_dir / "latents.csv"
    if not latents_path.is_file():
        raise RunError(f"{latents_path}: not found; the run has no latents (did training finish?)")
    indices, case_ids, latents = read_latents_csv(latents_path)
    if len(indices) == 0:
        raise RunError(f"{latents_path}: no cases")
    expected = cfg.model.hypernet.latent_dim
    if latents.shape[1] != expected:
        raise RunError(
            f"{latents_path}: latents have {latents.shape[1]} dimensions but {config_path} says "
            f"model.hypernet.latent_dim = {expected}"
        )
    if not np.isfinite(latents).all():
        bad = [case_ids[i] for i in np.flatnonzero(~np.isfinite(latents).all(axis=1))[:10]]
        raise RunError(f"{latents_path}: NaN or infinite latents for {', '.join(bad)}")
    return cfg, indices, case_ids, latents


def _read_history(run_dir: Path) -> tuple[pd.DataFrame | None, str | None]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return None, f"{path.name} not found: no training curves"
    try:
        history = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        return None, f"{path.name} is not a readable CSV ({str(exc).splitlines()[0]}): no training curves"
    if history.empty:
        return None, f"{path.name} has no rows: no training curves"
    return history, None


def _existing(path: Path | None, run_dir: Path) -> Path | None:
    """``path`` as given, else relative to the run folder (runs are often moved with their data)."""
    if path is None:
        return None
    for candidate in (path, run_dir / path):
        if candidate.exists():
            return candidate
    return None


def resolve_truth_path(cfg: ExperimentConfig, run_dir: Path, truth: Path | None) -> Path | None:
    """The truth CSV to use: the explicit one, ``data.truth``, or ``truth.csv`` beside the datalist.

    Args:
        cfg: the run's config.
        run_dir: the run folder (relative config paths are also tried against it).
        truth: an explicit path (must exist), or None.

    Raises:
        DataError: the explicit truth file does not exist.
    """
    if truth is not None:
        truth = Path(truth)
        if not truth.is_file():
            raise DataError(f"{truth}: truth CSV not found")
        return truth
    configured = _existing(cfg.data.truth, run_dir)
    if configured is not None and configured.is_file():
        return configured
    datalist = _existing(cfg.data.datalist, run_dir)
    if datalist is not None:
        beside = (datalist if datalist.is_dir() else datalist.parent) / "truth.csv"
        if beside.is_file():
            return beside
    return None


def _load_cases(
    cfg: ExperimentConfig, run_dir: Path, indices: np.ndarray, case_ids: Sequence[str]
) -> tuple[dict[int, Any], str | None]:
    """Datalist cases by sample index, or ({}, why not)."""
    datalist = _existing(cfg.data.datalist, run_dir)
    if datalist is None:
        where = cfg.data.datalist or "data.datalist (not set)"
        return {}, f"datalist {where} not found: no slice thumbnails"
    try:
        from hypersort_ray.data.datalist import load_datalist

        cases = load_datalist(datalist)
    except (DataError, ImportError) as exc:
        return {}, f"datalist {datalist} unusable ({exc}): no slice thumbnails"
    by_index = {c.index: c for c in cases}
    run_ids = {int(i): c for i, c in zip(indices, case_ids, strict=True)}
    unknown = sorted(set(run_ids) - set(by_index))
    if unknown:
        return {}, (
            f"datalist {datalist} has {len(cases)} cases but latents.csv has sample indices up to "
            f"{max(run_ids)}: not the run's dataset, no slice thumbnails"
        )
    clash = [i for i in run_ids if run_ids[i] != by_index[i].case_id]
    if len(clash) > max(1, len(run_ids) // 20):
        return {}, (
            f"datalist {datalist} does not match latents.csv for {len(clash)} cases (e.g. index {clash[0]}: "
            f"{by_index[clash[0]].case_id!r} vs {run_ids[clash[0]]!r}): no slice thumbnails"
        )
    note = None
    if clash:
        note = (
            f"datalist case ids differ from latents.csv for index {', '.join(map(str, clash))} "
            f"(e.g. {by_index[clash[0]].case_id!r} vs {run_ids[clash[0]]!r}); matched by sample index"
        )
    return by_index, note


# ------------------------------------------------------------------------------------ model hooks
def dice(a: np.ndarray, b: np.ndarray, num_classes: int = 2) -> float:
    """Mean Dice over foreground classes present in either map (1.0 when none is).

    Args:
        a, b: integer class maps of equal shape.
        num_classes: K (classes 1..K-1 are foreground).
    """
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ ({a.shape} vs {b.shape})")
    values = []
    for c in range(1, max(num_classes, 2)):
        in_a, in_b = a == c, b == c
        denom = int(in_a.sum()) + int(in_b.sum())
        if denom:
            values.append(2.0 * int(np.logical_and(in_a, in_b).sum()) / denom)
    return float(np.mean(values)) if values else 1.0


def _read_volume(path: Path, what: str, case_id: str) -> np.ndarray:
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise DataError(
            f"case {case_id}: {what} {path}: not a readable NIfTI ({type(exc).__name__})"
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _predict(
    predictor: Predictor, style: str | np.ndarray, indices: Sequence[int]
) -> Mapping[int, np.ndarray]:
    out = predictor(style, list(indices))
    missing = [i for i in indices if i not in out]
    if missing:
        raise RunError(f"predictor returned no prediction for sample indices {missing[:10]}")
    return out


def _main_style_disagreement(
    predictor: Predictor, cases: Mapping[int, Any], indices: np.ndarray, cfg: ExperimentConfig, progress: bool
) -> np.ndarray:
    """1 - Dice(main-style prediction, given label) per case (NaN where the case has no files)."""
    from hypersort_ray.data.transforms import map_label_values  # lazy: torch/monai

    label_cfg = cfg.preprocessing.label
    k = label_cfg.num_classes
    values = np.full(len(indices), np.nan)
    todo = [(row, int(i)) for row, i in enumerate(indices) if int(i) in cases]
    for start in range(0, len(todo), PREDICT_CHUNK):
        chunk = todo[start : start + PREDICT_CHUNK]
        _say(progress, f"main-style predictions {start + len(chunk)}/{len(todo)}")
        preds = _predict(predictor, "main", [i for _, i in chunk])
        for row, index in chunk:
            case = cases[index]
            label = map_label_values(_read_volume(case.label, "label", case.case_id), label_cfg)
            pred = np.asarray(preds[index])
            if pred.shape != label.shape:
                raise DataError(
                    f"case {case.case_id}: prediction shape {pred.shape} differs from label {case.label} {label.shape}"
                )
            values[row] = 1.0 - dice(pred, label, k)
    return values


def _merge_extra_scores(
    extra: pd.DataFrame | Mapping[str, Sequence[float]] | None, indices: np.ndarray
) -> dict[str, np.ndarray]:
    """Extra score columns in latents.csv row order (NaN where a case has no value)."""
    if extra is None:
        return {}
    if isinstance(extra, pd.DataFrame):
        if "index" not in extra.columns:
            raise ValueError("extra_scores DataFrame needs an 'index' column")
        frame = extra.set_index("index")
        cols = [c for c in frame.columns if c != "case_id" and pd.api.types.is_numeric_dtype(frame[c])]
        return {c: frame[c].reindex(indices).to_numpy(dtype=np.float64) for c in cols}
    return {str(k): np.asarray(v, dtype=np.float64) for k, v in extra.items()}


def _train_loss_score(run_dir: Path, indices: np.ndarray, notes: list[str]) -> np.ndarray | None:
    """``train_loss``: each case's own Dice+CE loss averaged over the training epochs (run order).

    From ``sample_losses.csv`` (written by ``hypersort train``); runs without it (older runs, imported
    reference models) simply have no such column.
    """
    from hypersort_ray.train.latents_io import SAMPLE_LOSSES_CSV, read_sample_losses_csv

    path = run_dir / SAMPLE_LOSSES_CSV
    if not path.is_file():
        return None
    try:
        losses = read_sample_losses_csv(path)
    except RunError as exc:
        notes.append(f"train_loss skipped: {exc}")
        return None
    values = np.array([losses.get(int(i), np.nan) for i in indices], dtype=np.float64)
    if np.isnan(values).all():
        notes.append(f"train_loss skipped: {path} has no value for the run's cases")
        return None
    return values


# ------------------------------------------------------------------------------------ thumbnails
def _thumbnails(
    rows: Sequence[int],
    indices: np.ndarray,
    cases: Mapping[int, Any],
    cfg: ExperimentConfig,
    predictor: Predictor | None,
    notes: list[str],
) -> dict[int, CaseThumbnail]:
    """Slice montages of the given run rows (image | label | main-style prediction)."""
    wanted = [int(indices[r]) for r in rows if int(indices[r]) in cases]
    preds: Mapping[int, np.ndarray] = _predict(predictor, "main", wanted) if predictor and wanted else {}
    out = {}
    for index in wanted:
        thumb = _case_montage(cases[index], cfg, preds.get(index), notes)
        if thumb is not None:
            out[index] = thumb
    return out


def _style_montages(
    model: StyleModel,
    cases: Mapping[int, Any],
    cfg: ExperimentConfig,
    predictor: Predictor | None,
    notes: list[str],
) -> dict[str, CaseThumbnail]:
    """Per style, its medoid case: image | given label | the style's prediction (its segmenting latent).

    The latent is passed explicitly (not the style key): the run's saved styles may be older than the
    ones fitted now.
    """
    out = {}
    for style in model.styles:
        case = cases.get(int(style.medoid_index))
        if case is None:
            continue
        pred = None
        if predictor is not None:
            latent = np.asarray(style.latent, dtype=np.float64)
            pred = _predict(predictor, latent, [case.index])[case.index]
        thumb = _case_montage(
            case, cfg, pred, notes, titles=("image", "given label", f"{style.name} prediction")
        )
        if thumb is not None:
            out[style.key] = thumb
    return out


def _case_montage(
    case: Any,
    cfg: ExperimentConfig,
    pred: np.ndarray | None,
    notes: list[str],
    titles: Sequence[str] | None = None,
) -> CaseThumbnail | None:
    """Mid-slice montage of one case with its given label and, when given, a prediction (+ their Dice)."""
    from hypersort_ray.data.transforms import map_label_values  # lazy: torch/monai

    label_cfg = cfg.preprocessing.label
    try:
        image = _read_volume(case.image, "image", case.case_id).astype(np.float32)
        label = map_label_values(_read_volume(case.label, "label", case.case_id), label_cfg)
    except DataError as exc:
        notes.append(f"thumbnail skipped: {exc}")
        return None
    if image.shape[: label.ndim] != label.shape:
        notes.append(f"thumbnail skipped: case {case.case_id}: image {image.shape} vs label {label.shape}")
        return None
    pred = None if pred is None else np.asarray(pred)
    score = dice(pred, label, label_cfg.num_classes) if pred is not None and pred.shape == label.shape else None
    png = plots.slice_montage_png(image, label, pred if score is not None else None, titles=titles)
    return CaseThumbnail(png, score)


# -------------------------------------------------------------------------------------------- main
def _key_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    scores = metrics.get("scores", {})
    out = {}
    for name in (
        "latent_norm",
        "mean_distance",
        "outlier_score",
        TRAIN_LOSS,
        "main_style_disagreement",
        "own_vs_main_disagreement",
    ):
        if name in scores:
            out[f"auroc_{name}"] = scores[name].get("auroc")
            out[f"spearman_{name}"] = scores[name].get("spearman")
    out["ari_styles"] = metrics.get("styles", {}).get("ari")
    opposite = (metrics.get("directions") or {}).get("opposite_sides")
    if opposite:
        out["opposite_cosine"] = opposite["cosine"]
    return out


def _run_order(table: pd.DataFrame, indices: np.ndarray) -> pd.DataFrame:
    return table.set_index("index").loc[indices].reset_index()


def analyze_run(
    run_dir: Path,
    truth: Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    predictor: Predictor | None = None,
    *,
    rank_by: str | None = None,
    extra_scores: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Analyse a run folder and write ``RUN_DIR/analysis/`` (contents in the module docstring).

    Args:
        run_dir: the run folder written by ``hypersort train``.
        truth: truth CSV; default ``data.truth`` of the run's config, else ``truth.csv`` beside the
            datalist, else none (no ``metrics.json``).
        overrides: ``key=value`` on the analysis settings (``min_cluster_size=5``,
            ``cluster_selection_method=leaf``, ``top_k=20``; ``analysis.`` prefix optional).
        progress: report the stages on stderr.
        predictor: optional model hook (module docstring); None skips model-based parts.
        rank_by: score column ranking ``suspicion.csv`` (default ``latent_norm``).
        extra_scores: optional extra score columns (module docstring).

    Returns:
        Summary: output paths, number of styles, main style size, top-5 suspicious case ids, key metrics
        (AUROC/Spearman per score, ARI, eroded/dilated cosine) and notes.

    Raises:
        RunError: missing run folder/config/latents, latent dimension mismatch.
        ConfigError: bad override or config.
        DataError: bad truth CSV (unknown ids, malformed), or a predictor output not matching a label.
    """
    run_dir = Path(run_dir)
    _say(progress, f"reading {run_dir}")
    cfg, indices, case_ids, latents = _load_run(run_dir)
    settings = analysis_settings(cfg, overrides)
    rank_by = rank_by or getattr(settings, "rank_by", None) or DEFAULT_RANK_BY
    history, history_note = _read_history(run_dir)
    notes = [history_note] if history_note else []
    truth_path = resolve_truth_path(cfg, run_dir, truth)
    aligned = None
    if truth_path is not None:
        # Read the truth first: a bad file should fail before any expensive model-based work.
        frame = read_truth_csv(truth_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            aligned = align_truth(frame, indices, case_ids, source=str(truth_path))
        for w in caught:
            notes.append(str(w.message))
            warnings.warn(w.message, stacklevel=2)

    _say(progress, f"styles of {len(indices)} latents (d = {latents.shape[1]})")
    model = _fit_styles(latents, case_ids, indices, settings)

    cases, cases_note = _load_cases(cfg, run_dir, indices, case_ids)
    if cases_note:
        notes.append(cases_note)
    extra = _merge_extra_scores(extra_scores, indices)
    if TRAIN_LOSS not in extra:
        train_loss = _train_loss_score(run_dir, indices, notes)
        if train_loss is not None:
            extra[TRAIN_LOSS] = train_loss
    if predictor is None:
        notes.append("no model predictor given: model-based scores and prediction thumbnails skipped")
    elif not cases:
        notes.append(
            "a model predictor was given but the datalist is unavailable: model-based scores skipped"
        )
    elif "main_style_disagreement" not in extra:
        extra["main_style_disagreement"] = _main_style_disagreement(predictor, cases, indices, cfg, progress)
    try:
        table = suspicion_table(
            indices, case_ids, latents, model.outlier_scores, model.keys, extra, rank_by=rank_by
        )
    except ValueError as exc:
        raise ConfigError(f"analysis ranking: {exc}") from None

    metrics = None
    kinds_run_order = None
    if aligned is not None:
        _say(progress, f"metrics vs {truth_path}")
        metrics = compute_metrics(table, aligned, latents, model.keys, np.asarray(model.main.centroid))
        if aligned.kinds is not None:
            kinds_run_order = np.full(len(indices), "?", dtype=object)
            kinds_run_order[aligned.rows] = aligned.kinds

    _say(progress, "figures")
    top_k = min(settings.top_k, len(table))
    position = {int(i): r for r, i in enumerate(indices)}
    top_rows = [position[int(i)] for i in table["index"].head(top_k)]
    thumbs = _thumbnails(top_rows, indices, cases, cfg, predictor, notes) if cases else {}
    style_thumbs = _style_montages(model, cases, cfg, predictor, notes) if cases else {}
    map_png = plots.latent_map_png(latents, model.keys, case_ids, highlight=top_rows, kinds=kinds_run_order)
    map_html = plots.latent_map_html(
        latents,
        _run_order(table, indices),
        thumbnails={i: plots.data_uri(t.png) for i, t in thumbs.items()},
        kinds=kinds_run_order,
        title=f"HyperSORT latent map: {cfg.name}",
    )
    curves = None
    if history is not None:
        try:
            curves = plots.loss_curves_png(history)
        except ValueError as exc:
            notes.append(f"history.csv: {exc}")

    out = run_dir / ANALYSIS_DIR
    files: dict[str, str] = {}
    files["suspicion.csv"] = str(write_suspicion_csv(table, out / "suspicion.csv"))
    styles_doc = model.to_json()
    files["styles.json"] = str(atomic_write_json(out / "styles.json", styles_doc))
    if metrics is not None:
        files["metrics.json"] = str(atomic_write_json(out / "metrics.json", metrics))
    elif (out / "metrics.json").exists():
        # A metrics.json from an earlier analysis with truth would now describe other styles.
        (out / "metrics.json").unlink()
    files["latent_map.png"] = str(atomic_write_bytes(out / "latent_map.png", map_png))
    files["latent_map.html"] = str(atomic_write_text(out / "latent_map.html", map_html))
    if curves is not None:
        files["loss_curves.png"] = str(atomic_write_bytes(out / "loss_curves.png", curves))
    report_settings = {
        "analysis config": settings.model_dump(),
        "style method": model.method,
        "style parameters": model.params,
        "ranking column": rank_by,
        "truth": str(truth_path) if truth_path else "none",
        "model predictor": "yes" if predictor else "no",
    }
    page = build_report(
        ReportInputs(
            run_dir=str(run_dir),
            run_name=cfg.name,
            datalist=str(cfg.data.datalist) if cfg.data.datalist else None,
            truth=str(truth_path) if truth_path else None,
            styles=model,
            table=table,
            top_k=top_k,
            rank_by=rank_by,
            latent_map_png=map_png,
            latent_map_html="latent_map.html",
            loss_curves_png=curves,
            metrics=metrics,
            thumbnails=thumbs,
            style_thumbnails=style_thumbs,
            settings=report_settings,
            notes=notes,
        )
    )
    files["report.html"] = str(atomic_write_text(out / "report.html", page))
    _say(progress, f"wrote {out}")
    return {
        "analysis_dir": str(out),
        "files": files,
        "n_cases": int(len(indices)),
        "latent_dim": int(latents.shape[1]),
        "n_styles": len(model.styles),
        "main_style_size": model.main.size,
        "n_outliers": model.n_outliers,
        "style_sizes": {s.key: s.size for s in model.styles},
        "rank_by": rank_by,
        "top_suspicious": table["case_id"].head(5).tolist(),
        "truth": str(truth_path) if truth_path else None,
        "metrics": _key_metrics(metrics),
        "notes": notes,
    }


def styles_of_run(run_dir: Path, overrides: list[str] | None = None) -> StyleModel:
    """Re-fit the styles of a run (deterministic: the same as ``analyze`` wrote) for ``assign_styles``.

    Args:
        run_dir: the run folder.
        overrides: analysis overrides used for the analysis, if any.
    """
    cfg, indices, case_ids, latents = _load_run(Path(run_dir))
    settings = analysis_settings(cfg, overrides)
    return _fit_styles(latents, case_ids, indices, settings)


def _fit_styles(latents: np.ndarray, case_ids: list[str], indices: np.ndarray, settings: Any) -> StyleModel:
    """The one styles fit of a run (``analyze`` and :func:`styles_of_run` must agree)."""
    return discover_styles(
        latents,
        case_ids,
        indices,
        min_cluster_size=settings.min_cluster_size,
        min_samples=settings.min_samples,
        cluster_selection_method=settings.cluster_selection_method,
    )
