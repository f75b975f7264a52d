"""Known label problems of a dataset (``truth.csv``): reading, the one definition of "perturbed", lookup.

``hypersort synth`` writes ``index,case_id,perturbation,iterations,voxels_changed``; any CSV with an
``index`` and/or ``case_id`` column plus a categorical column (a perturbation kind, a rater) and/or a
numeric one (voxels changed, a severity) works.

A case is **perturbed** when its kind column holds something other than a clean value (``none``,
``clean``, ``normal``, ...); without a kind column, when the primary numeric column is > 0. Training
(per-epoch AUROC), sweeps and the analysis all use :func:`perturbed_flags`, so they always agree.

Example:
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"index": [0, 1], "perturbation": ["none", "eroded"], "voxels_changed": [0, 40]})
    >>> perturbed_flags(frame, *truth_columns(frame))[0].tolist()
    [False, True]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hypersort_ray.errors import DataError

__all__ = [
    "CLEAN_VALUES",
    "TRUTH_FILE",
    "listing",
    "perturbed_by_index",
    "perturbed_flags",
    "read_truth_csv",
    "resolve_truth_path",
    "truth_columns",
]

#: The truth file's name beside a datalist (``hypersort synth`` writes it there).
TRUTH_FILE = "truth.csv"

# Values of a categorical truth column that mean "this label is fine".
CLEAN_VALUES = ("none", "clean", "normal", "ok", "correct", "unperturbed", "original", "unchanged")
KIND_PREFERENCE = (
    "perturbation",
    "kind",
    "error_type",
    "error",
    "rater",
    "annotator",
    "style",
    "category",
    "group",
)
NUMERIC_PREFERENCE = (
    "voxels_changed",
    "changed_voxels",
    "voxels_modified",
    "n_changed",
    "severity",
    "iterations",
)
_SHOW = 10  # ids listed in an error or note before "... and N more"


def listing(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:_SHOW])
    more = len(values) - _SHOW
    return shown + (f" ... and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------- reading
def read_truth_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check a truth CSV.

    Args:
        path: the CSV file.

    Returns:
        The table; ``index`` (if present) as int64, ``case_id`` (if present) as str.

    Raises:
        DataError: missing/unreadable file, no ``index``/``case_id`` column, no other column,
            non-integer or duplicated ``index``, duplicated ``case_id``, empty table. The message names
            the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: truth CSV not found")
    try:
        frame = pd.read_csv(path, dtype={"case_id": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if not {"index", "case_id"} & set(frame.columns):
        raise DataError(f"{path}: needs an 'index' or 'case_id' column; found {', '.join(frame.columns)}")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    if len(set(frame.columns) - {"index", "case_id"}) == 0:
        raise DataError(f"{path}: no truth column besides index/case_id (e.g. perturbation, voxels_changed)")
    if "index" in frame.columns:
        raw = frame["index"]
        as_num = pd.to_numeric(raw, errors="coerce")
        bad = raw[as_num.isna() | (as_num != np.floor(as_num)) | (as_num < 0)]
        if len(bad):
            rows = [int(i) + 2 for i in bad.index]  # +2: header line and 1-based lines
            raise DataError(f"{path}: 'index' must be non-negative integers; bad on lines {listing(rows)}")
        frame["index"] = as_num.astype(np.int64)
        dup = frame["index"][frame["index"].duplicated()].unique().tolist()
        if dup:
            raise DataError(f"{path}: duplicated index values {listing(dup)}")
    if "case_id" in frame.columns:
        if frame["case_id"].isna().any():
            rows = [int(i) + 2 for i in frame.index[frame["case_id"].isna()]]
            raise DataError(f"{path}: empty case_id on lines {listing(rows)}")
        frame["case_id"] = frame["case_id"].astype(str).str.strip()
        dup = frame["case_id"][frame["case_id"].duplicated()].unique().tolist()
        if dup:
            raise DataError(f"{path}: duplicated case_id values {listing(dup)}")
    return frame


def truth_columns(frame: pd.DataFrame) -> tuple[str | None, list[str]]:
    """(kind column, numeric columns with the preferred one first)."""
    candidates = [c for c in frame.columns if c not in ("index", "case_id")]
    lower = {c.lower(): c for c in candidates}
    kind = next((lower[k] for k in KIND_PREFERENCE if k in lower), None)
    if kind is None:
        kind = next((c for c in candidates if not pd.api.types.is_numeric_dtype(frame[c])), None)
    numeric = [c for c in candidates if c != kind and pd.api.types.is_numeric_dtype(frame[c])]
    preferred = [lower[k] for k in NUMERIC_PREFERENCE if k in lower and lower[k] in numeric]
    numeric = preferred[:1] + [c for c in numeric if c not in preferred[:1]]
    return kind, numeric


def perturbed_flags(
    frame: pd.DataFrame, kind: str | None, numeric: list[str]
) -> tuple[np.ndarray | None, str | None]:
    """Clean-vs-perturbed per row: kind != clean value, else primary numeric > 0."""
    if kind is not None:
        values = frame[kind].astype(str).str.strip().str.lower()
        clean = next((v for v in CLEAN_VALUES if (values == v).any()), None)
        if clean is not None:
            return (values != clean).to_numpy(), clean
    if numeric:
        column = pd.to_numeric(frame[numeric[0]], errors="coerce")
        if column.notna().all() and (column >= 0).all():
            return (column > 0).to_numpy(), None
    return None, None


def perturbed_by_index(frame: pd.DataFrame) -> dict[int, bool]:
    """``{sample index: perturbed}`` for a truth table with an ``index`` column ({} when undecidable)."""
    if "index" not in frame.columns:
        return {}
    flags, _ = perturbed_flags(frame, *truth_columns(frame))
    if flags is None:
        return {}
    return {int(i): bool(f) for i, f in zip(frame["index"], flags, strict=True)}


def _existing(path: Path | None, base: Path | None) -> Path | None:
    """``path`` as given, else relative to ``base`` (runs are often moved with their data)."""
    if path is None:
        return None
    candidates = [Path(path)] + ([Path(base) / path] if base is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


def resolve_truth_path(
    explicit: str | os.PathLike[str] | None,
    configured: str | os.PathLike[str] | None,
    datalist: str | os.PathLike[str] | None,
    base: str | os.PathLike[str] | None = None,
) -> Path | None:
    """The truth CSV to use: the explicit one, else the configured one, else ``truth.csv`` beside the
    datalist, else None.

    Args:
        explicit: given on the command line (must exist).
        configured: ``data.truth`` of the config.
        datalist: ``data.datalist`` of the config (a file or a folder).
        base: a folder that relative configured paths are also tried against (the run folder).

    Raises:
        DataError: the explicit truth file does not exist.
    """
    if explicit is not None:
        if not Path(explicit).is_file():
            raise DataError(f"{explicit}: truth CSV not found")
        return Path(explicit)
    found = _existing(Path(configured) if configured else None, Path(base) if base else None)
    if found is not None and found.is_file():
        return found
    folder = _existing(Path(datalist) if datalist else None, Path(base) if base else None)
    if folder is not None:
        beside = (folder if folder.is_dir() else folder.parent) / TRUTH_FILE
        if beside.is_file():
            return beside
    return None
