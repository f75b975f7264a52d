"""The run folder's CSV tables: latents, per-sample training losses and per-epoch history.

File names and locations belong to :class:`hypersort_ray.runs.layout.RunDir`; this module only knows the
formats. The latents CSV (``index,case_id,z0,...,z{d-1}``, one row per sample, sorted by index) is the
human- and tool-facing copy of the latents; the checkpoint keeps the authoritative one. Floats are written so they read back to the very same value: the shortest
round-trip text for the source precision (float32 values stay short, float64 keep all 17 digits).

Example:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/latents.csv"
    >>> write_latents_csv(path, [1, 0], ["b", "a"], np.array([[0.5, -1.0], [0.25, 2.0]]))
    >>> idx, ids, z = read_latents_csv(path)
    >>> idx.tolist(), ids, z[0].tolist()
    ([0, 1], ['a', 'b'], [0.25, 2.0])
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.atomic import atomic_write_text
from hypersort_ray.errors import RunError

__all__ = [
    "read_history_csv",
    "read_latents_csv",
    "read_sample_losses_csv",
    "write_history_csv",
    "write_latents_csv",
    "write_sample_losses_csv",
]


def _as_array(values: Any) -> np.ndarray:
    """numpy view of a tensor (any device) or array-like, keeping float32 as float32."""
    if hasattr(values, "detach"):  # a torch tensor; imported lazily so reading CSVs needs no torch
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _format_float(x: np.floating) -> str:
    # numpy's str() of a float32/float64 scalar is the shortest text that parses back to the same value
    # in that precision (Dragon4), so the CSV loses nothing and stays readable.
    return str(x)


def write_latents_csv(
    path: str | os.PathLike[str],
    indices: Sequence[int] | np.ndarray | Any,
    case_ids: Sequence[str],
    values: np.ndarray | Any,
) -> None:
    """Write the latents atomically (temporary file + rename), rows sorted by sample index.

    Args:
        path: the CSV file.
        indices: ``[N]`` sample indices.
        case_ids: ``[N]`` case ids, row-aligned with ``indices`` (not indexed by sample index).
        values: ``[N, d]`` latents (numpy array or torch tensor; float32 or float64).

    Raises:
        ValueError: lengths differ, duplicated indices, or values not 2-D.

    Example:
        See the module docstring.
    """
    path = Path(path)
    idx = np.asarray(_as_array(indices)).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{path}: indices must be integers, got dtype {idx.dtype}")
    vals = _as_array(values)
    if vals.ndim != 2:
        raise ValueError(f"{path}: values must be [N, d], got shape {vals.shape}")
    if not np.issubdtype(vals.dtype, np.floating):
        vals = vals.astype(np.float64)
    ids = [str(c) for c in case_ids]
    if not len(idx) == len(ids) == vals.shape[0]:
        raise ValueError(
            f"{path}: {len(idx)} indices, {len(ids)} case ids and {vals.shape[0]} rows differ in number"
        )
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: duplicated sample indices {uniq[counts > 1][:10].tolist()}")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "case_id", *(f"z{j}" for j in range(vals.shape[1]))])
    for row in np.argsort(idx, kind="stable"):
        writer.writerow([int(idx[row]), ids[row], *(_format_float(v) for v in vals[row])])

    atomic_write_text(path, buf.getvalue())


def read_latents_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read a latents CSV written by :func:`write_latents_csv` (or by hand, same columns).

    Args:
        path: the CSV file.

    Returns:
        ``(indices int64 [N], case_ids [N], values float64 [N, d])``, sorted by index.

    Raises:
        RunError: missing file, bad header (missing/misnamed columns), a ragged row, a non-integer
            index, a non-numeric value or a duplicated index; the message names the file and line.

    Example:
        See the module docstring.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path}: latents file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc

    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise RunError(f"{path}: empty file; expected the header index,case_id,z0,...")
    header = [h.strip() for h in header]
    if header[:2] != ["index", "case_id"]:
        raise RunError(f"{path}:1: the header must start with index,case_id; got {','.join(header[:2])}")
    zcols = header[2:]
    if not zcols:
        raise RunError(f"{path}:1: no latent columns; expected index,case_id,z0,...,z{{d-1}}")
    expected = [f"z{j}" for j in range(len(zcols))]
    if zcols != expected:
        wrong = next(j for j, (a, b) in enumerate(zip(zcols, expected, strict=True)) if a != b)
        raise RunError(
            f"{path}:1: latent column {wrong + 3} is {zcols[wrong]!r}, expected {expected[wrong]!r} "
            f"(columns must be z0..z{len(zcols) - 1} in order)"
        )

    indices: list[int] = []
    case_ids: list[str] = []
    rows: list[list[float]] = []
    first_line: dict[int, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue  # a blank line (e.g. trailing newline edited in) carries no sample
            if len(record) != len(header):
                raise RunError(f"{path}:{line}: {len(record)} fields, the header has {len(header)}")
            try:
                index = int(record[0])
            except ValueError:
                raise RunError(f"{path}:{line}: index {record[0]!r} is not an integer") from None
            if index < 0:
                raise RunError(f"{path}:{line}: index {index} is negative")
            if index in first_line:
                raise RunError(f"{path}:{line}: index {index} already appears on line {first_line[index]}")
            first_line[index] = line
            vector = []
            for col, cell in zip(expected, record[2:], strict=True):
                try:
                    vector.append(float(cell))
                except ValueError:
                    raise RunError(f"{path}:{line}: {col} = {cell!r} is not a number") from None
            indices.append(index)
            case_ids.append(record[1])
            rows.append(vector)
    except csv.Error as exc:
        raise RunError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc

    order = np.argsort(np.asarray(indices, dtype=np.int64), kind="stable")
    idx = np.asarray(indices, dtype=np.int64)[order]
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(zcols))[order]
    return idx, [case_ids[i] for i in order], values


#: Columns of the per-sample training-loss table (each sample's own segmentation loss during training).
SAMPLE_LOSS_COLUMNS = ("index", "case_id", "train_loss_mean", "train_loss_last", "epochs")


def write_sample_losses_csv(path: str | os.PathLike[str], state: dict[str, Any], case_ids: Sequence[str]) -> Path:
    """Write ``index,case_id,train_loss_mean,train_loss_last,epochs`` from a ``SampleLosses`` state dict.

    ``train_loss_mean`` is the mean over the epochs the sample was seen (empty when never seen).
    """
    total = np.asarray(state["sum"], dtype=np.float64)
    count = np.asarray(state["count"], dtype=np.float64)
    last = np.asarray(state["last"], dtype=np.float64)
    if not (len(total) == len(count) == len(last) == len(case_ids)):
        raise RunError(f"{path}: sample-loss record has {len(total)} rows for {len(case_ids)} cases")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SAMPLE_LOSS_COLUMNS)
    for i, cid in enumerate(case_ids):
        mean = repr(float(total[i] / count[i])) if count[i] > 0 else ""
        writer.writerow([i, cid, mean, repr(float(last[i])) if np.isfinite(last[i]) else "", int(count[i])])
    return atomic_write_text(Path(path), buf.getvalue())


def read_sample_losses_csv(path: str | os.PathLike[str]) -> dict[int, float]:
    """``{index: train_loss_mean}`` from ``sample_losses.csv`` (rows without a mean are left out).

    Raises:
        RunError: unreadable file or missing columns.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunError(f"{path}: cannot read ({exc})") from None
    if rows and not {"index", "train_loss_mean"} <= set(rows[0]):
        raise RunError(f"{path}: needs the columns index and train_loss_mean, has {', '.join(rows[0])}")
    out: dict[int, float] = {}
    for line, row in enumerate(rows, start=2):
        try:
            if row["train_loss_mean"] not in ("", None):
                out[int(row["index"])] = float(row["train_loss_mean"])
        except (TypeError, ValueError):
            raise RunError(f"{path}, line {line}: bad index or train_loss_mean {row}") from None
    return out


def write_history_csv(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> Path:
    """Per-epoch metrics as CSV (union of keys, ``epoch`` first), written atomically."""
    import pandas as pd

    df = pd.DataFrame(list(history))
    if "epoch" in df:
        df = df[["epoch"] + [c for c in df.columns if c != "epoch"]]
    return atomic_write_text(Path(path), df.to_csv(index=False))


def read_history_csv(path: str | os.PathLike[str]):
    """The per-epoch history as a DataFrame.

    Raises:
        RunError: missing, unreadable or empty file (the message names it).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: not found")
    try:
        history = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if history.empty:
        raise RunError(f"{path}: has no rows")
    return history
