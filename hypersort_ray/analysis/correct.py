"""``hypersort correct``: re-segment training cases with a style's UNet and write corrected labels.

The corrected label of a case is the chosen style's prediction for its image (``load_model(run).
predict(image, style=...)``: the run's preprocessing, sliding window, and the geometry replayed back
to the image grid), written in the **given label's geometry** (its shape, affine, qform/sform codes
and data type), as ``OUT/<case_id>.nii.gz``, plus ``OUT/corrections.csv``::

    index,case_id,style,dice_given_vs_corrected,voxels_given,voxels_corrected,voxels_changed,path

Only the classes the model predicts are corrected: a voxel keeps its given value unless the predicted
class differs from the given label's class (after the run's label mapping). A voxel the model moves to
class c gets the label value that means c (``class_map``: the smallest value mapped to c; a
``foreground`` list or the default "every value > 0": the foreground value this label uses most, else
the first listed value / 1); a voxel moved to background gets 0. So a multi-structure label trained as
"liver vs rest" keeps every other structure, and a label that uses 255 for foreground keeps 255.
``voxels_given``/``voxels_corrected`` count foreground-class voxels, ``voxels_changed`` the voxels
whose value changed.

Safety: input labels are never overwritten. An output folder that is, or contains, a folder holding
the datalist's labels is refused, as is any output file that would be one of the datalist's images or
labels; every file is written to a temporary name and renamed into place, ``corrections.csv`` last.

Example:
    >>> correct_cases("runs/demo", cases="top:5", style="main", out_dir=Path("corrected"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hypersort_ray.analysis.model_scores import dice_score, load_run_cases, progress_bar
from hypersort_ray.atomic import atomic_save_nifti
from hypersort_ray.errors import DataError, RunError

if TYPE_CHECKING:  # pragma: no cover
    from hypersort_ray.config import LabelConfig
    from hypersort_ray.data.datalist import Case

__all__ = ["CORRECTIONS_COLUMNS", "correct_cases", "select_cases"]

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
def _read_suspicion(run_dir: Path) -> list[tuple[int, str]]:
    path = run_dir / "analysis" / "suspicion.csv"
    if not path.is_file():
        raise RunError(
            f"{path}: not found; run `hypersort analyze {run_dir}` first (top:K takes the K most "
            "suspicious cases of its ranking), or pass case ids: --cases id,id"
        )
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if "index" not in fields or "case_id" not in fields:
                raise RunError(
                    f"{path}: expected columns index,case_id,...; got {','.join(fields) or 'nothing'}"
                )
            return [(int(row["index"]), str(row["case_id"])) for row in reader]
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{path}: cannot be read ({exc}); re-run `hypersort analyze {run_dir}`") from exc


def select_cases(run_dir: str | Path, spec: str, cases: Sequence[Case]) -> list[Case]:
    """The cases named by ``spec``: ``top:K`` (most suspicious first) or ``id,id,...`` (given order).

    Raises:
        RunError: ``top:K`` without ``analysis/suspicion.csv``, or a ranking with indices the datalist
            lacks (rows are matched by sample index; differing case ids only warn).
        DataError: a malformed spec, or unknown case ids (all listed).
    """
    run_dir = Path(run_dir)
    text = str(spec).strip()
    by_id = {c.case_id: c for c in cases}
    if text.lower().startswith("top:"):
        raw = text[4:].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise DataError(f"--cases {spec!r}: top:K needs a positive integer K, e.g. top:10")
        ranking = _read_suspicion(run_dir)
        by_index = {c.index: c for c in cases}
        chosen, renamed = [], []
        for index, case_id in ranking[: int(raw)]:
            case = by_index.get(index)
            if case is None:
                raise RunError(
                    f"{run_dir / 'analysis' / 'suspicion.csv'}: sample index {index} ({case_id}) is not in "
                    f"the run's datalist ({len(cases)} cases); re-run `hypersort analyze {run_dir}`"
                )
            if case.case_id != case_id:
                renamed.append(f"index {index}: {case_id!r} vs {case.case_id!r}")
            chosen.append(case)
        if renamed:  # sample identity is the index; the datalist's ids win
            warnings.warn(
                f"{run_dir / 'analysis' / 'suspicion.csv'}: case ids differ from the datalist's "
                f"({'; '.join(renamed[:3])}); cases matched by index",
                stacklevel=2,
            )
        return chosen
    ids = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not ids:
        raise DataError(f"--cases {spec!r}: expected top:K or a comma-separated list of case ids")
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        known = ", ".join(c.case_id for c in list(cases)[:3])
        raise DataError(
            f"--cases: {len(unknown)} unknown case id(s): {', '.join(unknown)} (the run's datalist has "
            f"{len(cases)} cases, e.g. {known})"
        )
    return [by_id[i] for i in ids]


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


def _write_like(path: Path, data: np.ndarray, ref: Any) -> None:
    """Write ``data`` with the reference NIfTI's shape, affine, qform/sform and data type, atomically."""

    header = ref.header.copy()
    dtype = ref.get_data_dtype()
    arr = np.ascontiguousarray(data.reshape(ref.shape)).astype(dtype)
    img = type(ref)(arr, ref.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    qform, qcode = ref.get_qform(coded=True)
    sform, scode = ref.get_sform(coded=True)
    img.set_qform(qform if qform is not None else ref.affine, code=int(qcode or 0))
    img.set_sform(sform if sform is not None else ref.affine, code=int(scode or 0))
    atomic_save_nifti(img, path)


def _read_label(case: Case) -> tuple[Any, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(case.label))
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise DataError(
            f"case {case.case_id}: label {case.label}: not a readable NIfTI ({type(exc).__name__}: {exc})"
        ) from exc
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    return img, raw


# ------------------------------------------------------------------------------------------- entry
def correct_cases(
    run_dir: str | Path,
    cases: str,
    style: str = "main",
    out_dir: Path = Path("corrected"),
    progress: bool = False,
) -> dict[str, Any]:
    """Segment the chosen training cases with ``style``'s UNet; write corrected labels + corrections.csv.

    Args:
        run_dir: a trained run folder.
        cases: ``top:K`` (needs ``hypersort analyze`` first) or a comma list of case ids.
        style: ``main`` or a style id of the run.
        out_dir: output folder (created); never the datalist's labels folder or one containing it.
        progress: progress bar on stderr.

    Returns:
        ``{"out_dir", "corrections_csv", "style", "latent", "cases", "case_ids",
        "mean_dice_given_vs_corrected", "voxels_changed"}``.

    Raises:
        RunError: not a run folder; ``top:K`` before ``hypersort analyze``.
        DataError: unknown case ids, an unsafe ``out_dir``, unreadable/mismatched files.
        ModelError: unknown style.
    """
    from hypersort_ray.inference import load_model

    run_dir = Path(run_dir)
    _cfg, all_cases = load_run_cases(run_dir)
    chosen = select_cases(run_dir, cases, all_cases)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, all_cases, chosen)
    model = load_model(run_dir)
    latent, style_id = model.resolve(style, None)  # unknown style -> ModelError before any work
    label_cfg, k = model.config.preprocessing.label, model.num_classes

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in progress_bar(chosen, progress, f"correcting ({style_id})", total=len(chosen)):
        ref, raw = _read_label(case)
        mask = model.predict(case.image, style=style_id)["mask"]
        if tuple(mask.shape) != tuple(raw.shape):
            raise DataError(
                f"case {case.case_id}: label {case.label} has shape {tuple(raw.shape)} but the image "
                f"{case.image} has shape {tuple(mask.shape)}; run `hypersort validate-data` on the datalist"
            )
        corrected, stats = _corrected_label(raw, mask, label_cfg, k)
        target = out / f"{case.case_id}.nii.gz"
        _write_like(target, corrected, ref)
        rows.append(
            {"index": case.index, "case_id": case.case_id, "style": style_id, **stats, "path": str(target)}
        )

    csv_path = out / "corrections.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CORRECTIONS_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(buf.getvalue())
        os.replace(tmp, csv_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
