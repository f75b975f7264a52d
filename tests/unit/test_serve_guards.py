"""The endpoint's guards without Ray running: allocation limits, gzip/extension CPU caps, fail-closed auth,
the proxy guard, deadlines that reach the inference thread, strict latents, the one error shape.

Each test names the hole of issue 14 it closes; the adversarial suite (tests/integration/
test_serve_adversarial.py) checks the same holes against a real endpoint.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.serve.validation import (
    MAX_VOX_OFFSET,
    RequestError,
    UploadLimits,
    check_latent_radius,
    check_upload,
    decode_nifti,
    estimate_inference_bytes,
    gunzip_prefix,
    parse_latent_field,
    plan_inference,
    read_nifti_header,
)

TWO_MM = np.diag([2.0, 2.0, 2.0, 1.0])
ROI = (16, 16, 16)


def expect(status: int, fn, *args, match: str = "", **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, info.value.detail
    assert match.lower() in info.value.detail.lower(), info.value.detail
    return info.value


def plan(shape, affine=TWO_MM, **kwargs):
    options = {"spacing": (2.0, 2.0, 2.0), "roi_size": ROI, "max_voxels": 64**3, "num_classes": 2}
    return plan_inference(shape, affine, **{**options, **kwargs})


# ------------------------------------------------------------------------- padding amplification
def test_needle_is_refused_from_its_padded_size():
    # 2 x 2 x 200 000 passes an unpadded voxel count (800 000) but MONAI pads to 16 x 16 x 200 000.
    assert plan((2, 2, 200_000), max_voxels=10**8).resampled == (2, 2, 200_000)  # unpadded: 800 000 < 10**6
    err = expect(413, plan, (2, 2, 200_000), max_voxels=10**6, match="padded")
    assert "(16, 16, 200000)" in err.detail and "max_voxels" in err.detail


def test_every_axis_is_raised_to_the_roi():
    p = plan((8, 8, 8))
    assert p.resampled == (8, 8, 8) and p.padded == (16, 16, 16) and p.padded_voxels == 16**3
    assert plan((40, 8, 30)).padded == (40, 16, 30)
    expect(413, plan, (8, 8, 8), max_voxels=16**3 - 1, match="padded")


def test_padding_follows_the_reorientation():
    # The file's first axis becomes the model's third (RAS): it is padded to the third ROI edge.
    swap = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    p = plan((40, 4, 4), swap, roi_size=(8, 8, 64), orientation="RAS")
    assert p.padded == (8, 8, 64)
    assert plan((40, 4, 4), swap, roi_size=(8, 8, 64), orientation=None).padded == (40, 8, 64)


def test_resampling_counts():
    # 20³ at 8 mm is 80³ at 2 mm: refused from the header, before preprocessing allocates it.
    expect(413, plan, (20, 20, 20), np.diag([8.0, 8.0, 8.0, 1.0]), match="at the model's spacing")
    assert plan((64, 64, 64), np.diag([1.0, 1.0, 1.0, 1.0])).resampled == (32, 32, 32)


def test_minimum_edge_in_the_file_and_at_the_models_spacing():
    expect(422, plan, (40, 40, 1), match="at least 2 voxels")
    expect(422, plan, (40, 40, 40), np.diag([1e-6, 1e-6, 1e-6, 1.0]), match="at the model's spacing")
    expect(422, plan, (40, 40, 40), min_edge=41, match="at least 41")
    assert plan((40, 40, 40), np.diag([1e-6, 1e-6, 1e-6, 1.0]), spacing=None).resampled == (40, 40, 40)


def test_the_plan_is_the_grid_preprocessing_builds():
    """Oblique, sheared and axis-swapping affines: the planned grid is the prepared image's shape."""
    from hypersort_ray.config import PreprocessConfig
    from hypersort_ray.data.transforms import load_image_for_inference

    pre = PreprocessConfig(spacing=(2.0, 2.0, 2.0), orientation="RAS", roi_size=ROI)
    rng = np.random.default_rng(7)
    for _ in range(6):
        affine = np.eye(4)
        affine[:3, :3] = rng.normal(scale=1.5, size=(3, 3))
        affine[:3, 3] = rng.normal(scale=20, size=3)
        shape = tuple(int(s) for s in rng.integers(6, 24, size=3))
        planned = plan(shape, affine, orientation="RAS", max_voxels=10**7).resampled
        prepared = load_image_for_inference(rng.random(shape).astype(np.float32), pre, affine=affine)
        assert planned == tuple(prepared.image.shape[1:]), (shape, affine)


