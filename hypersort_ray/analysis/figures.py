"""Case pictures of the report: where the most suspicious cases disagree, and each style's medoid.

A suspicious case (with a model ``predictor``) is shown by three orthogonal slices through the centre of
its largest disagreement component (:mod:`.localisation`), one row each for the given label, the
main-style prediction and the case's own-style prediction (its own λ), with the Dice of the main-style
prediction against the given label: the reviewer sees *why* it is suspicious. Without a predictor, and
for a style's medoid, a montage shows mid slices: image | given label | a prediction. A case whose files
cannot be read is skipped with a note (the report says why); it never fails the analysis.

Example:
    >>> thumbs = case_thumbnails([0, 3], indices, cases, cfg, predictor, notes)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hypersort_ray.analysis import plots
from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import Predictor, predict_cases, read_volume
from hypersort_ray.analysis.report import CaseThumbnail
from hypersort_ray.analysis.styles import StyleModel
from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.errors import DataError

__all__ = ["Figures", "case_montage", "case_thumbnails", "location_montage", "style_montages"]


@dataclass
class Figures:
    """The analysis' pictures, rendered in memory (written by the caller).

    Attributes:
        latent_map_png: the static latent map.
        latent_map_html: the interactive, self-contained latent map.
        loss_curves_png: training curves (None without a usable history).
        thumbnails: sample index -> montage of the top-k suspicious cases.
        style_thumbnails: style key -> montage of the style's medoid case.
        top_k: how many suspicious cases the report lists.
    """

    latent_map_png: bytes
    latent_map_html: str
    loss_curves_png: bytes | None
    thumbnails: dict[int, CaseThumbnail] = field(default_factory=dict)
    style_thumbnails: dict[str, CaseThumbnail] = field(default_factory=dict)
    top_k: int = 0


def case_thumbnails(
    rows: Sequence[int],
    indices: np.ndarray,
    cases: Mapping[int, Case],
    cfg: ExperimentConfig,
    predictor: Predictor | None,
    notes: list[str],
    *,
    latents: np.ndarray | None = None,
    centres: Mapping[int, Sequence[int] | None] | None = None,
) -> dict[int, CaseThumbnail]:
    """Pictures of the given run rows: with a predictor, orthogonal slices through the largest
    disagreement (:func:`location_montage`); without, mid slices of image and label.

    Args:
        rows: positions in the run's latents table.
        indices: the run's sample indices (row order).
        cases: datalist cases by sample index.
        cfg: the run's config (label mapping).
        predictor: the model hook (None: no predictions).
        notes: skipped cases are noted here.
        latents: ``[N, d]`` latents in row order (the own-style predictions; None: that row is left out).
        centres: sample index -> voxel to slice through (the largest disagreement's centre; None or
            missing: the label's centre of mass).
    """
    wanted = [(r, int(indices[r])) for r in rows if int(indices[r]) in cases]
    preds = predict_cases(predictor, "main", [i for _, i in wanted]) if predictor and wanted else {}
    out = {}
    for row, index in wanted:
        if predictor is None:
            thumb = case_montage(cases[index], cfg, None, notes)
        else:
            own = None
            if latents is not None:
                own = predict_cases(predictor, np.asarray(latents[row], dtype=np.float64), [index])[index]
            centre = (centres or {}).get(index)
            thumb = location_montage(cases[index], cfg, preds[index], own, centre, notes)
        if thumb is not None:
            out[index] = thumb
    return out


def location_montage(
    case: Case,
    cfg: ExperimentConfig,
    main_pred: np.ndarray,
    own_pred: np.ndarray | None,
    centre: Sequence[int] | None,
    notes: list[str],
) -> CaseThumbnail | None:
    """Axial, coronal and sagittal slices through ``centre``: rows given label | main-style prediction |
    own-style prediction (+ the Dice of the main-style prediction against the given label).

    Returns:
        The thumbnail, or None when the case's files are unusable (noted).
    """
    loaded = _image_and_label(case, cfg, notes)
    if loaded is None:
        return None
    image, label = loaded
    main_pred = np.asarray(main_pred)
    if main_pred.shape != label.shape or label.ndim != 3:
        return case_montage(case, cfg, main_pred, notes)
    if centre is None:
        fg = np.argwhere(label > 0)
        centre = fg.mean(axis=0).round().astype(int).tolist() if len(fg) else None
    rows: list[tuple[str, np.ndarray | None]] = [("given label", label), ("main style", main_pred)]
    if own_pred is not None and np.asarray(own_pred).shape == label.shape:
        rows.append(("own style", np.asarray(own_pred)))
    png = plots.orthogonal_montage_png(image[..., 0] if image.ndim == 4 else image, rows, centre)
    return CaseThumbnail(png, dice_score(main_pred, label, cfg.preprocessing.label.num_classes))


def _image_and_label(
    case: Case, cfg: ExperimentConfig, notes: list[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The case's image and mapped label, or None with a note."""
    from hypersort_ray.data.transforms import map_label_values  # lazy: torch/monai

    try:
        image = read_volume(case.image, "image", case.case_id)[1].astype(np.float32)
        label = map_label_values(read_volume(case.label, "label", case.case_id)[1], cfg.preprocessing.label)
    except DataError as exc:
        notes.append(f"thumbnail skipped: {exc}")
        return None
    if image.shape[: label.ndim] != label.shape:
        notes.append(f"thumbnail skipped: case {case.case_id}: image {image.shape} vs label {label.shape}")
        return None
    return image, label


def style_montages(
    model: StyleModel,
    cases: Mapping[int, Case],
    cfg: ExperimentConfig,
    predictor: Predictor | None,
    notes: list[str],
) -> dict[str, CaseThumbnail]:
    """Per style, its medoid case: image | given label | the style's prediction (its segmenting latent).

    The latent is passed explicitly (not the style id): the run's saved styles may be older than the
    ones fitted now.

    Args:
        model: the fitted styles.
        cases: datalist cases by sample index.
        cfg: the run's config.
        predictor: the model hook (None: no prediction column).
        notes: skipped cases are noted here.
    """
    out = {}
    for style in model.styles:
        case = cases.get(int(style.medoid_index))
        if case is None:
            continue
        pred = None
        if predictor is not None:
            latent = np.asarray(style.latent, dtype=np.float64)
            pred = predict_cases(predictor, latent, [case.index])[case.index]
        titles = ("image", "given label", f"{style.name} prediction")
        thumb = case_montage(case, cfg, pred, notes, titles=titles)
        if thumb is not None:
            out[style.key] = thumb
    return out


def case_montage(
    case: Case,
    cfg: ExperimentConfig,
    pred: np.ndarray | None,
    notes: list[str],
    titles: Sequence[str] | None = None,
) -> CaseThumbnail | None:
    """Mid-slice montage of one case with its given label and, when given, a prediction (+ their Dice).

    Args:
        case: the case.
        cfg: the run's config (label mapping, number of classes).
        pred: a class map in the label's grid, or None.
        notes: a skipped case is noted here.
        titles: panel titles (default: the plot's own).

    Returns:
        The thumbnail, or None when the case's files are unusable.
    """
    loaded = _image_and_label(case, cfg, notes)
    if loaded is None:
        return None
    image, label = loaded
    label_cfg = cfg.preprocessing.label
    pred = None if pred is None else np.asarray(pred)
    fits = pred is not None and pred.shape == label.shape
    score = dice_score(pred, label, label_cfg.num_classes) if fits else None
    png = plots.slice_montage_png(image, label, pred if fits else None, titles=titles)
    return CaseThumbnail(png, score)
