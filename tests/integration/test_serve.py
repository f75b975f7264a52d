"""The Ray Serve endpoint over real HTTP on 127.0.0.1: one module-scoped app with a tiny random model.

Covers every route, every class of bad input (status + a message naming the problem, service still
healthy afterwards), equality with ``HyperSortModel.predict`` and ``hypersort predict``, a concurrent
burst with mixed styles, bearer-token auth on and off, and the config-file builder.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import struct
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a"
TOKEN_ENV = "HYPERSORT_SERVE_TEST_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_VOXELS = 30**3
MAX_BODY_MB = 0.5
SHAPE = (24, 20, 22)
GZIP_MAGIC = b"\x1f\x8b"


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from helpers_model import make_tiny_run  # tests/helpers_model.py: tiny random model, styles main/1/2

    return make_tiny_run(tmp_path_factory.mktemp("serve"), latent_dim=2, with_styles=True)


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
        "style_cache_size": 4,
        "max_body_mb": MAX_BODY_MB,
        "max_voxels": MAX_VOXELS,
        "request_timeout_s": 60,
        "auth_token_env": TOKEN_ENV,
    }
    return ServeSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def server(run_dir):
    """One Serve app on 127.0.0.1 with auth on; yields the base URL; always shuts Serve and Ray down."""
    import ray
    from ray import serve

    from hypersort_ray.serve.app import build_application, http_options

    os.environ[TOKEN_ENV] = TOKEN  # before ray.init: replicas inherit the environment
    port = _free_port()
    settings = _settings(run_dir, port=port)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options=http_options(settings))
        serve.run(build_application(settings), name="hypersort", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60.0) as c:
        yield c


# -------------------------------------------------------------------------------------- inputs
def _affine() -> np.ndarray:
    aff = np.array([[-1.8, 0.0, 0.0, 20.0], [0.0, 2.1, 0.0, -14.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    return aff


def _image(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    center = [s / 2 for s in shape]
    ball = sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) < (min(shape) / 3) ** 2
    return (40 + 60 * ball + rng.normal(0, 5, shape)).astype(np.int16)


def _nifti(data: np.ndarray, affine=None, compress: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, _affine() if affine is None else affine).to_bytes()
    return gzip.compress(raw) if compress else raw


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-img") / "case_007.nii.gz"
    nib.save(nib.Nifti1Image(_image(), _affine()), str(path))
    return path


def _post(client, payload: bytes, route="/v1/segment", filename="case.nii.gz", data=None, params=None, headers=AUTH):
    files = {"file": (filename, payload, "application/octet-stream")}
    return client.post(route, files=files, data=data or {}, params=params or {}, headers=headers)


def _mask(blob: bytes):
    img = nib.Nifti1Image.from_bytes(gzip.decompress(blob))
    return np.asarray(img.dataobj), img.affine


def _expected(model, payload: bytes, tmp_path: Path, **kwargs) -> np.ndarray:
    """What HyperSortModel.predict says for exactly these bytes (the file's float32 affine included)."""
    suffix = ".nii.gz" if payload[:2] == GZIP_MAGIC else ".nii"
    path = tmp_path / f"expected-{abs(hash(payload))}{suffix}"
    path.write_bytes(payload)
    return model.predict(path, **kwargs)["mask"]


def _style_ids(model) -> list[str]:
    return [s.id for s in model.styles]


# ---------------------------------------------------------------------------------------- routes
def test_healthz_is_open(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert "model_version" not in body  # open route: says nothing about the model


def test_docs_and_openapi(client):
    docs = client.get("/docs")  # the Swagger page loads a CDN: off unless api_docs
    assert docs.status_code == 404 and "api_docs" in docs.json()["detail"]
    spec = client.get("/openapi.json").json()
    for path in ("/v1/segment", "/v1/segment/styles", "/v1/styles", "/v1/model", "/healthz"):
        assert path in spec["paths"], path
    props = spec["components"]["schemas"]
    assert "SegmentSummary" in props and "ErrorResponse" in props


def test_styles(client, model):
    r = client.get("/v1/styles", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["main_style"] == "main" and body["latent_dim"] == 2
    assert [s["id"] for s in body["styles"]] == _style_ids(model)
    assert len(body["styles"]) >= 2
    assert body["styles"][0]["is_main"] and body["styles"][0]["centroid"] == [0.0, 0.0]
    for got, want in zip(body["styles"], model.styles, strict=True):
        assert got["centroid"] == pytest.approx(list(want.latent)) and got["size"] == want.size


def test_model_info(client, run_dir, model):
    r = client.get("/v1/model", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["latent_dim"] == 2 and body["spatial_dims"] == 3 and body["num_styles"] == len(model.styles)
    assert body["config"]["roi_size"] == [16, 16, 16]
    assert body["config"]["network"]["channels"] == 4
    assert body["config"]["spacing"] == [2.0, 2.0, 2.0]
    assert body["source"] == f"local:{run_dir.name}"  # no server paths on the wire
    assert str(run_dir) not in r.text
    assert body["model_version"].startswith("local:")
    assert body["registry_name"] is None
    assert body["cache"]["capacity"] == 4


def test_segment_matches_model_predict(client, model, image_file):
    r = _post(client, image_file.read_bytes(), filename=image_file.name, data={"style": "1"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["x-style"] == "1"
    assert float(r.headers["x-inference-ms"]) > 0
    assert r.headers["x-model-version"].startswith("local:")
    assert 'filename="case_007_mask.nii.gz"' in r.headers["content-disposition"]
    mask, affine = _mask(r.content)
    assert mask.shape == SHAPE and mask.dtype == np.uint8
    np.testing.assert_allclose(affine, _affine(), atol=1e-5)
    expected = model.predict(image_file, style="1")["mask"]
    np.testing.assert_array_equal(mask, expected)
    assert int(r.headers["x-foreground-voxels"]) == int((expected > 0).sum())


def test_segment_matches_hypersort_predict_cli(client, run_dir, image_file, tmp_path):
    from typer.testing import CliRunner

    from hypersort_ray.cli import app

    out = tmp_path / "cli_mask.nii.gz"
    res = CliRunner().invoke(
        app, ["predict", "--model", str(run_dir), "--image", str(image_file), "--out", str(out), "--style", "main"]
    )
    assert res.exit_code == 0, res.output
    r = _post(client, image_file.read_bytes(), data={"style": "main"})
    assert r.status_code == 200, r.text
    served, affine = _mask(r.content)
    cli = nib.load(str(out))
    np.testing.assert_array_equal(served, np.asarray(cli.dataobj))
    np.testing.assert_allclose(affine, cli.affine, atol=1e-5)


def test_segment_default_style_is_main_and_plain_nii(client, model, tmp_path):
    payload = _nifti(_image(seed=3), compress=False)
    r = _post(client, payload, filename="plain.nii")
    assert r.status_code == 200, r.text
    assert r.headers["x-style"] == "main"
    mask, _ = _mask(r.content)
    np.testing.assert_array_equal(mask, _expected(model, payload, tmp_path, style="main"))


def test_main_cluster_id_is_an_alias_of_main(client, model):
    main_cluster = next((k for k, v in getattr(model, "aliases", {}).items() if v == "main"), None)
    if main_cluster is None:
        pytest.skip("the fixture model has no alias for main")
    r = _post(client, _nifti(_image(seed=6)), data={"style": main_cluster}, params={"format": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["style"] == "main"


def test_segment_trailing_singleton_axis_keeps_input_shape(client):
    data = _image(seed=4)[..., None]
    r = _post(client, _nifti(data))
    assert r.status_code == 200, r.text
    mask, _ = _mask(r.content)
    assert mask.shape == (*SHAPE, 1)


def test_segment_latent_json(client, model, tmp_path):
    payload = _nifti(_image(seed=1))
    style = model.styles[1]
    latent = json.dumps(list(style.latent))
    r = _post(client, payload, data={"latent": latent}, params={"format": "json", "include_mask": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["style"] == "latent" and body["latent"] == pytest.approx(list(style.latent))
    assert body["shape"] == list(SHAPE)
    mask, _ = _mask(base64.b64decode(body["mask_base64"]))
    expected = _expected(model, payload, tmp_path, latent=list(style.latent))
    np.testing.assert_array_equal(mask, expected)
    voxel_ml = abs(np.linalg.det(_affine()[:3, :3])) / 1000
    assert body["foreground_voxels"] == int((expected > 0).sum())
    assert body["volume_ml"] == pytest.approx(body["foreground_voxels"] * voxel_ml, rel=1e-5)
    assert sum(body["class_voxels"].values()) == int(np.prod(SHAPE))
    # that latent is a style's centroid: asking for the style gives the same mask
    r1 = _post(client, payload, data={"style": style.id}, params={"format": "json"})
    assert r1.json()["foreground_voxels"] == body["foreground_voxels"] and r1.json()["mask_base64"] is None
    assert r1.json()["style"] == style.id


def test_segment_styles_zip(client, model, image_file):
    r = _post(client, image_file.read_bytes(), route="/v1/segment/styles", filename=image_file.name)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    ids = _style_ids(model)
    assert r.headers["x-styles"] == ",".join(ids)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = sorted(zf.namelist())
        assert names == sorted([f"case_007_style-{i}.nii.gz" for i in ids] + ["manifest.json"])
        manifest = json.loads(zf.read("manifest.json"))
        for style in ids:
            mask, affine = _mask(zf.read(f"case_007_style-{style}.nii.gz"))
            np.testing.assert_array_equal(mask, model.predict(image_file, style=style)["mask"])
            np.testing.assert_allclose(affine, _affine(), atol=1e-5)
    assert [m["style"] for m in manifest] == ids


def test_segment_styles_nifti4d_and_json(client, model, image_file):
    r = _post(client, image_file.read_bytes(), route="/v1/segment/styles", params={"format": "nifti4d"})
    assert r.status_code == 200, r.text
    stacked, affine = _mask(r.content)
    assert stacked.shape == (*SHAPE, len(model.styles))
    for i, style in enumerate(r.headers["x-styles"].split(",")):
        np.testing.assert_array_equal(stacked[..., i], model.predict(image_file, style=style)["mask"])
    r = _post(client, image_file.read_bytes(), route="/v1/segment/styles", params={"format": "json"})
    assert r.status_code == 200
    assert [x["style"] for x in r.json()["results"]] == _style_ids(model)


# ------------------------------------------------------------------------------------ bad inputs
def _header_claiming(shape, datatype=16) -> bytes:
    """A syntactically valid NIfTI-1 header whose dims say ``shape``; no voxel data follows."""
    raw = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes()[:352])
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    raw[40:56] = struct.pack("<8h", *dims)
    raw[70:72] = struct.pack("<h", datatype)
    return bytes(raw)


def _bomb_for_small_header(mib: int) -> bytes:
    """A legal 16³ uint8 volume followed by ``mib`` MiB of zeros inside the same gzip stream."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [comp.compress(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)).to_bytes())]
    block = b"\x00" * 2**20
    parts += [comp.compress(block) for _ in range(mib)]
    parts.append(comp.flush())
    return b"".join(parts)


def _nan_image() -> bytes:
    data = _image().astype(np.float32)
    data[3, 4, 5] = np.nan
    return _nifti(data)


BAD_INPUTS = [
    # (id, payload builder, form data, expected status, words the detail must contain)
    ("text-file", lambda: b"this is not an image at all\n" * 20, {}, 400, "not a NIfTI"),
    ("corrupt-gzip", lambda: b"\x1f\x8b\x08\x00" + os.urandom(400), {}, 400, "gzip"),
    ("truncated", lambda: _nifti(_image().astype(np.float32), compress=False)[:5000], {}, 400, "truncated"),
    ("two-dimensional", lambda: _nifti(_image()[:, :, 0]), {}, 422, "3D"),
    ("two-channels", lambda: _nifti(np.stack([_image(), _image()], axis=-1)), {}, 422, "channels"),
    ("nan-voxels", _nan_image, {}, 422, "NaN"),
    ("latent-too-short", lambda: _nifti(_image()), {"latent": "[0.1]"}, 422, "latent_dim"),
    ("latent-nan", lambda: _nifti(_image()), {"latent": "[NaN, 0.1]"}, 422, "NaN"),
    ("latent-not-numbers", lambda: _nifti(_image()), {"latent": "[\"a\", 1]"}, 422, "not a number"),
    ("style-and-latent", lambda: _nifti(_image()), {"style": "1", "latent": "[0, 0]"}, 422, "either"),
    ("unknown-style", lambda: _nifti(_image()), {"style": "42"}, 404, "unknown style"),
    ("body-too-large", lambda: os.urandom(int(MAX_BODY_MB * 2**20) + 4096), {}, 413, "max_body_mb"),
    ("too-many-voxels", lambda: gzip.compress(_header_claiming((64, 64, 64))), {}, 413, "voxels"),
    ("bomb-lying-header", lambda: gzip.compress(_header_claiming((512, 512, 512)) + b"\0" * 2**20), {}, 413, "voxels"),
    # 10³ at 8 mm is 37³ at 2 mm (MONAI's grid: (10 - 1) · 8 / 2 + 1), over MAX_VOXELS = 30³
    ("coarse-voxels", lambda: _nifti(_image((10, 10, 10)), affine=np.diag([8.0, 8.0, 8.0, 1.0])), {}, 413, "spacing"),
    ("complex-datatype", lambda: _header_claiming((8, 8, 8), datatype=32), {}, 422, "complex"),
    ("empty-file", lambda: b"", {}, 400, "empty"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(client, case):
    _, build, data, status, words = case
    t0 = time.perf_counter()
    r = _post(client, build(), data=data)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words.lower() in str(detail).lower(), detail
    assert time.perf_counter() - t0 < 30
    assert client.get("/healthz").status_code == 200


def test_gzip_bomb_is_decoded_only_to_the_declared_size(client):
    bomb = _bomb_for_small_header(256)  # 256 MiB of zeros in ~250 KiB, under max_body_mb
    assert len(bomb) < MAX_BODY_MB * 2**20
    t0 = time.perf_counter()
    r = _post(client, bomb)
    # the header is legal (16³): only header + 4 KiB of voxels are inflated, the rest never is
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t0 < 20
    assert _mask(r.content)[0].shape == (16, 16, 16)


def test_missing_file_and_no_server_paths(client):
    # No input names a server-side path: a "path" field is ignored and the upload is required.
    r = client.post("/v1/segment", data={"path": "/etc/passwd", "style": "main"}, headers=AUTH)
    assert r.status_code == 415  # not multipart: refused before any parser reads it
    r = client.post("/v1/segment", files={"path": (None, "/etc/passwd"), "style": (None, "main")}, headers=AUTH)
    assert r.status_code == 422
    assert "file" in r.json()["detail"]
    spec = client.get("/openapi.json").json()
    for route, expected in (
        ("/v1/segment", {"format", "include_mask", "file", "style", "latent"}),
        ("/v1/segment/styles", {"format", "file", "styles"}),
    ):
        op = spec["paths"][route]["post"]
        names = {p["name"] for p in op.get("parameters", [])}
        ref = op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
        names |= set(spec["components"]["schemas"][ref]["properties"])
        assert names == expected, route


def test_filename_is_sanitised(client):
    r = _post(client, _nifti(_image()), filename='../../etc/"evil"\r\n.nii.gz')
    assert r.status_code == 200, r.text
    disposition = r.headers["content-disposition"]
    assert "/" not in disposition.split("filename=")[1] and "\r" not in disposition


def test_still_serving_after_bad_inputs(client, model, tmp_path):
    payload = _nifti(_image(seed=9))
    r = _post(client, payload, data={"style": "main"})
    assert r.status_code == 200
    np.testing.assert_array_equal(_mask(r.content)[0], _expected(model, payload, tmp_path, style="main"))


# ----------------------------------------------------------------------------------- concurrency
def test_concurrent_mixed_styles(server, model, tmp_path):
    """40 requests, 8 in flight, mixed styles/latents: no errors, right masks; /healthz stays quick."""
    payload = _nifti(_image(seed=5))
    choices = [{"style": s} for s in _style_ids(model)] + [{"latent": "[0.3, 0.2]"}, {}]
    expected = {i: _expected(model, payload, tmp_path, **_as_kwargs(c)) for i, c in enumerate(choices)}
    health_times: list[float] = []
    stop = threading.Event()

    def poll_health():
        with httpx.Client(base_url=server, timeout=30.0) as c:
            while not stop.is_set() and len(health_times) < 200:
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                health_times.append(time.perf_counter() - t0)
                stop.wait(0.2)

    def one(i: int):
        with httpx.Client(base_url=server, timeout=60.0) as c:
            k = i % len(choices)
            r = _post(c, payload, data=choices[k])
            return k, r.status_code, r.content

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(40)))
    finally:
        stop.set()
        poller.join(timeout=30)
    assert [s for _, s, _ in results] == [200] * 40
    for k, _, content in results:
        np.testing.assert_array_equal(_mask(content)[0], expected[k])
    assert health_times, "the health poller never ran"
    assert max(health_times) < 5.0, f"/healthz took {max(health_times):.2f}s under load"


def _as_kwargs(choice: dict) -> dict:
    if "latent" in choice:
        return {"latent": json.loads(choice["latent"])}
    return {"style": choice.get("style", "main")}


# -------------------------------------------------------------------------------------------- auth
def test_auth_required(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.get("/v1/styles", headers=headers)
        assert r.status_code == 401
        assert "token" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    r = _post(client, _nifti(_image()), headers={})
    assert r.status_code == 401
    # An unauthenticated upload is refused before its body is parsed, whatever its size.
    r = _post(client, os.urandom(int(MAX_BODY_MB * 2**20) + 1), headers={})
    assert r.status_code == 401


def test_auth_off_second_app(server, run_dir):
    """A second application whose token variable is unset, explicitly insecure: no auth needed."""
    from ray import serve

    from hypersort_ray.serve.app import build_application

    settings = _settings(run_dir, auth_token_env="HYPERSORT_SERVE_TEST_UNSET_VAR", insecure_no_auth=True)
    assert "HYPERSORT_SERVE_TEST_UNSET_VAR" not in os.environ
    serve.run(build_application(settings), name="open", route_prefix="/open", blocking=False)
    try:
        with httpx.Client(base_url=server, timeout=60.0) as c:
            r = c.get("/open/v1/styles")
            assert r.status_code == 200, r.text
            r = _post(c, _nifti(_image()), route="/open/v1/segment", headers={}, params={"format": "json"})
            assert r.status_code == 200, r.text
            assert c.get("/v1/styles").status_code == 401  # the first app still wants its token
    finally:
        serve.delete("open")


# ---------------------------------------------------------------------------------- config files
def test_serve_config_file_builds(run_dir):
    """deployments/serve_config.yaml is a valid Serve config whose args Serve validates with BuildArgs."""
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder
    from ray.serve.schema import ServeDeploySchema

    from hypersort_ray.serve.app import build_app

    cfg = yaml.safe_load((REPO / "deployments" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    assert cfg["http_options"]["host"] == "127.0.0.1"
    assert cfg["http_options"]["request_timeout_s"] > 0
    (application,) = cfg["applications"]
    assert application["import_path"] == "hypersort_ray.serve.app:build_app"
    built = call_builder(build_app, dict(application["args"], model=str(run_dir)))  # what `serve run` does
    assert type(built).__name__ == "Application"
    with pytest.raises(ValidationError, match="max_replica"):
        call_builder(build_app, dict(application["args"], max_replica=3))


def test_rayservice_manifest_embeds_the_same_app():
    docs = list(yaml.safe_load_all((REPO / "deployments" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d and d.get("kind") == "RayService")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_cfg["applications"]
    assert application["import_path"] == "hypersort_ray.serve.app:build_app"
    from hypersort_ray.serve.schemas import BuildArgs

    BuildArgs.model_validate(application["args"])
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve.app import proxy_environment

    pod_env = {e["name"]: e.get("value") for e in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
               ["spec"]["containers"][0]["env"]}
    assert set(proxy_environment(ServeSettings())) <= set(pod_env)  # every proxy setting reaches the pods


def test_deployment_options_from_settings(run_dir):
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.errors import ConfigError
    from hypersort_ray.serve.app import build_application, deployment_options

    fixed = deployment_options(ServeSettings(model="m", num_replicas=3, max_ongoing_requests=5, num_cpus=2))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 5
    assert {k: fixed["ray_actor_options"][k] for k in ("num_cpus", "num_gpus")} == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert fixed["max_queued_requests"] == 32
    auto = deployment_options(ServeSettings(model="m", num_replicas="auto", min_replicas=0, max_replicas=6, num_gpus=1))
    assert auto["num_replicas"] is None
    assert auto["autoscaling_config"]["min_replicas"] == 0 and auto["autoscaling_config"]["max_replicas"] == 6
    assert auto["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ConfigError, match="min_replicas"):
        deployment_options(ServeSettings(model="m", num_replicas="auto", min_replicas=5, max_replicas=2))
    with pytest.raises(ConfigError, match="model"):
        build_application(ServeSettings())
    app = build_application(ServeSettings(model=str(run_dir), num_replicas="auto"))
    assert type(app).__name__ == "Application"


def test_request_timeout_reaches_the_proxy(server):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    assert details["http_options"]["request_timeout_s"] == 60
    assert details["http_options"]["host"] == "127.0.0.1"