def test_a_sheared_slab_is_refused_like_a_thin_one():
    # Every voxel column is >= 2 mm long, but the volume is 0.8 mm thick: MONAI resamples it to one slice.
    sheared = np.array([[2.0, 2.0, 0, 0], [0, 0.02, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    err = expect(422, plan, (40, 40, 40), sheared, orientation="RAS", match="at least 2 voxels per axis")
    assert "(79, 1, 40)" in err.detail
    expect(422, plan, (40, 40, 40), np.diag([2.0, 0.02, 2.0, 1.0]), match="at least 2 voxels per axis")


def test_unusable_affines_are_422():
    nan = TWO_MM.copy()
    nan[0, 3] = np.nan
    expect(422, plan, (20, 20, 20), nan, match="NaN or inf")
    singular = TWO_MM.copy()
    singular[:, 1] = 0.0
    expect(422, plan, (20, 20, 20), singular, match="singular")
    collapsed = np.array([[2.0, 2.0, 0, 0], [0, 0, 2.0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 1]])  # two equal columns
    expect(422, plan, (20, 20, 20), collapsed, match="singular")


def test_memory_budget():
    est = estimate_inference_bytes(100**3, 100**3, 100**3, num_classes=2, source_bytes_per_voxel=2)
    assert est == 100**3 * 82
    assert estimate_inference_bytes(10, 80, 80, num_classes=3) > estimate_inference_bytes(10, 80, 80, num_classes=2)
    p = plan((100, 100, 100), max_voxels=200**3, memory_budget_bytes=est, source_bytes_per_voxel=2)
    assert p.peak_bytes == est
    err = expect(413, plan, (100, 100, 100), max_voxels=200**3, memory_budget_bytes=est - 1,
                 source_bytes_per_voxel=2, match="max_inference_memory_mb")
    assert "MiB" in err.detail


def test_check_upload_refuses_a_needle_without_inflating_its_voxels(monkeypatch):
    payload = gzip.compress(nib.Nifti2Image(np.zeros((2, 2, 500_000), np.uint8), TWO_MM).to_bytes(), 9)
    assert len(payload) < 8192
    inflated = []
    real = gunzip_prefix

    def spy(data, limit, **kwargs):
        out = real(data, limit, **kwargs)
        inflated.append(len(out))
        return out

    monkeypatch.setattr("hypersort_ray.serve.validation.gunzip_prefix", spy)
    limits = UploadLimits(spatial_dims=3, roi_size=ROI, spacing=(2.0, 2.0, 2.0), orientation="RAS", num_classes=2,
                          in_channels=1, max_voxels=130**3)
    expect(413, check_upload, payload, limits, match="padded")
    assert max(inflated) <= 540


# --------------------------------------------------------------------------- gzip CPU amplifiers
def _valid(shape=(6, 7, 8), version=1) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    return klass(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), TWO_MM).to_bytes()


def test_member_flood_is_cut_short():
    flood = gzip.compress(b"", mtime=0) * (20 * 2**20 // 20)  # 20 MiB of empty members
    t0 = time.perf_counter()
    expect(400, read_nifti_header, flood, max_voxels=10**6, match="members")
    assert time.perf_counter() - t0 < 0.5  # the unbounded loop took ~2.4 s for this (0.12 s per MiB)


def test_input_consumed_without_output_is_capped():
    head = b"\x1f\x8b\x08\x10" + b"\x00" * 6  # FCOMMENT set: a comment field follows, zlib outputs nothing
    expect(400, gunzip_prefix, head + b"c" * (2 * 2**20), 100, match="produced no data")
    zeros = gzip.compress(b"abc") + b"\x00" * (2 * 2**20)  # zero padding after a member counts as idle too
    expect(400, gunzip_prefix, zeros, 100, match="produced no data")
    assert gunzip_prefix(gzip.compress(b"abc") + b"\x00" * 100, 100) == b"abc"


def test_block_gzip_members_are_fine():
    raw = _valid((40, 40, 40))
    blocks = b"".join(gzip.compress(raw[i : i + 4096]) for i in range(0, len(raw), 4096))  # bgzip-like
    vol = decode_nifti(blocks + gzip.compress(b""), max_voxels=10**6, spatial_dims=3)
    assert vol.array.shape == (40, 40, 40)


def test_gunzip_checkpoint_can_stop_decompression():
    calls = []

    def stop():
        calls.append(1)
        raise TimeoutError("deadline")

    big = gzip.compress(np.random.default_rng(0).integers(0, 255, 4 * 2**20, dtype=np.uint8).tobytes(), 1)
    with pytest.raises(TimeoutError):
        gunzip_prefix(big, 4 * 2**20, checkpoint=stop)
    assert calls


# ------------------------------------------------------------------------------ header extensions
def _with_extensions(raw: bytes, block_bytes: int) -> bytes:
    count = block_bytes // 16
    header = bytearray(raw[:348])
    struct.pack_into("<f", header, 108, float(352 + 16 * count))
    ext = struct.pack("<ii", 16, 6) + b"comment!"
    return bytes(header) + b"\x01\x00\x00\x00" + ext * count + raw[352:]


def test_extensions_are_never_parsed(monkeypatch):
    raw = _valid((10, 11, 12))
    flood = _with_extensions(raw, 900 * 1024)  # 57 600 extensions: seconds of nibabel parsing

    def boom(*args, **kwargs):
        raise AssertionError("extensions parsed")

    monkeypatch.setattr(nib.nifti1.Nifti1Extensions, "from_fileobj", classmethod(boom))
    t0 = time.perf_counter()
    vol = decode_nifti(gzip.compress(flood), max_voxels=10**4, spatial_dims=3)
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(vol.array, np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj, np.float32))


def test_extension_block_over_the_cap_is_413():
    assert MAX_VOX_OFFSET <= 2**20
    flood = _with_extensions(_valid(), 2 * 2**20)
    expect(413, read_nifti_header, gzip.compress(flood), max_voxels=10**4, match="extensions")


def test_declared_size_beyond_the_payload_is_refused_from_the_header():
    raw = bytearray(_valid((2, 2, 2))[:352])
    struct.pack_into("<8h", raw, 40, 3, 100, 100, 100, 1, 1, 1, 1)
    expect(400, read_nifti_header, bytes(raw) + b"\x00" * 100, max_voxels=10**6, match="truncated")
    expect(400, read_nifti_header, gzip.compress(bytes(raw)), max_voxels=10**6, match="can hold")


def test_binary_and_complex_datatypes_are_422():
    for code, word in ((1, "binary"), (32, "complex64"), (1792, "complex128"), (128, "RGB")):
        raw = bytearray(_valid((4, 4, 4)))
        struct.pack_into("<h", raw, 70, code)
        expect(422, read_nifti_header, bytes(raw), max_voxels=1000, match=word)


# ------------------------------------------------------------------------------------------ latents
@pytest.mark.parametrize(
    "text,match",
    [
        ("[" + "9" * 4000 + ", 0]", "characters"),
        ("9" * 40 + ",0", "characters"),
        ("[0." + "3" * 40 + ", 0]", "characters"),
        ("[1e39, 0]", "float32"),
        ("[-3.5e38, 0]", "float32"),
        ("[1e400, 0]", "NaN or inf"),
        ("[NaN, 0]", "NaN or inf"),
        ("[-Infinity, 0]", "NaN or inf"),
        ("inf,0", "NaN or inf"),
        ("0x10,0", "not a number"),
        ("1_000,0", "not a number"),
        ("[" * 40 + "]" * 40, "not a number"),
    ],
)
def test_strict_latents(text, match):
    expect(422, parse_latent_field, text, 2, match=match)


def test_latents_within_float32_pass():
    assert parse_latent_field("[3.4e38, -1]", 2) == (3.4e38, -1.0)
    assert parse_latent_field("1e-45,0", 2) == (1e-45, 0.0)


def test_latent_radius():
    known = [("main", (0.0, 0.0)), ("1", (1.5, -1.0))]
    assert check_latent_radius((1.4, -1.0), known, 1.0) == pytest.approx(0.1)
    err = expect(422, check_latent_radius, (50.0, 50.0), known, 3.0, match="latent_radius")
    assert "style 1" in err.detail


# ------------------------------------------------------------------------------------ fail closed
def test_auth_plan_and_replica_credentials():
    from hypersort_ray.errors import ConfigError
    from hypersort_ray.serve.auth import TOKEN_DIGEST_ENV, replica_credentials, resolve_auth
    from hypersort_ray.serve.validation import bearer_token_ok, token_digest

    plan = resolve_auth("TOK", insecure_no_auth=False, environ={"TOK": "s3cret"})
    assert plan.required and "s3cret" not in json.dumps(plan.env_vars)
    # A replica without the variable but with the deployment's digest checks the token.
    token, digest = replica_credentials("TOK", True, environ=plan.env_vars)
    assert token is None and digest == token_digest("s3cret")
    assert bearer_token_ok("Bearer s3cret", None, digest) and not bearer_token_ok("Bearer nope", None, digest)
    # The deployment's digest wins over a stale variable on the node.
    assert replica_credentials("TOK", True, environ={**plan.env_vars, "TOK": "old"})[1] == digest
    # No token anywhere: required by default -> the replica refuses to start.
    assert resolve_auth("TOK", insecure_no_auth=False, environ={}).required
    with pytest.raises(ConfigError, match="no token"):
        replica_credentials("TOK", True, environ={"TOK": "  "})
    assert replica_credentials("TOK", False, environ={}) == (None, None)
    assert not resolve_auth("TOK", insecure_no_auth=True, environ={}).required
    with pytest.raises(ConfigError, match="SHA-256"):
        replica_credentials("TOK", True, environ={TOKEN_DIGEST_ENV: "abcd"})


def test_bind_checks():
    from hypersort_ray.errors import ConfigError
    from hypersort_ray.serve.auth import AuthPlan, check_bind, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))
    check_bind("127.0.0.1", AuthPlan(required=True), insecure_no_auth=False)
    check_bind("0.0.0.0", AuthPlan(required=True, env_vars={"HYPERSORT_API_TOKEN_SHA256": "x"}), False)
    check_bind("0.0.0.0", AuthPlan(required=False), insecure_no_auth=True)
    with pytest.raises(ConfigError, match="insecure-no-auth"):
        check_bind("0.0.0.0", AuthPlan(required=True), insecure_no_auth=False)


