"""The segmentation endpoint: a Ray Serve deployment with a FastAPI ingress.

Routes (OpenAPI at ``/openapi.json``; the Swagger page at ``/docs`` only with ``api_docs: true``):

* ``POST /v1/segment`` -- multipart ``file`` (``.nii``/``.nii.gz``) + ``style`` (``main`` or a style id)
  or ``latent`` (``[0.1, -0.3]``). Returns the mask as ``.nii.gz`` with the input's affine and shape
  (headers ``X-Style``, ``X-Foreground-Voxels``, ``X-Model-Version``, ``X-Inference-Ms``), or with
  ``?format=json`` a summary (``&include_mask=true`` adds the mask as base64).
* ``POST /v1/segment/styles`` -- one mask per style (the paper's "best of N" for a human to pick), at most
  ``max_styles_per_request`` (choose them with the ``styles`` field): a zip of ``.nii.gz`` files,
  ``?format=nifti4d`` for one volume with the styles along the last axis, or ``?format=json``.
* ``GET /v1/styles``, ``GET /v1/model``, ``GET /healthz`` (always open, no auth, says nothing about the model).

Design:

* The model is loaded once per replica with :func:`hypersort_ray.inference.load_model`; the UNet of each
  latent is generated once and kept in the model's LRU (``style_cache_size``; 0 disables it).
* Nothing heavy runs on the event loop: the header checks run in a one-thread parse pool, decoding and
  inference in the replica's inference pool (one thread per whole CPU of the replica, one on a GPU), so
  ``/healthz`` and the metadata routes answer while volumes are being segmented or floods are refused.
* Every request has a deadline (``request_timeout_s``) that reaches its inference thread, and a client
  that leaves cancels its work: :mod:`hypersort_ray.serve.deadline` stops the sliding window at its next
  window. ``max_ongoing_requests`` and ``max_queued_requests`` bound what piles up.
* No ``@serve.batch``: requests carry different volumes (shapes) and often different latents, and a
  sliding-window pass already batches windows (``benchmarks/serve.py --probe-batching``).
* Every upload is checked by :mod:`hypersort_ray.serve.validation` before model code runs; Host, Origin,
  token and body size by :class:`~hypersort_ray.serve.middleware.RequestGuardMiddleware` before the
  multipart parser reads anything. Every error is one JSON shape with the request id
  (:mod:`hypersort_ray.serve.wire`); details go to the server log under that id.

* A deployment of ``models:/NAME@ALIAS`` follows the alias (:mod:`hypersort_ray.serve.follow`): a new
  version is loaded and warmed up beside the old one, then swapped in; each request uses the model it
  started with, and ``X-Model-Version`` / ``/v1/model`` name the version that answered.
* Every request is timed stage by stage and handed to :mod:`hypersort_ray.serve.telemetry`, which logs
  MLflow traces and the deployment's serving-run metrics from a background thread (never image data,
  file names or anything that identifies a patient; a dead tracking server never delays a request).

Entry points: :func:`run_server` (``hypersort serve``), :func:`build_app` (Serve config files:
``import_path: hypersort_ray.serve.app:build_app``), :func:`build_application` (a bound application for
``serve.run``).
"""

# No `from __future__ import annotations` here: Serve pickles the FastAPI app by value, and FastAPI
# then cannot rebuild the multipart body model from string annotations (/openapi.json answers 500).
import asyncio
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from hypersort_ray.config import ServeSettings
from hypersort_ray.errors import ConfigError, HypersortError
from hypersort_ray.serve.auth import AuthPlan, check_bind, is_loopback, replica_credentials, resolve_auth
from hypersort_ray.serve.deadline import (
    Cancelled,
    CancelToken,
    checkpoint,
    install_forward_hook,
    run_with_token,
)
from hypersort_ray.serve.follow import AliasFollower, parse_alias_uri, resolve_alias
from hypersort_ray.serve.middleware import (
    PROXY_BUFFER_ENV,
    PROXY_CALLBACK,
    PROXY_MAX_BODY_ENV,
    PROXY_UPLOAD_MIN_RATE_ENV,
    PROXY_UPLOAD_TIMEOUT_ENV,
    GuardSettings,
    RequestGuardMiddleware,
)
from hypersort_ray.serve.results import (
    describe_model,
    encode_mask,
    header_value,
    public_info,
    public_source,
    zip_masks,
)
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
from hypersort_ray.serve.telemetry import (
    RequestRecord,
    Telemetry,
    TelemetryConfig,
    model_tags,
    start_serving_run,
)
from hypersort_ray.serve.validation import (
    DecodedVolume,
    RequestError,
    UploadLimits,
    bearer_token_ok,
    check_latent_radius,
    check_upload,
    decode_nifti,
    parse_latent_field,
    plan_for,
    safe_stem,
    voxel_volume_ml,
)
from hypersort_ray.serve.wire import error_body, request_id_from_headers, scrub

