"""Request parsing and validation for the segmentation endpoint (no Ray, no torch).

Everything a client sends is checked here before any model code runs, so a bad request costs a few
microseconds and never a crash, a hang or a memory spike:

* :func:`read_nifti_header` parses only the fixed-size NIfTI header (348 bytes for NIfTI-1, 540 for
  NIfTI-2). For a ``.nii.gz`` upload only that prefix is decompressed. The dims are checked against
  ``max_voxels`` **before** any voxel data is decompressed.
* :func:`gunzip_prefix` decompresses a gzip stream incrementally and stops at a byte cap. The cap for
  the voxel data is exactly what the header declares (``vox_offset + voxels * bytes_per_voxel``), itself
  bounded by ``max_voxels``, so a decompression bomb can never expand past the size of a legal volume.
* :func:`decode_nifti` builds the array and affine from the bounded bytes with nibabel (in memory; no
  file is ever opened on behalf of a request).
* :func:`parse_latent_field` and :func:`check_volume_shape` give 422s that name the problem.

Every failure is a :class:`RequestError` carrying the HTTP status and a message for ``{"detail": ...}``:
400 not a NIfTI / corrupt or truncated data, 413 too large, 422 unusable content (dims, channels,
datatype, NaN, latent), 404 unknown style, 401 missing or wrong token.

Example:
    >>> import gzip, io, nibabel as nib, numpy as np
    >>> img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    >>> payload = gzip.compress(img.to_bytes())
    >>> header = read_nifti_header(payload, max_voxels=1000)
    >>> header.shape, header.compressed
    ((4, 5, 6), True)
    >>> volume = decode_nifti(payload, max_voxels=1000, spatial_dims=3)
    >>> volume.array.shape, volume.array.dtype
    ((4, 5, 6), dtype('float32'))
"""

from __future__ import annotations

import hmac
import json
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_VOX_OFFSET",
    "DecodedVolume",
    "NiftiHeaderInfo",
    "RequestError",
    "bearer_token_ok",
    "check_resampled_size",
    "check_volume_shape",
    "decode_nifti",
    "gunzip_prefix",
    "parse_latent_field",
    "read_nifti_header",
    "safe_stem",
    "voxel_volume_ml",
]

NIFTI1_HEADER = 348
NIFTI2_HEADER = 540
MAX_HEADER_BYTES = NIFTI2_HEADER
# Header extensions live between the header and vox_offset; real ones (DICOM tags, JSON sidecars) are
# kilobytes. A larger offset is refused so the cap on decompressed bytes stays tied to the voxel count.
MAX_VOX_OFFSET = 16 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 64 * 1024

# NIfTI datatype code -> (bytes per voxel, name). Complex, RGB, float128 and 1-bit are refused (422).
_DATATYPES: dict[int, tuple[int, str]] = {
    2: (1, "uint8"),
    4: (2, "int16"),
    8: (4, "int32"),
    16: (4, "float32"),
    64: (8, "float64"),
    256: (1, "int8"),
    512: (2, "uint16"),
    768: (4, "uint32"),
    1024: (8, "int64"),
    1280: (8, "uint64"),
}
_UNSUPPORTED_DATATYPES = {
    1: "binary (1 bit)",
    32: "complex64",
    128: "RGB24",
    1536: "float128",
    1792: "complex128",
    2048: "complex256",
    2304: "RGBA32",
}