class _RayInitReached(Exception):
    pass


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_run_server_refuses_a_public_bind_without_token(tmp_path, monkeypatch, host):
    import ray

    from hypersort_ray.config import ServeSettings
    from hypersort_ray.errors import ConfigError
    from hypersort_ray.serve.app import run_server

    def fake_init(*args, **kwargs):
        raise _RayInitReached

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("HYPERSORT_API_TOKEN", raising=False)
    # run_server sets these for the Ray it starts: restore them after the test.
    for key in ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "HYPERSORT_PROXY_MAX_BODY_MB", "RAY_ADDRESS",
                "RAY_API_SERVER_ADDRESS", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(key, raising=False)
    # Refused before anything is read: not even a model is needed to say so.
    with pytest.raises(ConfigError, match="refusing to listen"):
        run_server(ServeSettings(model=str(tmp_path / "no-model"), host=host), block=False)
    # With the explicit flag, or a token, it checks the model and goes on to start Ray.
    model = str(make_tiny_run(tmp_path))
    with pytest.raises(_RayInitReached):
        run_server(ServeSettings(model=model, host=host, insecure_no_auth=True), block=False)
    monkeypatch.setenv("HYPERSORT_API_TOKEN", "t0ken")
    with pytest.raises(_RayInitReached):
        run_server(ServeSettings(model=model, host=host), block=False)


