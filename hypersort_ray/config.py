"""Validated configuration for every hypersort command.

One pydantic model per concern; :class:`ExperimentConfig` gathers them for a training run and
:class:`SweepConfig` wraps one for a Ray Tune sweep. Every model forbids unknown keys, so a typo in a
YAML file fails with the key path instead of being silently ignored.

The defaults of :class:`ExperimentConfig` *are* the demo configuration (``configs/demo.yaml`` mirrors
them; a test keeps the two equal), chosen by measurement on the synthetic benchmark. The paper's values
live in ``configs/paper_amos.yaml``.

Example:
    >>> cfg = load_config(None, overrides=["training.epochs=3", "model.hypernet.latent_dim=4"])
    >>> cfg.training.epochs, cfg.model.hypernet.latent_dim
    (3, 4)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hypersort_ray.errors import ConfigError
from hypersort_ray.reference_yaml import is_reference_config, translate_reference_config

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]

# The largest ROI edge we accept: a 512³ float32 patch is 512 MiB per channel before the UNet runs.
MAX_ROI_EDGE = 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    """Where the cases come from and how preprocessed volumes are cached."""

    datalist: Path | None = Field(
        None, description="TSV (reference format), MSD-style JSON, or a folder with imagesTr/ labelsTr/."
    )
    truth: Path | None = Field(
        None, description="Optional truth CSV (index/case_id + columns); defaults to truth.csv beside the datalist."
    )
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="memory: MONAI CacheDataset; disk: PersistentDataset under cache_dir."
    )
    cache_dir: Path | None = Field(None, description="Disk cache folder; defaults to <output_dir>/cache.")
    loader_workers: NonNegInt = Field(0, description="DataLoader worker processes per training worker.")
    validation_fraction: Probability = Field(
        0.0, description="Fraction of cases held out from latent fitting (sweep objective: validation Dice)."
    )


# ------------------------------------------------------------------------------------ preprocessing
class IntensityConfig(_Strict):
    lower_percentile: Annotated[float, Field(ge=0, le=100)] = 0.5
    upper_percentile: Annotated[float, Field(ge=0, le=100)] = 99.5
    clip: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> IntensityConfig:
        if self.lower_percentile >= self.upper_percentile:
            raise ValueError(
                f"lower_percentile ({self.lower_percentile}) must be below upper_percentile ({self.upper_percentile})"
            )
        return self


class LabelConfig(_Strict):
    """Which label values form which class. Default: every value > 0 is foreground (class 1)."""

    foreground: list[int] | None = Field(
        None, description="Label values mapped to class 1 (binary task). None: every value > 0."
    )
    class_map: dict[int, int] | None = Field(
        None, description="Multi-class mapping {label value: class}; unmapped values become 0."
    )

    @model_validator(mode="after")
    def _one_of(self) -> LabelConfig:
        if self.foreground is not None and self.class_map is not None:
            raise ValueError("give either foreground or class_map, not both")
        if self.class_map is not None and any(c < 0 for c in self.class_map.values()):
            raise ValueError(f"class_map classes must be >= 0, got {self.class_map}")
        return self

    @property
    def num_classes(self) -> int:
        if self.class_map:
            return max(self.class_map.values()) + 1
        return 2


class AugmentConfig(_Strict):
    """Light training augmentation (MONAI random transforms). Off by default: on the detection matrix it
    slowed fitting and did not improve the suspicion ranking (docs/benchmarks.md)."""

    enabled: bool = Field(False, description="Apply the random transforms below to training samples.")
    flip_prob: Probability = Field(0.0, description="Per-axis flip probability (image and label together).")
    intensity_shift: NonNegFloat = Field(0.0, description="Random intensity offset in ±this (normalised units).")
    intensity_scale: NonNegFloat = Field(0.0, description="Random intensity scaling by 1 ± this.")
    noise_std: NonNegFloat = Field(0.0, description="Gaussian noise standard deviation (normalised units).")


class PreprocessConfig(_Strict):
    orientation: str | None = Field("RAS", description="Axis codes for Orientationd; None keeps the file's.")
    spacing: list[PositiveFloat] | None = Field(
        [2.0, 2.0, 2.0], description="Target voxel spacing in mm; None keeps the file's."
    )
    intensity: IntensityConfig = IntensityConfig()
    label: LabelConfig = LabelConfig()
    roi_size: list[PositiveInt] = Field([32, 32, 32], description="Training patch size (voxels).")
    crop: Literal["center", "random", "foreground"] = "center"
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _dims(self) -> PreprocessConfig:
        if len(self.roi_size) not in (2, 3):
            raise ValueError(f"roi_size must have 2 or 3 entries, got {self.roi_size}")
        if self.spacing is not None and len(self.spacing) != len(self.roi_size):
            raise ValueError(f"spacing {self.spacing} and roi_size {self.roi_size} differ in length")
        too_big = [s for s in self.roi_size if s > MAX_ROI_EDGE]
        if too_big:
            raise ValueError(f"roi_size {self.roi_size} exceeds the maximum edge {MAX_ROI_EDGE}")
        return self


# -------------------------------------------------------------------------------------------- model
class UNetConfig(_Strict):
    """The paper's primary UNet (names follow the reference: in_c, out_c, n_down, n_fix, C, n_dim)."""

    kind: Literal["hypersort_unet", "monai_basic_unet"] = "hypersort_unet"
    in_channels: PositiveInt = 1
    out_channels: Annotated[int, Field(ge=2)] = 2
    n_down: NonNegInt = 2
    n_fix: PositiveInt = 2
    channels: PositiveInt = 8
    spatial_dims: Literal[2, 3] = 3


