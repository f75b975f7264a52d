"""Property-based fuzzing of the upload parsers (hypothesis, no Ray).

Whatever bytes arrive, :func:`read_nifti_header`, :func:`decode_nifti`, :func:`gunzip_prefix`,
:func:`plan_inference` and :func:`parse_latent_field` either return something that honours the limits or
raise :class:`RequestError` with a 4xx status and a client-safe message -- never another exception, never
work beyond the limits.
"""

from __future__ import annotations

import gzip
import math
import struct
import time

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hypersort_ray.serve.validation import (  # noqa: E402
    MAX_VOX_OFFSET,
    RequestError,
    decode_nifti,
    gunzip_prefix,
    parse_latent_field,
    plan_inference,
    read_nifti_header,
)
from hypersort_ray.serve.wire import scrub  # noqa: E402

MAX_VOXELS = 4096
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _base(version: int, shape=(4, 5, 6), dtype=np.int16) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    return klass(np.arange(math.prod(shape)).astype(dtype).reshape(shape), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()


BASES = [_base(1), _base(2), _base(1, (3, 3, 3, 1), np.float32), _base(2, (2, 3, 4), np.uint8)]

# Offsets of the fields a parser trusts: sizeof_hdr, magic, dims, datatype, bitpix, pixdim, vox_offset,
# scaling, q/sform codes, quaternions, srows, the extension flag (NIfTI-1 and NIfTI-2 layouts).
HOT = [0, 4, 12, 14, 16, 40, 56, 70, 72, 76, 80, 104, 108, 112, 116, 168, 176, 184, 252, 254, 256, 280,
       344, 348, 400, 440, 500, 540]


@st.composite
def mutated_nifti(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.one_of(st.sampled_from(HOT), st.integers(0, len(raw) - 1)))
        kind = draw(st.sampled_from(["byte", "i16", "i32", "i64", "f32", "f64"]))
        fmt, value = {
            "byte": ("<B", draw(st.integers(0, 255))),
            "i16": ("<h", draw(st.integers(-(2**15), 2**15 - 1))),
            "i32": ("<i", draw(st.integers(-(2**31), 2**31 - 1))),
            "i64": ("<q", draw(st.integers(-(2**63), 2**63 - 1))),
            "f32": ("<f", draw(st.floats(width=32, allow_nan=True, allow_infinity=True))),
            "f64": ("<d", draw(st.floats(allow_nan=True, allow_infinity=True))),
        }[kind]
        if where + struct.calcsize(fmt) <= len(raw):
            struct.pack_into(fmt, raw, where, value)
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    data = bytes(raw if cut is None else raw[:cut])
    return gzip.compress(data, 1) if draw(st.booleans()) else data


def _client_safe(err: RequestError) -> None:
    assert err.status in (400, 413, 422), (err.status, err.detail)
    assert err.detail and scrub(err.detail) == err.detail[: len(scrub(err.detail))]
    assert "Traceback" not in err.detail and "Error:" not in err.detail


@FUZZ
@given(mutated_nifti())
def test_header_parser_never_crashes(payload):
    try:
        h = read_nifti_header(payload, max_voxels=MAX_VOXELS)
    except RequestError as err:
        _client_safe(err)
        return
    assert h.version in (1, 2) and 1 <= len(h.shape) <= 7 and all(d >= 1 for d in h.shape)
    assert h.voxels <= MAX_VOXELS
    assert (348 if h.version == 1 else 540) <= h.vox_offset <= MAX_VOX_OFFSET
    assert h.bytes_per_voxel in (1, 2, 4, 8)
    if not h.compressed:
        assert h.total_bytes <= len(payload)


@FUZZ
@given(mutated_nifti())
def test_decoder_never_crashes_or_overreaches(payload):
    t0 = time.perf_counter()
    try:
        vol = decode_nifti(payload, max_voxels=MAX_VOXELS, spatial_dims=3)
    except RequestError as err:
        _client_safe(err)
        return
    finally:
        assert time.perf_counter() - t0 < 2.0
    assert vol.array.dtype == np.float32 and vol.array.ndim == 3 and vol.array.size <= MAX_VOXELS
    assert np.isfinite(vol.array).all() and np.isfinite(vol.affine).all()
    assert vol.geometry is not None and tuple(vol.geometry.shape) == tuple(vol.shape)


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 10_000))
def test_gunzip_never_exceeds_its_limit(data, limit):
    try:
        out = gunzip_prefix(b"\x1f\x8b" + data, limit)
    except RequestError as err:
        assert err.status == 400
        return
    assert len(out) <= limit


@FUZZ
@given(
    st.lists(st.integers(1, 10**7), min_size=3, max_size=3),
    st.lists(
        st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-300, 1e-7])),
        min_size=9,
        max_size=9,
    ),
)
def test_plan_honours_every_limit(shape, linear):
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(linear).reshape(3, 3)
    try:
        p = plan_inference(shape, affine, spacing=(2.0, 2.0, 2.0), roi_size=(16, 16, 16), max_voxels=128**3,
                           memory_budget_bytes=2**30, num_classes=2, orientation="RAS")
    except RequestError as err:
        assert err.status in (413, 422)
        return
    assert p.padded_voxels <= 128**3 and p.peak_bytes <= 2**30
    assert all(e >= 16 for e in p.padded) and min(p.resampled) >= 2


@FUZZ
@given(st.text(max_size=300))
def test_latent_parser_is_strict(text):
    try:
        out = parse_latent_field(text, 2)
    except RequestError as err:
        assert err.status == 422
        return
    if out is not None:
        assert len(out) == 2 and all(math.isfinite(v) and abs(v) <= 3.4028235e38 for v in out)