def test_deployment_carries_the_digest_and_the_limits(monkeypatch):
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve.app import deployment_options
    from hypersort_ray.serve.auth import resolve_auth

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    settings = ServeSettings(model="m", max_queued_requests=5, max_ongoing_requests=3)
    options = deployment_options(settings, resolve_auth("TOK", False, environ={"TOK": "s3cret"}))
    assert options["max_queued_requests"] == 5 and options["max_ongoing_requests"] == 3
    env = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert len(env["HYPERSORT_API_TOKEN_SHA256"]) == 64 and "s3cret" not in json.dumps(options)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


# --------------------------------------------------------------------------------- proxy guard
async def _drive(app, path="/v1/segment", headers=(), chunks=(b"",), method="POST"):
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    pending = list(chunks)
    sent = []

    async def receive():
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.sleep(3600)  # a client that stalls

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return scope, sent


def _recording_app(seen: list, status=200, content_type=b"text/plain", body=b"ok", read_body=True):
    async def app(scope, receive, send):
        seen.append(scope)
        if read_body:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect" or not msg.get("more_body"):
                    break
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"x-request-id", b"serve-id-1")]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_proxy_guard_strips_control_headers():
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware

    seen: list = []
    app = ProxyGuardMiddleware(_recording_app(seen), max_body_bytes=1000)
    headers = [(b"x-request-timeout-seconds", b"0"), (b"X-Request-Id", b"mine"), (b"x-request-disconnect-disabled", b"?1"),
               (b"authorization", b"Bearer t"), (b"content-length", b"3")]
    _, sent = asyncio.run(_drive(app, headers=headers, chunks=(b"abc",)))
    assert [k for k, _ in seen[0]["headers"]] == [b"authorization", b"content-length"]
    assert sent[0]["status"] == 200


def test_proxy_guard_refuses_a_declared_length_without_calling_the_proxy():
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware

    seen: list = []
    app = ProxyGuardMiddleware(_recording_app(seen), max_body_bytes=1000)
    _, sent = asyncio.run(_drive(app, headers=[(b"content-length", str(10 * 2**30).encode())]))
    assert not seen and sent[0]["status"] == 413
    body = json.loads(sent[1]["body"])
    assert body["status"] == 413 and "max_body_mb" in body["detail"] and body["request_id"]


def test_proxy_guard_cuts_a_streamed_body_at_the_cap():
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware

    seen: list = []
    app = ProxyGuardMiddleware(_recording_app(seen), max_body_bytes=1000)
    _, sent = asyncio.run(_drive(app, chunks=[b"x" * 600, b"x" * 600, b"x" * 600]))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [413]  # the proxy's own answer is dropped


def test_proxy_guard_rewrites_plain_text_errors_into_the_error_shape():
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware

    app = ProxyGuardMiddleware(_recording_app([], status=503, body=b"Request dropped due to backpressure"))
    _, sent = asyncio.run(_drive(app, chunks=(b"",)))
    assert sent[0]["status"] == 503
    body = json.loads(sent[1]["body"])
    assert body == {"status": 503, "error": "service_unavailable", "detail": body["detail"], "request_id": "serve-id-1"}
    assert "max_queued_requests" in body["detail"] and "backpressure" not in body["detail"]
    ok = ProxyGuardMiddleware(_recording_app([], status=404, content_type=b"application/json", body=b'{"a": 1}'))
    assert asyncio.run(_drive(ok, chunks=(b"",)))[1][1]["body"] == b'{"a": 1}'  # the app's JSON passes
    own = ProxyGuardMiddleware(_recording_app([], status=503, body=b"unhealthy"))
    assert asyncio.run(_drive(own, path="/-/healthz", chunks=(b"",)))[1][1]["body"] == b"unhealthy"


def _timed_receive(events):
    """A client: each event is (delay_s, message); after the last one it stalls."""
    pending = list(events)

    async def receive():
        if pending:
            delay, message = pending.pop(0)
            await asyncio.sleep(delay)
            return message
        await asyncio.sleep(3600)

    return receive