class RequestError(Exception):
    """A client error: ``status`` is the HTTP status, ``detail`` the message for ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# --------------------------------------------------------------------------------------- gzip
def gunzip_prefix(data: bytes | memoryview, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes of a gzip stream (several members allowed).

    Decompression is incremental (64 KiB of input at a time, output capped per call), so memory and
    time stay proportional to ``limit`` however large the stream would expand. Returns fewer than
    ``limit`` bytes when the stream ends first; the caller decides whether that is a truncation.

    Raises:
        RequestError: 400 when the stream is not valid gzip/deflate data.
    """
    if limit <= 0:
        return b""
    view = memoryview(data)
    out = bytearray()
    pos = 0
    pending: bytes = b""
    decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    member_started = False
    try:
        while len(out) < limit:
            if pending:
                chunk, pending = pending, b""
            elif pos < len(view):
                chunk = bytes(view[pos : pos + _CHUNK])
                pos += len(chunk)
            else:
                break
            if decomp.eof:
                # The previous member ended: what follows is another member or zero padding.
                if not chunk.strip(b"\x00"):
                    continue
                decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            member_started = True
            out += decomp.decompress(chunk, limit - len(out))
            pending = decomp.unconsumed_tail or (decomp.unused_data if decomp.eof else b"")
    except zlib.error as exc:
        raise RequestError(400, f"corrupt gzip data: {exc}") from None
    if not member_started:
        raise RequestError(400, "empty gzip stream")
    return bytes(out)


# ------------------------------------------------------------------------------------- header
@dataclass(frozen=True)
class NiftiHeaderInfo:
    """What the fixed-size header says, read without touching the voxel data."""

    version: int  # 1 or 2
    endian: str  # "<" or ">"
    shape: tuple[int, ...]
    datatype: int
    dtype_name: str
    bytes_per_voxel: int
    vox_offset: int
    compressed: bool

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        """Bytes of a complete single-file NIfTI: header + extensions + voxel data."""
        return self.vox_offset + self.voxels * self.bytes_per_voxel


def _header_bytes(data: bytes | memoryview) -> tuple[bytes, bool]:
    view = memoryview(data)
    if len(view) == 0:
        raise RequestError(400, "the uploaded file is empty")
    if bytes(view[:2]) == _GZIP_MAGIC:
        return gunzip_prefix(view, MAX_HEADER_BYTES), True
    return bytes(view[:MAX_HEADER_BYTES]), False


def read_nifti_header(data: bytes | memoryview, *, max_voxels: int) -> NiftiHeaderInfo:
    """Parse and check the NIfTI-1/-2 header of a ``.nii`` or ``.nii.gz`` upload.

    Only the header is read (for gzip: only the header bytes are decompressed).

    Raises:
        RequestError: 400 not a single-file NIfTI or an invalid header; 413 more than ``max_voxels``
            voxels or an oversized extension block; 422 a datatype the model cannot use.
    """
    raw, compressed = _header_bytes(data)
    if len(raw) < 4:
        raise RequestError(400, "not a NIfTI file: too short for a header")
    version = endian = None
    for e in ("<", ">"):
        size = struct.unpack(e + "i", raw[:4])[0]
        if size in (NIFTI1_HEADER, NIFTI2_HEADER):
            version, endian = (1 if size == NIFTI1_HEADER else 2), e
            break
    if version is None:
        kind = "gzip data that is not a NIfTI" if compressed else "not a NIfTI file (.nii or .nii.gz)"
        raise RequestError(400, f"{kind}: the header size field is not 348 or 540")
    need = NIFTI1_HEADER if version == 1 else NIFTI2_HEADER
    if len(raw) < need:
        raise RequestError(400, f"not a NIfTI file: truncated header ({len(raw)} of {need} bytes)")
    if version == 1:
        magic = raw[344:348]
        if magic == b"ni1\x00":
            raise RequestError(400, "two-file NIfTI (.hdr/.img) is not supported: upload one .nii or .nii.gz")
        if magic != b"n+1\x00":
            raise RequestError(400, f"not a NIfTI-1 file: bad magic {magic!r}")
        dim = struct.unpack(endian + "8h", raw[40:56])
        datatype = struct.unpack(endian + "h", raw[70:72])[0]
        vox_offset_f = struct.unpack(endian + "f", raw[108:112])[0]
        if not math.isfinite(vox_offset_f):
            raise RequestError(400, "invalid NIfTI header: vox_offset is not a number")
        vox_offset = int(vox_offset_f)
    else:
        magic = raw[4:12]
        if magic[:3] == b"ni2":
            raise RequestError(400, "two-file NIfTI (.hdr/.img) is not supported: upload one .nii or .nii.gz")
        if magic != b"n+2\x00\r\n\x1a\n":
            raise RequestError(400, f"not a NIfTI-2 file: bad magic {magic!r}")
        datatype = struct.unpack(endian + "h", raw[12:14])[0]
        dim = struct.unpack(endian + "8q", raw[16:80])
        vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise RequestError(400, f"invalid NIfTI header: dim[0] = {ndim} (expected 1..7)")
    shape = tuple(int(d) for d in dim[1 : 1 + ndim])
    if any(d < 1 for d in shape):
        raise RequestError(400, f"invalid NIfTI header: dimensions {shape} must all be >= 1")
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise RequestError(
            413, f"volume {shape} has {voxels} voxels; this server accepts at most {max_voxels}"
        )
    if vox_offset < need:
        raise RequestError(400, f"invalid NIfTI header: vox_offset {vox_offset} lies inside the header")
    if vox_offset > MAX_VOX_OFFSET:
        raise RequestError(
            413, f"NIfTI header extensions of {vox_offset} bytes exceed the limit of {MAX_VOX_OFFSET}"
        )
    if datatype in _UNSUPPORTED_DATATYPES:
        raise RequestError(
            422, f"unsupported NIfTI datatype {_UNSUPPORTED_DATATYPES[datatype]}: send a scalar image"
        )
    if datatype not in _DATATYPES:
        raise RequestError(400, f"invalid NIfTI header: unknown datatype code {datatype}")
    bpv, name = _DATATYPES[datatype]
    return NiftiHeaderInfo(version, endian, shape, datatype, name, bpv, vox_offset, compressed)


