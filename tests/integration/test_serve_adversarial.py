"""Hostile and malformed requests against a REAL endpoint (Ray Serve on 127.0.0.1, the tiny model).

One module-scoped app (auth on, the ingress guard installed on Serve's proxy, small limits) answers more
than 40 kinds of bad requests -- truncated, nested and member-flooded gzip, NIfTI-1/2 headers with absurd,
zero, negative or needle-shaped dims, declared sizes far beyond the payload, extension floods, non-finite
and singular affines, tiny spacings, complex/bool/4-D/5-D data, empty, missing and oversized bodies, wrong
content types, bad and huge latents, unknown styles, bad tokens, hostile control headers -- each with the
right 4xx in the one error shape, within a few seconds, while a poller keeps ``/healthz`` answering. A
second app with one request slot shows the limits that only show on a busy replica (the proxy's body cap,
``max_queued_requests``, cancellation of abandoned work). Afterwards the service still serves masks equal
to ``HyperSortModel.predict``.

The token is put into this process's environment only after Ray started, so replicas can only have it
through the deployment's runtime environment (a replica reading its own environment would serve open).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

TOKEN = "adversarial-token-91c2"
TOKEN_ENV = "HYPERSORT_ADV_TEST_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_MB = 24
MAX_VOXELS = 130**3
MEMORY_MB = 160
UPLOAD_TIMEOUT_S = 3.0
SHAPE = (24, 20, 22)
TWO_MM = np.diag([2.0, 2.0, 2.0, 1.0])
ERROR_KEYS = {"status", "error", "detail", "request_id"}
# What must never reach a client: exception text, tracebacks, library internals, server paths.
LEAKS = ("Traceback", "site-packages", "/tmp/", "nibabel", "zlib", "Error -", "Exception", "python3")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from helpers_model import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("adversarial"), latent_dim=2, with_styles=True)


@pytest.fixture(scope="module")
def model(run_dir):
    from hypersort_ray.inference import load_model

    return load_model(run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(run_dir: Path, **overrides):
    from hypersort_ray.config import ServeSettings

    values = {
        "model": str(run_dir),
        "host": "127.0.0.1",
        "num_cpus": 1,
        "max_ongoing_requests": 8,
        "max_queued_requests": 16,
        "style_cache_size": 4,
        "max_body_mb": MAX_BODY_MB,
        "max_voxels": MAX_VOXELS,
        "max_inference_memory_mb": MEMORY_MB,
        "max_styles_per_request": 2,
        "request_timeout_s": 30,
        "upload_timeout_s": UPLOAD_TIMEOUT_S,
        "auth_token_env": TOKEN_ENV,
    }
    return ServeSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(run_dir):
    """The app on 127.0.0.1 with the proxy guard; yields (url, port); always stops Serve and Ray."""
    import ray
    from ray import serve

    from hypersort_ray.serve.app import build_application, http_options, proxy_environment

    port = _free_port()
    settings = _settings(run_dir, port=port)
    saved = {k: os.environ.get(k) for k in [*proxy_environment(settings), TOKEN_ENV]}
    os.environ.pop(TOKEN_ENV, None)
    os.environ.update(proxy_environment(settings))  # Serve's proxy reads these when Ray starts it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # Only now: the raylet and its workers never see the token; replicas get its digest from the deployment.
        os.environ[TOKEN_ENV] = TOKEN
        serve.start(http_options=http_options(settings))
        serve.run(build_application(settings), name="adversarial", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}", port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30.0) as c:
        yield c


class HealthPoller:
    """Polls /healthz every 0.2 s in the background for the whole module; records status and latency."""

    def __init__(self, url: str):
        self.url = url
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = c.get("/healthz").status_code
                except httpx.HTTPError:
                    status = -1
                self.samples.append((status, time.perf_counter() - t0))
                self._stop.wait(0.2)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def health(url):
    with HealthPoller(url) as poller:
        yield poller


# -------------------------------------------------------------------------------------- inputs
def _image(shape=SHAPE, seed: int = 0, noise: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    center = [s / 2 for s in shape]
    ball = sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) < (min(shape) / 3) ** 2
    return (40 + 60 * ball + rng.normal(0, noise, shape)).astype(np.int16)


def _affine() -> np.ndarray:
    return np.array([[-1.8, 0.0, 0.0, 20.0], [0.0, 2.1, 0.0, -14.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])


def _nifti(data: np.ndarray, affine=None, compress: bool = True, version: int = 1) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    raw = klass(data, _affine() if affine is None else affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def _patched(raw: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _n1_dims(shape, datatype: int = 16, bitpix: int = 32) -> bytes:
    """A NIfTI-1 header (plus the 4-byte extension flag) whose dims say ``shape``; no voxel data."""
    raw = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), TWO_MM).to_bytes()[:352]
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    raw = _patched(raw, 40, "<8h", *dims)
    raw = _patched(raw, 70, "<h", datatype)
    return _patched(raw, 72, "<h", bitpix)


def _n2_needle(length: int) -> bytes:
    """A NIfTI-2 needle of 2 x 2 x length uint8 voxels at 2 mm: a few KiB gzipped."""
    return gzip.compress(nib.Nifti2Image(np.zeros((2, 2, length), np.uint8), TWO_MM).to_bytes(), compresslevel=9)


def _extension_flood(block_bytes: int, version: int = 1) -> bytes:
    """A legal image whose header is followed by ``block_bytes`` of 16-byte extensions (the CPU amplifier)."""
    raw = nib.Nifti1Image(_image(), _affine()).to_bytes() if version == 1 else \
        nib.Nifti2Image(_image(), _affine()).to_bytes()
    size = 348 if version == 1 else 540
    header, voxels = raw[:size], raw[size + 4:]
    count = block_bytes // 16
    extension = struct.pack("<ii", 16, 6) + b"comment!"
    vox_offset = size + 4 + count * 16
    header = _patched(header, 108, "<f", float(vox_offset)) if version == 1 else _patched(header, 168, "<q", vox_offset)
    return gzip.compress(header + b"\x01\x00\x00\x00" + extension * count + voxels, compresslevel=6)


def _gzip_member_flood(mib: int) -> bytes:
    return gzip.compress(b"", mtime=0) * (mib * 2**20 // 20)


def _gzip_comment_flood(nbytes: int) -> bytes:
    """A gzip member whose FCOMMENT field is ``nbytes`` long: input consumed without any output."""
    head = b"\x1f\x8b\x08\x10" + b"\x00" * 4 + b"\x00\xff"  # FLG.FCOMMENT, mtime 0, XFL 0, OS unknown
    return head + b"c" * nbytes + b"\x00" + zlib.compress(b"x")[2:-4]


def _with_affine_rows(rows: np.ndarray) -> bytes:
    img = nib.Nifti1Image(_image(), _affine())
    hdr = img.header
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = rows[0], rows[1], rows[2]
    hdr["sform_code"] = 1
    hdr["qform_code"] = 0
    hdr["vox_offset"] = 352
    return gzip.compress(img.header.binaryblock + b"\x00" * 4 + _image().tobytes(order="F"))


def _nan_affine() -> bytes:
    rows = _affine()[:3].copy()
    rows[0, 0] = np.nan
    return _with_affine_rows(rows)


def _singular_affine() -> bytes:
    rows = _affine()[:3].copy()
    rows[:, 1] = 0.0  # the second voxel axis has no length
    return _with_affine_rows(rows)


def _bool_header() -> bytes:
    return _n1_dims((8, 8, 8), datatype=1, bitpix=1) + b"\x00" * 64


def _nested_gzip() -> bytes:
    return gzip.compress(gzip.compress(nib.Nifti1Image(_image(), _affine()).to_bytes()))


def _truncated_gzip() -> bytes:
    full = _nifti(_image().astype(np.float32))
    return full[: len(full) // 2]


def _declared_beyond_gzip() -> bytes:
    """A 13 MiB float64 volume declared in a ~100-byte gzip stream."""
    return gzip.compress(_n1_dims((120, 120, 120), datatype=64, bitpix=64))


def _n2_raw() -> bytes:
    return nib.Nifti2Image(np.zeros((4, 4, 4), np.uint8), TWO_MM).to_bytes()


def _post(client, payload: bytes | None, route="/v1/segment", filename="case.nii.gz", data=None, params=None,
          headers=AUTH, timeout=20.0):
    files = {"file": (filename, payload, "application/octet-stream")} if payload is not None else None
    return client.post(route, files=files, data=data or {}, params=params or {}, headers=headers, timeout=timeout)


def _mask(blob: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(blob)).dataobj)


def _expected(model, payload: bytes, tmp_path: Path, **kwargs) -> np.ndarray:
    path = tmp_path / f"expected-{abs(hash(payload))}.nii.gz"
    path.write_bytes(payload if payload[:2] == b"\x1f\x8b" else gzip.compress(payload))
    return model.predict(path, **kwargs)["mask"]


def assert_error(r, status: int, words: str = "", run_dir: Path | None = None) -> dict:
    """The one error shape, the right status, a message naming the problem, nothing internal."""
    assert r.status_code == status, (r.status_code, r.text[:400])
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["status"] == status and body["request_id"] and isinstance(body["detail"], str)
    assert r.headers.get("x-request-id") == body["request_id"]
    assert words.lower() in body["detail"].lower(), body["detail"]
    for leak in LEAKS:
        assert leak not in r.text, (leak, r.text)
    if run_dir is not None:
        assert str(run_dir) not in r.text
    return body


def _nan_qform_beside_a_good_sform() -> bytes:
    img = nib.Nifti1Image(_image(), TWO_MM)
    img.set_qform(TWO_MM, code=1)
    img.set_sform(TWO_MM, code=2)  # the best affine, and finite: only the mask's qform would fail
    return gzip.compress(_patched(img.to_bytes(), 256, "<f", float("nan")))  # quatern_b


def _sheared_slab() -> bytes:
    # every voxel column >= 2 mm long, the volume 0.8 mm thick: MONAI resamples it to one slice
    sheared = np.array([[2.0, 2.0, 0, 0], [0, 0.02, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    return _nifti(_image((40, 40, 40)), affine=sheared)


# --------------------------------------------------------------------------------- hostile uploads
HOSTILE = [
    # (id, payload builder, form data, expected status, words the detail must contain)
    ("truncated-gzip", _truncated_gzip, {}, 400, "truncated"),
    ("truncated-gzip-header", lambda: _nifti(_image())[:6], {}, 400, "too short"),
    ("nested-gzip", _nested_gzip, {}, 400, "not a NIfTI"),
    ("gzip-empty-member-flood", lambda: _gzip_member_flood(4), {}, 400, "members"),
    ("gzip-comment-flood", lambda: _gzip_comment_flood(512 * 1024), {}, 400, "produced no data"),
    ("gzip-garbage", lambda: b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, {}, 400, "gzip"),
    ("not-nifti-text", lambda: b"GET / HTTP/1.1\r\n" * 40, {}, 400, "not a NIfTI"),
    ("png-bytes", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 400, {}, 400, "not a NIfTI"),
    ("n1-absurd-dims", lambda: gzip.compress(_n1_dims((32767, 32767, 32767))), {}, 413, "voxels"),
    ("n1-zero-dim", lambda: _n1_dims((20, 0, 20)), {}, 400, ">= 1"),
    ("n1-negative-dim", lambda: _n1_dims((20, -5, 20)), {}, 400, ">= 1"),
    ("n1-dim0-out-of-range", lambda: _patched(_n1_dims((8, 8, 8)), 40, "<h", 9), {}, 400, "dim[0]"),
    ("n1-needle", lambda: gzip.compress(_n1_dims((2, 2, 32000), datatype=2, bitpix=8) + b"\x00" * 128000),
     {}, 413, "padded"),
    ("n2-needle-2x2x500000", lambda: _n2_needle(500_000), {}, 413, "padded"),
    ("n2-negative-dims", lambda: _patched(_n2_raw(), 16, "<4q", 3, 4, -4, 4), {}, 400, ">= 1"),
    ("n2-huge-dims", lambda: gzip.compress(_patched(_n2_raw(), 16, "<4q", 3, 2**40, 2**40, 2**40)), {}, 413,
     "voxels"),
    ("declared-beyond-raw-payload", lambda: _n1_dims((100, 100, 100)) + b"\x00" * 1024, {}, 400, "truncated"),
    ("declared-beyond-gzip-payload", _declared_beyond_gzip, {}, 400, "can hold"),
    ("extension-flood-4mib", lambda: _extension_flood(4 * 2**20), {}, 413, "extensions"),
    ("vox-offset-inside-header", lambda: _patched(_nifti(_image(), compress=False), 108, "<f", 100.0), {}, 400,
     "inside the header"),
    ("vox-offset-nan", lambda: _patched(_nifti(_image(), compress=False), 108, "<f", float("nan")), {}, 400,
     "vox_offset"),
    ("nan-affine", _nan_affine, {}, 422, "NaN or inf"),
    ("singular-affine", _singular_affine, {}, 422, "singular"),
    ("tiny-spacing", lambda: _nifti(_image(), affine=np.diag([1e-6, 1e-6, 1e-6, 1.0])), {}, 422, "at least"),
    ("coarse-spacing", lambda: _nifti(_image((20, 20, 20)), affine=np.diag([20.0, 20.0, 20.0, 1.0])), {}, 413,
     "max_voxels"),
    ("memory-budget", lambda: _nifti(_image((128, 128, 128), noise=0.0), affine=TWO_MM), {}, 413,
     "max_inference_memory_mb"),
    ("complex-dtype", lambda: _nifti(np.zeros((8, 8, 8), np.complex64), compress=False), {}, 422, "complex"),
    ("bool-dtype", _bool_header, {}, 422, "binary"),
    ("rgb-dtype", lambda: _n1_dims((8, 8, 8), datatype=128, bitpix=24), {}, 422, "RGB"),
    ("four-d-channels", lambda: _nifti(np.stack([_image()] * 3, axis=-1)), {}, 422, "channels"),
    ("five-d", lambda: _nifti(_image()[..., None, None].repeat(2, axis=4)), {}, 422, "channels"),
    ("two-d", lambda: _nifti(_image()[:, :, 0]), {}, 422, "3D"),
    ("one-voxel-axis", lambda: _nifti(_image((24, 20, 1))), {}, 422, "at least"),
    ("nan-voxels", lambda: _nifti(np.full((8, 8, 8), np.nan, np.float32), affine=TWO_MM), {}, 422, "NaN"),
    ("nan-qform-beside-good-sform", _nan_qform_beside_a_good_sform, {}, 422, "qform or sform"),
    ("sheared-slab", _sheared_slab, {}, 422, "at least 2 voxels"),
    ("intensities-overflow-float32",
     lambda: _nifti(np.where(_image() > np.median(_image()), 3e38, -3e38).astype(np.float32), affine=TWO_MM), {},
     422, "overflow"),
    ("empty-file", lambda: b"", {}, 400, "empty"),
    ("latent-huge-integer", lambda: _nifti(_image()), {"latent": "[" + "9" * 5000 + ", 0]"}, 422, "characters"),
    ("latent-long-number", lambda: _nifti(_image()), {"latent": "[0." + "1" * 40 + ", 0]"}, 422, "characters"),
    ("latent-beyond-float32", lambda: _nifti(_image()), {"latent": "[1e39, 0]"}, 422, "float32"),
    ("latent-extrapolation", lambda: _nifti(_image()), {"latent": "[50, 50]"}, 422, "latent_radius"),
    ("latent-nan", lambda: _nifti(_image()), {"latent": "[NaN, 0]"}, 422, "NaN"),
    ("latent-nested", lambda: _nifti(_image()), {"latent": "[" * 30 + "]" * 30}, 422, "not a number"),
    ("latent-wrong-length", lambda: _nifti(_image()), {"latent": "[0.1]"}, 422, "latent_dim"),
    ("latent-object", lambda: _nifti(_image()), {"latent": '{"x": 1}'}, 422, "JSON list"),
    ("unknown-style", lambda: _nifti(_image()), {"style": "no-such-style"}, 404, "unknown style"),
    ("style-and-latent", lambda: _nifti(_image()), {"style": "1", "latent": "[0, 0]"}, 422, "either"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_upload(client, health, run_dir, case):
    _, build, data, status, words = case
    payload = build()
    t0 = time.perf_counter()
    r = _post(client, payload, data=data)
    elapsed = time.perf_counter() - t0
    assert_error(r, status, words, run_dir)
    assert elapsed < 5.0, f"{case[0]} took {elapsed:.1f}s"


def test_hostile_kinds_are_many():
    assert len(HOSTILE) >= 25


def test_member_flood_never_blocks_the_event_loop(url, client):
    """20 MiB of empty gzip members: refused in milliseconds, /healthz answers quickly meanwhile."""
    flood = _gzip_member_flood(20)
    latencies: list[float] = []
    done = threading.Event()

    def poll():
        with httpx.Client(base_url=url, timeout=30.0) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t0 = time.perf_counter()
        r = _post(client, flood)
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        poller.join(timeout=30)
    assert latencies and max(latencies) < 1.0, f"/healthz took {max(latencies):.2f}s during the flood"
    assert elapsed < 4.0
    assert_error(r, 400, "members")


def test_extension_flood_below_the_cap_is_fast_and_ignored(client, model, tmp_path):
    """900 KiB of tiny extensions (57 000 of them): never parsed, so the request costs what the image costs."""
    payload = _extension_flood(900 * 1024)
    t0 = time.perf_counter()
    r = _post(client, payload, data={"style": "main"})
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t0 < 5.0
    np.testing.assert_array_equal(_mask(r.content), _expected(model, _nifti(_image()), tmp_path, style="main"))


def test_nifti2_upload_keeps_nifti2_geometry(client, model, tmp_path):
    payload = _nifti(_image(seed=2), version=2)
    r = _post(client, payload, data={"style": "1"})
    assert r.status_code == 200, r.text
    out = nib.Nifti2Image.from_bytes(gzip.decompress(r.content))  # the one NIfTI writer keeps the version
    np.testing.assert_allclose(out.affine, _affine(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), _expected(model, payload, tmp_path, style="1"))


# ------------------------------------------------------------------------------ bodies and routes
def test_empty_and_missing_bodies(client):
    assert_error(client.post("/v1/segment", headers=AUTH), 415, "multipart")
    r = client.post("/v1/segment", headers=AUTH, files={"style": (None, "main")})
    assert_error(r, 422, "file")
    # a `file` part without a filename: FastAPI's own message names a Python class; ours does not
    r = client.post("/v1/segment", headers=AUTH, files={"file": (None, b"not a file part")})
    assert_error(r, 422, "file part with a filename")
    assert "<class" not in r.text


def test_a_body_of_multipart_delimiters_is_refused_while_it_streams(client):
    """8 MiB of ``\r\n--x`` + one byte took Starlette's form parser ~1.3 s of the replica's event loop
    (a plain body of that size 0.04 s); the body guard stops it after MAX_MULTIPART_PARTS delimiters."""
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.nii.gz"\r\n\r\n'
    body = head + b"\r\n--xZ" * (8 * 2**20 // 6) + b"\r\n--x--\r\n"
    t0 = time.perf_counter()
    r = client.post("/v1/segment", headers={**AUTH, "content-type": "multipart/form-data; boundary=x"},
                    content=body)
    assert_error(r, 400, "parts")
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_types(client, content_type):
    r = client.post("/v1/segment", headers={**AUTH, "content-type": content_type}, content=b'{"file": "x"}')
    assert_error(r, 415, "multipart/form-data")


def test_oversized_body_is_refused(server):
    """A complete multipart upload just over the cap (sent until the answer arrives: no reset races)."""
    _, port = server
    part = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    body = part + os.urandom(MAX_BODY_MB * 2**20 + 4096) + b"\r\n--xyz--\r\n"
    status, answer = _raw_exchange(port, _head("/v1/segment", port, f"Content-Length: {len(body)}\r\n"), body)
    assert status == 413, answer[:300]
    reply = json.loads(answer)
    assert set(reply) == ERROR_KEYS and "max_body_mb" in reply["detail"]


def _answer(sock: socket.socket, deadline: float = math.inf) -> tuple[int, bytes]:
    """Read one HTTP answer (status, body) until it is complete, the server closes, or the deadline."""
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
        if time.monotonic() > deadline:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
    return status, data.split(b"\r\n\r\n", 1)[-1]


def _raw_exchange(port: int, head: bytes, body: bytes = b"", wait_s: float = 5.0) -> tuple[int, bytes]:
    """Send a hand-made request (the body may be far shorter than declared) and read the answer.

    The body goes out in pieces and stops as soon as an answer arrives: the server refuses mid-body and
    closes the connection, so sending on would only end in a reset.
    """
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head)
        view = memoryview(body)
        while view and not select.select([sock], [], [], 0)[0]:
            try:
                sent = sock.send(view[: 64 * 1024])
            except (ConnectionResetError, BrokenPipeError):
                break
            view = view[sent:]
        return _answer(sock, deadline=time.monotonic() + wait_s)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _head(path: str, port: int, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\n{extra}\r\n").encode()


def test_declared_length_over_the_cap_is_answered_before_the_body(server):
    _, port = server
    t0 = time.perf_counter()
    status, body = _raw_exchange(port, _head("/v1/segment", port, f"Content-Length: {10 * 2**30}\r\n"), b"x" * 1024)
    assert status == 413, body[:300]
    assert "max_body_mb" in json.loads(body)["detail"]
    assert time.perf_counter() - t0 < 3.0


def test_streamed_body_over_the_cap_is_cut_off(server):
    _, port = server
    # A well-formed multipart start, so that no parser refuses the body before it reaches the cap.
    part = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    chunks = [part] + [b"x" * 2**20] * (MAX_BODY_MB + 2)
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for chunk in chunks)
    status, answer = _raw_exchange(port, _head("/v1/segment", port, "Transfer-Encoding: chunked\r\n"), body)
    assert status == 413, answer[:300]


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/v1/nothing-here", headers=AUTH), 404)
    assert_error(client.get("/v1/segment", headers=AUTH), 405)


def test_styles_route_is_bounded(client, model):
    assert len(model.styles) == 3
    r = _post(client, _nifti(_image()), route="/v1/segment/styles")
    assert_error(r, 422, "max_styles_per_request")
    r = _post(client, _nifti(_image()), route="/v1/segment/styles", data={"styles": "main,1,2"})
    assert_error(r, 422, "at most 2")
    r = _post(client, _nifti(_image()), route="/v1/segment/styles", data={"styles": "main,nope"})
    assert_error(r, 404, "unknown style")
    r = _post(client, _nifti(_image()), route="/v1/segment/styles", data={"styles": "2, main, 2"},
              params={"format": "json"})
    assert r.status_code == 200, r.text
    assert [x["style"] for x in r.json()["results"]] == ["2", "main"]


# ------------------------------------------------------------------------------------ auth, headers
def test_token_reaches_replicas_through_the_deployment(client):
    """The replicas' own environment lacks the token (set here after Ray started): they still check it."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        assert_error(client.get("/v1/styles", headers=headers), 401, "token")
        assert_error(_post(client, _nifti(_image()), headers=headers), 401, "token")
    assert client.get("/v1/styles", headers=AUTH).status_code == 200