def _body(chunk: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": chunk, "more_body": more}


async def _call(app, receive, path="/v1/segment"):
    sent: list = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def test_proxy_guard_hands_the_proxy_only_complete_bodies_in_their_pieces():
    """A slow upload is read by the guard: the proxy (and so a replica slot) sees it only when complete."""
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware, UploadPolicy

    got: list = []
    delivered = {"n": 0}
    chunks = [b"a" * 100, b"b" * 50, b"c"]

    async def proxy(scope, receive, send):
        got.append(("called after", delivered["n"]))
        while True:
            message = await receive()
            got.append((message["body"], message["more_body"]))
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    inner = _timed_receive([(0.05, _body(c, i < len(chunks) - 1)) for i, c in enumerate(chunks)])

    async def counting():
        message = await inner()
        delivered["n"] += 1
        return message

    guard = ProxyGuardMiddleware(proxy, max_body_bytes=1000, upload=UploadPolicy(timeout_s=5))
    sent = asyncio.run(_call(guard, counting))
    assert got[0] == ("called after", 3)
    assert got[1:] == [(b"a" * 100, True), (b"b" * 50, True), (b"c", False)]
    assert sent[0]["status"] == 200 and guard.pool.used == 0


def test_proxy_guard_times_out_a_trickling_upload_and_lets_a_steady_one_finish():
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware, UploadPolicy

    seen: list = []
    policy = UploadPolicy(timeout_s=0.3, min_rate_bytes_s=1000)
    guard = ProxyGuardMiddleware(_recording_app(seen), max_body_bytes=10_000, upload=policy)
    # 10 bytes, then nothing: cut off after 0.3 s + 10 / 1000 s
    t0 = time.perf_counter()
    sent = asyncio.run(_call(guard, _timed_receive([(0.0, _body(b"x" * 10))])))
    assert 0.25 < time.perf_counter() - t0 < 2.0
    assert not seen and sent[0]["status"] == 408
    detail = json.loads(sent[1]["body"])["detail"]
    assert "upload_timeout_s" in detail and "10 bytes" in detail
    # 1000 bytes every 0.2 s for 1 s: longer than 0.3 s, but each KB earns a second
    steady = [(0.2, _body(b"y" * 1000, i < 4)) for i in range(5)]
    sent = asyncio.run(_call(guard, _timed_receive(steady)))
    assert sent[0]["status"] == 200 and len(seen) == 1
    assert guard.pool.used == 0


def test_proxy_guard_caps_the_bytes_it_holds_and_gives_them_back():
    """Two uploads that together exceed the buffer: the second gets 503 (Retry-After); nothing stays held
    after a refusal, a timeout, a client that left, or a completed request."""
    from hypersort_ray.serve.middleware import ProxyGuardMiddleware, UploadPolicy

    seen: list = []
    guard = ProxyGuardMiddleware(_recording_app(seen), max_body_bytes=1000,
                                 upload=UploadPolicy(timeout_s=0.5, min_rate_bytes_s=0, buffer_bytes=1500))

    async def both():
        first = asyncio.create_task(_call(guard, _timed_receive([(0.0, _body(b"a" * 900))])))  # then stalls
        await asyncio.sleep(0.1)
        used_while_held = guard.pool.used
        second = await _call(guard, _timed_receive([(0.0, _body(b"b" * 700, False))]))
        return used_while_held, second, await first

    used_while_held, second, first = asyncio.run(both())
    assert used_while_held == 900
    assert second[0]["status"] == 503 and (b"retry-after", b"5") in second[0]["headers"]
    assert "proxy_buffer_mb" in json.loads(second[1]["body"])["detail"]
    assert first[0]["status"] == 408 and guard.pool.used == 0 and not seen
    left = [(0.0, _body(b"c" * 500)), (0.0, {"type": "http.disconnect"})]
    assert asyncio.run(_call(guard, _timed_receive(left))) == [] and guard.pool.used == 0
    over = [(0.0, _body(b"d" * 600)), (0.0, _body(b"d" * 600, False))]
    assert asyncio.run(_call(guard, _timed_receive(over)))[0]["status"] == 413 and guard.pool.used == 0
    ok = asyncio.run(_call(guard, _timed_receive([(0.0, _body(b"e" * 800, False))])))
    assert ok[0]["status"] == 200 and guard.pool.used == 0 and len(seen) == 1


def test_proxy_callback_reads_the_upload_rule(monkeypatch):
    from hypersort_ray.serve.middleware import (
        PROXY_BUFFER_ENV,
        PROXY_UPLOAD_MIN_RATE_ENV,
        PROXY_UPLOAD_TIMEOUT_ENV,
        UploadPolicy,
        proxy_middlewares,
    )

    monkeypatch.setenv(PROXY_UPLOAD_TIMEOUT_ENV, "7.5")
    monkeypatch.setenv(PROXY_UPLOAD_MIN_RATE_ENV, "0")
    monkeypatch.setenv(PROXY_BUFFER_ENV, "2")
    (middleware,) = proxy_middlewares()
    assert middleware.kwargs["upload"] == UploadPolicy(timeout_s=7.5, min_rate_bytes_s=0, buffer_bytes=2 * 2**20)
    monkeypatch.setenv(PROXY_UPLOAD_TIMEOUT_ENV, "soon")
    monkeypatch.setenv(PROXY_BUFFER_ENV, "-1")
    (middleware,) = proxy_middlewares()
    assert middleware.kwargs["upload"] == UploadPolicy(min_rate_bytes_s=0)  # bad values: the defaults


def test_serve_settings_pass_the_upload_rule_to_the_proxy_and_check_the_buffer():
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve.app import proxy_environment

    env = proxy_environment(ServeSettings(upload_timeout_s=12, upload_min_rate_kib=8, proxy_buffer_mb=512))
    assert env["HYPERSORT_PROXY_UPLOAD_TIMEOUT_S"] == "12" and env["HYPERSORT_PROXY_UPLOAD_MIN_RATE_KIB"] == "8"
    assert env["HYPERSORT_PROXY_BUFFER_MB"] == "512"
    with pytest.raises(ValueError, match="proxy_buffer_mb .* max_body_mb"):
        ServeSettings(max_body_mb=300, proxy_buffer_mb=200)


def test_proxy_without_environment_applies_the_serve_settings_defaults(monkeypatch):
    """A proxy whose node lacks the variables behaves as ``hypersort serve`` with default settings."""
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve import middleware as mw
    from hypersort_ray.serve.app import proxy_environment

    passed = proxy_environment(ServeSettings())
    for name in passed:
        monkeypatch.delenv(name, raising=False)
    (bare,) = mw.proxy_middlewares()
    for name, value in passed.items():
        monkeypatch.setenv(name, value)
    (configured,) = mw.proxy_middlewares()
    assert bare.kwargs == configured.kwargs
    assert bare.kwargs["upload"] == mw.UploadPolicy()


def test_proxy_callback_reads_its_cap(monkeypatch):
    from hypersort_ray.serve.middleware import PROXY_MAX_BODY_ENV, ProxyGuardMiddleware, proxy_middlewares

    monkeypatch.setenv(PROXY_MAX_BODY_ENV, "1.5")
    (middleware,) = proxy_middlewares()
    assert middleware.cls is ProxyGuardMiddleware and middleware.kwargs["max_body_bytes"] == int(1.5 * 2**20)


# ------------------------------------------------------------------------- host, origin, content type
def _guard(**kwargs):
    from hypersort_ray.serve.middleware import GuardSettings, RequestGuardMiddleware

    settings = GuardSettings(max_body_bytes=1000, token=None, **kwargs)
    return RequestGuardMiddleware(_recording_app([], read_body=False), settings=lambda: settings,
                                  open_paths={"/healthz"}, multipart_prefixes=("/v1/segment",))


def _status(app, method="GET", path="/v1/styles", headers=()):
    return asyncio.run(_drive(app, path=path, headers=headers, method=method))[1][0]


def test_host_allow_list():
    from hypersort_ray.serve.middleware import host_allowed

    allowed = ["127.0.0.1", "localhost", "::1", "*.example.org"]
    for host in ("127.0.0.1:8000", "LOCALHOST", "[::1]:8000", "api.example.org", "a.b.example.org:443"):
        assert host_allowed(host, allowed), host
    for host in (None, "", "evil.example", "example.org.evil.com", "127.0.0.2:8000", "[::2]",
                 "[::1]evil.example", "[::1]:8000x", "[::1"):  # a bracket, then anything but a port
        assert not host_allowed(host, allowed), host
    assert host_allowed("anything", ["*"]) and host_allowed("anything", [])
    app = _guard(allowed_hosts=("127.0.0.1",))
    assert _status(app, headers=[(b"host", b"127.0.0.1:9")])["status"] == 200
    assert _status(app, headers=[(b"host", b"rebound.attacker:9")])["status"] == 400


def test_origin_check_and_cors():
    app = _guard(allowed_origins=("https://viewer.example.org",))
    host = (b"host", b"127.0.0.1:8000")
    assert _status(app, "POST", headers=[host, (b"origin", b"http://evil.example")])["status"] == 403
    assert _status(app, headers=[host, (b"origin", b"http://127.0.0.1:8000")])["status"] == 200  # same origin
    ok = _status(app, headers=[host, (b"origin", b"https://viewer.example.org")])
    assert (b"access-control-allow-origin", b"https://viewer.example.org") in ok["headers"]
    pre = _status(app, "OPTIONS", headers=[host, (b"origin", b"https://viewer.example.org"),
                                           (b"access-control-request-method", b"POST")])
    assert pre["status"] == 204 and (b"access-control-allow-methods", b"GET, POST") in pre["headers"]


def test_segment_posts_must_be_multipart():
    app = _guard()
    assert _status(app, "POST", "/v1/segment", [(b"content-type", b"application/json")])["status"] == 415
    assert _status(app, "POST", "/v1/segment/styles")["status"] == 415
    assert _status(app, "POST", "/v1/segment", [(b"content-type", b"multipart/form-data; boundary=x")])["status"] == 200


# ------------------------------------------------------------------------------- deadlines, cancel
def test_expired_token_skips_the_work():
    from hypersort_ray.serve.deadline import Cancelled, CancelToken, checkpoint, run_with_token

    ran = []
    with pytest.raises(Cancelled) as info:
        run_with_token(CancelToken(deadline=time.monotonic() - 1), ran.append, 1)
    assert info.value.timed_out and not ran
    token = CancelToken(deadline=time.monotonic() + 60)
    token.cancel()
    with pytest.raises(Cancelled) as info:
        run_with_token(token, ran.append, 1)
    assert not info.value.timed_out and not ran
    checkpoint()  # no token on this thread: a no-op


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers_model import make_tiny_run

    from hypersort_ray.inference import load_model

    return load_model(make_tiny_run(tmp_path_factory.mktemp("guards"), latent_dim=2))


def test_deadline_stops_the_sliding_window_in_its_thread(tiny_model):
    """The forward hook ends a ~3 s sliding-window pass within a window of its deadline; other threads and
    later requests are untouched."""
    from hypersort_ray.serve.deadline import Cancelled, CancelToken, install_forward_hook, run_with_token

    install_forward_hook()
    image = np.random.default_rng(0).random((112, 112, 112), dtype=np.float32)
    prepared = tiny_model.prepare(image, TWO_MM)
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        run_with_token(CancelToken(deadline=time.monotonic() + 0.3), tiny_model.predict, prepared)
    assert time.perf_counter() - t0 < 1.5
    # A token cancelled from another thread (the event loop when the client leaves) stops it too.
    token = CancelToken(deadline=time.monotonic() + 60)
    threading.Timer(0.3, token.cancel).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        run_with_token(token, tiny_model.predict, prepared)
    assert time.perf_counter() - t0 < 1.5
    small = np.random.default_rng(1).random((20, 20, 20), dtype=np.float32)
    expected = tiny_model.predict(small, affine=TWO_MM)["mask"]  # no token: unaffected
    got = run_with_token(CancelToken(time.monotonic() + 60), lambda: tiny_model.predict(small, affine=TWO_MM))
    np.testing.assert_array_equal(got["mask"], expected)


def _bare_segmenter(timeout_s: float = 60.0):
    """The replica class without __init__ (no Ray, no model): enough to drive its pool plumbing."""
    from concurrent.futures import ThreadPoolExecutor

    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve.app import HyperSortSegmenter

    cls = HyperSortSegmenter.func_or_class
    replica = object.__new__(cls)
    replica.settings = ServeSettings(model="m", request_timeout_s=timeout_s)
    replica._pool = ThreadPoolExecutor(max_workers=1)
    return replica


def test_in_pool_deadline_and_internal_errors():
    from hypersort_ray.serve.deadline import Cancelled, checkpoint

    replica = _bare_segmenter(timeout_s=0.3)
    stopped = threading.Event()

    def long_work():
        try:
            for _ in range(1000):
                checkpoint()
                time.sleep(0.01)
        finally:
            stopped.set()

    with pytest.raises(Cancelled) as info:
        asyncio.run(replica._in_pool(long_work))
    assert info.value.timed_out
    assert stopped.wait(2.0), "the worker thread kept running after the deadline"

    replica = _bare_segmenter()

    def broken():
        raise MemoryError("cannot allocate 68719476736 bytes in /opt/venv/lib/python3.11/site-packages/torch")

    with pytest.raises(RequestError) as err:
        asyncio.run(replica._in_pool(broken))
    assert err.value.status == 500
    assert "68719476736" not in err.value.detail and "site-packages" not in err.value.detail
    assert "MemoryError" in err.value.log_detail  # the log keeps it


def test_client_leaving_cancels_the_thread():
    from hypersort_ray.serve.deadline import checkpoint

    replica = _bare_segmenter()
    stopped = threading.Event()
    started = threading.Event()

    def long_work():
        started.set()
        try:
            for _ in range(1000):
                checkpoint()
                time.sleep(0.01)
        finally:
            stopped.set()

    async def leave():
        task = asyncio.ensure_future(replica._in_pool(long_work))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        task.cancel()  # what Serve does when the client disconnects or the proxy times out
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert stopped.wait(2.0)


# ---------------------------------------------------------------------------------------- leaks
def test_error_shape_and_scrub():
    from hypersort_ray.serve.wire import error_body, request_id_from_headers, scrub

    body = json.loads(error_body(413, "too big", "rid-1"))
    assert body == {"status": 413, "error": "payload_too_large", "detail": "too big", "request_id": "rid-1"}
    assert scrub("failed at /home/me/runs/x/config.yaml and C:\\data\\x.nii") == "failed at <path> and <path>"
    assert scrub("voxel size (2.0, 2.0) mm, 512/3") == "voxel size (2.0, 2.0) mm, 512/3"
    assert request_id_from_headers([(b"x-request-id", b"3f2a-11")]) == "3f2a-11"
    odd = request_id_from_headers([(b"x-request-id", b"<script>\nx")])
    assert odd != "<script>\nx" and len(odd) == 32


def test_model_identity_without_paths():
    from hypersort_ray.serve.results import public_info, public_source

    assert public_source("/srv/runs/demo") == "local:demo"
    assert public_source("file:///srv/runs/demo/") == "local:demo"
    assert public_source("models:/hypersort@champion") == "models:/hypersort@champion"
    info = {"epoch": 3, "num_samples": 40, "run_dir": "/srv/runs/demo", "source_run": "/x/y", "tracking_uri": "http://h"}
    assert public_info(info) == {"epoch": 3, "num_samples": 40}


def test_health_schema_has_no_version():
    from hypersort_ray.serve.schemas import HealthResponse

    assert set(HealthResponse(model_loaded=True).model_dump()) == {"status", "model_loaded"}


def test_internal_error_handler_keeps_the_text_in_the_log(caplog):
    from starlette.requests import Request

    from hypersort_ray.serve.app import _internal_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/segment", "headers": [(b"x-request-id", b"r-9")],
                       "query_string": b"", "state": {}})
    from hypersort_ray.serve.app import logger

    logger.addHandler(caplog.handler)  # Serve's logger may not propagate to the root
    try:
        response = asyncio.run(_internal_error(request, RuntimeError("secret /etc/hypersort/token.txt")))
    finally:
        logger.removeHandler(caplog.handler)
    assert response.status_code == 500
    assert b"secret" not in response.body and json.loads(response.body)["request_id"] == "r-9"
    assert "r-9" in caplog.text and "secret" in caplog.text


