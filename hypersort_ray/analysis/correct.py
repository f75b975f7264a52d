"""``hypersort correct``: re-segment training cases with a style's UNet and write corrected labels.

The corrected label of a case is the chosen style's prediction for its image (``model.predict(image,
style=...)`` of the run's model, which the caller loads: the run's preprocessing, sliding window, and
the geometry replayed back to the image grid), written in the **given label's geometry** (its shape,
affine, qform/sform codes and data type; :func:`hypersort_ray.data.nifti.save_like`), as
``OUT/<case_id>.nii.gz``, plus ``OUT/corrections.csv``::

    index,case_id,style,dice_given_vs_corrected,voxels_given,voxels_corrected,voxels_changed,path

Only the classes the model predicts are corrected: a voxel keeps its given value unless the predicted
class differs from the given label's class (after the run's label mapping). A voxel the model moves to
class c gets the label value that means c (``class_map``: the smallest value mapped to c; a
``foreground`` list or the default "every value > 0": the foreground value this label uses most, else
the first listed value / 1); a voxel moved to background gets 0. So a multi-structure label trained as
"liver vs rest" keeps every other structure, and a label that uses 255 for foreground keeps 255.
``voxels_given``/``voxels_corrected`` count foreground-class voxels, ``voxels_changed`` the voxels
whose value changed.

``top:K`` takes the K most suspicious cases of the run's analysis, which must have been made from the
run's current checkpoint (:meth:`RunDir.read_suspicion`; a ranking of an older checkpoint is refused
with :class:`~hypersort_ray.errors.ProvenanceError`).

Safety: input labels are never overwritten. An output folder that is, or contains, a folder holding
the datalist's labels is refused, as is any output file that would be one of the datalist's images or
labels; every file is written to a temporary name and renamed into place, ``corrections.csv`` last.

Example:
    >>> model = load_model("runs/demo")                                          # doctest: +SKIP
    >>> correct_cases("runs/demo", model, cases="top:5", out_dir=Path("corrected"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.evaluation import (
    SegmentationModel,
    check_model_provenance,
    load_run_cases,
    progress_bar,
    read_volume,
)
from hypersort_ray.atomic import atomic_write_text
from hypersort_ray.config import LabelConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.data.nifti import NiftiGeometry, save_like
from hypersort_ray.errors import DataError, RunError
from hypersort_ray.runs import RunDir

__all__ = ["CORRECTIONS_COLUMNS", "CORRECTIONS_CSV", "correct_cases", "select_cases"]

logger = logging.getLogger(__name__)

#: The table written beside the corrected labels (in the user's output folder, not the run folder).
CORRECTIONS_CSV = "corrections.csv"

CORRECTIONS_COLUMNS = (
    "index",
    "case_id",
    "style",
    "dice_given_vs_corrected",
    "voxels_given",
    "voxels_corrected",
    "voxels_changed",
    "path",
)


# ------------------------------------------------------------------------------------------ selection
def _ranking(run: RunDir) -> list[tuple[int, str]]:
    """The analysis' ranking, most suspicious first, refused when made from another checkpoint."""
    if not run.analysis.suspicion_csv.is_file():
        raise RunError(
            f"{run.analysis.suspicion_csv}: not found; run `hypersort analyze {run.path}` first (top:K takes "
            "the K most suspicious cases of its ranking), or pass case ids: --cases id,id"
        )
    return run.read_suspicion()


