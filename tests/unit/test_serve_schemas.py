"""Request parsing and validation of the serving endpoint, without Ray: NIfTI header guard, gzip bomb
guard, latent parsing, token check, body-size middleware, builder args."""

from __future__ import annotations

import asyncio
import gzip
import math
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from hypersort_ray.serve.middleware import BodySizeLimitMiddleware
from hypersort_ray.serve.schemas import BuildArgs
from hypersort_ray.serve.validation import (
    MAX_VOX_OFFSET,
    RequestError,
    bearer_token_ok,
    check_volume_shape,
    decode_nifti,
    gunzip_prefix,
    parse_latent_field,
    read_nifti_header,
    safe_stem,
    voxel_volume_ml,
)


def nifti_bytes(data: np.ndarray, affine=None, version: int = 1, big_endian: bool = False) -> bytes:
    affine = np.diag([1.5, 2.0, 2.5, 1.0]) if affine is None else affine
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = klass(data, affine)
    if big_endian:
        hdr = img.header.as_byteswapped(">")
        img = klass(data, affine, header=hdr)
    return img.to_bytes()


def expect(status: int, fn, *args, match: str = "", **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, info.value.detail
    assert match.lower() in info.value.detail.lower(), info.value.detail
    return info.value


# ----------------------------------------------------------------------------------- header guard
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("compress", [False, True])
def test_header_of_valid_files(version, compress):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    raw = nifti_bytes(data, version=version)
    payload = gzip.compress(raw) if compress else raw
    h = read_nifti_header(payload, max_voxels=10_000)
    assert (h.version, h.shape, h.dtype_name, h.compressed) == (version, (4, 5, 6), "int16", compress)
    assert h.total_bytes == len(raw)
    vol = decode_nifti(payload, max_voxels=10_000, spatial_dims=3)
    np.testing.assert_array_equal(vol.array, data.astype(np.float32))
    np.testing.assert_allclose(vol.affine, np.diag([1.5, 2.0, 2.5, 1.0]))


def test_big_endian_header():
    data = np.ones((3, 3, 3), np.float32)
    h = read_nifti_header(nifti_bytes(data, big_endian=True), max_voxels=100)
    assert h.endian == ">" and h.shape == (3, 3, 3)


def test_not_a_nifti_is_400():
    expect(400, read_nifti_header, b"hello world, definitely not an image" * 20, max_voxels=10, match="not a NIfTI")
    expect(400, read_nifti_header, b"", max_voxels=10, match="empty")
    expect(400, read_nifti_header, gzip.compress(b"plain text inside gzip" * 30), max_voxels=10, match="not a NIfTI")


def test_corrupt_gzip_is_400():
    raw = gzip.compress(nifti_bytes(np.zeros((8, 8, 8), np.int16)))
    broken = raw[:10] + bytes(b ^ 0x5A for b in raw[10:60]) + raw[60:]
    expect(400, read_nifti_header, broken, max_voxels=10_000, match="gzip")


def test_truncated_data_is_400():
    raw = nifti_bytes(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    expect(400, decode_nifti, raw[:-100], max_voxels=10_000, spatial_dims=3, match="truncated")
    expect(400, decode_nifti, gzip.compress(raw)[:-200], max_voxels=10_000, spatial_dims=3, match="truncated")
    expect(400, read_nifti_header, raw[:200], max_voxels=10_000, match="truncated header")


def test_two_file_nifti_is_400():
    raw = bytearray(nifti_bytes(np.zeros((4, 4, 4), np.uint8)))
    raw[344:348] = b"ni1\x00"
    expect(400, read_nifti_header, bytes(raw), max_voxels=1000, match=".hdr/.img")


def test_too_many_voxels_is_413_from_the_header_alone():
    # A header claiming 1000³ voxels followed by no data at all: refused from the dims, nothing decoded.
    raw = bytearray(nifti_bytes(np.zeros((2, 2, 2), np.uint8)))
    raw[40:56] = struct.pack("<8h", 3, 1000, 1000, 1000, 1, 1, 1, 1)
    payload = gzip.compress(bytes(raw[:352]))
    expect(413, read_nifti_header, payload, max_voxels=64**3, match="voxels")
    expect(413, decode_nifti, payload, max_voxels=64**3, spatial_dims=3, match="at most")


def test_huge_extension_offset_is_413():
    raw = bytearray(nifti_bytes(np.zeros((2, 2, 2), np.uint8)))
    raw[108:112] = struct.pack("<f", float(MAX_VOX_OFFSET + 1024))
    expect(413, read_nifti_header, bytes(raw), max_voxels=1000, match="extensions")


def test_invalid_dims_and_datatypes():
    raw = bytearray(nifti_bytes(np.zeros((2, 2, 2), np.uint8)))
    bad = bytearray(raw)
    bad[40:56] = struct.pack("<8h", 3, 2, 0, 2, 1, 1, 1, 1)
    expect(400, read_nifti_header, bytes(bad), max_voxels=1000, match=">= 1")
    bad = bytearray(raw)
    bad[70:72] = struct.pack("<h", 32)  # complex64
    expect(422, read_nifti_header, bytes(bad), max_voxels=1000, match="complex64")
    bad = bytearray(raw)
    bad[70:72] = struct.pack("<h", 9999)
    expect(400, read_nifti_header, bytes(bad), max_voxels=1000, match="datatype")


def test_shape_for_the_model_is_422():
    assert check_volume_shape((10, 11, 12), 3) == (10, 11, 12)
    assert check_volume_shape((10, 11, 12, 1), 3) == (10, 11, 12)
    assert check_volume_shape((10, 11, 1), 2) == (10, 11)
    expect(422, check_volume_shape, (10, 11), 3, match="3D")
    expect(422, check_volume_shape, (10, 11, 12, 2), 3, match="channels")
    payload = nifti_bytes(np.zeros((4, 4, 4, 3), np.float32))
    expect(422, decode_nifti, payload, max_voxels=1000, spatial_dims=3, match="single-channel")


def test_nan_image_is_422():
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    expect(422, decode_nifti, nifti_bytes(data), max_voxels=1000, spatial_dims=3, match="NaN")


def test_trailing_singleton_axis_is_squeezed():
    data = np.random.default_rng(0).normal(size=(5, 6, 7, 1)).astype(np.float32)
    vol = decode_nifti(nifti_bytes(data), max_voxels=1000, spatial_dims=3)
    assert vol.array.shape == (5, 6, 7) and vol.shape == (5, 6, 7, 1)


# ------------------------------------------------------------------------------------- gzip bombs
def _bomb(decompressed_mib: int) -> bytes:
    """A valid NIfTI header claiming a small volume, followed by MiB of zeros: compresses ~1000:1."""
    header = nifti_bytes(np.zeros((16, 16, 16), np.uint8))[:352]
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [comp.compress(header)]
    block = b"\x00" * 2**20
    for _ in range(decompressed_mib):
        parts.append(comp.compress(block))
    parts.append(comp.flush())
    return b"".join(parts)


def test_gunzip_prefix_stops_at_the_cap():
    bomb = _bomb(64)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 2**20
    out = gunzip_prefix(bomb, 1000)
    assert len(out) == 1000


def test_bomb_decodes_only_the_declared_bytes(monkeypatch):
    bomb = _bomb(64)
    seen = []
    real = gunzip_prefix

    def spy(data, limit, **kwargs):
        out = real(data, limit, **kwargs)
        seen.append(len(out))
        return out

    monkeypatch.setattr("hypersort_ray.serve.validation.gunzip_prefix", spy)
    vol = decode_nifti(bomb, max_voxels=16**3, spatial_dims=3)
    assert vol.array.shape == (16, 16, 16)
    assert max(seen) <= 352 + 16**3  # never more than header + declared voxels, not 64 MiB


def test_bomb_with_lying_header_is_413():
    # The header claims 512³ float64 = 1 GiB: refused before decompressing a byte of it.
    raw = bytearray(nifti_bytes(np.zeros((2, 2, 2), np.float64))[:352])
    raw[40:56] = struct.pack("<8h", 3, 512, 512, 512, 1, 1, 1, 1)
    payload = gzip.compress(bytes(raw) + b"\x00" * 2**20)
    expect(413, decode_nifti, payload, max_voxels=256**3, spatial_dims=3)


def test_multi_member_gzip():
    raw = nifti_bytes(np.arange(64, dtype=np.uint8).reshape(4, 4, 4))
    payload = gzip.compress(raw[:200]) + gzip.compress(raw[200:])
    vol = decode_nifti(payload, max_voxels=100, spatial_dims=3)
    assert vol.array.sum() == sum(range(64))


def test_garbage_after_member_is_400_only_when_needed():
    raw = nifti_bytes(np.zeros((4, 4, 4), np.uint8))
    assert decode_nifti(gzip.compress(raw) + b"\x00" * 10, max_voxels=100, spatial_dims=3).array.shape == (4, 4, 4)
    expect(400, decode_nifti, gzip.compress(raw[:300]) + b"garbage!" * 10, max_voxels=100, spatial_dims=3)


# ---------------------------------------------------------------------------------------- latent
@pytest.mark.parametrize(
    "text,expected",
    [("[0.1,-0.3]", (0.1, -0.3)), ("[0.1, -0.3]", (0.1, -0.3)), ("0.1,-0.3", (0.1, -0.3)), (" [1, 2] ", (1.0, 2.0))],
)
def test_latent_parsing(text, expected):
    assert parse_latent_field(text, 2) == expected


def test_latent_absent():
    assert parse_latent_field(None, 2) is None
    assert parse_latent_field("  ", 2) is None


@pytest.mark.parametrize(
    "text,match",
    [
        ("[0.1]", "latent_dim is 2"),
        ("[0.1, 0.2, 0.3]", "3 values"),
        ("[NaN, 0.1]", "NaN"),
        ("[0.1, Infinity]", "NaN or inf"),
        ("nan,0", "NaN"),
        ('{"a": 1}', "JSON list"),
        ("[true, 0.1]", "not a number"),
        ('["x", 0.1]', "not a number"),
        ("[[1], 2]", "not a number"),
        ("abc,def", "not a number"),
    ],
)
def test_bad_latents_are_422(text, match):
    expect(422, parse_latent_field, text, 2, match=match)


# ------------------------------------------------------------------------------------- small bits
def test_bearer_token():
    assert bearer_token_ok(None, None) and bearer_token_ok("anything", "")
    assert bearer_token_ok("Bearer s3cret", "s3cret") and bearer_token_ok("bearer s3cret", "s3cret")
    assert not bearer_token_ok(None, "s3cret")
    assert not bearer_token_ok("Bearer wrong", "s3cret")
    assert not bearer_token_ok("Basic s3cret", "s3cret")


def test_safe_stem():
    assert safe_stem("case_001.nii.gz") == "case_001"
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem('a"b\r\nc.nii') == "a_b_c"
    assert safe_stem(None) == "image" and safe_stem("....") == "image"


def test_voxel_volume():
    assert math.isclose(voxel_volume_ml(np.diag([2.0, 2.0, 2.0, 1.0])), 0.008)
    rot = np.array([[0, -1.5, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    assert math.isclose(voxel_volume_ml(rot), 0.009)


def test_build_args():
    args = BuildArgs.model_validate({"model": "models:/hypersort@champion", "num_replicas": "auto"})
    assert args.num_replicas == "auto" and args.style_cache_size == 32
    with pytest.raises(ValidationError, match="http_options"):
        BuildArgs.model_validate({"model": "runs/x", "port": 8000})
    with pytest.raises(ValidationError):
        BuildArgs.model_validate({"num_replicas": 1})  # model missing
    with pytest.raises(ValidationError):
        BuildArgs.model_validate({"model": "runs/x", "replicas": 2})  # typo: unknown key
    with pytest.raises(ValidationError, match=r"upload_timeout_s \(\$HYPERSORT_PROXY_UPLOAD_TIMEOUT_S\)"):
        BuildArgs.model_validate({"model": "runs/x", "upload_timeout_s": 5})  # the proxy reads its environment


# ------------------------------------------------------------------------------------ middleware
async def _call(app, body_chunks: list[bytes], content_length: int | None,
                content_type: bytes = b"application/octet-stream"):
    headers = [(b"content-type", content_type)]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    chunks = list(body_chunks)
    sent = []

    async def receive():
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _echo_app():
    """Reads the whole body like a form parser would; answers 400 when reading fails."""

    async def app(scope, receive, send):
        total = 0
        try:
            while True:
                msg = await receive()
                total += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        except Exception:  # noqa: BLE001 - mimic FastAPI: parser errors become a 400
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"parse error"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(total).encode()})

    return app


@pytest.mark.parametrize("declared", [True, False])
def test_body_limit_middleware(declared):
    app = BodySizeLimitMiddleware(_echo_app(), limit_bytes=lambda: 100)
    ok = asyncio.run(_call(app, [b"x" * 60, b"x" * 40], 100 if declared else None))
    assert ok[0]["status"] == 200 and ok[1]["body"] == b"100"
    big = asyncio.run(_call(app, [b"x" * 60, b"x" * 60], 120 if declared else None))
    assert big[0]["status"] == 413
    assert b"max_body_mb" in big[1]["body"]
    assert len([m for m in big if m["type"] == "http.response.start"]) == 1


def test_body_limit_off():
    app = BodySizeLimitMiddleware(_echo_app(), limit_bytes=lambda: None)
    assert asyncio.run(_call(app, [b"x" * 1000], 1000))[0]["status"] == 200


def test_delimiter_counter_counts_across_chunk_edges():
    from hypersort_ray.serve.middleware import _DelimiterCounter

    rng = np.random.default_rng(3)
    delimiter = b"\r\n--b0undary"
    body = b"".join(delimiter if rng.random() < 0.3 else bytes(rng.integers(0, 256, 7, dtype=np.uint8))
                    for _ in range(400))
    for _ in range(20):
        cuts = sorted(rng.integers(0, len(body), 12).tolist())
        counter = _DelimiterCounter(delimiter)
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            counter.feed(body[a:b])
        assert counter.count == body.count(delimiter)


def test_multipart_bodies_built_of_delimiters_are_refused():
    """A body of ``\r\n--B`` + one byte, repeated, costs Starlette's form parser tens of times a plain
    body: refused while it streams, after MAX_MULTIPART_PARTS delimiters, before the parser sees more."""
    from hypersort_ray.serve.middleware import MAX_MULTIPART_PARTS

    app = BodySizeLimitMiddleware(_echo_app(), limit_bytes=lambda: 10**8)
    ctype = b"multipart/form-data; boundary=x"
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.nii.gz"\r\n\r\n'
    hostile = [head] + [b"\r\n--xZ" * 1000] * 50
    sent = asyncio.run(_call(app, hostile, None, ctype))
    assert sent[0]["status"] == 400 and b"parts" in sent[1]["body"]
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1
    fields = b"".join(b'\r\n--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv' % i
                      for i in range(MAX_MULTIPART_PARTS - 2))
    normal = [head + b"\x00" * 5000, fields, b"\r\n--x--\r\n"]  # a file, 62 fields, the closing line
    assert asyncio.run(_call(app, normal, None, ctype))[0]["status"] == 200
    assert asyncio.run(_call(app, hostile, None))[0]["status"] == 200  # not multipart: nothing to count


def test_configs_serve_yaml_is_the_defaults():
    from pathlib import Path

    from hypersort_ray.config import ServeSettings, load_serve_settings

    path = Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"
    assert load_serve_settings(path) == ServeSettings()


# ---------------------------------------------------------------------------------------- results
class _FakeModel:
    def __init__(self, info):
        self.info = info


def test_describe_model():
    from hypersort_ray.serve.results import describe_model

    local = describe_model(_FakeModel({"source": "/data/runs/demo", "epoch": 60}))
    assert local["model_version"] == "local:demo@epoch60" and local["registry_name"] is None
    pinned = describe_model(_FakeModel({"source": "models:/hypersort/3"}))
    assert (pinned["registry_name"], pinned["registry_version"], pinned["model_version"]) == (
        "hypersort", "3", "hypersort/3"
    )
    explicit = describe_model(_FakeModel({"source": "models:/hypersort@champion", "registry_version": "7"}))
    assert explicit["model_version"] == "hypersort/7"
    run = describe_model(_FakeModel({"source": "runs:/abc123/model"}))
    assert run["model_version"] == "runs:/abc123/model" and run["registry_name"] is None


def test_encode_mask_keeps_geometry():
    from hypersort_ray.serve.results import encode_mask, header_value

    aff = np.array([[-1.5, 0, 0, 10.0], [0, 2.0, 0, -3.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros((5, 6, 7, 1), np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    vol = decode_nifti(img.to_bytes(), max_voxels=1000, spatial_dims=3)
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1:3, 2:4, 3:5] = 1
    out = nib.Nifti1Image.from_bytes(gzip.decompress(encode_mask(mask, vol)))
    assert out.shape == (5, 6, 7, 1) and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, aff, atol=1e-6)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert int(np.asarray(out.dataobj).sum()) == 8
    assert header_value("stil\u00e9") == "stil%C3%A9"


def test_resampled_size_guard():
    from hypersort_ray.serve.validation import plan_inference

    def plan(shape, affine, spacing, max_voxels):
        return plan_inference(shape, affine, spacing=spacing, roi_size=(16, 16, 16), max_voxels=max_voxels)

    two_mm = np.diag([2.0, 2.0, 2.0, 1.0])
    assert plan((64, 64, 64), two_mm, [2.0, 2.0, 2.0], 64**3).resampled == (64, 64, 64)
    assert plan((64, 64, 64), np.diag([1.0, 1.0, 1.0, 1.0]), [2.0, 2.0, 2.0], 64**3).resampled == (32, 32, 32)
    assert plan((10, 10, 10), np.diag([20.0] * 3 + [1.0]), None, 16**3).resampled == (10, 10, 10)
    # 100³ at 20 mm would become about 1000³ at 2 mm: refused before preprocessing allocates it
    err = expect(413, plan, (100, 100, 100), np.diag([20.0] * 3 + [1.0]), [2.0] * 3, 256**3,
                 match="at the model's spacing")
    assert "(991, 991, 991)" in err.detail  # MONAI's grid: the centres of the first and last voxel kept


def _guarded(token, limit=100):
    from hypersort_ray.serve.middleware import GuardSettings, RequestGuardMiddleware

    return RequestGuardMiddleware(
        _echo_app(), settings=lambda: GuardSettings(limit, token), open_paths={"/healthz"}
    )


async def _get(app, path, headers=(), root_path=""):
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": list(headers)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_guard_token():
    app = _guarded("s3cret")
    assert asyncio.run(_get(app, "/v1/styles"))[0]["status"] == 401
    assert asyncio.run(_get(app, "/v1/styles", [(b"authorization", b"Bearer nope")]))[0]["status"] == 401
    assert asyncio.run(_get(app, "/v1/styles", [(b"authorization", b"Bearer s3cret")]))[0]["status"] == 200
    assert asyncio.run(_get(app, "/healthz"))[0]["status"] == 200
    # below a route prefix (Serve's root_path) the open path is still open, the rest is not
    assert asyncio.run(_get(app, "/open/healthz", root_path="/open"))[0]["status"] == 200
    assert asyncio.run(_get(app, "/open/v1/model", root_path="/open"))[0]["status"] == 401
    assert asyncio.run(_get(app, "/healthz/../v1/model"))[0]["status"] == 401
    assert asyncio.run(_get(_guarded(None), "/v1/styles"))[0]["status"] == 200


def test_guard_checks_token_before_size():
    big = asyncio.run(_call(_guarded("s3cret"), [b"x" * 500], 500))
    assert big[0]["status"] == 401  # an anonymous client learns nothing about limits
