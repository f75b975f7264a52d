"""Atomic writes: files (temp file + fsync + ``os.replace``) and whole folders (build beside, then swap).

Every writer of the project goes through this module: checkpoints, the run folder's tables, analysis
outputs, exported models, corrected labels and sweep results. A reader (or a crash mid-write) never
sees a half-written file or a half-filled folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_save_nifti",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_via",
    "fsync_dir",
    "replace_dir",
    "staged_dir",
    "to_jsonable",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_via(
    path: str | os.PathLike[str], write: Callable[[Path], Any], *, suffix: str = ""
) -> Path:
    """Let ``write(tmp)`` write a temporary sibling of ``path``, then rename it over ``path``.

    For writers that want a file name (``torch.jit.save``, ``nibabel.save``, ``DataFrame.to_csv``).
    ``suffix`` is kept at the end of the temporary name (nibabel picks the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``.

    A reader (or a crash mid-write) never sees a half-written file.

    Args:
        path: destination.
        data: file content.
    """
    return atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, Paths and non-finite floats made JSON-safe (NaN/inf -> null)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | os.PathLike[str], document: Any) -> Path:
    """Write ``document`` as indented, strict JSON (no NaN tokens) atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(document), indent=2, allow_nan=False) + "\n")


def replace_dir(new: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Put the complete folder ``new`` in place of ``dst`` (which may not exist).

    The old folder is first renamed aside and only removed once ``new`` is in place, so at every moment
    ``dst`` is either the old complete folder or the new complete one (a crash between the two renames
    leaves the old one beside it as ``.<name>.old-*``, never a mix). Both must be on one file system.
    """
    new, dst = Path(new), Path(dst)
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dst


@contextmanager
def staged_dir(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh folder beside ``dst`` to fill; on success it replaces ``dst`` (:func:`replace_dir`).

    On an exception the staging folder is removed and ``dst`` is left as it was.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with staged_dir(target) as tmp:
        ...     _ = (tmp / "weights.bin").write_bytes(b"1")
        >>> sorted(p.name for p in target.iterdir())
        ['weights.bin']
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_nifti(img: Any, path: str | os.PathLike[str]) -> Path:
    """``nibabel.save`` through a temporary sibling + ``os.replace``: no half-written image on disk."""
    import nibabel as nib

    ext = ".nii.gz" if Path(path).name.endswith(".nii.gz") else ".nii"
    return atomic_write_via(path, lambda tmp: nib.save(img, str(tmp)), suffix=ext)
