"""λ → UNet → sliding-window prediction → mask in the input's original geometry.

A *model* is anything :func:`load_model` accepts:

* a run folder (``hypersort train``: ``checkpoint/config.yaml`` + ``checkpoint/hypernet.safetensors``,
  styles from ``analysis/styles.json`` when the run was analysed);
* a model folder (:func:`write_model_dir`; the payload of the MLflow pyfunc model);
* an MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/3``, ``runs:/RUN_ID/model``,
  ``models:/m-…``), resolved against ``MLFLOW_TRACKING_URI`` (or ``tracking_uri=``).

A *style* is a named latent: ``main`` is λ = 0 (the paper's canonical choice: the L1 pull puts the main
annotation mode at the origin); every other cluster found by ``hypersort analyze`` is its centroid. An
explicit latent (``"0.1,-0.3"``) can be given instead. The UNet for a latent is generated once and kept in
a small LRU cache, so serving many requests of a few styles costs one hyper-network pass per style.

Prediction runs the training preprocessing (orientation, resampling to the training spacing, intensity
scaling), MONAI sliding-window inference with the training ROI, then replays the geometry backwards
(:func:`~hypersort_ray.data.transforms.invert_to_original`): the mask has the input's shape and affine.

Example:
    >>> model = load_model("runs/demo")                                    # doctest: +SKIP
    >>> result = model.predict_file("case.nii.gz", "mask.nii.gz", style="main")  # doctest: +SKIP
    >>> result["mask"].shape == nib.load("case.nii.gz").shape              # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.atomic import atomic_save_nifti
from hypersort_ray.config import ExperimentConfig, UNetConfig, config_to_yaml, load_config
from hypersort_ray.errors import HypersortError, ModelError

__all__ = [
    "MODEL_FORMAT",
    "EXPORT_FORMAT",
    "Style",
    "PreparedInput",
    "HyperSortModel",
    "parse_latent",
    "write_model_dir",
    "load_model",
    "load_exported_unet",
    "predict_cli",
    "export_cli",
]

MODEL_FORMAT = "hypersort-model"
MODEL_VERSION = 1
EXPORT_FORMAT = "hypersort-unet"
MODEL_FILES = ("model.json", "config.yaml", "hypernet.safetensors", "styles.json")
_NIFTI_EXTS = (".nii.gz", ".nii")


# ------------------------------------------------------------------------------------------ styles
@dataclass(frozen=True)
class Style:
    """An annotation style: a named latent (λ = 0 for ``main``, a cluster centroid otherwise).

    Attributes:
        id: ``"main"`` or the cluster id from ``analysis/styles.json`` (as a string).
        latent: the latent vector.
        size: training samples in the cluster (0 when unknown).
        name: a human-readable label.
    """

    id: str
    latent: tuple[float, ...]
    size: int = 0
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "latent": list(self.latent)}


def parse_latent(text: str | Sequence[float], dim: int) -> tuple[float, ...]:
    """``"0.1,-0.3"``, ``"[0.1, -0.3]"`` or a list of numbers → a validated latent of length ``dim``.

    Raises:
        ModelError: not numbers, wrong length, or NaN/inf.

    Example:
        >>> parse_latent("0.5, -1", 2)
        (0.5, -1.0)
    """
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").strip("[]()").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError as exc:
            raise ModelError(f"latent {text!r}: expected comma-separated numbers, e.g. '0.1,-0.3'") from exc
    else:
        try:
            values = [float(v) for v in np.asarray(text, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError) as exc:
            raise ModelError(f"latent {text!r}: expected a list of numbers") from exc
    if len(values) != dim:
        raise ModelError(f"latent has {len(values)} values but the model's latent_dim is {dim}")
    if not all(math.isfinite(v) for v in values):
        raise ModelError(f"latent {values} contains NaN or inf")
    return tuple(values)


def _read_styles(path: Path | None, dim: int) -> tuple[list[Style], dict[str, str]]:
    """Styles from ``styles.json`` (``hypersort analyze`` output or a model folder's normalised copy).

    Returns the styles (``main`` first) and aliases: the main cluster's own id resolves to ``main``.
    """
    styles = [Style("main", (0.0,) * dim, 0, "main style (λ = 0)")]
    aliases: dict[str, str] = {}
    if path is None or not path.is_file():
        return styles, aliases
    try:
        data = json.loads(path.read_text())
        main_id = "" if data.get("main_style") is None else str(data["main_style"])
        entries = data.get("styles", [])
        if not isinstance(entries, list):
            raise TypeError("'styles' must be a list")
        for s in entries:
            sid = str(s["id"])
            size = int(s.get("size", 0) or 0)
            if sid in ("main", main_id):
                styles[0] = Style("main", (0.0,) * dim, size, "main style (λ = 0)")
                if sid != "main":
                    aliases[sid] = "main"
                continue
            centroid = tuple(float(v) for v in s["centroid"])
            if len(centroid) != dim:
                raise ModelError(
                    f"{path}: style {sid} centroid has {len(centroid)} values, but latent_dim is {dim}"
                )
            if not all(math.isfinite(v) for v in centroid):
                raise ModelError(f"{path}: style {sid} centroid contains NaN or inf")
            if any(st.id == sid for st in styles):
                raise ModelError(f"{path}: style id {sid!r} appears twice")
            styles.append(Style(sid, centroid, size, str(s.get("name") or f"style {sid}")))
    except HypersortError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{path}: not a valid styles file ({type(exc).__name__}: {exc})") from exc
    return styles, aliases


def _styles_doc(styles: Sequence[Style]) -> dict[str, Any]:
    """The normalised ``styles.json`` of a model folder: ids, names, sizes, centroids (no case ids)."""
    return {
        "main_style": "main",
        "styles": [
            {"id": s.id, "name": s.name, "size": s.size, "centroid": list(s.latent)} for s in styles
        ],
    }


# ------------------------------------------------------------------------------------ model folder
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, what: str) -> None:
    if expected and _sha256_file(path) != expected:
        raise ModelError(f"{path}: checksum does not match {what} (file corrupt, truncated or replaced)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must hold a JSON object")
    return data


def _load_cfg(path: Path) -> ExperimentConfig:
    try:
        return load_config(path)
    except HypersortError as exc:
        raise ModelError(f"model config {path}: {exc}") from exc


def _checkpoint_parts(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run's checkpoint folder and its meta, with config + weights checked against meta.json."""
    ckpt = run_dir / "checkpoint"
    for name in ("config.yaml", "hypernet.safetensors"):
        if not (ckpt / name).is_file():
            raise ModelError(f"{ckpt / name}: missing; is {run_dir} a finished hypersort run folder?")
    meta = _read_json(ckpt / "meta.json") if (ckpt / "meta.json").is_file() else {}
    files = meta.get("files", {}) if isinstance(meta.get("files"), dict) else {}
    for name in ("config.yaml", "hypernet.safetensors"):
        _verify(ckpt / name, files.get(name), f"{ckpt / 'meta.json'}")
    return ckpt, meta


def write_model_dir(run_dir: str | Path, out: str | Path) -> Path:
    """Gather what inference needs from a run folder into a self-contained model folder.

    The folder holds ``config.yaml`` (the training config, local data paths removed),
    ``hypernet.safetensors`` (H's weights: tensors only, no pickle), ``styles.json`` (ids, names,
    sizes, centroids; no case ids) and ``model.json`` (format, latent_dim, provenance, preprocessing
    and network summary, sha256 of every file). ``out`` is replaced atomically.

    Args:
        run_dir: a run folder from ``hypersort train`` (or ``import-reference``).
        out: the model folder to write.

    Returns:
        ``out``.
    """
    import hypersort_ray
    from hypersort_ray.config import DataConfig

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ModelError(f"run folder {run_dir}: not found")
    ckpt, meta = _checkpoint_parts(run_dir)
    cfg = _load_cfg(ckpt / "config.yaml")
    dim = cfg.model.hypernet.latent_dim
    styles, _ = _read_styles(run_dir / "analysis" / "styles.json", dim)
    # Training-machine paths (datalist, output folder) mean nothing to a consumer of the model.
    cfg = cfg.model_copy(update={"data": DataConfig(), "output_dir": Path(".")})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.yaml").write_text(config_to_yaml(cfg))
        shutil.copyfile(ckpt / "hypernet.safetensors", tmp / "hypernet.safetensors")
        (tmp / "styles.json").write_text(json.dumps(_styles_doc(styles), indent=2) + "\n")
        doc = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "hypersort_version": hypersort_ray.__version__,
            "latent_dim": dim,
            "spatial_dims": cfg.model.unet.spatial_dims,
            "num_classes": cfg.model.unet.out_channels,
            "unet": cfg.model.unet.model_dump(mode="json"),
            "preprocessing": cfg.preprocessing.model_dump(mode="json"),
            "epoch": meta.get("epoch"),
            "num_samples": meta.get("num_samples"),
            "source_run": str(run_dir.resolve()),
            "files": {n: _sha256_file(tmp / n) for n in ("config.yaml", "hypernet.safetensors", "styles.json")},
        }
        (tmp / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class _Source:
    """Where a model's files are: config, weights, styles (may be None) and provenance."""

    config: Path
    weights: Path
    styles: Path | None
    info: dict[str, Any]
    checksums: dict[str, str] = field(default_factory=dict)


def _source_from_path(path: Path, ref: str) -> _Source:
    if (path / "model.json").is_file():
        doc = _read_json(path / "model.json")
        if doc.get("format") != MODEL_FORMAT:
            raise ModelError(f"{path / 'model.json'}: format is {doc.get('format')!r}, expected {MODEL_FORMAT!r}")
        if int(doc.get("version", 0)) > MODEL_VERSION:
            raise ModelError(
                f"{path / 'model.json'}: model format version {doc.get('version')} is newer than this "
                f"hypersort-ray understands ({MODEL_VERSION}); upgrade hypersort-ray"
            )
        info = {"source": ref, **{k: doc[k] for k in ("hypersort_version", "epoch", "num_samples", "source_run") if k in doc}}
        return _Source(path / "config.yaml", path / "hypernet.safetensors", path / "styles.json", info,
                       dict(doc.get("files") or {}))
    if (path / "checkpoint" / "hypernet.safetensors").is_file():
        ckpt, meta = _checkpoint_parts(path)
        info = {"source": ref, "run_dir": str(path.resolve()), "epoch": meta.get("epoch"),
                "num_samples": meta.get("num_samples")}
        return _Source(ckpt / "config.yaml", ckpt / "hypernet.safetensors", path / "analysis" / "styles.json", info)
    if (path / "hypernet.safetensors").is_file() and (path / "config.yaml").is_file():
        meta = _read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
        files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        info = {"source": ref, "epoch": meta.get("epoch"), "num_samples": meta.get("num_samples")}
        return _Source(path / "config.yaml", path / "hypernet.safetensors", None, info,
                       {k: v for k, v in files.items() if k in ("config.yaml", "hypernet.safetensors")})
    raise ModelError(
        f"model {ref!r}: not a hypersort run folder (no checkpoint/hypernet.safetensors), model folder "
        "(no model.json) or checkpoint folder"
    )


def _is_mlflow_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) or bool(re.match(r"^[a-z][a-z0-9+.-]*://", text))