__all__ = [
    "APP_NAME",
    "DEPLOYMENT_NAME",
    "HyperSortSegmenter",
    "build_app",
    "build_application",
    "run_server",
    "stop_server",
]

# A child of Serve's logger: in a replica its lines go to the replica's Serve log (logs/serve/replica_*.log
# under Ray's session folder) with Serve's request context; a logger of our own would be silent there.
logger = logging.getLogger("ray.serve.hypersort")

APP_NAME = "hypersort"
DEPLOYMENT_NAME = "HyperSortSegmenter"
# Paths any client may call without a token: liveness and the API description.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})
NIFTI_GZ = "application/gzip"
# Set in the replicas' runtime env unless the deployer chose otherwise: nothing leaves the machine.
PRIVACY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}
# 499: nginx's "client closed request"; nobody reads it, but the log line says what happened.
CLIENT_CLOSED = 499

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Not a NIfTI file, corrupt/truncated data, or a Host not served."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when auth is on)."},
    403: {"model": ErrorResponse, "description": "A cross-origin request from an origin not allowed."},
    404: {"model": ErrorResponse, "description": "Unknown style."},
    413: {"model": ErrorResponse, "description": "Body, voxels (padded, at the model's spacing) or memory over a limit."},
    415: {"model": ErrorResponse, "description": "The body is not multipart/form-data."},
    422: {"model": ErrorResponse, "description": "Wrong dimensionality/channels/datatype, NaN, a bad affine or latent."},
    503: {"model": ErrorResponse, "description": "Too many requests queued (max_queued_requests)."},
    504: {"model": ErrorResponse, "description": "The request's deadline (request_timeout_s) passed."},
}


# ----------------------------------------------------------------------------------- guard
def _replica() -> Any:
    """The serving replica (the app object is a pickled copy, so ask the replica context)."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - outside a replica (e.g. a plain TestClient)
        return None


def _replica_guard() -> GuardSettings | None:
    """The serving replica's guard settings (None outside a replica: the route checks still apply)."""
    return getattr(_replica(), "guard", None)


# ------------------------------------------------------------------------------------- app
api = FastAPI(
    title="HyperSORT segmentation",
    version="1",
    description=(
        "Latent-conditioned segmentation with a HyperSORT hyper-network: pick an annotation style "
        "(`main` = λ 0, or a discovered style) or an explicit latent, upload a NIfTI, get the mask. "
        "When the server has a token configured, send `Authorization: Bearer <token>`. Every error is "
        "`{status, error, detail, request_id}`."
    ),
    docs_url=None,
    redoc_url=None,
)
api.add_middleware(
    RequestGuardMiddleware, settings=_replica_guard, open_paths=OPEN_PATHS, multipart_prefixes=("/v1/segment",)
)
_bearer = HTTPBearer(auto_error=False, description="Required when the server sets a token.")


def request_id_of(request: Request) -> str:
    """The id the guard middleware put on the request (Serve's ``x-request-id``), else from the headers."""
    state_id = getattr(request.state, "request_id", None)
    return str(state_id) if state_id else request_id_from_headers(request.scope.get("headers", []))