class HyperNetConfig(_Strict):
    latent_dim: PositiveInt = 2
    hidden: list[PositiveInt] = Field([50, 50, 50], description="Hidden layer widths of H (ReLU).")
    bound: PositiveFloat = Field(5.0, description="Output activation tanh(x)*bound.")


class ModelConfig(_Strict):
    unet: UNetConfig = UNetConfig()
    hypernet: HyperNetConfig = HyperNetConfig()


# ----------------------------------------------------------------------------------------- training
class LatentOptimConfig(_Strict):
    """Row-sparse Adam for the per-sample latent table (reference: betas 0.7/0.9, lr 1e-3)."""

    # 3e-2, not the reference's 1e-3: each λ takes one Adam step per epoch, so lr bounds how far it can
    # travel in a run of tens of epochs (measured on the synthetic benchmark: docs/benchmarks.md).
    lr: PositiveFloat = 3e-2
    betas: tuple[Probability, Probability] = (0.7, 0.9)
    eps: PositiveFloat = 1e-8
    init_std: NonNegFloat = 0.05


class ScalingSettings(_Strict):
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegFloat = 0.0
    threads_per_worker: NonNegInt = Field(0, description="torch threads per worker; 0 = cpus_per_worker.")


class TrainingConfig(_Strict):
    epochs: PositiveInt = 40
    batch_size: PositiveInt = Field(4, description="Samples per step per worker.")
    lr: PositiveFloat = Field(1e-3, description="Adam learning rate of the hyper-network H.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="H's learning rate after the warm-up: constant, or cosine (decays from lr to 0 by the "
        "last epoch). The latents' learning rate stays constant.",
    )
    warmup_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of the run over which H's learning rate rises linearly from 0 to lr (0: none).",
    )
    weight_decay: NonNegFloat = 0.0
    l1_weight: NonNegFloat = Field(0.1, description="Weight of ||lambda||_1 in the loss.")
    l1_calibrate: bool = Field(
        False,
        description="Scale l1_weight by the measured segmentation-gradient norm on lambda at step 0 "
        "(makes one l1_weight serve several network sizes).",
    )
    latent: LatentOptimConfig = LatentOptimConfig()
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Primary network autocast: bf16 (CUDA or CPU; a GPU without native bfloat16 uses fp16 "
        "instead), fp16 with loss scaling (CUDA only; an error on CPU).",
    )
    channels_last: bool = False
    micro_batch: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Samples per primary-network pass; auto: the largest whose estimated peak fits "
        "memory_budget_gb (on CPU at most 64^3 voxels, measured faster). A number is used as given.",
    )
    activation_checkpointing: bool | Literal["auto", "blocks", "nested"] = Field(
        "auto",
        description="Recompute primary-network activations in backward: true/blocks per conv unit, nested "
        "also per stage (least memory); auto: only when the estimate does not fit the budget otherwise.",
    )
    memory_budget_gb: PositiveFloat | None = Field(
        None,
        description="Peak memory (GiB) per worker that auto micro_batch/checkpointing must fit; None: the "
        "device's (CUDA total, or available RAM). Set it when workers share a machine.",
    )
    grad_clip: NonNegFloat = Field(0.0, description="Clip H's gradient norm; 0 disables.")
    checkpoint_every: PositiveInt = Field(5, description="Epochs between checkpoints.")
    keep_checkpoints: PositiveInt = 2
    max_failures: NonNegInt = 2
    log_every: PositiveInt = Field(5, description="Epochs between latent-map/latent-table artefacts.")
    resume_from: Path | None = Field(
        None, description="A checkpoint folder to continue from (any world size; latents are re-sharded)."
    )
    scaling: ScalingSettings = ScalingSettings()