def _mlflow_tracking_uri(explicit: str | None) -> str:
    """Explicit > ``MLFLOW_TRACKING_URI`` > an existing ``./mlflow.db`` (MLflow's own default).

    Never lets MLflow create an empty store in the working folder just to report "not found".
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    local = Path.cwd() / "mlflow.db"
    if local.is_file():
        return f"sqlite:///{local.as_posix()}"
    raise ModelError(
        "an MLflow model URI needs a tracking store: set MLFLOW_TRACKING_URI (e.g. http://host:5000 or "
        "sqlite:///RUN_DIR/mlflow.db)"
    )


def _download_mlflow_model(uri: str, dst: Path, tracking_uri: str | None) -> _Source:
    import yaml

    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        raise ModelError("mlflow is required to load MLflow model URIs") from exc
    from hypersort_ray.tracking.registry import check_reachable, mlflow_store

    store = _mlflow_tracking_uri(tracking_uri)
    try:
        check_reachable(store)
        # MLflow 3.17 resolves models:/ URIs with the *global* registry URI even when download_artifacts
        # is given one (and would create ./mlflow.db), so the store is set globally for the call.
        with mlflow_store(store):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
                )
            )
    except MlflowException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        missing = exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in first.lower()
        what = "not found in" if missing else "cannot be loaded from"
        raise ModelError(f"model {uri!r} {what} the MLflow store {store}: {first}") from exc
    except OSError as exc:
        raise ModelError(f"model {uri!r}: cannot download from {store} ({exc})") from exc
    candidates = []
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        conf = yaml.safe_load(mlmodel.read_text()) or {}
        art = (conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {}).get("hypersort")
        if isinstance(art, dict) and art.get("path"):
            candidates.append(local / art["path"])
    candidates += [local / "artifacts" / "hypersort", local]
    for candidate in candidates:
        if (candidate / "model.json").is_file():
            source = _source_from_path(candidate, uri)
            source.info["source"] = uri
            return source
    raise ModelError(f"model {uri!r}: the MLflow model holds no hypersort model folder (model.json)")


# ------------------------------------------------------------------------------------------- input
@dataclass
class PreparedInput:
    """One input image, validated and preprocessed, ready for any number of latents.

    Attributes:
        prepared: the processed image with its MONAI trace (``PreparedImage``).
        affine: the input's voxel-to-world affine (what the mask is written with).
        shape: the input's spatial shape (the mask's shape).
        header: the input NIfTI header, when the input was a file (kept for writing masks).
        source: the file path, or ``"<array>"``.
        nifti_affine: the 4x4 affine masks are written with (the file's own for file inputs).
        nifti_shape: the spatial shape masks are written with (a 2D model's ``(X, Y, 1)`` file keeps
            its singleton axis).
    """

    prepared: Any
    affine: np.ndarray
    shape: tuple[int, ...]
    header: Any = None
    source: str = "<array>"
    nifti_affine: np.ndarray | None = None
    nifti_shape: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------------- model
@dataclass
class HyperSortModel:
    """A loaded hyper-network with its styles; generates (and caches) one UNet per latent.

    Thread-safe: concurrent requests may share one instance (the generated UNets are only read).

    Args:
        config: the training configuration (network, preprocessing).
        hyper: the hyper-network H (``hypersort_ray.model.hypernet.HyperNetwork``).
        styles: ``main`` (λ = 0) first, then one per discovered cluster.
        info: provenance (source, run folder or MLflow URI, epoch).
        cache_size: how many generated UNets to keep (LRU); 0 disables the cache.
        device: where H and the generated UNets run.
        sw_batch_size: windows per sliding-window forward pass.
        overlap: sliding-window overlap (fraction of the ROI).
        aliases: other ids that name a style (the main cluster's id → ``main``).

    Example:
        >>> model = load_model("runs/demo")                          # doctest: +SKIP
        >>> out = model.predict(np.zeros((40, 40, 40)), style="main")  # doctest: +SKIP
        >>> out["mask"].shape
        (40, 40, 40)
    """

    config: ExperimentConfig
    hyper: Any
    styles: list[Style]
    info: dict[str, Any] = field(default_factory=dict)
    cache_size: int = 32
    device: str = "cpu"
    sw_batch_size: int = 4
    overlap: float = 0.25
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_size < 0:
            raise ModelError(f"cache_size must be >= 0, got {self.cache_size}")
        self._cache: OrderedDict[tuple[float, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    # ---------------------------------------------------------------------------------- describe
    @property
    def latent_dim(self) -> int:
        return self.config.model.hypernet.latent_dim

    @property
    def spatial_dims(self) -> int:
        return self.config.model.unet.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.config.model.unet.in_channels

    @property
    def num_classes(self) -> int:
        return self.config.model.unet.out_channels

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: dimensions, preprocessing, styles, provenance (for /v1/model, --json)."""
        pre = self.config.preprocessing
        return {
            "latent_dim": self.latent_dim,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "roi_size": list(pre.roi_size),
            "spacing": None if pre.spacing is None else list(pre.spacing),
            "orientation": pre.orientation,
            "styles": [s.to_dict() for s in self.styles],
            "cache": self.cache_info(),
            **{k: v for k, v in self.info.items() if isinstance(v, str | int | float | type(None))},
        }

    def style(self, style_id: str) -> Style:
        """The style named ``style_id`` (``main``, a cluster id, or the main cluster's own id)."""
        key = self.aliases.get(str(style_id), str(style_id))
        for s in self.styles:
            if s.id == key:
                return s
        raise ModelError(f"unknown style {style_id!r}; known styles: {', '.join(s.id for s in self.styles)}")

    def resolve(
        self, style: str | None = None, latent: str | Sequence[float] | None = None
    ) -> tuple[tuple[float, ...], str]:
        """The latent and a label for what was asked: an explicit latent, else a style, else ``main``.

        Raises:
            ModelError: both given, unknown style, or a bad latent.
        """
        has_latent = latent is not None and not (isinstance(latent, str) and not latent.strip())
        if has_latent and not isinstance(latent, str) and len(np.asarray(latent).reshape(-1)) == 0:
            has_latent = False
        if has_latent:
            if style not in (None, ""):
                raise ModelError("give either a style or a latent, not both")
            return parse_latent(latent, self.latent_dim), "latent"  # type: ignore[arg-type]
        chosen = self.style(style or "main")
        return chosen.latent, chosen.id

    # ---------------------------------------------------------------------------------- networks
    def unet_for(self, latent: Sequence[float]):
        """The primary UNet with H(λ)'s parameters, generated once per latent (LRU cache).

        The returned module is shared between callers: treat it as read-only (it is in eval mode with
        gradients off).
        """
        import torch

        key = parse_latent(list(latent), self.latent_dim)
        with self._lock:
            net = self._cache.get(key)
            if net is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return net
            self.cache_misses += 1
            # Generation holds the lock: a burst of requests for a new style generates it once.
            with torch.no_grad():
                net = self.hyper.make_primary(torch.tensor(key, dtype=torch.float32))
            net = net.requires_grad_(False).to(self.device).eval()
            if self.cache_size > 0:
                self._cache[key] = net
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return net

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "size", "maxsize"}`` of the generated-UNet cache."""
        with self._lock:
            return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache),
                    "maxsize": self.cache_size}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -------------------------------------------------------------------------------- prediction
    def prepare(self, image: str | Path | np.ndarray, affine: np.ndarray | Sequence[float] | None = None) -> PreparedInput:
        """Validate an image (NIfTI path or array) and run the training preprocessing on it.

        Arrays are ``(*spatial)`` or channel-first ``(C, *spatial)``; NIfTI files are ``(*spatial)`` or
        channel-last ``(*spatial, C)`` (the NIfTI convention). Trailing singleton axes are dropped.

        Args:
            image: a NIfTI path, or an array.
            affine: voxel-to-world affine of an array input (``(d+1, d+1)`` or flat). Default:
                ``diag(training spacing)``, i.e. the array is taken to be at the training resolution.

        Raises:
            ModelError: missing/unreadable file, wrong dimensionality or channels (e.g. a 2D image for a
                3D model), NaN/inf voxels, a bad affine.
        """
        from hypersort_ray.data.transforms import load_image_for_inference

        header, nifti_affine, nifti_shape = None, None, None
        if isinstance(image, str | Path):
            data, affine_arr, header, source = self._read_nifti(Path(image))
            nifti_affine = np.asarray(header.get_best_affine(), dtype=np.float64)
            nifti_shape = tuple(int(s) for s in data.shape[: max(3, self.spatial_dims)])
            channel_last = True
        else:
            if affine is not None and not isinstance(affine, np.ndarray) and len(affine) == 0:
                affine = None
            data, source, channel_last = self._as_array(image), "<array>", False
            affine_arr = None if affine is None else self._check_affine(affine)
        data = self._channels_first(data, channel_last, source)
        if not np.isfinite(data).all():
            bad = int(data.size - np.isfinite(data).sum())
            raise ModelError(f"image {source}: contains {bad} NaN or inf voxel(s)")
        try:
            prepared = load_image_for_inference(data, self.config.preprocessing, affine=affine_arr)
        except HypersortError as exc:
            raise ModelError(f"image {source}: {exc}") from exc
        return PreparedInput(
            prepared=prepared,
            affine=np.asarray(prepared.original_affine, dtype=np.float64),
            shape=tuple(int(s) for s in data.shape[1:]),
            header=header,
            source=source,
            nifti_affine=nifti_affine,
            nifti_shape=nifti_shape,
        )

    def _read_nifti(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, str]:
        import nibabel as nib

        if not path.is_file():
            raise ModelError(f"image {path}: no such file")
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
            raise ModelError(f"image {path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
        return data, self._check_affine(img.affine, source=str(path)), img.header, str(path)

    def _as_array(self, image: Any) -> np.ndarray:
        try:
            arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"image: cannot be read as an array ({exc})") from exc
        if arr.dtype.kind not in "biuf":
            raise ModelError(f"image: array dtype {arr.dtype} is not numeric")
        return arr.astype(np.float32, copy=False)

    def _check_affine(self, affine: Any, source: str = "<array>") -> np.ndarray:
        n = self.spatial_dims + 1
        try:
            arr = np.asarray(affine, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"affine of {source}: not numbers ({exc})") from exc
        if arr.ndim == 1 and arr.size in (n * n, 16):
            side = n if arr.size == n * n else 4
            arr = arr.reshape(side, side)
        if arr.shape == (4, 4) and n == 3:  # a NIfTI affine for a 2D model: keep the in-plane part
            arr = arr[np.ix_([0, 1, 3], [0, 1, 3])]
        if arr.shape != (n, n):
            raise ModelError(f"affine of {source}: shape {arr.shape}, expected ({n}, {n}) (or {n * n} values)")
        if not np.isfinite(arr).all():
            raise ModelError(f"affine of {source}: contains NaN or inf")
        if abs(np.linalg.det(arr[:-1, :-1])) < 1e-12:
            raise ModelError(f"affine of {source}: singular (zero voxel size or collapsed axes)")
        return arr

    def _channels_first(self, data: np.ndarray, channel_last: bool, source: str) -> np.ndarray:
        dims, channels = self.spatial_dims, self.in_channels
        shape = tuple(data.shape)
        while data.ndim > dims and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == dims and channels == 1:
            data = data[None]
        elif data.ndim == dims + 1 and channel_last and data.shape[-1] == channels:
            data = np.moveaxis(data, -1, 0)
        elif data.ndim == dims + 1 and not channel_last and data.shape[0] == channels:
            pass
        else:
            layout = f"{'x'.join('N' * dims)}" + ("" if channels == 1 else f" with {channels} channels")
            raise ModelError(
                f"image {source}: shape {shape} does not fit the model, which segments {dims}D volumes "
                f"({layout}); a {len(shape)}D input cannot be used"
            )
        if any(s < 2 for s in data.shape[1:]):
            raise ModelError(
                f"image {source}: shape {shape} has a spatial axis of size 1 (a 2D slice?); the model "
                f"segments {dims}D volumes"
            )
        return np.ascontiguousarray(data)

    def predict_processed(self, image: Any, latent: Sequence[float]):
        """Class probabilities ``(K, *spatial)`` (CPU tensor) for a preprocessed image ``(C, *spatial)``."""
        import torch
        from monai.inferers import sliding_window_inference

        net = self.unet_for(latent)
        roi = tuple(int(r) for r in self.config.preprocessing.roi_size)
        x = torch.as_tensor(image).float()
        if hasattr(x, "as_tensor"):  # MetaTensor → plain tensor: no meta bookkeeping in the UNet
            x = x.as_tensor()
        x = x.unsqueeze(0).to(self.device)
        with torch.no_grad():
            logits = sliding_window_inference(
                x, roi, self.sw_batch_size, net, overlap=self.overlap, mode="gaussian"
            )
            logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
            return torch.softmax(logits.float(), dim=1)[0].cpu()

    def predict_prepared(self, prepared: PreparedInput, latent: Sequence[float], *, probabilities: bool = False) -> dict[str, Any]:
        """Segment a :class:`PreparedInput` with one latent; arrays in the input's grid.

        Returns:
            ``{"mask": (*shape) uint8, "probabilities": (K, *shape) float32 (when asked)}``.
        """
        from hypersort_ray.data.transforms import invert_to_original

        probs = self.predict_processed(prepared.prepared.image, latent)
        restored = invert_to_original(probs, prepared.prepared, self.config.preprocessing)
        restored = np.asarray(restored, dtype=np.float32)
        # Linear resampling keeps convex combinations, but voxels the processed grid does not cover get
        # zeros from padding: renormalise, and call uncovered voxels background.
        total = restored.sum(axis=0, keepdims=True)
        uncovered = total[0] <= 1e-6
        restored = np.divide(restored, np.maximum(total, 1e-6))
        if uncovered.any():
            restored[:, uncovered] = 0.0
            restored[0, uncovered] = 1.0
        dtype = np.uint8 if self.num_classes <= 256 else np.uint16
        out: dict[str, Any] = {"mask": np.argmax(restored, axis=0).astype(dtype)}
        if tuple(out["mask"].shape) != prepared.shape:  # the inverse trace must land on the input grid
            raise ModelError(
                f"image {prepared.source}: prediction came back with shape {out['mask'].shape}, "
                f"expected {prepared.shape}"
            )
        if probabilities:
            out["probabilities"] = restored
        return out

    def predict(
        self,
        image: str | Path | np.ndarray | PreparedInput,
        *,
        affine: np.ndarray | Sequence[float] | None = None,
        style: str | None = None,
        latent: str | Sequence[float] | None = None,
        probabilities: bool = False,
    ) -> dict[str, Any]:
        """Segment a NIfTI path or an array; the mask lives in the input's grid (shape and affine).

        Args:
            image: NIfTI path, array (see :meth:`prepare`) or a :class:`PreparedInput`.
            affine: the array's affine (ignored for files).
            style: ``main`` (default) or a style id.
            latent: an explicit latent instead of a style.
            probabilities: also return the class probabilities.

        Returns:
            ``{"mask", "affine", "style", "latent"}`` and ``"probabilities"`` ``(K, *shape)`` float32
            when asked.
        """
        values, used = self.resolve(style, latent)
        prepared = image if isinstance(image, PreparedInput) else self.prepare(image, affine)
        out = self.predict_prepared(prepared, values, probabilities=probabilities)
        return {**out, "affine": prepared.affine, "style": used, "latent": list(values)}

    def predict_file(self, image: str | Path | PreparedInput, out: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Predict and write the mask NIfTI (input affine, shape and header; uint8).

        With ``probabilities=True`` the class probabilities go to ``<out>_probs.nii.gz``
        (``(*shape, K)`` float32) and their path is returned as ``"probabilities_path"``.
        """
        out = _nifti_path(out, "--out")
        prepared = image if isinstance(image, PreparedInput) else self.prepare(image)
        result = self.predict(prepared, **kwargs)
        write_nifti(out, result["mask"], prepared)
        if "probabilities" in result:
            path = _sibling(out, "_probs")
            write_nifti(path, np.moveaxis(result["probabilities"], 0, -1), prepared)
            result["probabilities_path"] = str(path)
        result["path"] = str(out)
        return result


# ------------------------------------------------------------------------------------ NIfTI output
def _nifti_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.name.endswith(_NIFTI_EXTS):
        raise ModelError(f"{what} {path}: must end with .nii.gz or .nii")
    return path


def _sibling(path: Path, suffix: str) -> Path:
    name = path.name
    for ext in _NIFTI_EXTS:
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + suffix + ext)
    return path.with_name(name + suffix)


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for ext in _NIFTI_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _nifti_geometry(prepared: PreparedInput) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 4x4 affine and spatial shape to write: the input file's, or the array's embedded in 3D."""
    if prepared.nifti_affine is not None and prepared.nifti_shape is not None:
        return prepared.nifti_affine, prepared.nifti_shape
    aff = prepared.affine
    if aff.shape == (3, 3):  # 2D model: embed the in-plane affine in 3D
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = aff
        return full, (*prepared.shape, 1)
    return aff, prepared.shape


def write_nifti(path: str | Path, data: np.ndarray, prepared: PreparedInput) -> Path:
    """Write ``data`` (``(*shape)`` or ``(*shape, K)``) on the input's grid, atomically.

    A file input's header is reused (qform/sform codes, units, orientation); intensity scaling is
    reset so values are stored as given.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine, shape = _nifti_geometry(prepared)
    extra = tuple(data.shape[len(prepared.shape) :])  # probabilities: trailing class axis
    data = np.ascontiguousarray(data.reshape(*shape, *extra))
    header = prepared.header.copy() if prepared.header is not None else None
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is not None:  # same qform/sform codes as the input: the mask reads back like it
        img.set_qform(affine, code=int(header["qform_code"]))
        img.set_sform(affine, code=int(header["sform_code"]))
    return atomic_save_nifti(img, path)