def test_timeout_header_before_auth_is_refused_quickly(client):
    t0 = time.perf_counter()
    r = _post(client, _nifti(_image()), headers={"x-request-timeout-seconds": "0"})
    assert_error(r, 401, "token")
    assert time.perf_counter() - t0 < 3.0


def test_proxy_strips_request_control_headers(client, model, tmp_path):
    """x-request-timeout-seconds, x-request-id, x-request-disconnect-disabled never reach Serve's proxy logic."""
    payload = _nifti(_image(seed=4))
    headers = {**AUTH, "x-request-timeout-seconds": "0.001", "x-request-id": "attacker-chosen-id",
               "x-request-disconnect-disabled": "?1"}
    r = _post(client, payload, data={"style": "main"}, headers=headers)
    assert r.status_code == 200, r.text  # a 1 ms timeout, if honoured, would have answered 408
    assert r.headers["x-request-id"] != "attacker-chosen-id"
    np.testing.assert_array_equal(_mask(r.content), _expected(model, payload, tmp_path, style="main"))
    bad = _post(client, b"not a nifti", headers={**AUTH, "x-request-id": "attacker-chosen-id"})
    assert assert_error(bad, 400)["request_id"] != "attacker-chosen-id"


def test_host_allow_list(url):
    with httpx.Client(base_url=url, timeout=10.0) as c:
        r = c.get("/v1/styles", headers={**AUTH, "Host": "evil.example"})
        assert_error(r, 400, "allowed_hosts")
        r = c.get("/healthz", headers={"Host": "rebind.attacker.example:8000"})
        assert_error(r, 400, "Host")
        assert c.get("/healthz", headers={"Host": "localhost"}).status_code == 200


