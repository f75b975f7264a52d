"""The segmentation endpoint: a Ray Serve deployment with a FastAPI ingress.

Routes (OpenAPI at ``/docs``):

* ``POST /v1/segment`` -- multipart ``file`` (``.nii``/``.nii.gz``) + ``style`` (``main`` or a style id)
  or ``latent`` (``[0.1, -0.3]``). Returns the mask as ``.nii.gz`` with the input's affine and shape
  (headers ``X-Style``, ``X-Foreground-Voxels``, ``X-Model-Version``, ``X-Inference-Ms``), or with
  ``?format=json`` a summary (``&include_mask=true`` adds the mask as base64).
* ``POST /v1/segment/styles`` -- one mask per style (the paper's "best of N" for a human to pick): a zip
  of ``.nii.gz`` files, ``?format=nifti4d`` for one volume with the styles along the last axis, or
  ``?format=json``.
* ``GET /v1/styles``, ``GET /v1/model``, ``GET /healthz`` (always open, no auth).

Design:

* The model is loaded once per replica with :func:`hypersort_ray.inference.load_model`; the UNet of each
  latent is generated once and kept in the model's LRU (``style_cache_size``; 0 disables it).
* Inference runs in the replica's own thread pool (one thread per whole CPU of the replica, one on a
  GPU), never on the event loop, so ``/healthz`` and the ``/v1/styles`` metadata routes answer while
  volumes are being segmented. ``max_ongoing_requests`` bounds what a replica accepts.
* No ``@serve.batch``: requests carry different volumes (shapes) and often different latents, and a
  sliding-window pass already batches windows (per-window cost is flat from a batch of 2 on); measured
  on CPU, stacking 4 same-style 64³ volumes into one pass was slower (0.63-0.66x) than one by one
  (``benchmarks/serve.py --probe-batching``; deployments/README.md).
* Every upload is validated by :mod:`hypersort_ray.serve.validation` before model code runs; the body
  size and the bearer token are checked by :class:`RequestGuardMiddleware` before the multipart parser
  reads anything.

Entry points: :func:`run_server` (``hypersort serve``), :func:`build_app` (Serve config files:
``import_path: hypersort_ray.serve.app:build_app``), :func:`build_application` (a bound application for
``serve.run``).
"""

# No `from __future__ import annotations` here: Serve pickles the FastAPI app by value, and FastAPI
# then cannot rebuild the multipart body model from string annotations (/openapi.json answers 500).
import asyncio
import base64
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from hypersort_ray.config import ServeSettings
from hypersort_ray.errors import ConfigError, HypersortError
from hypersort_ray.serve.middleware import GuardSettings, RequestGuardMiddleware
from hypersort_ray.serve.results import describe_model, encode_mask, header_value, zip_masks
from hypersort_ray.serve.schemas import (
    BuildArgs,
    CacheStats,
    ConfigSummary,
    ErrorResponse,
    HealthResponse,
    ModelResponse,
    SegmentSummary,
    StyleInfo,
    StylesResponse,
    StylesSummary,
)
from hypersort_ray.serve.validation import (
    DecodedVolume,
    RequestError,
    bearer_token_ok,
    check_resampled_size,
    decode_nifti,
    parse_latent_field,
    read_nifti_header,
    safe_stem,
    voxel_volume_ml,
)

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "HyperSortSegmenter", "build_app", "build_application", "run_server"]

logger = logging.getLogger("hypersort_ray.serve")

APP_NAME = "hypersort"
DEPLOYMENT_NAME = "HyperSortSegmenter"
# Paths any client may call without a token: liveness and the API description.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
NIFTI_GZ = "application/gzip"

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Not a NIfTI file, or corrupt/truncated data."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when auth is on)."},
    404: {"model": ErrorResponse, "description": "Unknown style."},
    413: {"model": ErrorResponse, "description": "Body over max_body_mb or volume over max_voxels."},
    422: {"model": ErrorResponse, "description": "Wrong dimensionality/channels, NaN, or a bad latent."},
}


# ----------------------------------------------------------------------------------- guard
def _replica_guard() -> GuardSettings | None:
    """The serving replica's limits (the app object is a pickled copy, so ask the replica context)."""
    try:
        replica = serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - outside a replica (e.g. a plain TestClient): route checks still apply
        return None
    return getattr(replica, "guard", None)