def check_volume_shape(shape: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """The spatial shape of a single-channel ``spatial_dims``-D volume, or a 422 naming the problem.

    Trailing axes of length 1 are accepted (``(X, Y, Z, 1)``); a 4th axis longer than 1 is a channel or
    time axis the model cannot use.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < spatial_dims:
        raise RequestError(
            422, f"image has {len(shape)} dimension(s) {shape}; the model segments {spatial_dims}D volumes"
        )
    extra = shape[spatial_dims:]
    if math.prod(extra) != 1:
        raise RequestError(
            422,
            f"image has shape {shape}: {math.prod(extra)} channels/time points beyond the {spatial_dims} "
            "spatial axes; the model segments single-channel volumes",
        )
    return shape[:spatial_dims]


# --------------------------------------------------------------------------------------- decode
@dataclass
class DecodedVolume:
    """A validated upload: float32 spatial array, affine, and the original header facts."""

    array: np.ndarray  # spatial shape, float32, finite
    affine: np.ndarray  # 4x4
    shape: tuple[int, ...]  # the file's full shape (trailing 1s included)
    header: NiftiHeaderInfo
    qform_code: int = 0
    sform_code: int = 0
    xyzt_units: int = 0


def decode_nifti(data: bytes | memoryview, *, max_voxels: int, spatial_dims: int) -> DecodedVolume:
    """Validate and decode an uploaded NIfTI held in memory.

    Order of checks: header (400) → voxel count (413) → shape for the model (422) → decompress at most
    the declared size (400 when corrupt or truncated) → values (422 on NaN/inf).
    """
    import nibabel as nib

    header = read_nifti_header(data, max_voxels=max_voxels)
    spatial = check_volume_shape(header.shape, spatial_dims)
    total = header.total_bytes
    if header.compressed:
        raw = gunzip_prefix(data, total)
    else:
        raw = bytes(memoryview(data)[:total])
    if len(raw) < total:
        raise RequestError(
            400, f"truncated NIfTI: the header declares {total} bytes, the file holds {len(raw)}"
        )
    klass = nib.Nifti1Image if header.version == 1 else nib.Nifti2Image
    try:
        img = klass.from_bytes(raw)
        array = np.asarray(img.dataobj, dtype=np.float32).reshape(spatial)
        affine = np.asarray(img.affine, dtype=np.float64)
        hdr = img.header
        qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
        units = int(hdr["xyzt_units"])
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on malformed input
        raise RequestError(400, f"cannot read the NIfTI data: {type(exc).__name__}: {exc}"[:300]) from None
    if not np.isfinite(affine).all():
        raise RequestError(422, "the NIfTI affine contains NaN or inf")
    if not np.isfinite(array).all():
        raise RequestError(422, "image contains NaN or inf values")
    return DecodedVolume(array, affine, header.shape, header, qcode, scode, units)


# --------------------------------------------------------------------------------------- fields
def parse_latent_field(text: str | None, dim: int) -> tuple[float, ...] | None:
    """Parse the ``latent`` form field: a JSON list (``[0.1, -0.3]``) or ``0.1,-0.3``.

    Returns None for an absent/empty field.

    Raises:
        RequestError: 422 when it is not a list of numbers, has the wrong length, or holds NaN/inf.
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    if len(text) > 64 * 1024:
        raise RequestError(422, "latent: field too long")
    values: Any
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        values = [p for p in text.strip("[]").split(",")]
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list):
        raise RequestError(
            422, f"latent: expected a JSON list of numbers like [0.1, -0.3], got {text[:80]!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or isinstance(v, list | dict) or v is None:
            raise RequestError(422, f"latent: {v!r} is not a number")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise RequestError(422, f"latent: {str(v)[:40]!r} is not a number") from None
    if len(out) != dim:
        raise RequestError(422, f"latent has {len(out)} values but the model's latent_dim is {dim}")
    if not all(math.isfinite(v) for v in out):
        raise RequestError(422, f"latent {out} contains NaN or inf")
    return tuple(out)


def bearer_token_ok(authorization: str | None, token: str | None) -> bool:
    """True when auth is off (no token) or the header is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(filename: str | None, default: str = "image") -> str:
    """A file-name stem safe for Content-Disposition and zip entries (no paths, no odd characters)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    name = _UNSAFE.sub("_", name).strip("._")[:100]
    return name or default


def check_resampled_size(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float] | None, max_voxels: int
) -> int:
    """Voxels of the volume once resampled to the model's spacing; 413 above ``max_voxels``.

    The header's voxel count is not enough: a small volume with a large voxel size (say 100³ at 20 mm)
    becomes 1000³ at 2 mm, which would exhaust the replica's memory in preprocessing.
    """
    dims = len(shape)
    if target_spacing is None:
        return math.prod(int(s) for s in shape)
    lin = np.asarray(affine, dtype=np.float64)[:3, :dims]
    zooms = np.sqrt((lin**2).sum(axis=0))
    edges = [max(1, math.ceil(float(n) * float(z) / float(t))) for n, z, t in zip(shape, zooms, target_spacing, strict=True)]
    total = math.prod(edges)
    if total > max_voxels:
        raise RequestError(
            413,
            f"volume {tuple(int(s) for s in shape)} with voxel size {tuple(round(float(z), 3) for z in zooms)} mm "
            f"becomes {tuple(edges)} = {total} voxels at the model's spacing {list(target_spacing)} mm; "
            f"this server accepts at most {max_voxels}",
        )
    return total


def voxel_volume_ml(affine: np.ndarray, spatial_dims: int = 3) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's linear part, mm³ / 1000)."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    if spatial_dims == 2:
        lin = lin.copy()
        # A 2D image's third axis is a slice thickness that may be 0 or missing: count area as 1 mm.
        if not np.any(lin[:, 2]):
            lin[2, 2] = 1.0
    return float(abs(np.linalg.det(lin))) / 1000.0