# ------------------------------------------------------------------------------------ mask writer
def test_mask_keeps_nifti2_and_both_forms():
    from hypersort_ray.serve.results import encode_mask

    img = nib.Nifti2Image(np.zeros((5, 6, 7), np.int16), TWO_MM)
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform = np.array([[0, -2.0, 0, 5], [2.0, 0, 0, -3], [0, 0, 2.0, 1], [0, 0, 0, 1]])
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=3)
    img.header["xyzt_units"] = 10
    vol = decode_nifti(img.to_bytes(), max_voxels=1000, spatial_dims=3)
    mask = np.ones((5, 6, 7), np.uint8)
    back = nib.Nifti2Image.from_bytes(gzip.decompress(encode_mask(mask, vol)))
    np.testing.assert_allclose(back.get_qform(), qform, atol=1e-6)
    np.testing.assert_allclose(back.get_sform(), sform, atol=1e-6)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 3
    assert int(back.header["xyzt_units"]) == 10 and back.get_data_dtype() == np.uint8
    stacked = np.stack([mask, mask * 0], axis=-1)
    four = nib.Nifti2Image.from_bytes(gzip.decompress(encode_mask(stacked, vol, shape=stacked.shape)))
    assert four.shape == (5, 6, 7, 2)


def _forms_then(patch) -> bytes:
    """A NIfTI-1 whose qform (code 1) and sform (code 2) are both 2 mm, then one header field patched."""
    img = nib.Nifti1Image(np.full((6, 6, 6), 50, np.int16), TWO_MM)
    img.set_qform(TWO_MM, code=1)
    img.set_sform(TWO_MM, code=2)
    raw = bytearray(img.to_bytes())
    patch(raw)
    return gzip.compress(bytes(raw))


