"""Datalists: which image/label files form the dataset, in which order, and are they usable.

The row order of a datalist defines the **sample index** (0..N-1), the identity of a sample for the whole
product: its latent vector, its worker shard and every report refer to it. Three forms are accepted:

* the reference repository's tab-separated file (header ``DataPath<TAB>LabelPath``, one case per line);
* an MSD-style JSON file ``{"training": [{"image": ..., "label": ...}, ...]}``;
* a folder with ``imagesTr/`` and ``labelsTr/`` (paired by file name, nnU-Net ``_0000`` suffix allowed).

Relative paths are resolved against the datalist's folder, so a dataset folder can be moved as a whole.

Example:
    >>> cases = load_datalist("data/datalist.tsv")          # doctest: +SKIP
    >>> summary = validate_cases(cases)                       # doctest: +SKIP
    >>> summary["n_cases"], summary["label_values"]           # doctest: +SKIP
    (200, [0, 1])
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.errors import DataError

__all__ = ["Case", "case_id_from_path", "dataset_hash", "load_datalist", "validate_cases"]

IMAGE_COLUMNS = ("datapath", "image", "img")
LABEL_COLUMNS = ("labelpath", "label", "seg")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net / MSD v2 name the first (and, for CT, only) image channel <case>_0000.nii.gz.
CHANNEL_SUFFIX = "_0000"
# Affines of image and label must agree this closely (relative, absolute in mm).
AFFINE_RTOL = 1e-3
AFFINE_ATOL = 1e-4
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Case:
    """One training sample.

    Args:
        index: sample index = row order in the datalist (stable sample identity).
        case_id: image file name without ``.nii``/``.nii.gz`` and without ``_0000``; unique.
        image: absolute, resolved image path.
        label: absolute, resolved label path.
    """

    index: int
    case_id: str
    image: Path
    label: Path


def case_id_from_path(path: str | Path, strip_channel: bool = False) -> str:
    """``/x/liver_003.nii.gz`` -> ``liver_003``; with ``strip_channel``, ``liver_003_0000`` -> ``liver_003``.

    The nnU-Net channel suffix is stripped only where the folder convention applies (an image in
    ``imagesTr/`` whose label lacks the suffix): ``case_0000`` in a TSV is a case id, not a channel.
    """
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    if strip_channel and name.endswith(CHANNEL_SUFFIX):
        name = name[: -len(CHANNEL_SUFFIX)]
    return name


# ------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class _Row:
    """A datalist entry before checks; ``where`` says where it came from, for error messages."""

    image: Path
    label: Path
    where: str
    case_id: str | None = None  # set when the source already decided it (folder pairing)


def load_datalist(path: str | Path) -> list[Case]:
    """Read a datalist (TSV, MSD-style JSON or ``imagesTr``/``labelsTr`` folder) into cases.

    Only the file system is checked here (files exist, no duplicates); use :func:`validate_cases` to open
    the volumes.

    Args:
        path: the TSV/JSON file or the dataset folder.

    Returns:
        The cases in row order; ``cases[i].index == i``.

    Raises:
        DataError: missing/empty/unknown datalist, missing files, duplicate images or case ids, no cases.
            All file problems are listed in one message.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: datalist not found")
    if path.is_dir():
        rows = _rows_from_folder(path)
    else:
        text = _read_text(path)
        if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
            rows = _rows_from_json(path, text)
        else:
            rows = _rows_from_table(path, text)
    if not rows:
        raise DataError(f"{path}: datalist has no cases")
    return _rows_to_cases(path, rows)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: datalist is not a text file (expected TSV, MSD-style JSON or a folder)"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: datalist is empty")
    return text