def select_cases(run_dir: str | os.PathLike[str], spec: str, cases: Sequence[Case]) -> list[Case]:
    """The cases named by ``spec``: ``top:K`` (most suspicious first) or ``id,id,...`` (given order).

    Args:
        run_dir: the run folder (``top:K`` reads its analysis).
        spec: ``top:K`` or a comma list of case ids.
        cases: the run's datalist.

    Raises:
        RunError: ``top:K`` without an analysis, or a ranking with indices the datalist lacks (rows are
            matched by sample index; differing case ids are only logged).
        ProvenanceError: ``top:K`` with an analysis made from another checkpoint than the run's.
        DataError: a malformed spec, or unknown case ids (all listed).
    """
    text = str(spec).strip()
    if text.lower().startswith("top:"):
        raw = text[4:].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise DataError(f"--cases {spec!r}: top:K needs a positive integer K, e.g. top:10")
        return _top_cases(RunDir(run_dir), int(raw), cases)
    ids = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not ids:
        raise DataError(f"--cases {spec!r}: expected top:K or a comma-separated list of case ids")
    by_id = {c.case_id: c for c in cases}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        known = ", ".join(c.case_id for c in list(cases)[:3])
        raise DataError(
            f"--cases: {len(unknown)} unknown case id(s): {', '.join(unknown)} (the run's datalist has "
            f"{len(cases)} cases, e.g. {known})"
        )
    return [by_id[i] for i in ids]


def _top_cases(run: RunDir, k: int, cases: Sequence[Case]) -> list[Case]:
    """The ``k`` most suspicious cases of the run's ranking, matched to the datalist by sample index."""
    ranking_file = run.analysis.suspicion_csv
    by_index = {c.index: c for c in cases}
    chosen, renamed = [], []
    for index, case_id in _ranking(run)[:k]:
        case = by_index.get(index)
        if case is None:
            raise RunError(
                f"{ranking_file}: sample index {index} ({case_id}) is not in the run's datalist "
                f"({len(cases)} cases); re-run `hypersort analyze {run.path}`"
            )
        if case.case_id != case_id:
            renamed.append(f"index {index}: {case_id!r} vs {case.case_id!r}")
        chosen.append(case)
    if renamed:  # sample identity is the index; the datalist's ids win
        logger.warning(
            "%s: case ids differ from the datalist's (%s); cases matched by index",
            ranking_file,
            "; ".join(renamed[:3]),
        )
    return chosen