@pytest.mark.parametrize("patch", [
    pytest.param(lambda raw: struct.pack_into("<f", raw, 76 + 8, float("nan")), id="nan-pixdim-of-the-qform"),
    pytest.param(lambda raw: struct.pack_into("<f", raw, 256, float("nan")), id="nan-quaternion"),
    pytest.param(lambda raw: struct.pack_into("<f", raw, 256, 5.0), id="impossible-quaternion"),
    pytest.param(lambda raw: struct.pack_into("<f", raw, 268, float("inf")), id="inf-qoffset"),
    pytest.param(lambda raw: struct.pack_into("<f", raw, 280, float("nan")), id="nan-in-the-sform"),
])
def test_forms_the_mask_could_not_carry_are_422_before_inference(patch):
    """Before, a broken qform next to a good sform decoded fine, the whole inference ran, and writing the
    mask failed: a 500. Now the decode refuses it (nothing runs), in words without exception text."""
    err = expect(422, decode_nifti, _forms_then(patch), max_voxels=1000, spatial_dims=3, match="qform or sform")
    assert "decompose" not in err.detail and "[[" not in err.detail  # no nibabel text, no matrices
    assert err.log_detail  # what nibabel said stays in the server log
    vol = decode_nifti(_forms_then(lambda raw: None), max_voxels=1000, spatial_dims=3)
    vol.geometry.check_writable()