def _resolve(base: Path, value: str) -> Path:
    p = Path(value.strip()).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _rows_from_table(path: Path, text: str) -> list[_Row]:
    """Reference TSV: header line, then ``image<TAB>label`` per line (commas accepted when no tab)."""
    lines = [(no, line) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    delimiter = "\t" if "\t" in lines[0][1] else ","
    first = [c.strip() for c in next(csv.reader([lines[0][1]], delimiter=delimiter))]
    if len(first) < 2:
        raise DataError(
            f"{path}: line {lines[0][0]}: expected tab-separated image and label columns "
            "(header DataPath<TAB>LabelPath), or use an MSD-style JSON / imagesTr+labelsTr folder"
        )
    header = [c.lower() for c in first]
    img_col = next((header.index(n) for n in IMAGE_COLUMNS if n in header), None)
    lab_col = next((header.index(n) for n in LABEL_COLUMNS if n in header), None)
    body = lines[1:]
    if img_col is None or lab_col is None:
        if len(first) != 2:
            raise DataError(
                f"{path}: line {lines[0][0]}: header {first} names no image column "
                f"({'/'.join(IMAGE_COLUMNS)}) and label column ({'/'.join(LABEL_COLUMNS)})"
            )
        img_col, lab_col = 0, 1
        # An unrecognised 2-column first line is a header, unless both entries are existing files:
        # then the file simply has no header and the line is the first case.
        if all(_resolve(path.parent, c).is_file() for c in first):
            body = lines
    rows = []
    need = max(img_col, lab_col) + 1
    for no, line in body:
        cols = next(csv.reader([line], delimiter=delimiter))
        where = f"{path} line {no}"
        if len(cols) < need or not cols[img_col].strip() or not cols[lab_col].strip():
            sep = "tab" if delimiter == "\t" else "comma"
            raise DataError(
                f"{where}: expected {need} {sep}-separated columns with an image and a label, got {cols}"
            )
        rows.append(_Row(_resolve(path.parent, cols[img_col]), _resolve(path.parent, cols[lab_col]), where))
    return rows


def _rows_from_json(path: Path, text: str) -> list[_Row]:
    """MSD ``dataset.json``: ``{"training": [{"image": ..., "label": ...}]}`` (a bare list also works)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "training" not in data and (path.parent / "imagesTr").is_dir():
        # nnU-Net v2's dataset.json lists no cases: they are the files of imagesTr/ and labelsTr/.
        return _rows_from_folder(path.parent)
    entries = data.get("training") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a 'training' list of {{'image': ..., 'label': ...}} entries")
    rows = []
    for i, entry in enumerate(entries):
        where = f"{path} training[{i}]"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("image"), str)
            or not isinstance(entry.get("label"), str)
        ):
            raise DataError(f"{where}: expected {{'image': path, 'label': path}}, got {entry!r}"[:300])
        rows.append(_Row(_resolve(path.parent, entry["image"]), _resolve(path.parent, entry["label"]), where))
    return rows


def _nifti_files(folder: Path) -> list[Path]:
    # Dot files: MSD tarballs ship macOS '._name.nii.gz' resource forks next to every volume.
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(NIFTI_SUFFIXES)
    )


def _rows_from_folder(path: Path) -> list[_Row]:
    """``imagesTr/`` + ``labelsTr/``, paired by case id; rows sorted by case id."""
    img_dir, lab_dir = path / "imagesTr", path / "labelsTr"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise DataError(
            f"{path}: a dataset folder needs imagesTr/ and labelsTr/ (or pass a TSV / MSD-style JSON datalist)"
        )
    labels = {case_id_from_path(p): p for p in _nifti_files(lab_dir)}
    problems, rows = [], []
    for img in _nifti_files(img_dir):
        stem = img.name[: -len(".nii.gz")] if img.name.lower().endswith(".nii.gz") else Path(img.name).stem
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() and stem[-4:] != "0000":
            problems.append(
                f"{img}: extra image channel {stem[-5:]}; only single-channel images are supported"
            )
            continue
        cid = case_id_from_path(img)
        if cid not in labels:
            cid = case_id_from_path(img, strip_channel=True)
        label = labels.pop(cid, None)
        if label is None:
            problems.append(f"{img}: no label {cid}.nii.gz in {lab_dir}")
            continue
        rows.append(_Row(img.resolve(), label.resolve(), f"{path} case {cid}", cid))
    problems += [f"{lab}: label without an image in {img_dir}" for lab in labels.values()]
    if problems:
        raise DataError(
            f"{path}: {len(problems)} problem(s) pairing images and labels:\n" + "\n".join(problems)
        )
    return rows


def _rows_to_cases(path: Path, rows: list[_Row]) -> list[Case]:
    """Check files exist and nothing is listed twice; collect every problem before raising."""
    problems: list[str] = []
    seen_images: dict[Path, int] = {}
    seen_ids: dict[str, int] = {}
    cases = []
    for i, row in enumerate(rows):
        cid = row.case_id or case_id_from_path(row.image)
        head = f"case {cid} (row {i}, {row.where})"
        for kind, file in (("image", row.image), ("label", row.label)):
            if not file.is_file():
                problems.append(f"{head}: {kind} file not found: {file}")
        if row.image in seen_images:
            j = seen_images[row.image]
            problems.append(
                f"{head}: duplicate entry: image {row.image} is also listed in row {j} ({rows[j].where})"
            )
        elif cid in seen_ids:
            j = seen_ids[cid]
            problems.append(
                f"{head}: duplicate case id '{cid}': {row.image} and {rows[j].image} (row {j}, {rows[j].where})"
            )
        seen_images.setdefault(row.image, i)
        seen_ids.setdefault(cid, i)
        cases.append(Case(index=i, case_id=cid, image=row.image, label=row.label))
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s) in the datalist:\n" + "\n".join(problems))
    return cases


# --------------------------------------------------------------------------------------- validation
@dataclass
class _Volume:
    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, ...]
    values: np.ndarray | None  # label values (labels only)


def _open_volume(file: Path, is_label: bool, problems: list[str]) -> _Volume | None:
    """Read header and data of one NIfTI file; append what is wrong to ``problems``."""
    import nibabel as nib

    try:
        img = nib.load(str(file))
    except nib.filebasedimages.ImageFileError:
        problems.append("not a NIfTI file (nibabel cannot tell its format)")
        return None
    except Exception as exc:  # OSError, EOFError, zlib.error, ... depending on the damage
        problems.append(f"not a readable NIfTI file ({type(exc).__name__}: {exc})".splitlines()[0][:300])
        return None
    if not isinstance(img, nib.Nifti1Pair):  # Nifti1Image and Nifti2Image derive from it
        problems.append(f"is a {type(img).__name__}, not a NIfTI image")
        return None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated/corrupt gzip streams fail only when the data is read
        problems.append(f"cannot read the voxel data ({type(exc).__name__}: {exc})".splitlines()[0][:300])
        return None
    shape = tuple(int(s) for s in data.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape, data = shape[:3], data[..., 0]
    if len(shape) not in (2, 3):
        problems.append(f"shape {shape}: expected a 3D volume (or 4D with a single 4th dimension)")
        return None
    values = None
    if is_label:
        values = _label_values(data, problems)
    elif np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        problems.append(f"image has {n_bad} NaN/inf voxel(s)")
    spacing = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    return _Volume(shape=shape, affine=np.asarray(img.affine, dtype=float), spacing=spacing, values=values)


def _label_values(data: np.ndarray, problems: list[str]) -> np.ndarray | None:
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            problems.append("label has NaN/inf voxel(s)")
            return None
        frac = data != np.round(data)
        if frac.any():
            problems.append(f"label values are not integers (e.g. {float(data[frac].flat[0])!r})")
            return None
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        problems.append(f"label has unsupported data type {data.dtype}")
        return None
    values = np.unique(data)
    if values.size and values[0] < 0:
        problems.append(f"label has negative values (min {values[0]:g})")
        return None
    return values.astype(np.int64)


def _check_case(case: Case) -> tuple[list[str], _Volume | None, _Volume | None]:
    """Problems of one case as ``(file, what)`` strings, plus the opened image and label."""
    problems: list[str] = []
    found: list[_Volume | None] = []
    for file, is_label in ((case.image, False), (case.label, True)):
        mine: list[str] = []
        if not Path(file).is_file():
            mine.append("file not found")
            vol = None
        else:
            vol = _open_volume(Path(file), is_label, mine)
        problems += [f"{file}: {p}" for p in mine]
        found.append(vol)
    img, lab = found
    if img is not None and lab is not None:
        if img.shape != lab.shape:
            problems.append(f"{case.label}: label shape {lab.shape} differs from image shape {img.shape}")
        elif not np.allclose(img.affine, lab.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            diff = float(np.abs(img.affine - lab.affine).max())
            problems.append(
                f"{case.label}: label affine differs from the image affine by up to {diff:.4g} "
                f"(image {np.round(img.affine[:3], 4).tolist()}, label {np.round(lab.affine[:3], 4).tolist()})"
            )
    return problems, img, lab


def validate_cases(cases: Sequence[Case], progress: bool = False) -> dict[str, Any]:
    """Open every case with nibabel and check it can be trained on.

    Checks: readable NIfTI (corrupt gzip, other formats), 3D (4D with a singleton 4th dimension is fine;
    2D only if every case is 2D), image and label shape equal, affines equal within 1e-3 relative /
    1e-4 mm, label values integral and non-negative, no NaN/inf in the image. Every problem of every
    case is collected, so one run tells the user everything to fix.

    Args:
        cases: from :func:`load_datalist`.
        progress: show a progress bar on stderr.

    Returns:
        ``{"n_cases", "shape_min", "shape_max", "spacing_min", "spacing_max", "label_values", "ok": True}``.

    Raises:
        DataError: first line ``N of M cases have problems``, then one line per problem
            ``case <id> (row i): <file>: <what>``.
    """
    if not cases:
        raise DataError("no cases to validate")
    bad: dict[int, list[str]] = {}
    shapes, spacings, dims = [], [], {}
    values: set[int] = set()
    for case in _progress(cases, progress, "validating"):
        problems, img, lab = _check_case(case)
        if problems:
            bad[case.index] = [f"case {case.case_id} (row {case.index}): {p}" for p in problems]
            continue
        assert img is not None and lab is not None and lab.values is not None
        shapes.append(img.shape)
        spacings.append(img.spacing)
        dims.setdefault(len(img.shape), []).append(case)
        values.update(int(v) for v in lab.values)
    if len(dims) > 1:
        # Mixed 2D/3D: blame the minority, it is most likely the odd one out.
        minority = min(dims, key=lambda d: len(dims[d]))
        for case in dims[minority]:
            bad.setdefault(case.index, []).append(
                f"case {case.case_id} (row {case.index}): {case.image}: {minority}D volume while other cases are "
                f"{max(dims, key=lambda d: len(dims[d]))}D"
            )
    if bad:
        lines = [f"{len(bad)} of {len(cases)} cases have problems"]
        for index in sorted(bad):
            lines += bad[index]
        raise DataError("\n".join(lines))
    return {
        "n_cases": len(cases),
        "shape_min": [int(x) for x in np.min(shapes, axis=0)],
        "shape_max": [int(x) for x in np.max(shapes, axis=0)],
        "spacing_min": [round(float(x), 6) for x in np.min(spacings, axis=0)],
        "spacing_max": [round(float(x), 6) for x in np.max(spacings, axis=0)],
        "label_values": sorted(values),
        "ok": True,
    }


def _progress(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="case", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------- hash
def _file_digest(path: Path) -> str:
    """Size + first and last MiB: catches replaced/edited files without reading whole volumes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_CHUNK))
        if size > _HASH_CHUNK:
            f.seek(max(_HASH_CHUNK, size - _HASH_CHUNK))
            h.update(f.read(_HASH_CHUNK))
    return h.hexdigest()


def dataset_hash(cases: Sequence[Case]) -> str:
    """Content fingerprint of a dataset (MLflow tag): sample order, case ids and file contents.

    Paths are not hashed, so moving a dataset folder keeps its hash; reordering rows changes it (the
    sample indices change).

    Args:
        cases: from :func:`load_datalist`.

    Returns:
        A sha256 hex digest.
    """
    h = hashlib.sha256()
    for case in cases:
        h.update(f"{case.index}\t{case.case_id}\t".encode())
        h.update(_file_digest(case.image).encode())
        h.update(_file_digest(case.label).encode())
    return h.hexdigest()