# ------------------------------------------------------------------------------------------- safety
def _check_out_dir(out: Path, cases: Sequence[Case], chosen: Sequence[Case]) -> None:
    """Refuse an output folder that is/contains a labels folder, or outputs that are input files."""
    label_dirs = sorted({c.label.resolve().parent for c in cases})
    for folder in label_dirs:
        if out == folder or out in folder.parents:
            what = "is" if out == folder else "contains"
            raise DataError(
                f"--out {out}: {what} the labels folder {folder} of the run's datalist; corrected labels "
                "are never written where the input labels live: choose another folder"
            )
    inputs = {p.resolve() for c in cases for p in (c.image, c.label)}
    for case in chosen:
        target = out / f"{case.case_id}.nii.gz"
        if target.resolve() in inputs or any(_same_file(target, p) for p in (case.image, case.label)):
            raise DataError(
                f"--out {out}: {target} would overwrite an input file of the datalist; choose another folder"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- labels
def _class_values(raw: np.ndarray, given: np.ndarray, cfg: LabelConfig, num_classes: int) -> dict[int, float]:
    """The label value written for each foreground class (module docstring)."""
    if cfg.class_map:
        out: dict[int, float] = {}
        for value, cls in sorted(cfg.class_map.items()):
            out.setdefault(int(cls), float(value))
        return {c: out.get(c, float(c)) for c in range(1, num_classes)}
    fg_values = np.round(raw[given > 0])
    if fg_values.size:
        vals, counts = np.unique(fg_values, return_counts=True)
        return {1: float(vals[np.argmax(counts)])}
    return {1: float(cfg.foreground[0]) if cfg.foreground else 1.0}


def _corrected_label(
    raw: np.ndarray, pred: np.ndarray, cfg: LabelConfig, num_classes: int
) -> tuple[np.ndarray, dict[str, Any]]:
    from hypersort_ray.data.transforms import map_label_values  # lazy: torch/monai

    given = map_label_values(raw, cfg)
    corrected = np.array(raw, copy=True)
    differs = pred.astype(np.int64) != given
    corrected[differs & (pred == 0)] = 0
    for cls, value in _class_values(raw, given, cfg, num_classes).items():
        corrected[differs & (pred == cls)] = value
    stats = {
        "dice_given_vs_corrected": round(dice_score(given, pred, num_classes), 6),
        "voxels_given": int((given > 0).sum()),
        "voxels_corrected": int((pred > 0).sum()),
        "voxels_changed": int((corrected != raw).sum()),
    }
    return corrected, stats


# ------------------------------------------------------------------------------------------- entry
def correct_cases(
    run_dir: str | os.PathLike[str],
    model: SegmentationModel,
    cases: str,
    style: str = "main",
    out_dir: Path = Path("corrected"),
    progress: bool = False,
) -> dict[str, Any]:
    """Segment the chosen training cases with ``style``'s UNet; write corrected labels + corrections table.

    Args:
        run_dir: a trained run folder (or :class:`RunDir`).
        model: the run's loaded model, with its styles (e.g. ``hypersort_ray.inference.load_model(run_dir)``).
        cases: ``top:K`` (needs ``hypersort analyze`` first) or a comma list of case ids.
        style: ``main`` or a style id of the run.
        out_dir: output folder (created); never the datalist's labels folder or one containing it.
        progress: progress bar on stderr.

    Returns:
        ``{"out_dir", "corrections_csv", "style", "latent", "cases", "case_ids",
        "mean_dice_given_vs_corrected", "voxels_changed"}``.

    Raises:
        RunError: not a run folder; ``top:K`` before ``hypersort analyze``.
        ProvenanceError: the model or the ranking comes from another checkpoint than the run's.
        DataError: unknown case ids, an unsafe ``out_dir``, unreadable/mismatched files.
        ModelError: unknown style.
    """
    run = RunDir(run_dir)
    _cfg, all_cases = load_run_cases(run)
    chosen = select_cases(run, cases, all_cases)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, all_cases, chosen)
    check_model_provenance(run, model)
    latent, style_id = model.resolve(style, None)  # unknown style -> ModelError before any work
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        _correct_case(case, model, style_id, out)
        for case in progress_bar(chosen, progress, f"correcting ({style_id})", total=len(chosen))
    ]
    csv_path = _write_corrections(out / CORRECTIONS_CSV, rows)  # last: it lists the labels written
    dice = [r["dice_given_vs_corrected"] for r in rows]
    return {
        "out_dir": str(out),
        "corrections_csv": str(csv_path),
        "style": style_id,
        "latent": list(latent),
        "cases": len(rows),
        "case_ids": [r["case_id"] for r in rows],
        "mean_dice_given_vs_corrected": round(float(np.mean(dice)), 6) if dice else None,
        "voxels_changed": int(sum(r["voxels_changed"] for r in rows)),
    }


def _correct_case(case: Case, model: SegmentationModel, style_id: str, out: Path) -> dict[str, Any]:
    """Predict one case with the style, write its corrected label in the given label's geometry."""
    ref, raw = read_volume(case.label, "label", case.case_id)
    mask = model.predict(case.image, style=style_id)["mask"]
    if tuple(mask.shape) != tuple(raw.shape):
        raise DataError(
            f"case {case.case_id}: label {case.label} has shape {tuple(raw.shape)} but the image "
            f"{case.image} has shape {tuple(mask.shape)}; run `hypersort validate-data` on the datalist"
        )
    corrected, stats = _corrected_label(raw, mask, model.config.preprocessing.label, model.num_classes)
    target = out / f"{case.case_id}.nii.gz"
    # The given label's grid, qform/sform and data type: the file replaces it in any viewer or pipeline.
    geometry = NiftiGeometry.from_header(ref.header, source=f"case {case.case_id}: label {case.label}")
    save_like(target, corrected, geometry, dtype=ref.get_data_dtype())
    return {"index": case.index, "case_id": case.case_id, "style": style_id, **stats, "path": str(target)}


def _write_corrections(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """The corrections table, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CORRECTIONS_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