# ------------------------------------------------------------------------------- tracking / analysis
class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="MLflow URI; default MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."
    )
    experiment: str = "hypersort"
    register_as: str | None = Field(None, description="Register the final model under this name.")
    alias: str | None = "champion"


class AnalysisConfig(_Strict):
    min_cluster_size: PositiveInt | None = Field(None, description="HDBSCAN; None derives it from N.")
    min_samples: PositiveInt | None = None
    cluster_selection_method: Literal["eom", "leaf"] = "eom"
    top_k: PositiveInt = 10
    rank_by: str = Field(
        "suspicion",
        description="Score column that orders suspicion.csv (most suspicious first); the default combines "
        "the λ and the model evidence (docs/method.md), any single score column may be named instead.",
    )
    run_after_training: bool = True


class ExperimentConfig(_Strict):
    """Everything one training run needs."""

    name: str = "hypersort"
    output_dir: Path = Path("runs/demo")
    data: DataConfig = DataConfig()
    preprocessing: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    tracking: TrackingConfig = TrackingConfig()
    analysis: AnalysisConfig = AnalysisConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        dims = len(self.preprocessing.roi_size)
        if dims != self.model.unet.spatial_dims:
            raise ValueError(
                f"preprocessing.roi_size has {dims} dims but model.unet.spatial_dims is {self.model.unet.spatial_dims}"
            )
        n_classes = self.preprocessing.label.num_classes
        if n_classes != self.model.unet.out_channels:
            raise ValueError(
                f"the label mapping gives {n_classes} classes but model.unet.out_channels is "
                f"{self.model.unet.out_channels}"
            )
        factor = 2**self.model.unet.n_down
        bad = [s for s in self.preprocessing.roi_size if s % factor]
        if bad:
            raise ValueError(
                f"preprocessing.roi_size {self.preprocessing.roi_size} must be divisible by 2**n_down = {factor}"
            )
        return self


