"""Pydantic schemas of the HTTP API (responses, errors) and of the config-file application builder.

These models are the OpenAPI document served at ``/docs``; they import nothing from Ray or torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hypersort_ray.config import ServeSettings
from hypersort_ray.serve.middleware import (
    PROXY_BUFFER_ENV,
    PROXY_UPLOAD_MIN_RATE_ENV,
    PROXY_UPLOAD_TIMEOUT_ENV,
)

__all__ = [
    "BuildArgs",
    "CacheStats",
    "ConfigSummary",
    "ErrorResponse",
    "HealthResponse",
    "ModelResponse",
    "SegmentSummary",
    "StyleInfo",
    "StylesResponse",
    "StylesSummary",
]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer, from a route, a middleware or the proxy: one shape."""

    status: int = Field(..., description="The HTTP status, repeated.")
    error: str = Field(..., description="The status as a word: payload_too_large, not_found, ...")
    detail: str = Field(..., description="What was wrong and, for a limit, what the server accepts.")
    request_id: str = Field(..., description="Quote it when asking about the request: the server log has it.")


class HealthResponse(BaseModel):
    """Liveness only: open to anyone, so it says nothing about the model."""

    status: Literal["ok"] = "ok"
    model_loaded: bool


class StyleInfo(BaseModel):
    id: str = Field(..., description="Style id to pass as `style` (main = λ 0).")
    name: str
    size: int = Field(..., description="Training cases in the style's cluster (0 when unknown).")
    centroid: list[float] = Field(..., description="The style's latent (cluster centroid; zeros for main).")
    is_main: bool


class StylesResponse(BaseModel):
    main_style: str
    latent_dim: int
    styles: list[StyleInfo]


class ConfigSummary(BaseModel):
    network: dict[str, Any] = Field(..., description="The primary UNet's settings.")
    hypernet: dict[str, Any]
    roi_size: list[int]
    spacing: list[float] | None
    orientation: str | None
    num_classes: int


class CacheStats(BaseModel):
    capacity: int = Field(..., description="style_cache_size: generated UNets kept (LRU); 0 disables caching.")
    hits: int
    misses: int


class ModelResponse(BaseModel):
    registry_name: str | None = Field(None, description="Registered model name when loaded from MLflow.")
    registry_version: str | None = Field(None, description="Registered model version when known.")
    model_version: str = Field(..., description="What X-Model-Version reports.")
    source: str = Field(..., description="MLflow URI, or local:<folder name> (no server paths).")
    latent_dim: int
    spatial_dims: int
    num_styles: int
    config: ConfigSummary
    cache: CacheStats
    info: dict[str, Any] = Field(
        default_factory=dict, description="Provenance recorded with the model (epoch, samples; no paths)."
    )


class SegmentSummary(BaseModel):
    style: str = Field(..., description="Style id used, or `latent` for an explicit latent.")
    latent: list[float]
    shape: list[int] = Field(..., description="Mask shape (= the input's).")
    foreground_voxels: int
    volume_ml: float = Field(..., description="Foreground volume from the affine's voxel volume.")
    voxel_volume_ml: float
    class_voxels: dict[str, int] = Field(..., description="Voxels per class label (0 = background).")
    model_version: str
    inference_ms: float
    mask_base64: str | None = Field(None, description="The mask as base64 of a .nii.gz (include_mask=true).")


class StylesSummary(BaseModel):
    """The JSON answer of /v1/segment/styles: one summary per style run."""

    model_version: str
    inference_ms: float
    results: list[SegmentSummary]


#: Settings only Serve's proxy uses, and the environment variable it reads each from.
PROXY_ONLY_FIELDS = {
    "upload_timeout_s": PROXY_UPLOAD_TIMEOUT_ENV,
    "upload_min_rate_kib": PROXY_UPLOAD_MIN_RATE_ENV,
    "proxy_buffer_mb": PROXY_BUFFER_ENV,
}


class BuildArgs(ServeSettings):
    """``args:`` of an application in a Serve config file (``import_path: hypersort_ray.serve.app:build_app``).

    The fields of :class:`~hypersort_ray.config.ServeSettings` except ``host``, ``port`` and
    ``request_timeout_s``, which a config file sets once for the whole cluster under ``http_options``, and
    the upload settings of Serve's proxy (:data:`PROXY_ONLY_FIELDS`), which the nodes' environment sets.
    ``model`` is required.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="Run folder or MLflow model URI.")

    @model_validator(mode="before")
    @classmethod
    def _no_http_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            misplaced = [k for k in ("host", "port", "request_timeout_s") if k in data]
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)}: set these under http_options in the Serve config file, not in args"
                )
            proxy_only = [f"{k} (${env})" for k, env in PROXY_ONLY_FIELDS.items() if k in data]
            if proxy_only:
                raise ValueError(
                    f"{', '.join(proxy_only)}: Serve's proxy reads these from the environment of the nodes "
                    "(the variable named), not from args"
                )
        return data