# ------------------------------------------------------------------------------------------ loading
def load_model(
    ref: str | Path,
    *,
    device: str = "cpu",
    cache_size: int = 32,
    tracking_uri: str | None = None,
) -> HyperSortModel:
    """Load a run folder, model folder or MLflow model URI (see the module docstring).

    Args:
        ref: the model reference.
        device: ``cpu`` or ``cuda[:i]``.
        cache_size: generated UNets kept (LRU).
        tracking_uri: MLflow store for ``models:/``/``runs:/`` URIs (default ``MLFLOW_TRACKING_URI``).

    Raises:
        ModelError: not found, not a hypersort model, corrupt or mismatched weights.
    """
    text = str(ref)
    if _is_mlflow_uri(text):
        with tempfile.TemporaryDirectory(prefix="hypersort-model-") as tmp:
            # Everything is read into memory below, so the download can go when we are done.
            return _load_from_source(_download_mlflow_model(text, Path(tmp), tracking_uri), device, cache_size)
    path = Path(text)
    if not path.exists():
        raise ModelError(f"model {text!r}: no such run folder or model folder, and not an MLflow URI")
    return _load_from_source(_source_from_path(path, text), device, cache_size)


def _load_from_source(source: _Source, device: str, cache_size: int) -> HyperSortModel:
    import torch
    from safetensors.torch import load_file

    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.unet import build_primary

    for name, path in (("config.yaml", source.config), ("hypernet.safetensors", source.weights),
                       ("styles.json", source.styles)):
        if path is not None and path.is_file():
            _verify(path, source.checksums.get(name), "the model's recorded checksum")
    cfg = _load_cfg(source.config)
    hn = cfg.model.hypernet
    try:
        state = load_file(str(source.weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a bad header
        raise ModelError(f"{source.weights}: cannot read weights ({exc})") from exc
    hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)
    try:
        hyper.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{source.weights}: weights do not match the network in {source.config} ({str(exc).splitlines()[0]})"
        ) from exc
    hyper.requires_grad_(False).eval().to(torch.device(device))
    styles, aliases = _read_styles(source.styles, hn.latent_dim)
    return HyperSortModel(cfg, hyper, styles, info=source.info, cache_size=cache_size, device=device,
                          aliases=aliases)