def error_response(request: Request, status: int, detail: str, log_detail: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """The one error shape; the log line carries the same request id and whatever ``log_detail`` adds."""
    rid = request_id_of(request)
    level = logging.WARNING if status >= 500 else logging.INFO
    logger.log(level, "request %s: %s %s -> %d %s%s", rid, request.method, request.url.path, status, detail,
               f" | {log_detail}" if log_detail else "")
    # Serve's proxy adds x-request-id (the same id) to every response.
    return Response(error_body(status, detail, rid), status_code=status, media_type="application/json",
                    headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> Response:
    return error_response(request, exc.status, exc.detail, exc.log_detail)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(request, exc.status_code, detail, headers=dict(exc.headers or {}))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "value_error" or "<" in msg:  # a validator's own text: Python reprs, not for the wire
            msg = "send the image as a file part with a filename" if loc == "file" else "invalid value"
        parts.append(f"{loc or 'request'}: {msg}")
    return error_response(request, 422, "; ".join(parts) or "invalid request")


@api.exception_handler(Cancelled)
async def _cancelled(request: Request, exc: Cancelled) -> Response:
    if exc.timed_out:
        return error_response(request, 504, "the request did not finish within the server's deadline "
                              "(request_timeout_s)")
    return error_response(request, CLIENT_CLOSED, "the client left; the work was stopped")


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    rid = request_id_of(request)
    logger.error("request %s: internal error", rid, exc_info=(type(exc), exc, exc.__traceback__))
    return Response(error_body(500, "internal server error; the server log has the details under this request "
                               "id", rid), status_code=500, media_type="application/json")


@dataclass(frozen=True)
class _Served:
    """The model a request is answered with, and what was derived from it (swapped whole on an alias move)."""

    model: Any
    identity: dict[str, Any]
    limits: UploadLimits


def _status_of(exc: BaseException) -> int:
    """The HTTP status the exception handlers will answer ``exc`` with (for the request's trace)."""
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    if isinstance(exc, Cancelled):
        return 504 if exc.timed_out else CLIENT_CLOSED
    if isinstance(exc, RequestValidationError):
        return 422
    return 500


@dataclass
class _Inputs:
    """A checked segmentation request, ready for the inference thread."""

    payload: bytes
    filename: str
    style: str | None
    latent: tuple[float, ...] | None


def _upload_limits(settings: ServeSettings, model: Any) -> UploadLimits:
    """The model's facts and the server's limits an upload is checked against."""
    pre = model.config.preprocessing
    return UploadLimits(
        spatial_dims=model.spatial_dims,
        roi_size=tuple(int(r) for r in pre.roi_size),
        spacing=tuple(float(v) for v in pre.spacing) if pre.spacing is not None else None,
        orientation=pre.orientation,
        num_classes=int(model.config.model.unet.out_channels),
        in_channels=int(model.config.model.unet.in_channels),
        max_voxels=settings.max_voxels,
        min_edge=settings.min_edge_voxels,
        memory_budget_bytes=int(settings.max_inference_memory_mb * 2**20),
    )


def _parse_style_list(text: str | None) -> list[str] | None:
    """The ``styles`` form field: comma-separated ids, duplicates dropped (None: every style)."""
    if text is None or not text.strip():
        return None
    if len(text) > 4096:
        raise RequestError(422, "styles: field too long")
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out or None


@serve.deployment(
    name=DEPLOYMENT_NAME,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    # A model that cannot load (bad URI, wrong weights) or a replica without its token fails the
    # deployment quickly instead of retrying for minutes; the error names the problem.
    max_constructor_retry_count=3,
)
@serve.ingress(api)
class HyperSortSegmenter:
    """One replica: the served model (followed through its alias), a parse pool, an inference pool and the
    request telemetry.

    Args:
        settings: :class:`ServeSettings` (or its dict); ``model`` must be set.
        auth_required: the deployer's decision (:func:`hypersort_ray.serve.auth.resolve_auth`); a replica
            that finds no token then refuses to start.
        serving_run: where the deployment's serving run lives (``{"tracking_uri", "experiment_id",
            "run_id"}``, from :func:`~hypersort_ray.serve.telemetry.start_serving_run`); None: no traces.
    """

    def __init__(
        self,
        settings: ServeSettings | dict[str, Any],
        auth_required: bool = True,
        serving_run: dict[str, str] | None = None,
    ):
        import torch

        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        if not s.model:
            raise ConfigError("serve: no model given (--model RUN_DIR|MODEL_URI)")
        # Before anything slow: a replica that would serve without the token it was promised fails now.
        token, digest = replica_credentials(s.auth_token_env, auth_required)
        use_gpu = s.num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise ConfigError(f"serve: num_gpus = {s.num_gpus} but this replica sees no CUDA device")
        self.device = "cuda" if use_gpu else "cpu"
        cpus = max(1, int(s.num_cpus))
        # CPU replicas run one inference per CPU, each single-threaded (throughput under load beats
        # intra-op threads); a GPU replica runs one at a time and gives torch the CPUs for pre/post.
        workers = 1 if use_gpu else cpus
        torch.set_num_threads(cpus if use_gpu else 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hypersort-infer")
        # Header checks get their own thread: a flood of bad uploads never waits behind inference, and
        # never takes more than this one thread's CPU.
        self._parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypersort-parse")
        install_forward_hook()
        self.guard = GuardSettings(
            max_body_bytes=int(s.max_body_mb * 2**20), token=token, token_sha256=digest,
            allowed_hosts=tuple(s.allowed_hosts), allowed_origins=tuple(s.allowed_origins),
        )
        self.follower = None
        self._served = self._start_model()
        self.telemetry = self._start_telemetry(serving_run)
        logger.info(
            "hypersort replica ready: model %s, device %s, %d inference thread(s), auth %s, %s",
            self._served.identity["model_version"], self.device, workers, "on" if self.guard.auth_on else "off",
            f"following {s.model} every {s.follow_alias_s:g} s" if self.follower else "version pinned",
        )

    # ------------------------------------------------------------------------- the served model
    @property
    def model(self) -> Any:
        """The model answering new requests now."""
        return self._served.model

    @property
    def identity(self) -> dict[str, Any]:
        return self._served.identity

    @property
    def limits(self) -> UploadLimits:
        return self._served.limits

    def _start_model(self) -> _Served:
        """Load the model; for ``models:/NAME@ALIAS`` load the version the alias names now, and follow it."""
        s = self.settings
        alias = parse_alias_uri(s.model)
        if alias is None:
            return self._load(s.model, None)
        from hypersort_ray.mlflow_store import existing_store_uri

        name, alias_name = alias
        store = existing_store_uri(s.tracking_uri)
        version = resolve_alias(name, alias_name, store)
        served = self._load(f"models:/{name}/{version}", alias_name)
        if not s.pin_version:
            self.follower = AliasFollower(
                name, alias_name, store, version, load=lambda v: self._load(f"models:/{name}/{v}", alias_name),
                install=self._install, interval_s=s.follow_alias_s,
            )
        return served

    def _load(self, ref: str, alias: str | None) -> _Served:
        """Load, describe and warm up one model (in the follower's thread for a new version)."""
        from hypersort_ray.inference import load_model

        s = self.settings
        model = load_model(ref, device=self.device, cache_size=s.style_cache_size, tracking_uri=s.tracking_uri)
        identity = describe_model(model)
        if alias:
            identity["alias"] = alias
        served = _Served(model, identity, _upload_limits(s, model))
        self._warm_up(served.model)
        return served

    def _install(self, version: str, served: _Served) -> None:
        """Swap a new version in: one reference assignment, so a request sees one version only."""
        self._served = served
        logger.info("now serving %s", served.identity["model_version"])

    def _start_telemetry(self, serving_run: dict[str, str] | None) -> Telemetry | None:
        s = self.settings
        if not serving_run or s.trace_sample_rate <= 0 and not serving_run.get("run_id"):
            return None
        several = s.num_replicas == "auto" or s.num_replicas > 1
        suffix = ""
        if several:
            try:
                suffix = f".{serve.get_replica_context().replica_id.unique_id}"
            except Exception:  # noqa: BLE001 - outside a replica
                suffix = ""
        return Telemetry(TelemetryConfig(
            tracking_uri=serving_run["tracking_uri"], experiment_id=serving_run.get("experiment_id"),
            serving_run_id=serving_run.get("run_id"), sample_rate=s.trace_sample_rate,
            queue_size=s.trace_queue_size, metrics_interval_s=s.metrics_interval_s, metric_suffix=suffix,
        ))

    def check_health(self) -> None:
        if self._served.model is None:
            raise RuntimeError("model not loaded")

    def __del__(self) -> None:
        for name in ("_pool", "_parse_pool"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        for name in ("follower", "telemetry"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()

    # ------------------------------------------------------------------------------ telemetry
    def _record(self, request: Request, route: str, served: _Served) -> RequestRecord:
        return RequestRecord(request_id_of(request), route, tags=model_tags(served.identity))

    def _submit(self, record: RequestRecord, status: int) -> None:
        if self.telemetry is not None:
            self.telemetry.submit(record.finish(status))

    # ------------------------------------------------------------------------------ helpers
    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Route-level check too (the middleware already ran): a misrouted request still needs the token."""
        if not self.guard.auth_on:
            return
        header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
        if not bearer_token_ok(header, self.guard.token, self.guard.token_sha256):
            raise StarletteHTTPException(
                401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _latent(self, served: _Served, text: str | None) -> tuple[float, ...] | None:
        """The ``latent`` field (a bounded string: parsed in place) within the learned latents' radius."""
        values = parse_latent_field(text, served.model.latent_dim)
        if values is not None and not self.settings.allow_extrapolation:
            known = [(s.id, s.latent) for s in served.model.styles]
            check_latent_radius(values, known, self.settings.latent_radius)
        return values

    async def _read_inputs(self, served: _Served, file: UploadFile, style: str | None, latent: str | None) -> _Inputs:
        style = style.strip() if style else None
        latent_values = self._latent(served, latent)
        if style and latent_values is not None:
            raise RequestError(422, "give either a style or a latent, not both")
        if style:
            self._style(served, style)
        payload = await file.read()
        await self._parse(check_upload, payload, served.limits)
        return _Inputs(payload, file.filename or "image.nii.gz", style, latent_values)

    @staticmethod
    def _style(served: _Served, style_id: str):
        """The model's style (its own ids and aliases, e.g. the main cluster's id), else 404."""
        try:
            return served.model.style(style_id)
        except HypersortError as exc:
            raise RequestError(404, scrub(str(exc))) from None

    async def _parse(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a bounded header check in the parse pool (never on the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parse_pool, fn, *args)

    async def _in_pool(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the inference pool under this request's deadline; a client that leaves cancels it."""
        token = CancelToken(deadline=time.monotonic() + self.settings.request_timeout_s)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, run_with_token, token, fn)
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, token.remaining() or 0.0))
        except TimeoutError:
            token.cancel()
            raise Cancelled("the request's deadline passed", timed_out=True) from None
        except asyncio.CancelledError:
            token.cancel()  # the client left or the proxy timed out: the thread stops at its next window
            raise
        except (RequestError, Cancelled):
            raise
        except HypersortError as exc:
            raise RequestError(422, scrub(str(exc)), log_detail=str(exc)) from None
        except Exception as exc:
            # A bug or an allocator failure: the client gets the request id, the log gets the traceback.
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise RequestError(500, "internal server error; the server log has the details under this "
                               "request id", log_detail=trace) from None

    @staticmethod
    def _decode(served: _Served, payload: bytes, record: RequestRecord) -> DecodedVolume:
        with record.span("decode"):
            volume = decode_nifti(payload, max_voxels=served.limits.max_voxels,
                                  spatial_dims=served.model.spatial_dims, checkpoint=checkpoint)
            plan_for(volume.array.shape, volume.affine, served.limits, volume.header.bytes_per_voxel)
        zooms = np.sqrt((np.asarray(volume.affine)[:3, :3] ** 2).sum(axis=0))
        record.tags.update(input_shape=json.dumps([int(v) for v in volume.array.shape]),
                           input_spacing=json.dumps([round(float(z), 4) for z in zooms]))
        return volume

    @staticmethod
    def _prepare(served: _Served, volume: DecodedVolume, record: RequestRecord) -> tuple[Any, float]:
        """Preprocess once (a request for every style reuses it); returns (prepared, milliseconds)."""
        t0 = time.perf_counter()
        with record.span("preprocess"):
            prepared = served.model.prepare(volume.array, volume.affine)
        checkpoint()
        return prepared, (time.perf_counter() - t0) * 1000.0

    @staticmethod
    def _predict(served: _Served, volume: DecodedVolume, prepared: Any, style: str | None,
                 latent: tuple[float, ...] | None, record: RequestRecord) -> dict[str, Any]:
        checkpoint()
        t0 = time.perf_counter()
        model = served.model
        values, used = model.resolve(style if latent is None else None, list(latent) if latent is not None else None)
        with record.span("generate_unet", style=str(used)) as attrs:
            hits = model.cache_hits
            net = model.unet_for(values)
            attrs["cache_hit"] = model.cache_hits > hits
        record.cache_hit = bool(attrs["cache_hit"]) if record.cache_hit is None else record.cache_hit
        checkpoint()
        with record.span("sliding_window", style=str(used)):
            result = model.predict_prepared(prepared, values, net=net)
        result.update(style=used, latent=list(values), inference_ms=(time.perf_counter() - t0) * 1000.0)
        mask = np.asarray(result["mask"])
        if mask.shape != volume.array.shape:
            raise RuntimeError(f"model returned a mask of shape {mask.shape} for an image of shape {volume.array.shape}")
        result["mask"] = mask.astype(np.uint8, copy=False).reshape(volume.shape)
        return result

    def _warm_up(self, model: Any) -> None:
        """One tiny prediction: pays the one-off imports (MONAI, SciPy: ~10 s) and builds the main UNet;
        then times whether lone windows run faster as a pair of copies on this machine."""
        roi = tuple(int(r) for r in model.config.preprocessing.roi_size)
        image = np.random.default_rng(0).random(roi, dtype=np.float32)
        model.predict(image, style=model.styles[0].id)
        if model.calibrate_single_window():
            logger.info("lone sliding windows run as a batch of two copies (faster on this CPU)")

    @staticmethod
    def _summary(served: _Served, volume: DecodedVolume, result: dict[str, Any], include_mask: bool) -> SegmentSummary:
        mask = result["mask"]
        labels, counts = np.unique(mask, return_counts=True)
        class_voxels = {str(int(k)): int(v) for k, v in zip(labels, counts, strict=True)}
        fg = int(mask.size - class_voxels.get("0", 0))
        vml = voxel_volume_ml(volume.affine, served.model.spatial_dims)
        return SegmentSummary(
            style=str(result["style"]),
            latent=[float(v) for v in result["latent"]],
            shape=list(mask.shape),
            foreground_voxels=fg,
            volume_ml=fg * vml,
            voxel_volume_ml=vml,
            class_voxels=class_voxels,
            model_version=served.identity["model_version"],
            inference_ms=round(float(result["inference_ms"]), 3),
            mask_base64=base64.b64encode(encode_mask(mask, volume)).decode() if include_mask else None,
        )

    @staticmethod
    def _headers(served: _Served, **extra: str) -> dict[str, str]:
        headers = {"X-Model-Version": header_value(served.identity["model_version"])}
        headers.update({k: header_value(v) for k, v in extra.items()})
        return headers

    def _styles_to_run(self, served: _Served, requested: str | None) -> list[Any]:
        """The styles a /v1/segment/styles request runs: the named ones, or all; at most the server's cap."""
        cap = self.settings.max_styles_per_request
        names = _parse_style_list(requested)
        styles = [self._style(served, n) for n in names] if names is not None else list(served.model.styles)
        unique = list({s.id: s for s in styles}.values())
        if len(unique) > cap:
            raise RequestError(
                422, f"{len(unique)} styles requested; this server runs at most {cap} per request "
                "(max_styles_per_request): name them in the `styles` field"
            )
        return unique

    # ------------------------------------------------------------------------------- routes
    @api.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz(self) -> HealthResponse:
        """Liveness: answers while inference is running (never behind a token; no model details)."""
        return HealthResponse(model_loaded=self._served.model is not None)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        """The Swagger page, only when ``api_docs`` is on (it loads its scripts from a CDN)."""
        if not self.settings.api_docs:
            raise StarletteHTTPException(404, "API docs are off on this server (api_docs); /openapi.json is served")
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="HyperSORT segmentation")

    @api.get("/v1/styles", response_model=StylesResponse, tags=["model"], responses={401: _ERRORS[401]})
    async def styles(self, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> StylesResponse:
        """The annotation styles of the version serving now: ids, sizes, centroids; ``main`` is λ = 0."""
        self._authorize(credentials)
        model = self._served.model
        main = model.styles[0]
        return StylesResponse(
            main_style=main.id,
            latent_dim=model.latent_dim,
            styles=[
                StyleInfo(id=s.id, name=s.name, size=s.size, centroid=list(s.latent), is_main=s.id == main.id)
                for s in model.styles
            ],
        )

    @api.get("/v1/model", response_model=ModelResponse, tags=["model"], responses={401: _ERRORS[401]})
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> ModelResponse:
        """Which model answers: registry name/version, source, latent size, network and preprocessing."""
        self._authorize(credentials)
        served = self._served
        model, identity = served.model, served.identity
        cfg = model.config
        pre = cfg.preprocessing
        return ModelResponse(
            registry_name=identity["registry_name"],
            registry_version=identity["registry_version"],
            model_version=identity["model_version"],
            source=public_source(str(identity["source"] or "")),
            latent_dim=model.latent_dim,
            spatial_dims=model.spatial_dims,
            num_styles=len(model.styles),
            config=ConfigSummary(
                network=cfg.model.unet.model_dump(mode="json"),
                hypernet=cfg.model.hypernet.model_dump(mode="json"),
                roi_size=list(pre.roi_size),
                spacing=list(pre.spacing) if pre.spacing is not None else None,
                orientation=pre.orientation,
                num_classes=cfg.model.unet.out_channels,
            ),
            cache=CacheStats(capacity=model.cache_size, hits=model.cache_hits, misses=model.cache_misses),
            info=json.loads(json.dumps(public_info(model.info), default=str)),
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
        request: Request,
        file: UploadFile = File(..., description="The image: .nii or .nii.gz, single channel."),
        style: str | None = Form(None, description="`main` or a style id from /v1/styles."),
        latent: str | None = Form(None, description="An explicit latent as a JSON list, e.g. [0.1, -0.3]."),
        fmt: Literal["nifti", "json"] = Query("nifti", alias="format", description="nifti (.nii.gz) or json."),
        include_mask: bool = Query(False, description="format=json: add the mask as base64 .nii.gz."),
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
    ):
        """Segment one volume with the UNet of a style (default ``main``) or of an explicit latent."""
        served = self._served  # one version from start to end, whatever the alias does meanwhile
        record = self._record(request, "/v1/segment", served)
        try:
            response = await self._segment(served, record, file, style, latent, fmt, include_mask, credentials)
        except BaseException as exc:
            self._submit(record, _status_of(exc))
            raise
        self._submit(record, 200)
        return response

    async def _segment(self, served, record, file, style, latent, fmt, include_mask, credentials):
        self._authorize(credentials)
        inputs = await self._read_inputs(served, file, style, latent)
        if inputs.latent is not None:
            record.tags["style"], record.tags["latent"] = "latent", json.dumps(list(inputs.latent))
        else:
            record.tags["style"] = inputs.style or "main"

        def work():
            volume = self._decode(served, inputs.payload, record)
            prepared, prep_ms = self._prepare(served, volume, record)
            result = self._predict(served, volume, prepared, inputs.style or "main", inputs.latent, record)
            result["inference_ms"] += prep_ms
            with record.span("encode"):
                if fmt == "json":
                    return self._summary(served, volume, result, include_mask)
                return result, encode_mask(result["mask"], volume)

        out = await self._in_pool(work)
        if fmt == "json":
            return out
        result, blob = out
        return Response(
            blob,
            media_type=NIFTI_GZ,
            headers=self._headers(
                served,
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
        request: Request,
        file: UploadFile = File(..., description="The image: .nii or .nii.gz, single channel."),
        styles: str | None = Form(
            None, description="Comma-separated style ids (default: every style, up to max_styles_per_request)."
        ),
        fmt: Literal["zip", "nifti4d", "json"] = Query("zip", alias="format"),
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
    ):
        """One mask per style, for a human to pick the best (the paper's human-in-the-loop use)."""
        served = self._served
        record = self._record(request, "/v1/segment/styles", served)
        try:
            response = await self._segment_styles(served, record, file, styles, fmt, credentials)
        except BaseException as exc:
            self._submit(record, _status_of(exc))
            raise
        self._submit(record, 200)
        return response

    async def _segment_styles(self, served, record, file, styles, fmt, credentials):
        self._authorize(credentials)
        chosen = self._styles_to_run(served, styles)
        record.tags["style"] = ",".join(s.id for s in chosen)
        inputs = await self._read_inputs(served, file, None, None)
        stem = safe_stem(inputs.filename)

        def summarize(volume, result, include_mask):
            return self._summary(served, volume, result, include_mask)

        def work():
            volume = self._decode(served, inputs.payload, record)
            prepared, prep_ms = self._prepare(served, volume, record)
            results = [self._predict(served, volume, prepared, s.id, None, record) for s in chosen]
            total_ms = prep_ms + sum(r["inference_ms"] for r in results)
            with record.span("encode"):
                if fmt == "json":
                    summaries = [summarize(volume, r, False) for r in results]
                    return StylesSummary(model_version=served.identity["model_version"],
                                         inference_ms=round(total_ms, 3), results=summaries)
                if fmt == "nifti4d":
                    spatial = volume.array.shape
                    stacked = np.stack([r["mask"].reshape(spatial) for r in results], axis=-1)
                    return results, total_ms, encode_mask(stacked, volume, shape=stacked.shape)
                return results, total_ms, zip_masks(stem, volume, results, summarize)

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
                served,
                **{
                    "Content-Disposition": f'attachment; filename="{name}"',
                    "X-Styles": ids,
                    "X-Inference-Ms": f"{total_ms:.1f}",
                }
            ),
        )


# --------------------------------------------------------------------------- building
def replica_env_vars(plan: AuthPlan, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The replicas' runtime-env variables: the token digest, and telemetry off unless the deployer set it."""
    env = os.environ if environ is None else environ
    out = {key: env.get(key, default) for key, default in PRIVACY_ENV.items()}
    out.update(plan.env_vars)
    return out


def deployment_options(settings: ServeSettings, plan: AuthPlan | None = None) -> dict[str, Any]:
    """Replicas/autoscaling, request limits, resources and runtime env for :class:`HyperSortSegmenter`."""
    s = settings
    plan = plan or AuthPlan(required=not s.insecure_no_auth)
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": s.num_cpus,
            "num_gpus": s.num_gpus,
            "runtime_env": {"env_vars": replica_env_vars(plan)},
        },
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


def serving_params(settings: ServeSettings) -> dict[str, Any]:
    """What the serving run records about the deployment: the model, replicas, limits, tracing."""
    keys = ("model", "num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests", "max_queued_requests",
            "num_cpus", "num_gpus", "style_cache_size", "max_body_mb", "max_voxels", "max_inference_memory_mb",
            "max_styles_per_request", "latent_radius", "allow_extrapolation", "request_timeout_s",
            "follow_alias_s", "pin_version", "trace_sample_rate", "metrics_interval_s")
    data = settings.model_dump(mode="json")
    return {k: data[k] for k in keys}


def build_application(settings: ServeSettings, plan: AuthPlan | None = None):
    """The bound Serve application for ``settings`` (``serve.run(build_application(s))``).

    ``plan`` defaults to what this process's environment says (:func:`resolve_auth`): with the token
    variable set, its digest reaches the replicas; without it, replicas must find the token themselves or
    fail to start, unless ``insecure_no_auth``. The deployment's serving run is created here, once, in the
    model's MLflow experiment (fail-soft: without it the replicas serve untraced).
    """
    if not settings.model:
        raise ConfigError("serve: no model given (--model RUN_DIR|MODEL_URI)")
    plan = plan or resolve_auth(settings.auth_token_env, settings.insecure_no_auth)
    serving_run = None
    if settings.trace_sample_rate > 0 or settings.metrics_interval_s:
        serving_run = start_serving_run(settings.model, settings.tracking_uri, serving_params(settings))
    return HyperSortSegmenter.options(**deployment_options(settings, plan)).bind(
        settings.model_dump(mode="json"), plan.required, serving_run
    )


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


def proxy_environment(settings: ServeSettings) -> dict[str, str]:
    """What the processes starting Serve's proxies need in their environment for the ingress guard."""
    return {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        PROXY_MAX_BODY_ENV: f"{settings.max_body_mb:g}",
        PROXY_UPLOAD_TIMEOUT_ENV: f"{settings.upload_timeout_s:g}",
        PROXY_UPLOAD_MIN_RATE_ENV: f"{settings.upload_min_rate_kib:g}",
        PROXY_BUFFER_ENV: f"{settings.proxy_buffer_mb:g}",
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        **{k: os.environ.get(k, v) for k, v in PRIVACY_ENV.items()},
    }


def run_server(settings: ServeSettings, address: str | None = None, *, block: bool = True) -> str:
    """Deploy the endpoint and (by default) serve until Ctrl-C or SIGTERM; returns the URL.

    Starts a private local Ray instance unless ``address`` (or ``RAY_ADDRESS``) names a cluster
    (:func:`hypersort_ray.ray_cluster.connect`). At exit, a local Ray started here is shut down with Serve;
    on a cluster only this application is deleted.

    Refuses (:class:`ConfigError`) a non-loopback ``host`` without a token unless
    ``settings.insecure_no_auth``. On a loopback host without a token the endpoint runs without auth.

    Args:
        settings: the serve settings (``model`` required).
        address: Ray cluster address (``auto``, ``ray://host:10001``); None starts a local Ray.
        block: wait for a signal (the CLI); False returns once the app is running (tests, notebooks).
    """
    from hypersort_ray.ray_cluster import connect

    if not settings.model:
        raise ConfigError("serve: --model is required (a run folder or models:/NAME@ALIAS)")
    plan = resolve_auth(settings.auth_token_env, settings.insecure_no_auth)
    check_bind(settings.host, plan, settings.insecure_no_auth)
    _check_local_model(settings.model)
    if not plan.has_token and is_loopback(settings.host):
        plan = AuthPlan(required=False)  # only this machine can connect
    settings = _with_bound_host(settings)
    # Serve's proxies read the ingress guard's variables when they start: in the environment of the Ray
    # started here, and in the job's runtime env (the Serve controller and its proxies inherit it).
    proxy_env = proxy_environment(settings)
    for key, value in proxy_env.items():
        os.environ.setdefault(key, value)
    global _SERVER
    handle = connect(address, runtime_env={"env_vars": {k: os.environ[k] for k in proxy_env}})
    _SERVER = handle
    url_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{url_host}:{settings.port}"
    restore = _raise_on_signals() if block else {}
    try:
        serve.start(http_options=http_options(settings))
        serve.run(build_application(settings, plan), name=APP_NAME, route_prefix="/", blocking=False)
        if not _proxy_guard_active(url):
            print(f"warning: the ingress guard is not active on Serve's proxy (body cap, x-request-* headers): "
                  f"set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH={PROXY_CALLBACK} on the Ray nodes "
                  "(docs/serving-safely.md)", file=sys.stderr, flush=True)
        docs = f"  (API docs: {url}/docs)" if settings.api_docs else ""
        print(f"HyperSORT endpoint for {settings.model} at {url}{docs}", flush=True)
        auth = "bearer token from $" + str(settings.auth_token_env) if plan.has_token else (
            "off (insecure_no_auth)" if settings.insecure_no_auth else "off (loopback only)"
        )
        print(f"auth: {auth}; Ctrl-C stops it", file=sys.stderr, flush=True)
        if not block:
            return url
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr, flush=True)
    except BaseException:
        _stop(handle)
        raise
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    _stop(handle)
    return url


def _with_bound_host(settings: ServeSettings) -> ServeSettings:
    """A specific bind address is also a Host name clients use: answer for it."""
    host = settings.host
    if host in ("0.0.0.0", "::") or host in settings.allowed_hosts or "*" in settings.allowed_hosts:
        return settings
    return settings.model_copy(update={"allowed_hosts": [*settings.allowed_hosts, host]})


def _proxy_guard_active(url: str) -> bool:
    """Whether Serve's proxy strips ``x-request-*`` headers (the sign that the ingress guard is in place)."""
    probe = "hypersort-proxy-probe"
    request = urllib.request.Request(f"{url}/healthz", headers={"x-request-id": probe, "Host": "127.0.0.1"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own local URL
            return response.headers.get("x-request-id") != probe
    except urllib.error.HTTPError as err:  # an error answer (e.g. a Host not allowed) still carries the id
        return err.headers.get("x-request-id") != probe
    except Exception:  # noqa: BLE001 - no answer at all: nothing to tell
        return True


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
    """A local model is checked before Ray starts: it exists, every file matches its checksum, and its
    styles belong to its checkpoint (ProvenanceError otherwise) — a replica would fail on it anyway."""
    from hypersort_ray.mlflow_store import is_mlflow_uri
    from hypersort_ray.runs.model_dir import read_model_files

    if is_mlflow_uri(ref):
        return
    if not Path(ref).exists():
        raise ConfigError(f"serve: --model {ref}: no such run folder or model folder")
    read_model_files(ref)


def _stop(handle: Any) -> None:
    """Shut Serve and Ray down when this process started Ray; else remove only our application."""
    global _SERVER
    try:
        if handle.started:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        handle.close()
        _SERVER = None


#: The Ray this process's :func:`run_server` ``(block=False)`` started or joined (for :func:`stop_server`).
_SERVER: Any = None


def stop_server() -> None:
    """Stop what ``run_server(..., block=False)`` started: only our application on a joined cluster."""
    if _SERVER is not None:
        _stop(_SERVER)