def test_reading_the_geometry_refuses_an_unwritable_form(tmp_path):
    from hypersort_ray.data.nifti import NiftiGeometry
    from hypersort_ray.errors import DataError

    path = tmp_path / "broken.nii.gz"
    path.write_bytes(_forms_then(lambda raw: struct.pack_into("<f", raw, 256, float("nan"))))
    with pytest.raises(DataError, match="qform"):
        NiftiGeometry.from_header(nib.load(path).header)


def test_settings_defaults_are_closed():
    from hypersort_ray.config import ServeSettings

    s = ServeSettings()
    assert not s.insecure_no_auth and not s.api_docs and not s.allow_extrapolation and s.allowed_origins == []
    assert set(s.allowed_hosts) == {"127.0.0.1", "localhost", "::1"}


def test_proxy_guard_probe():
    """run_server's check: a proxy that echoes a client's x-request-id has no guard in front of it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from hypersort_ray.serve.app import _proxy_guard_active

    def server(echo: bool, status: int = 200):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(status)
                self.send_header("x-request-id", self.headers["x-request-id"] if echo else "serve-made-id")
                self.end_headers()

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    for echo, status, guarded in ((True, 200, False), (False, 200, True), (True, 400, False), (False, 400, True)):
        httpd = server(echo, status)
        try:
            assert _proxy_guard_active(f"http://127.0.0.1:{httpd.server_address[1]}") is guarded
        finally:
            httpd.shutdown()