# ------------------------------------------------------------------------------------------ export
def _resolve_export_style(model: HyperSortModel, style: str) -> tuple[tuple[float, ...], str]:
    """A style id first; otherwise, when it parses as numbers, an explicit latent."""
    try:
        return model.resolve(style, None)
    except ModelError as unknown:
        try:
            return model.resolve(None, style)
        except ModelError:
            raise unknown from None


def load_exported_unet(path: str | Path):
    """Load a file written by ``hypersort export``: an ``nn.Module`` in eval mode.

    ``state_dict`` exports (safetensors) are rebuilt as ``build_primary(UNetConfig(**metadata["unet"]))``
    with ``strict=True``; TorchScript exports are loaded with ``torch.jit.load``. Neither unpickles.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hypersort_ray.model.unet import build_primary

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported model {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors: try TorchScript
        meta = None
    if meta is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"exported model {path}: neither safetensors nor TorchScript ({exc})") from exc
    if meta.get("format") != EXPORT_FORMAT or "unet" not in meta:
        raise ModelError(f"exported model {path}: safetensors without hypersort metadata (format, unet)")
    net = build_primary(UNetConfig(**json.loads(meta["unet"])))
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"exported model {path}: weights do not match its UNet config ({exc})") from exc
    return net.requires_grad_(False).eval()


def export_cli(model: str, *, style: str, out: Path, fmt: str) -> dict[str, Any]:
    """Write a plain fixed-style UNet: TorchScript, or a state_dict (safetensors) for the primary class.

    Args:
        model: run folder, model folder or MLflow URI.
        style: ``main``, a style id, or a latent like ``"0.1,-0.3"``.
        out: the output file.
        fmt: ``torchscript`` or ``state_dict``.

    Returns:
        ``{"out", "format", "style", "latent"}``.
    """
    from safetensors.torch import save_file

    if fmt not in ("torchscript", "state_dict"):
        raise ModelError(f"--format {fmt!r}: expected torchscript or state_dict")
    m = load_model(model)
    values, used = _resolve_export_style(m, style)
    net = m.unet_for(values)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": EXPORT_FORMAT,
        "version": "1",
        "unet": json.dumps(m.config.model.unet.model_dump(mode="json")),
        "preprocessing": json.dumps(m.config.preprocessing.model_dump(mode="json")),
        "style": used,
        "latent": json.dumps(list(values)),
        "source": str(m.info.get("source", model)),
    }
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if fmt == "torchscript":
            _save_torchscript(net, m, tmp, meta)
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": fmt, "style": used, "latent": list(values)}


def _save_torchscript(net: Any, m: HyperSortModel, path: Path, meta: dict[str, str]) -> None:
    """Script the network, or trace it where scripting fails (our UNet's forward dispatches on layer
    names, which TorchScript cannot compile).

    A trace must not freeze shape-dependent logic, so the result is checked against the eager network
    on a second input of another batch size and another shape (small sizes: cheap for any ROI).
    """
    import torch

    unet = m.config.model.unet
    factor = 2**unet.n_down if unet.kind == "hypersort_unet" else 16
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, m.in_channels, *[2 * factor] * m.spatial_dims, generator=gen)
    other = torch.randn(2, m.in_channels, *[factor * k for k in (3, 2, 4)[: m.spatial_dims]], generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the input-shape check; jit deprecation
        try:
            compiled = torch.jit.script(net)
        except Exception:  # noqa: BLE001 - TorchScript raises several types for unsupported Python
            compiled = torch.jit.trace(net, example, check_trace=False)
        with torch.no_grad():
            if not torch.allclose(compiled(other), net(other), atol=1e-5, rtol=1e-4):
                raise ModelError("TorchScript export: the compiled UNet does not reproduce the network")
        torch.jit.save(compiled, str(path), _extra_files={"hypersort.json": json.dumps(meta)})


# ---------------------------------------------------------------------------------------- CLI glue
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "style"


def predict_cli(
    model: str,
    *,
    image: Path,
    out: Path,
    style: str | None = None,
    latent: str | None = None,
    all_styles: bool = False,
    probabilities: bool = False,
) -> dict[str, Any]:
    """``hypersort predict``: one mask (``--out`` file), or one per style (``--out`` folder)."""
    m = load_model(model)
    if all_styles:
        if style or latent:
            raise ModelError("--all-styles cannot be combined with --style or --latent")
        out = Path(out)
        if out.name.endswith(_NIFTI_EXTS) or out.is_file():
            raise ModelError(f"--out {out}: with --all-styles, --out is a folder (one mask per style)")
        prepared = m.prepare(image)
        masks: dict[str, str] = {}
        probs: dict[str, str] = {}
        for s in m.styles:
            target = out / f"{_stem(image)}_style-{_safe_name(s.id)}.nii.gz"
            result = m.predict_file(prepared, target, style=s.id, probabilities=probabilities)
            masks[s.id] = str(target)
            if "probabilities_path" in result:
                probs[s.id] = result["probabilities_path"]
        summary: dict[str, Any] = {"image": str(image), "out": str(out), "masks": masks}
        if probs:
            summary["probabilities"] = probs
        return summary
    result = m.predict_file(image, out, style=style, latent=latent, probabilities=probabilities)
    summary = {
        "image": str(image),
        "mask": str(out),
        "style": result["style"],
        "latent": result["latent"],
        "foreground_voxels": int((result["mask"] > 0).sum()),
    }
    if "probabilities_path" in result:
        summary["probabilities"] = result["probabilities_path"]
    return summary