def test_cross_origin_requests_are_refused(client, url):
    r = _post(client, _nifti(_image()), headers={**AUTH, "Origin": "http://evil.example"})
    assert_error(r, 403, "cross-origin")
    r = client.options("/v1/segment", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert_error(r, 403, "allowed_origins")
    assert "access-control-allow-origin" not in r.headers
    same = url.split("://", 1)[1]
    r = client.get("/v1/styles", headers={**AUTH, "Origin": f"http://{same}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_nothing_internal_on_open_or_model_routes(client, run_dir):
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "model_loaded": True}
    r = client.get("/v1/model", headers=AUTH)
    assert r.status_code == 200
    assert str(run_dir) not in r.text and "/tmp/" not in r.text
    assert r.json()["source"] == f"local:{run_dir.name}"
    docs = client.get("/docs")
    assert_error(docs, 404, "api_docs")
    assert "cdn" not in docs.text.lower()
    assert client.get("/openapi.json").status_code == 200


def _replica_log(app: str) -> str:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return "".join(p.read_text(errors="replace") for p in session.glob(f"logs/serve/replica_{app}_*.log"))


def test_refusals_are_logged_under_their_request_id(client, run_dir):
    """The client gets a short message; the log gets the internal detail under the same request id."""
    r = _post(client, b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    body = assert_error(r, 400, "corrupt gzip data", run_dir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in _replica_log("adversarial").splitlines() if body["request_id"] in line]
        if any("corrupt gzip data" in line for line in lines):
            break
        time.sleep(0.2)
    matching = [line for line in lines if "corrupt gzip data" in line]
    assert matching, "no log line with the request id"
    assert "invalid" in matching[0] or "Error" in matching[0] or "|" in matching[0]  # zlib's own words


def test_deployment_limits_are_in_force(server):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"]["adversarial"]["deployments"]["HyperSortSegmenter"]
    config = deployment["deployment_config"]
    assert config["max_queued_requests"] == 16 and config["max_ongoing_requests"] == 8
    env = config["ray_actor_options"]["runtime_env"]["env_vars"]
    assert TOKEN not in json.dumps(details)  # only its digest travels
    assert len(env["HYPERSORT_API_TOKEN_SHA256"]) == 64 and env["MLFLOW_DISABLE_TELEMETRY"] == "true"


# ------------------------------------------------------------------------ a busy replica (one slot)
@pytest.fixture(scope="module")
def held(server, run_dir):
    """A second app with one request slot and one queue slot: what piles up, and what gets cancelled."""
    from ray import serve

    from hypersort_ray.serve.app import build_application

    settings = _settings(run_dir, max_ongoing_requests=1, max_queued_requests=1, num_cpus=0.5,
                         max_voxels=200**3, max_inference_memory_mb=2048)
    serve.run(build_application(settings), name="held", route_prefix="/held", blocking=False)
    try:
        yield f"{server[0]}/held"
    finally:
        serve.delete("held")


def _cache_calls(c, base: str) -> int:
    cache = c.get(f"{base}/v1/model", headers=AUTH).json()["cache"]
    return cache["hits"] + cache["misses"]


def test_busy_replica_limits_and_cancellation(held, server, model, tmp_path):
    """One slow request occupies the only slot: the proxy still refuses an oversized body at once, a third
    request gets 503 instead of piling up, and when the slow client leaves its work stops."""
    _, port = server
    slow_payload = _nifti(_image((160, 160, 160), noise=0.0), affine=TWO_MM)  # ~7 s per style
    small = _nifti(_image(seed=7))
    with httpx.Client(timeout=30.0) as c:
        calls_before = _cache_calls(c, held)
    slow_result: dict = {}

    def slow():
        with httpx.Client(timeout=3.0) as c:  # the client gives up after 3 s and closes the connection
            try:
                slow_result["r"] = _post(c, slow_payload, route=f"{held}/v1/segment/styles",
                                         data={"styles": "main,1"}, timeout=3.0)
            except httpx.TimeoutException:
                slow_result["left_at"] = time.perf_counter()

    def queued():
        with httpx.Client(timeout=30.0) as c:
            r = _post(c, small, route=f"{held}/v1/segment", data={"style": "main"}, timeout=30.0)
            return r, time.perf_counter()

    with ThreadPoolExecutor(max_workers=3) as pool:
        slow_future = pool.submit(slow)
        time.sleep(1.0)  # the slow request holds the slot
        t0 = time.perf_counter()
        status, body = _raw_exchange(port, _head("/held/v1/segment", port, f"Content-Length: {4 * 2**30}\r\n"),
                                     b"x" * 512, wait_s=3.0)
        assert status == 413, body[:300]
        assert time.perf_counter() - t0 < 2.5, "the proxy waited for a replica before refusing the body"
        queued_future = pool.submit(queued)  # takes the one queue slot
        time.sleep(0.5)
        with httpx.Client(timeout=10.0) as c:
            t0 = time.perf_counter()
            r = _post(c, small, route=f"{held}/v1/segment", data={"style": "main"}, timeout=10.0)
            assert_error(r, 503, "max_queued_requests")
            assert time.perf_counter() - t0 < 2.5
        slow_future.result(timeout=30)
        queued_response, queued_done = queued_future.result(timeout=60)
    assert "left_at" in slow_result, "the slow request was expected to outlast its client's 3 s"
    assert queued_response.status_code == 200, queued_response.text
    # The abandoned request had ~14 s of windows left; cancelled, the queued one finishes soon after.
    assert queued_done - slow_result["left_at"] < 2.5, f"{queued_done - slow_result['left_at']:.1f}s"
    with httpx.Client(timeout=30.0) as c:
        calls = _cache_calls(c, held) - calls_before
    assert calls <= 2, f"{calls} networks ran: the abandoned request's second style should never start"
    np.testing.assert_array_equal(_mask(queued_response.content), _expected(model, small, tmp_path, style="main"))


def test_slow_uploads_wait_at_the_proxy_not_in_a_replica_slot(held, server, model, tmp_path):
    """Four uploads that stall after their first bytes (more than the held app's one request slot and one
    queue slot): a complete request still gets its mask and /healthz answers, because the proxy hands a
    replica only complete bodies; the stalled uploads get 408 after upload_timeout_s."""
    _, port = server
    socks = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=UPLOAD_TIMEOUT_S + 15)
            sock.sendall(_head("/held/v1/segment", port, "Content-Length: 100000\r\n") + b"--xyz\r\n")
            socks.append(sock)
        t_stalled = time.perf_counter()
        time.sleep(0.5)
        small = _nifti(_image(seed=7))
        with httpx.Client(timeout=20.0) as c:
            r = _post(c, small, route=f"{held}/v1/segment", data={"style": "main"}, timeout=20.0)
            assert r.status_code == 200, r.text
            assert c.get(f"{held}/healthz").status_code == 200
        np.testing.assert_array_equal(_mask(r.content), _expected(model, small, tmp_path, style="main"))
        for sock in socks:
            status, body = _answer(sock)
            assert status == 408, body[:300]
            reply = json.loads(body)
            assert set(reply) == ERROR_KEYS and "upload_timeout_s" in reply["detail"]
        assert time.perf_counter() - t_stalled >= UPLOAD_TIMEOUT_S
    finally:
        for sock in socks:
            sock.close()


# -------------------------------------------------------------------------------- fail closed
def test_replica_without_a_token_refuses_to_start(server, held, run_dir):
    """Auth configured (the default) but no token anywhere: the deployment fails instead of serving open."""
    from ray import serve

    from hypersort_ray.serve.app import build_application

    settings = _settings(run_dir, auth_token_env="HYPERSORT_ADV_NEVER_SET", num_cpus=0.25)
    assert "HYPERSORT_ADV_NEVER_SET" not in os.environ
    try:
        with pytest.raises(Exception, match="(?i)fail|error|token"):
            serve.run(build_application(settings), name="no-token", route_prefix="/no-token", blocking=False)
        with httpx.Client(timeout=10.0) as c:
            assert c.get(f"{server[0]}/no-token/v1/styles").status_code != 200
    finally:
        serve.delete("no-token")


# ------------------------------------------------------------------------------------- afterwards
def test_still_serving_correct_masks(client, model, tmp_path):
    for style in ("main", "1", "2"):
        payload = _nifti(_image(seed=11))
        r = _post(client, payload, data={"style": style})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(_mask(r.content), _expected(model, payload, tmp_path, style=style))
    payload = _nifti(_image(seed=12))
    r = _post(client, payload, data={"latent": "[0.4, -0.2]"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_mask(r.content), _expected(model, payload, tmp_path, latent=[0.4, -0.2]))


def test_health_answered_throughout(health):
    """Last in the module: /healthz answered every poll while all of the above ran."""
    assert len(health.samples) > 20
    statuses = {s for s, _ in health.samples}
    assert statuses == {200}, statuses
    worst = max(t for _, t in health.samples)
    assert worst < 2.0, f"/healthz took {worst:.2f}s"