# -------------------------------------------------------------------------------------------- sweep
class SearchDim(_Strict):
    """One dimension of the search space."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDim:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError(f"{self.type} needs low < high, got low={self.low} high={self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


def _default_space() -> dict[str, SearchDim]:
    return {
        "model.hypernet.latent_dim": SearchDim(type="choice", values=[2, 4, 8]),
        "training.l1_weight": SearchDim(type="loguniform", low=1e-3, high=1.0),
        "training.lr": SearchDim(type="loguniform", low=1e-4, high=3e-3),
    }


class SweepConfig(_Strict):
    name: str = "hypersort-sweep"
    base: ExperimentConfig = ExperimentConfig()
    space: dict[str, SearchDim] = Field(default_factory=_default_space)
    num_samples: PositiveInt = 6
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 2
    reduction_factor: Annotated[float, Field(gt=1)] = Field(
        2.0, description="ASHA: keep the best 1/reduction_factor of the trials at each rung."
    )
    metric: Literal["val_dice", "seg_loss", "auroc_latent_norm", "spearman_latent_norm"] = "seg_loss"
    mode: Literal["min", "max"] | None = Field(None, description="Default: min for seg_loss, else max.")
    workers_per_trial: PositiveInt = 1
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegFloat = 0.0
    max_concurrent_trials: PositiveInt = 1
    max_failures_per_trial: NonNegInt = 1
    register_best_as: str | None = None
    best_alias: str = "sweep-best"

    @model_validator(mode="after")
    def _space_keys(self) -> SweepConfig:
        base = self.base.model_dump()
        for key in self.space:
            node: Any = base
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"space key '{key}' is not a key of the experiment config")
                node = node[part]
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "seg_loss" else "max")


# ----------------------------------------------------------------------------------- serve
class ServeSettings(_Strict):
    model: str | None = Field(None, description="Run folder or MLflow model URI.")
    tracking_uri: str | None = Field(
        None, description="MLflow store of a models:/ URI; default MLFLOW_TRACKING_URI, else ./mlflow.db."
    )
    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 8000
    num_replicas: PositiveInt | Literal["auto"] = 1
    min_replicas: NonNegInt = 1
    max_replicas: PositiveInt = 2
    max_ongoing_requests: PositiveInt = 8
    num_cpus: PositiveFloat = 1.0
    num_gpus: NonNegFloat = 0.0
    style_cache_size: NonNegInt = 32
    max_queued_requests: PositiveInt = Field(
        32, description="Requests waiting for a busy replica (per caller); more get 503 at once."
    )
    max_body_mb: PositiveFloat = Field(256.0, description="Upload cap (proxy and replica): 413 before parsing.")
    upload_timeout_s: PositiveFloat = Field(
        20.0, description="Serve's proxy holds each upload until it is complete, so a replica never waits on a "
        "slow client: an upload gets this many seconds plus 1 s per upload_min_rate_kib KiB received (408 after)."
    )
    upload_min_rate_kib: NonNegFloat = Field(
        64.0, description="KiB of body that earn an upload one more second (0: upload_timeout_s is the whole time)."
    )
    proxy_buffer_mb: PositiveFloat = Field(
        1024.0, description="Upload bytes one Serve proxy holds at once, all requests together (503 above); "
        "at least max_body_mb."
    )
    max_voxels: PositiveInt = Field(
        512**3, description="Voxels at the model's spacing, every axis padded to the ROI (413 above)."
    )
    min_edge_voxels: PositiveInt = Field(
        2, description="Shortest axis accepted, in the file and at the model's spacing (422 below)."
    )
    max_inference_memory_mb: PositiveFloat = Field(
        12288.0, description="Estimated peak memory of one request (413 above); a replica needs this per CPU."
    )
    max_styles_per_request: PositiveInt = Field(
        8, description="Styles one /v1/segment/styles request may run (422 above; pick them with `styles`)."
    )
    latent_radius: PositiveFloat = Field(
        3.0, description="An explicit latent must lie this close to a learned style latent (422 beyond)."
    )
    allow_extrapolation: bool = Field(False, description="Accept latents farther than latent_radius.")
    request_timeout_s: PositiveFloat = Field(
        120.0, description="Proxy timeout (408) and each request's deadline in the replica (work stops)."
    )
    auth_token_env: str | None = Field(
        "HYPERSORT_API_TOKEN",
        description="Env var holding the bearer token; unset/empty: start-up error unless insecure_no_auth "
        "(hypersort serve on a loopback host runs without auth).",
    )
    insecure_no_auth: bool = Field(
        False, description="Serve without a token, also on a non-loopback host (--insecure-no-auth)."
    )
    allowed_hosts: list[str] = Field(
        ["127.0.0.1", "localhost", "::1"],
        description="Host header names answered (400 otherwise); '*' any, '*.example.org' a domain.",
    )
    allowed_origins: list[str] = Field(
        [], description="Browser origins allowed to call cross-origin (CORS); '*' any; same-origin always."
    )
    api_docs: bool = Field(
        False, description="Serve the Swagger page at /docs (it loads its assets from a CDN); /openapi.json always."
    )
    follow_alias_s: PositiveFloat = Field(
        30.0, description="models:/NAME@ALIAS: seconds between two checks of the alias; a new version is "
        "loaded, warmed up and swapped in with no failed request."
    )
    pin_version: bool = Field(False, description="Resolve the alias once at start and never follow it (--pin-version).")
    trace_sample_rate: Probability = Field(
        1.0, description="Fraction of requests logged as MLflow traces (metrics count every request); 0: none."
    )
    trace_queue_size: PositiveInt = Field(
        1000, description="Traces waiting for the MLflow writer; more are dropped and counted, never waited for."
    )
    metrics_interval_s: PositiveFloat = Field(30.0, description="Seconds between two points of the serving run's metrics.")

    @model_validator(mode="after")
    def _buffer_holds_an_upload(self) -> ServeSettings:
        if self.proxy_buffer_mb < self.max_body_mb:
            raise ValueError(
                f"proxy_buffer_mb ({self.proxy_buffer_mb:g}) is below max_body_mb ({self.max_body_mb:g}): "
                "the proxy could never hold an upload of the largest accepted size"
            )
        return self


# ---------------------------------------------------------------------------------- loading
def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path = value: message``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source}: {path} = {shown}: {e['msg']}")
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would ('3' -> 3, '[1,2]' -> list, 'null' -> None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place, returned for chaining)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"line {line}: duplicate key {key!r} (only one value could be used)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str | bytes) -> Any:
    """YAML as :func:`yaml.safe_load` reads it, but a repeated key in a mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def apply_values(data: dict[str, Any], values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set typed values by dotted key (in place). Unlike :func:`apply_overrides`, nothing is parsed:
    a path flag such as ``--out "/data/exp #3"`` or ``--out null`` reaches the config as that path."""
    for key, value in (values or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, values: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Load an experiment config (ours or the reference repository's format), then apply overrides.

    Args:
        path: YAML file, or None for the embedded defaults (the demo configuration).
        overrides: ``key.path=value`` strings (values parsed as YAML), applied after the file.
        values: typed values by dotted key (e.g. ``{"output_dir": Path(...)}`` from a path flag), applied
            last and never parsed; None values are skipped.
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        data = read_yaml(Path(path))
        if is_reference_config(data):
            data = translate_reference_config(data, source=Path(path))
    apply_overrides(data, overrides)
    apply_values(data, values)
    return _validate(ExperimentConfig, data, source)


#: The configs that ship with the package (``hypersort train paper_amos``); ``configs/`` in a checkout.
SHIPPED_CONFIGS = Path(__file__).with_name("configs")


def resolve_config_path(name_or_path: str | Path | None) -> Path | None:
    """A config file given as a path, or by the name of a shipped config (``demo``, ``paper_amos.yaml``).

    Raises:
        ConfigError: neither an existing file nor a shipped config (the message lists them).
    """
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and not path.exists():
        shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: config file not found (nor a shipped config: {names})")


def parse_config(text: str | bytes, source: str) -> ExperimentConfig:
    """An experiment config from YAML text (e.g. a checksum-verified file already read into memory).

    Raises:
        ConfigError: not YAML, not a mapping, or invalid (the message names ``source`` and the key).
    """
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _validate(ExperimentConfig, data, source)


def load_sweep_config(
    path: str | Path | None, overrides: list[str] | None = None, values: Mapping[str, Any] | None = None
) -> SweepConfig:
    """Load a sweep config and apply overrides / typed values (see :func:`load_config`)."""
    source = str(path) if path else "<defaults>"
    data = read_yaml(Path(path)) if path else {}
    apply_overrides(data, overrides)
    apply_values(data, values)
    return _validate(SweepConfig, data, source)


def load_serve_settings(
    path: str | Path | None, overrides: list[str] | None = None, values: Mapping[str, Any] | None = None
) -> ServeSettings:
    """Load serve settings and apply overrides / typed values (see :func:`load_config`)."""
    source = str(path) if path else "<defaults>"
    data = read_yaml(Path(path)) if path else {}
    apply_overrides(data, overrides)
    apply_values(data, values)
    return _validate(ServeSettings, data, source)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys (MLflow params, Tune spaces)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"``, creating sections as needed."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
