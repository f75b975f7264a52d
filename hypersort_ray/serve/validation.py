"""Request parsing and validation for the segmentation endpoint (no Ray; torch only in plans).

Everything a client sends is checked here before any model code runs, so a bad request costs little and
never a crash, a hang or a memory spike. The app runs these functions in a worker thread, never on the
event loop.

* :func:`read_nifti_header` parses only the fixed-size NIfTI header (348 bytes for NIfTI-1, 540 for
  NIfTI-2). For a ``.nii.gz`` upload only that prefix is decompressed. The dims are checked against
  ``max_voxels`` **before** any voxel data is decompressed, and a declared size that the payload cannot
  hold is refused at once.
* :func:`gunzip_prefix` decompresses a gzip stream incrementally and stops at a byte cap. The cap for
  the voxel data is exactly what the header declares (``vox_offset + voxels * bytes_per_voxel``), itself
  bounded by ``max_voxels``. The number of gzip members and the compressed input consumed without output
  are capped too (a stream of empty members or empty blocks costs CPU and produces nothing).
* :func:`plan_inference` bounds what inference will really allocate: the volume resampled to the
  model's spacing with every axis padded up to the ROI (what MONAI's sliding window allocates), a
  minimum edge, and an estimate of peak memory against a budget. The resampled grid is the one MONAI's
  own orientation and resampling steps compute from the header (lazily: no voxel is touched).
* :func:`decode_nifti` builds the array and affine from the bounded bytes with nibabel (in memory; no
  file is ever opened on behalf of a request). Header extensions are never parsed: their flag is cleared
  first (they are not needed to segment, and a block of tiny extensions is a CPU amplifier).
* :func:`parse_latent_field` (strict JSON numbers, finite in float32) and :func:`check_latent_radius`.

Every failure is a :class:`RequestError` carrying the HTTP status and a client-safe message (never
exception text or paths); ``log_detail`` keeps what the server log should say. 400 not a NIfTI /
corrupt or truncated data, 413 too large, 422 unusable content (dims, channels, datatype, NaN, affine,
latent), 404 unknown style, 401 missing or wrong token.

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

import hashlib
import hmac
import io
import json
import math
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_VOX_OFFSET",
    "DecodedVolume",
    "InferencePlan",
    "NiftiHeaderInfo",
    "RequestError",
    "UploadLimits",
    "bearer_token_ok",
    "check_latent_radius",
    "check_upload",
    "check_volume_shape",
    "decode_nifti",
    "estimate_inference_bytes",
    "gunzip_prefix",
    "parse_latent_field",
    "plan_for",
    "plan_inference",
    "read_nifti_header",
    "safe_stem",
    "token_digest",
    "voxel_volume_ml",
]

NIFTI1_HEADER = 348
NIFTI2_HEADER = 540
MAX_HEADER_BYTES = NIFTI2_HEADER
# Header extensions live between the header and vox_offset. Real ones (a DICOM header, an AFNI or JSON
# sidecar) are kilobytes to a few hundred; 1 MiB leaves room and keeps the bytes inflated before the
# voxels small. The extensions themselves are never parsed (see decode_nifti).
MAX_VOX_OFFSET = 1024 * 1024
# Deflate cannot expand by more than ~1032:1; a header declaring more bytes than that ratio allows for
# the upload's size is a lie and is refused before anything is inflated.
MAX_DEFLATE_RATIO = 1032
# Compressed input consumed without one byte of output (empty members, empty blocks, huge gzip headers):
# real files produce output within a few hundred bytes.
MAX_IDLE_INPUT = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
# Small enough that the per-member copy zlib makes of the remaining input stays cheap.
_CHUNK = 16 * 1024
# Bytes per voxel of the float32 working copies (see estimate_inference_bytes).
_F32 = 4

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
    1: "binary (1 bit, bool)",
    32: "complex64",
    128: "RGB24",
    1536: "float128",
    1792: "complex128",
    2048: "complex256",
    2304: "RGBA32",
}
_ACCEPTED_TYPES = ", ".join(name for _, name in _DATATYPES.values())


class RequestError(Exception):
    """A client error: ``status`` is the HTTP status, ``detail`` the client-safe message.

    ``log_detail`` is what the server log adds (exception text, internal sizes); it never goes on the wire.
    """

    def __init__(self, status: int, detail: str, log_detail: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.log_detail = log_detail


# --------------------------------------------------------------------------------------- gzip
def _member_cap(limit: int) -> int:
    """Members allowed when ``limit`` bytes are wanted: generous for block-gzip (bgzip's 64 KiB members)."""
    return 64 + limit // 8192


def gunzip_prefix(
    data: bytes | bytearray | memoryview,
    limit: int,
    *,
    max_members: int | None = None,
    max_idle_input: int = MAX_IDLE_INPUT,
    checkpoint: Callable[[], None] | None = None,
) -> bytearray:
    """Decompress at most ``limit`` bytes of a gzip stream (several members allowed).

    Decompression is incremental (16 KiB of input at a time, output capped per call), so memory and time
    stay proportional to ``limit`` however large the stream would expand. Returns fewer than ``limit``
    bytes when the stream ends first; the caller decides whether that is a truncation.

    Args:
        data: the gzip stream.
        limit: the most bytes to return.
        max_members: the most gzip members to open (default: 64 + limit / 8 KiB).
        max_idle_input: the most compressed bytes consumed in a row without output.
        checkpoint: called every few chunks; raises to stop (the request's deadline).

    Raises:
        RequestError: 400 for invalid gzip/deflate data, too many members, or input that produces nothing.
    """
    if limit <= 0:
        return bytearray()
    members_cap = _member_cap(limit) if max_members is None else max_members
    view = memoryview(data).cast("B")
    out = bytearray()
    pos = members = idle = steps = 0
    decomp: Any = None
    while len(out) < limit and pos < len(view):
        steps += 1
        if checkpoint is not None and steps % 64 == 0:
            checkpoint()
        if decomp is None or decomp.eof:
            if view[pos] == 0:
                # Zero padding after a member (tar-style): skip it, but it counts as idle input.
                chunk = bytes(view[pos : pos + _CHUNK])
                skipped = len(chunk) - len(chunk.lstrip(b"\x00"))
                pos += skipped
                idle += skipped
                _check_idle(idle, max_idle_input)
                continue
            members += 1
            if members > members_cap:
                raise RequestError(
                    400, f"gzip stream has more than {members_cap} members; this server accepts at most "
                    f"{members_cap} for this size (one per file is usual)"
                )
            decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunk_view = view[pos : pos + _CHUNK]
        try:
            produced = decomp.decompress(chunk_view, limit - len(out))
        except zlib.error as exc:
            raise RequestError(400, "corrupt gzip data", log_detail=str(exc)) from None
        consumed = len(chunk_view) - len(decomp.unconsumed_tail) - len(decomp.unused_data)
        pos += consumed
        if produced:
            out += produced
            idle = 0
        else:
            idle += consumed
            _check_idle(idle, max_idle_input)
            if consumed == 0 and not decomp.eof:
                break  # zlib wants more input than there is: a truncated stream
    if members == 0:
        raise RequestError(400, "empty gzip stream")
    return out


def _check_idle(idle: int, cap: int) -> None:
    if idle > cap:
        raise RequestError(
            400, f"gzip stream: {idle} bytes of compressed input produced no data; this server accepts at "
            f"most {cap} (empty members or blocks)"
        )


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
    affine: np.ndarray | None = field(default=None, compare=False)  # the header's best affine

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def header_size(self) -> int:
        return NIFTI1_HEADER if self.version == 1 else NIFTI2_HEADER

    @property
    def total_bytes(self) -> int:
        """Bytes of a complete single-file NIfTI: header + extensions + voxel data."""
        return self.vox_offset + self.voxels * self.bytes_per_voxel


def _header_bytes(data: bytes | bytearray | memoryview) -> tuple[bytes, bool]:
    view = memoryview(data)
    if len(view) == 0:
        raise RequestError(400, "the uploaded file is empty")
    if bytes(view[:2]) == _GZIP_MAGIC:
        return bytes(gunzip_prefix(view, MAX_HEADER_BYTES)), True
    return bytes(view[:MAX_HEADER_BYTES]), False


def _version_and_endian(raw: bytes, compressed: bool) -> tuple[int, str]:
    for e in ("<", ">"):
        size = struct.unpack(e + "i", raw[:4])[0]
        if size in (NIFTI1_HEADER, NIFTI2_HEADER):
            return (1 if size == NIFTI1_HEADER else 2), e
    kind = "gzip data that is not a NIfTI" if compressed else "not a NIfTI file (.nii or .nii.gz)"
    raise RequestError(400, f"{kind}: the header size field is not 348 or 540")


def _fields(raw: bytes, version: int, endian: str) -> tuple[tuple[int, ...], int, int]:
    """(dim[0..7], datatype, vox_offset) of a NIfTI-1/2 header, with its magic checked."""
    two_file = "two-file NIfTI (.hdr/.img) is not supported: upload one .nii or .nii.gz"
    if version == 1:
        magic = raw[344:348]
        if magic == b"ni1\x00":
            raise RequestError(400, two_file)
        if magic != b"n+1\x00":
            raise RequestError(400, "not a NIfTI-1 file: bad magic")
        dim = struct.unpack(endian + "8h", raw[40:56])
        datatype = struct.unpack(endian + "h", raw[70:72])[0]
        vox_offset_f = struct.unpack(endian + "f", raw[108:112])[0]
        if not math.isfinite(vox_offset_f) or abs(vox_offset_f) > 2**62:
            raise RequestError(400, "invalid NIfTI header: vox_offset is not a usable number")
        return dim, datatype, int(vox_offset_f)
    magic = raw[4:12]
    if magic[:3] == b"ni2":
        raise RequestError(400, two_file)
    if magic != b"n+2\x00\r\n\x1a\n":
        raise RequestError(400, "not a NIfTI-2 file: bad magic")
    datatype = struct.unpack(endian + "h", raw[12:14])[0]
    dim = struct.unpack(endian + "8q", raw[16:80])
    vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
    return dim, datatype, vox_offset


def header_affine(raw: bytes, version: int) -> np.ndarray:
    """The best affine (sform, else qform, else pixdim) of a header, parsed without its extensions."""
    import nibabel as nib

    size = NIFTI1_HEADER if version == 1 else NIFTI2_HEADER
    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Four zero bytes: "no extensions", so nibabel reads the header and nothing after it.
            header = klass.from_fileobj(io.BytesIO(raw[:size] + b"\x00" * 4), check=False)
            return np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a malformed header
        raise RequestError(400, "invalid NIfTI header: no usable affine", log_detail=repr(exc)) from None


def read_nifti_header(data: bytes | bytearray | memoryview, *, max_voxels: int) -> NiftiHeaderInfo:
    """Parse and check the NIfTI-1/-2 header of a ``.nii`` or ``.nii.gz`` upload.

    Only the header is read (for gzip: only the header bytes are decompressed).

    Raises:
        RequestError: 400 not a single-file NIfTI, an invalid header, or a declared size the upload
            cannot hold; 413 more than ``max_voxels`` voxels or an oversized extension block; 422 a
            datatype the model cannot use.
    """
    raw, compressed = _header_bytes(data)
    if len(raw) < 4:
        raise RequestError(400, "not a NIfTI file: too short for a header")
    version, endian = _version_and_endian(raw, compressed)
    need = NIFTI1_HEADER if version == 1 else NIFTI2_HEADER
    if len(raw) < need:
        raise RequestError(400, f"not a NIfTI file: truncated header ({len(raw)} of {need} bytes)")
    dim, datatype, vox_offset = _fields(raw, version, endian)
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise RequestError(400, f"invalid NIfTI header: dim[0] = {ndim} (expected 1..7)")
    shape = tuple(int(d) for d in dim[1 : 1 + ndim])
    if any(d < 1 for d in shape):
        raise RequestError(400, f"invalid NIfTI header: dimensions {shape} must all be >= 1")
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise RequestError(413, f"volume {shape} has {voxels} voxels; this server accepts at most {max_voxels}")
    if vox_offset < need:
        raise RequestError(400, f"invalid NIfTI header: vox_offset {vox_offset} lies inside the header")
    if vox_offset > MAX_VOX_OFFSET:
        raise RequestError(
            413, f"NIfTI header extensions of {vox_offset} bytes exceed the limit of {MAX_VOX_OFFSET} "
            "bytes; this server accepts NIfTI files with small or no extensions"
        )
    if datatype in _UNSUPPORTED_DATATYPES:
        raise RequestError(
            422, f"unsupported NIfTI datatype {_UNSUPPORTED_DATATYPES[datatype]}: send a scalar image "
            f"({_ACCEPTED_TYPES})"
        )
    if datatype not in _DATATYPES:
        raise RequestError(400, f"invalid NIfTI header: unknown datatype code {datatype}")
    bpv, name = _DATATYPES[datatype]
    info = NiftiHeaderInfo(version, endian, shape, datatype, name, bpv, vox_offset, compressed)
    _check_declared_size(info, len(memoryview(data)))
    return NiftiHeaderInfo(
        version, endian, shape, datatype, name, bpv, vox_offset, compressed, header_affine(raw, version)
    )


def _check_declared_size(info: NiftiHeaderInfo, payload_bytes: int) -> None:
    """400 when the header declares more data than the upload can possibly hold (checked before inflating)."""
    total = info.total_bytes
    if not info.compressed and total > payload_bytes:
        raise RequestError(
            400, f"truncated NIfTI: the header declares {total} bytes, the file holds {payload_bytes}"
        )
    if info.compressed and total > payload_bytes * MAX_DEFLATE_RATIO + 4096:
        raise RequestError(
            400, f"truncated NIfTI: the header declares {total} bytes, more than a gzip stream of "
            f"{payload_bytes} bytes can hold"
        )


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


# ----------------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class InferencePlan:
    """What inference of one volume will allocate: shapes on each grid and the estimated peak bytes."""

    shape: tuple[int, ...]  # the file's spatial shape
    resampled: tuple[int, ...]  # at the model's spacing
    padded: tuple[int, ...]  # every axis raised to the ROI (what the sliding window allocates)
    peak_bytes: int

    @property
    def padded_voxels(self) -> int:
        return math.prod(self.padded)


def estimate_inference_bytes(
    original_voxels: int,
    resampled_voxels: int,
    padded_voxels: int,
    *,
    num_classes: int,
    in_channels: int = 1,
    source_bytes_per_voxel: int = 4,
) -> int:
    """Estimated peak memory of segmenting one volume, in bytes (conservative: the stages' sum).

    Per voxel of the file's grid: the raw bytes, the decoded float32 array, its preprocessing copy, the
    class probabilities resampled back and the int64 argmax. Per voxel of the model's grid: the resampled
    image, the sampling grid (3 floats) and the probabilities before inversion. Per voxel of the padded
    grid: the input, MONAI's output and count buffers, the softmax and a working copy. Measured on CPU
    (tiny and demo-size UNets, 96³-160³), the real peak was 0.35-0.95 of this estimate.
    """
    k, c = int(num_classes), int(in_channels)
    original = source_bytes_per_voxel + _F32 * (1 + c + k) + 8
    resampled = _F32 * (3 + c + k)
    padded = _F32 * (c + 3 * k + 1)
    return original_voxels * original + resampled_voxels * resampled + padded_voxels * padded


def _linear_part(affine: np.ndarray, dims: int) -> np.ndarray:
    return np.asarray(affine, dtype=np.float64)[:3, :dims]


def _affine_nd(affine: np.ndarray, dims: int) -> np.ndarray:
    """The NIfTI 4×4 affine restricted to ``dims`` spatial axes (a 2-D model sees its first two)."""
    a = np.asarray(affine, dtype=np.float64)
    if dims == 3:
        return a
    return np.block([[a[:dims, :dims], a[:dims, 3:4]], [np.zeros((1, dims)), np.ones((1, 1))]])


def _model_grid(
    shape: Sequence[int], affine: np.ndarray, *, orientation: str | None, spacing: Sequence[float] | None
) -> tuple[int, ...]:
    """The grid MONAI's orientation and resampling steps will build (model axis order), computed by those
    very steps on metadata: a sheared or oblique affine gets its real extent, not its column norms."""
    # Imported here: torch and MONAI load where plans are made (the replica), never in the HTTP proxy,
    # which imports this module for the token check.
    from hypersort_ray.data.transforms import model_grid_shape

    try:
        return model_grid_shape(shape, _affine_nd(affine, len(shape)), orientation=orientation, spacing=spacing)
    except (np.linalg.LinAlgError, ValueError, RuntimeError) as exc:  # MONAI's Cholesky of near-collinear axes
        raise RequestError(422, "the NIfTI affine is nearly singular (its voxel axes are almost collinear)",
                           log_detail=f"{type(exc).__name__}: {exc}") from None


def plan_inference(
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    spacing: Sequence[float] | None,
    roi_size: Sequence[int],
    max_voxels: int,
    min_edge: int = 2,
    memory_budget_bytes: int | None = None,
    num_classes: int = 2,
    in_channels: int = 1,
    orientation: str | None = None,
    source_bytes_per_voxel: int = 4,
) -> InferencePlan:
    """Check what inference will allocate for a volume of ``shape`` with ``affine``; 413/422 when too much.

    Order: affine usable (422) → every file axis at least ``min_edge`` (422) → every axis at the model's
    spacing at least ``min_edge`` (422: tiny voxel sizes) → resampled and ROI-padded voxels within
    ``max_voxels`` (413) → estimated peak memory within ``memory_budget_bytes`` (413).
    """
    dims = len(roi_size)
    shape = tuple(int(s) for s in shape)[:dims]
    lin = _linear_part(affine, dims)
    if not np.isfinite(lin).all() or not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
        raise RequestError(422, "the NIfTI affine contains NaN or inf")
    zooms = np.sqrt((lin**2).sum(axis=0))
    square = lin[:dims, :dims] if dims == 3 else lin[:2, :2]
    if not np.all(zooms > 0) or abs(float(np.linalg.det(square))) < 1e-12 * max(float(np.prod(zooms)), 1e-300):
        raise RequestError(422, "the NIfTI affine is singular (a zero voxel size or collapsed axes)")
    if min(shape) < min_edge:
        raise RequestError(
            422, f"image {shape} has an axis shorter than {min_edge} voxels; this server segments volumes "
            f"of at least {min_edge} voxels per axis"
        )
    resampled = _model_grid(shape, affine, orientation=orientation, spacing=spacing)
    if min(resampled) < min_edge:
        raise RequestError(
            422, f"image {shape} with voxel size {_mm(zooms)} mm becomes {resampled} at the model's spacing "
            f"{list(spacing or [])} mm; this server needs at least {min_edge} voxels per axis there"
        )
    padded = tuple(max(n, int(r)) for n, r in zip(resampled, roi_size, strict=True))
    voxels = math.prod(padded)
    if voxels > max_voxels:
        raise RequestError(
            413, f"volume {shape} with voxel size {_mm(zooms)} mm becomes {resampled} at the model's spacing "
            f"{list(spacing or [])} mm and {padded} = {voxels} voxels once padded to the model's ROI "
            f"{list(roi_size)}; this server accepts at most {max_voxels} (max_voxels)"
        )
    peak = estimate_inference_bytes(
        math.prod(shape), math.prod(resampled), voxels, num_classes=num_classes, in_channels=in_channels,
        source_bytes_per_voxel=source_bytes_per_voxel,
    )
    if memory_budget_bytes is not None and peak > memory_budget_bytes:
        raise RequestError(
            413, f"volume {shape} ({padded} padded at the model's spacing) needs an estimated "
            f"{peak / 2**20:.0f} MiB to segment; this server's budget is {memory_budget_bytes / 2**20:.0f} MiB "
            "per request (max_inference_memory_mb)"
        )
    return InferencePlan(shape, resampled, padded, peak)


def _mm(zooms: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(f"{float(z):.4g}") for z in zooms)


@dataclass(frozen=True)
class UploadLimits:
    """The model's facts and the server's limits that an upload is checked against."""

    spatial_dims: int
    roi_size: tuple[int, ...]
    spacing: tuple[float, ...] | None
    orientation: str | None
    num_classes: int
    in_channels: int
    max_voxels: int
    min_edge: int = 2
    memory_budget_bytes: int | None = None


def plan_for(shape: Sequence[int], affine: np.ndarray, limits: UploadLimits, source_bytes_per_voxel: int = 4) -> InferencePlan:
    """:func:`plan_inference` with the model's facts and the server's limits."""
    return plan_inference(
        shape, affine, spacing=limits.spacing, roi_size=limits.roi_size, max_voxels=limits.max_voxels,
        min_edge=limits.min_edge, memory_budget_bytes=limits.memory_budget_bytes, num_classes=limits.num_classes,
        in_channels=limits.in_channels, orientation=limits.orientation, source_bytes_per_voxel=source_bytes_per_voxel,
    )


def check_upload(data: bytes | bytearray | memoryview, limits: UploadLimits) -> tuple[NiftiHeaderInfo, InferencePlan]:
    """Everything that can be refused from the header alone: format, dims, datatype, declared size,
    shape for the model, and what inference would allocate. Cheap and bounded (no voxel is inflated)."""
    header = read_nifti_header(data, max_voxels=limits.max_voxels)
    spatial = check_volume_shape(header.shape, limits.spatial_dims)
    affine = header.affine if header.affine is not None else np.eye(4)
    return header, plan_for(spatial, affine, limits, header.bytes_per_voxel)


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
    geometry: Any = None  # hypersort_ray.data.nifti.NiftiGeometry: what the mask is written with


def decode_nifti(
    data: bytes | bytearray | memoryview,
    *,
    max_voxels: int,
    spatial_dims: int,
    checkpoint: Callable[[], None] | None = None,
) -> DecodedVolume:
    """Validate and decode an uploaded NIfTI held in memory.

    Order of checks: header (400) → voxel count (413) → shape for the model (422) → decompress at most
    the declared size (400 when corrupt or truncated) → affine and values (422 on NaN/inf).
    Header extensions are skipped, never parsed.
    """
    import nibabel as nib

    from hypersort_ray.data.nifti import NiftiGeometry
    from hypersort_ray.errors import DataError

    header = read_nifti_header(data, max_voxels=max_voxels)
    spatial = check_volume_shape(header.shape, spatial_dims)
    total = header.total_bytes
    if header.compressed:
        raw = gunzip_prefix(data, total, checkpoint=checkpoint)
    else:
        raw = bytearray(memoryview(data)[:total])
    if len(raw) < total:
        raise RequestError(400, f"truncated NIfTI: the header declares {total} bytes, the file holds {len(raw)}")
    # Clear the extension flag: nibabel then reads the voxels at vox_offset and never parses extensions.
    size = header.header_size
    raw[size : size + 4] = b"\x00\x00\x00\x00"
    klass = nib.Nifti1Image if header.version == 1 else nib.Nifti2Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = klass.from_bytes(bytes(raw))
            del raw
            array = np.asarray(img.dataobj, dtype=np.float32).reshape(spatial)
            affine = np.asarray(img.affine, dtype=np.float64)
            hdr = img.header
            geometry = NiftiGeometry.from_header(hdr, shape=header.shape)
            qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
            units = int(hdr["xyzt_units"])
    except RequestError:
        raise
    except DataError as exc:  # a qform/sform that the mask could not carry: refused before any inference
        raise RequestError(
            422, "the NIfTI qform or sform is unusable (NaN/inf, or not a rotation with voxel sizes); "
            "this server writes the mask with the image's own forms", log_detail=str(exc),
        ) from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on malformed input
        raise RequestError(400, "cannot read the NIfTI data", log_detail=f"{type(exc).__name__}: {exc}") from None
    if not np.isfinite(affine).all():
        raise RequestError(422, "the NIfTI affine contains NaN or inf")
    if not np.isfinite(array).all():
        raise RequestError(422, "image contains NaN or inf values")
    return DecodedVolume(array, affine, header.shape, header, qcode, scode, units, geometry)


# --------------------------------------------------------------------------------------- fields
MAX_NUMBER_CHARS = 32
_NUMBER = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$")
_NON_FINITE = {"nan", "-nan", "+nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}
_F32_MAX = float(np.finfo(np.float32).max)


class _NotFinite(ValueError):
    pass


def _json_number(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise RequestError(
            422, f"latent: a number of {len(text)} characters; this server accepts at most {MAX_NUMBER_CHARS}"
        )
    return float(text)


def _json_constant(name: str) -> float:
    raise _NotFinite(name)


def _strict_json_list(text: str) -> Any:
    """``json.loads`` with numbers bounded in length and NaN/Infinity refused (json's extensions)."""
    return json.loads(text, parse_int=_json_number, parse_float=_json_number, parse_constant=_json_constant)


def _comma_values(text: str) -> list[float]:
    """``0.1,-0.3``: each part a plain JSON number."""
    out = []
    for part in text.strip("[]").split(","):
        part = part.strip()
        if part.lower() in _NON_FINITE:
            raise _NotFinite(part)
        if not _NUMBER.match(part):
            raise RequestError(422, f"latent: {part[:40]!r} is not a number")
        out.append(_json_number(part))
    return out


def parse_latent_field(text: str | None, dim: int) -> tuple[float, ...] | None:
    """Parse the ``latent`` form field: a JSON list (``[0.1, -0.3]``) or ``0.1,-0.3``.

    Numbers are strict JSON numbers of at most 32 characters, finite as float32 (the network's type).
    Returns None for an absent/empty field.

    Raises:
        RequestError: 422 when it is not a list of numbers, has the wrong length, or holds NaN/inf or a
            value beyond float32.
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    limit = max(64, dim * (MAX_NUMBER_CHARS + 4) + 8)
    if len(text) > limit:
        raise RequestError(422, f"latent: field of {len(text)} characters; at most {limit} for {dim} values")
    values: Any
    try:
        try:
            values = _strict_json_list(text)
        except (json.JSONDecodeError, RecursionError):
            values = _comma_values(text)
    except _NotFinite:
        raise RequestError(422, "latent contains NaN or inf") from None
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list):
        raise RequestError(422, f"latent: expected a JSON list of numbers like [0.1, -0.3], got {text[:80]!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise RequestError(422, f"latent: {str(v)[:40]!r} is not a number")
        out.append(float(v))
    if len(out) != dim:
        raise RequestError(422, f"latent has {len(out)} values but the model's latent_dim is {dim}")
    if not all(math.isfinite(v) for v in out):
        raise RequestError(422, "latent contains NaN or inf")
    if any(abs(v) > _F32_MAX for v in out):
        raise RequestError(422, f"latent values must be finite in float32 (|value| <= {_F32_MAX:.6g})")
    return tuple(out)


def check_latent_radius(
    latent: Sequence[float], known: Sequence[tuple[str, Sequence[float]]], radius: float
) -> float:
    """Distance from ``latent`` to the nearest known latent (style id, centroid); 422 beyond ``radius``.

    The network was trained around its learned latents; far from every one of them its output is an
    extrapolation, not a style.
    """
    point = np.asarray(latent, dtype=np.float64)
    best_id, best = "", math.inf
    for style_id, centroid in known:
        d = float(np.linalg.norm(point - np.asarray(centroid, dtype=np.float64)))
        if d < best:
            best_id, best = style_id, d
    if best > radius:
        raise RequestError(
            422, f"latent is {best:.4g} from the nearest learned latent (style {best_id}); this server "
            f"accepts latents within {radius:g} of a style (latent_radius), or set allow_extrapolation"
        )
    return best


def token_digest(token: str) -> bytes:
    """SHA-256 of a bearer token: what replicas keep and compare (the token itself need not reach them)."""
    return hashlib.sha256(token.encode()).digest()


def bearer_token_ok(authorization: str | None, token: str | None, digest: bytes | None = None) -> bool:
    """True when auth is off (no token, no digest) or the header is ``Bearer <token>`` (constant-time).

    ``digest`` (SHA-256 of the token) may replace ``token``.
    """
    if not token and not digest:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    expected = digest if digest else token_digest(token or "")
    return hmac.compare_digest(token_digest(given.strip()), expected)


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


def voxel_volume_ml(affine: np.ndarray, spatial_dims: int = 3) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's linear part, mm³ / 1000)."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    if spatial_dims == 2:
        lin = lin.copy()
        # A 2D image's third axis is a slice thickness that may be 0 or missing: count area as 1 mm.
        if not np.any(lin[:, 2]):
            lin[2, 2] = 1.0
    return float(abs(np.linalg.det(lin))) / 1000.0