# ------------------------------------------------------------------------------------- app
api = FastAPI(
    title="HyperSORT segmentation",
    version="1",
    description=(
        "Latent-conditioned segmentation with a HyperSORT hyper-network: pick an annotation style "
        "(`main` = λ 0, or a discovered style) or an explicit latent, upload a NIfTI, get the mask. "
        "When the server has a token configured, send `Authorization: Bearer <token>`."
    ),
)
api.add_middleware(RequestGuardMiddleware, settings=_replica_guard, open_paths=OPEN_PATHS)
_bearer = HTTPBearer(auto_error=False, description="Required when the server sets a token.")


@api.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


@dataclass
class _Inputs:
    """A validated segmentation request, ready for the worker thread."""

    payload: bytes
    filename: str
    style: str | None
    latent: tuple[float, ...] | None


@serve.deployment(
    name=DEPLOYMENT_NAME,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    # A model that cannot load (bad URI, wrong weights) fails the deployment quickly instead of
    # retrying for minutes; the error names the model.
    max_constructor_retry_count=3,
)
@serve.ingress(api)
class HyperSortSegmenter:
    """One replica: a loaded model, its UNet cache and a small inference thread pool.

    Args:
        settings: :class:`ServeSettings` (or its dict); ``model`` must be set.
    """

    def __init__(self, settings: ServeSettings | dict[str, Any]):
        import torch

        from hypersort_ray.inference import load_model

        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        if not s.model:
            raise ConfigError("serve: no model given (--model RUN_DIR|MODEL_URI)")
        use_gpu = s.num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise ConfigError(f"serve: num_gpus = {s.num_gpus} but this replica sees no CUDA device")
        device = "cuda" if use_gpu else "cpu"
        cpus = max(1, int(s.num_cpus))
        # CPU replicas run one inference per CPU, each single-threaded (throughput under load beats
        # intra-op threads); a GPU replica runs one at a time and gives torch the CPUs for pre/post.
        workers = 1 if use_gpu else cpus
        torch.set_num_threads(cpus if use_gpu else 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hypersort-infer")
        self.model = load_model(s.model, device=device, cache_size=s.style_cache_size)
        self.identity = describe_model(self.model)
        token = os.environ.get(s.auth_token_env, "") if s.auth_token_env else ""
        self.guard = GuardSettings(max_body_bytes=int(s.max_body_mb * 2**20), token=token or None)
        self._voxel_limit = s.max_voxels
        self._warm_up()
        logger.info(
            "hypersort replica ready: model %s (%s), device %s, %d inference thread(s), auth %s",
            self.identity["model_version"], s.model, device, workers, "on" if self.guard.token else "off",
        )

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ helpers
    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Route-level check too (the middleware already ran): a misrouted request still needs the token."""
        token = self.guard.token
        if not token:
            return
        header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
        if not bearer_token_ok(header, token):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _read_inputs(self, file: UploadFile, style: str | None, latent: str | None) -> _Inputs:
        style = style.strip() if style else None
        latent_values = parse_latent_field(latent, self.model.latent_dim)
        if style and latent_values is not None:
            raise RequestError(422, "give either a style or a latent, not both")
        if style:
            self._style(style)
        payload = await file.read()
        # Header only (for gzip: only the header is decompressed): 400/413/422 before any real work.
        read_nifti_header(payload, max_voxels=self._voxel_limit)
        return _Inputs(payload, file.filename or "image.nii.gz", style, latent_values)

    def _style(self, style_id: str):
        """The model's style (its own ids and aliases, e.g. the main cluster's id), else 404."""
        try:
            return self.model.style(style_id)
        except HypersortError as exc:
            raise RequestError(404, str(exc)) from None

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except (RequestError, HTTPException):
            raise
        except HypersortError as exc:
            raise RequestError(422, str(exc)) from None
        except Exception as exc:
            logger.exception("inference failed")
            raise HTTPException(500, f"inference failed: {type(exc).__name__}: {exc}"[:300]) from None

    def _decode(self, payload: bytes) -> DecodedVolume:
        volume = decode_nifti(payload, max_voxels=self._voxel_limit, spatial_dims=self.model.spatial_dims)
        spacing = self.model.config.preprocessing.spacing
        check_resampled_size(volume.array.shape, volume.affine, spacing, self._voxel_limit)
        return volume

    def _prepare(self, volume: DecodedVolume) -> tuple[Any, float]:
        """Preprocess once (a request for every style reuses it); returns (prepared, milliseconds)."""
        t0 = time.perf_counter()
        prepared = self.model.prepare(volume.array, volume.affine)
        return prepared, (time.perf_counter() - t0) * 1000.0

    def _predict(self, volume: DecodedVolume, prepared: Any, style: str | None, latent: tuple[float, ...] | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = self.model.predict(
            prepared, style=style if latent is None else None, latent=list(latent) if latent is not None else None
        )
        result["inference_ms"] = (time.perf_counter() - t0) * 1000.0
        mask = np.asarray(result["mask"])
        if mask.shape != volume.array.shape:
            raise RuntimeError(f"model returned a mask of shape {mask.shape} for an image of shape {volume.array.shape}")
        result["mask"] = mask.astype(np.uint8, copy=False).reshape(volume.shape)
        return result

    def _warm_up(self) -> None:
        """One tiny prediction: pays the one-off imports (MONAI, SciPy: ~10 s) and builds the main UNet."""
        roi = tuple(int(r) for r in self.model.config.preprocessing.roi_size)
        image = np.random.default_rng(0).random(roi, dtype=np.float32)
        self.model.predict(image, style=self.model.styles[0].id)

    def _summary(self, volume: DecodedVolume, result: dict[str, Any], include_mask: bool) -> SegmentSummary:
        mask = result["mask"]
        labels, counts = np.unique(mask, return_counts=True)
        class_voxels = {str(int(k)): int(v) for k, v in zip(labels, counts, strict=True)}
        fg = int(mask.size - class_voxels.get("0", 0))
        vml = voxel_volume_ml(volume.affine, self.model.spatial_dims)
        return SegmentSummary(
            style=str(result["style"]),
            latent=[float(v) for v in result["latent"]],
            shape=list(mask.shape),
            foreground_voxels=fg,
            volume_ml=fg * vml,
            voxel_volume_ml=vml,
            class_voxels=class_voxels,
            model_version=self.identity["model_version"],
            inference_ms=round(float(result["inference_ms"]), 3),
            mask_base64=base64.b64encode(encode_mask(mask, volume)).decode() if include_mask else None,
        )

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"X-Model-Version": header_value(self.identity["model_version"])}
        headers.update({k: header_value(v) for k, v in extra.items()})
        return headers

    # ------------------------------------------------------------------------------- routes
    @api.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz(self) -> HealthResponse:
        """Liveness: answers while inference is running (never behind a token)."""
        return HealthResponse(model_loaded=self.model is not None, model_version=self.identity["model_version"])

    @api.get("/v1/styles", response_model=StylesResponse, tags=["model"], responses={401: _ERRORS[401]})
    async def styles(self, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> StylesResponse:
        """The annotation styles this model knows: ids, cluster sizes, centroids; ``main`` is λ = 0."""
        self._authorize(credentials)
        main = self.model.styles[0]
        return StylesResponse(
            main_style=main.id,
            latent_dim=self.model.latent_dim,
            styles=[
                StyleInfo(id=s.id, name=s.name, size=s.size, centroid=list(s.latent), is_main=s.id == main.id)
                for s in self.model.styles
            ],
        )

    @api.get("/v1/model", response_model=ModelResponse, tags=["model"], responses={401: _ERRORS[401]})
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> ModelResponse:
        """Which model answers: registry name/version, source, latent size, network and preprocessing."""
        self._authorize(credentials)
        cfg = self.model.config
        pre = cfg.preprocessing
        return ModelResponse(
            registry_name=self.identity["registry_name"],
            registry_version=self.identity["registry_version"],
            model_version=self.identity["model_version"],
            source=self.identity["source"],
            latent_dim=self.model.latent_dim,
            spatial_dims=self.model.spatial_dims,
            num_styles=len(self.model.styles),
            config=ConfigSummary(
                network=cfg.model.unet.model_dump(mode="json"),
                hypernet=cfg.model.hypernet.model_dump(mode="json"),
                roi_size=list(pre.roi_size),
                spacing=list(pre.spacing) if pre.spacing is not None else None,
                orientation=pre.orientation,
                num_classes=cfg.model.unet.out_channels,
            ),
            cache=CacheStats(
                capacity=self.model.cache_size, hits=self.model.cache_hits, misses=self.model.cache_misses
            ),
            info=json.loads(json.dumps(self.model.info, default=str)),
        )

    @api.post(
        "/v1/segment",
        tags=["segment"],
        response_model=SegmentSummary,
        responses={
            200: {
                "description": "The mask as .nii.gz (default) or, with format=json, a summary.",
                "content": {NIFTI_GZ: {"schema": {"type": "string", "format": "binary"}}},
            },
            **_ERRORS,
        },
    )
    async def segment(
        self,
        file: UploadFile = File(..., description="The image: .nii or .nii.gz, single channel."),
        style: str | None = Form(None, description="`main` or a style id from /v1/styles."),
        latent: str | None = Form(None, description="An explicit latent as a JSON list, e.g. [0.1, -0.3]."),
        fmt: Literal["nifti", "json"] = Query("nifti", alias="format", description="nifti (.nii.gz) or json."),
        include_mask: bool = Query(False, description="format=json: add the mask as base64 .nii.gz."),
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
    ):
        """Segment one volume with the UNet of a style (default ``main``) or of an explicit latent."""
        self._authorize(credentials)
        inputs = await self._read_inputs(file, style, latent)

        def work():
            volume = self._decode(inputs.payload)
            prepared, prep_ms = self._prepare(volume)
            result = self._predict(volume, prepared, inputs.style or "main", inputs.latent)
            result["inference_ms"] += prep_ms
            if fmt == "json":
                return self._summary(volume, result, include_mask)
            return result, encode_mask(result["mask"], volume)

        out = await self._in_pool(work)
        if fmt == "json":
            return out
        result, blob = out
        return Response(
            blob,
            media_type=NIFTI_GZ,
            headers=self._headers(
                **{
                    "Content-Disposition": f'attachment; filename="{safe_stem(inputs.filename)}_mask.nii.gz"',
                    "X-Style": str(result["style"]),
                    "X-Latent": ",".join(f"{v:.6g}" for v in result["latent"]),
                    "X-Foreground-Voxels": str(int(np.count_nonzero(result["mask"]))),
                    "X-Inference-Ms": f"{result['inference_ms']:.1f}",
                }
            ),
        )

    @api.post(
        "/v1/segment/styles",
        tags=["segment"],
        response_model=StylesSummary,
        responses={
            200: {
                "description": "zip of one .nii.gz per style (default), one NIfTI with the styles along the "
                "last axis (format=nifti4d, order in X-Styles), or a JSON summary (format=json).",
                "content": {
                    "application/zip": {"schema": {"type": "string", "format": "binary"}},
                    NIFTI_GZ: {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_ERRORS,
        },
    )
    async def segment_styles(
        self,
        file: UploadFile = File(..., description="The image: .nii or .nii.gz, single channel."),
        fmt: Literal["zip", "nifti4d", "json"] = Query("zip", alias="format"),
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
    ):
        """One mask per style, for a human to pick the best (the paper's human-in-the-loop use)."""
        self._authorize(credentials)
        inputs = await self._read_inputs(file, None, None)
        stem = safe_stem(inputs.filename)

        def work():
            volume = self._decode(inputs.payload)
            prepared, prep_ms = self._prepare(volume)
            results = [self._predict(volume, prepared, s.id, None) for s in self.model.styles]
            total_ms = prep_ms + sum(r["inference_ms"] for r in results)
            if fmt == "json":
                summaries = [self._summary(volume, r, False) for r in results]
                return StylesSummary(
                    model_version=self.identity["model_version"], inference_ms=round(total_ms, 3), results=summaries
                )
            if fmt == "nifti4d":
                spatial = volume.array.shape
                stacked = np.stack([r["mask"].reshape(spatial) for r in results], axis=-1)
                return results, total_ms, encode_mask(stacked, volume, shape=stacked.shape)
            return results, total_ms, zip_masks(stem, volume, results, self._summary)

        out = await self._in_pool(work)
        if fmt == "json":
            return out
        results, total_ms, blob = out
        ids = ",".join(str(r["style"]) for r in results)
        if fmt == "nifti4d":
            media, name = NIFTI_GZ, f"{stem}_styles.nii.gz"
        else:
            media, name = "application/zip", f"{stem}_styles.zip"
        return Response(
            blob,
            media_type=media,
            headers=self._headers(
                **{
                    "Content-Disposition": f'attachment; filename="{name}"',
                    "X-Styles": ids,
                    "X-Inference-Ms": f"{total_ms:.1f}",
                }
            ),
        )


# --------------------------------------------------------------------------- building
def deployment_options(settings: ServeSettings) -> dict[str, Any]:
    """Replicas/autoscaling, request concurrency and resources for :class:`HyperSortSegmenter`."""
    s = settings
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }
    if s.num_replicas == "auto":
        if s.min_replicas > s.max_replicas:
            raise ConfigError(f"serve: min_replicas ({s.min_replicas}) is above max_replicas ({s.max_replicas})")
        options["num_replicas"] = None
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            # A replica works on about one volume per CPU; scale out once requests queue behind them.
            "target_ongoing_requests": max(1, int(s.num_cpus)) * 2,
        }
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build_application(settings: ServeSettings):
    """The bound Serve application for ``settings`` (``serve.run(build_application(s))``)."""
    if not settings.model:
        raise ConfigError("serve: no model given (--model RUN_DIR|MODEL_URI)")
    return HyperSortSegmenter.options(**deployment_options(settings)).bind(settings.model_dump(mode="json"))


def build_app(args: BuildArgs):
    """Application builder for Serve config files (``import_path: hypersort_ray.serve.app:build_app``).

    Serve validates ``args`` against :class:`BuildArgs` (ServeSettings minus host/port, which live under
    ``http_options``).
    """
    if isinstance(args, dict):  # called directly rather than by Serve
        args = BuildArgs.model_validate(args)
    return build_application(ServeSettings.model_validate(args.model_dump()))


def http_options(settings: ServeSettings) -> dict[str, Any]:
    return {"host": settings.host, "port": settings.port, "request_timeout_s": settings.request_timeout_s}


def run_server(settings: ServeSettings, address: str | None = None, *, block: bool = True) -> str:
    """Deploy the endpoint and (by default) serve until Ctrl-C or SIGTERM; returns the URL.

    Starts a local Ray instance unless ``address`` names a cluster. At exit, a local Ray started here is
    shut down with Serve; on a cluster only this application is deleted.

    Args:
        settings: the serve settings (``model`` required).
        address: Ray cluster address (``auto``, ``ray://host:10001``); None starts a local Ray.
        block: wait for a signal (the CLI); False returns once the app is running (tests, notebooks).
    """
    import ray

    if not settings.model:
        raise ConfigError("serve: --model is required (a run folder or models:/NAME@ALIAS)")
    _check_local_model(settings.model)
    started_ray = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        ray.init(address=address)
    url_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{url_host}:{settings.port}"
    restore = _raise_on_signals() if block else {}
    try:
        serve.start(http_options=http_options(settings))
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        auth = os.environ.get(settings.auth_token_env or "", "")
        print(f"HyperSORT endpoint for {settings.model} at {url}  (API docs: {url}/docs)", flush=True)
        print(f"auth: {'bearer token from $' + str(settings.auth_token_env) if auth else 'off'}; "
              "Ctrl-C stops it", file=sys.stderr, flush=True)
        if not block:
            return url
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr, flush=True)
    except BaseException:
        _stop(started_ray)
        raise
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    _stop(started_ray)
    return url


def _raise_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM (``docker stop``, Kubernetes) both end the blocking wait with a clean shutdown.

    A background process started by a non-interactive shell ignores SIGINT; this turns it back on.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, interrupt)
    return previous


def _check_local_model(ref: str) -> None:
    if "://" in ref or ref.startswith(("models:/", "runs:/")):
        return
    if not Path(ref).exists():
        raise ConfigError(f"serve: --model {ref}: no such run folder or model folder")


def _stop(started_ray: bool) -> None:
    """Shut Serve and Ray down when this process started Ray; else remove only our application."""
    import ray

    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        if started_ray:
            ray.shutdown()
