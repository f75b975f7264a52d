"""A loaded hyper-network with its styles: λ → UNet → sliding-window prediction in the input's geometry.

A *style* is a named latent: ``main`` is λ = 0 (the paper's canonical choice: the L1 pull puts the main
annotation mode at the origin); every other cluster found by ``hypersort analyze`` is its centroid. An
explicit latent (``"0.1,-0.3"``) can be given instead. The UNet for a latent is generated once and kept in
a small LRU cache, so serving many requests of a few styles costs one hyper-network pass per style.

Prediction runs the training preprocessing (orientation, resampling to the training spacing, intensity
scaling), MONAI sliding-window inference with the training ROI, then replays the geometry backwards
(:func:`~hypersort_ray.data.transforms.invert_to_original`): the mask has the input's shape and affine,
and is written with the input's header facts (:mod:`hypersort_ray.data.nifti`).

Example:
    >>> model = load_model("runs/demo")                                    # doctest: +SKIP
    >>> result = model.predict_file("case.nii.gz", "mask.nii.gz", style="main")  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.nifti import NIFTI_EXTENSIONS, NiftiGeometry, save_like
from hypersort_ray.errors import HypersortError, ModelError
from hypersort_ray.inference.inputs import (
    channels_first,
    check_affine,
    parse_latent,
    read_nifti,
    to_float_array,
)
from hypersort_ray.runs.styles import Style

__all__ = ["HyperSortModel", "PreparedInput", "nifti_path", "sibling_path"]


# ------------------------------------------------------------------------------------------- input
@dataclass
class PreparedInput:
    """One input image, validated and preprocessed, ready for any number of latents.

    Attributes:
        prepared: the processed image with its MONAI trace (``PreparedImage``).
        affine: the input's voxel-to-world affine (``(d+1, d+1)``).
        shape: the input's spatial shape (the mask's shape).
        geometry: what masks are written with: the file's own grid and header facts (a 2D model's
            ``(X, Y, 1)`` file keeps its singleton axis), or the array's affine embedded in 3D.
        source: the file path, or ``"<array>"``.
    """

    prepared: Any
    affine: np.ndarray
    shape: tuple[int, ...]
    geometry: NiftiGeometry
    source: str = "<array>"


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
    #: stitched outputs larger than this stay in host memory when the windows run on a GPU
    gpu_stitch_limit_bytes: int = 2 << 30
    #: run a lone window (a volume that fits one window, or the last partial window batch) as a batch of
    #: two copies: on CPU, oneDNN takes a slow path for small batch-1 3D convolutions (measured 3x slower
    #: than a batch of 2 at 32³, not at 64³); :meth:`calibrate_single_window` decides by timing both
    pad_single_windows: bool = False

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

        dims = self.spatial_dims
        geometry = None
        if isinstance(image, str | Path):
            source = str(image)
            data, img = read_nifti(Path(image))
            affine_arr = check_affine(img.affine, dims, source=source)
            try:
                geometry = NiftiGeometry.from_header(img.header, shape=data.shape[: max(3, dims)], source=source)
            except HypersortError as exc:
                raise ModelError(f"image {exc}") from exc
            channel_last = True
        else:
            if affine is not None and not isinstance(affine, np.ndarray) and len(affine) == 0:
                affine = None
            data, source, channel_last = to_float_array(image), "<array>", False
            affine_arr = None if affine is None else check_affine(affine, dims)
        data = channels_first(data, channel_last, source, dims, self.in_channels)
        if not np.isfinite(data).all():
            bad = int(data.size - np.isfinite(data).sum())
            raise ModelError(f"image {source}: contains {bad} NaN or inf voxel(s)")
        try:
            prepared = load_image_for_inference(data, self.config.preprocessing, affine=affine_arr)
        except HypersortError as exc:
            raise ModelError(f"image {source}: {exc}") from exc
        shape = tuple(int(s) for s in data.shape[1:])
        affine_out = np.asarray(prepared.original_affine, dtype=np.float64)
        return PreparedInput(
            prepared=prepared,
            affine=affine_out,
            shape=shape,
            geometry=geometry or _array_geometry(affine_out, shape),
            source=source,
        )

    def predict_processed(self, image: Any, latent: Sequence[float], *, net: Any = None):
        """Class probabilities ``(K, *spatial)`` (CPU tensor) for a preprocessed image ``(C, *spatial)``.

        On a GPU only the windows travel: the volume stays in host memory, and the stitched logits too
        when they would take more than :attr:`gpu_stitch_limit_bytes`, so a large volume never has to fit
        the GPU whole.
        """
        import torch
        from monai.inferers import sliding_window_inference

        net = self.unet_for(latent) if net is None else net
        roi = tuple(int(r) for r in self.config.preprocessing.roi_size)
        x = torch.as_tensor(image).float()
        if hasattr(x, "as_tensor"):  # MetaTensor → plain tensor: no meta bookkeeping in the UNet
            x = x.as_tensor()
        x = x.unsqueeze(0)
        device = torch.device(self.device)
        stitched = self.num_classes * x[0, 0].numel() * 4 * 2  # logits + the overlap weights, float32
        out_device = device if device.type == "cpu" or stitched <= self.gpu_stitch_limit_bytes else torch.device("cpu")
        predictor = _pad_lone_windows(net) if self.pad_single_windows else net
        with torch.no_grad():
            logits = sliding_window_inference(
                x, roi, self.sw_batch_size, predictor, overlap=self.overlap, mode="gaussian",
                sw_device=device, device=out_device,
            )
            logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
            return torch.softmax(logits.float(), dim=1)[0].cpu()

    def calibrate_single_window(self, repeats: int = 3) -> bool:
        """Time a lone ROI window as batch 1 and as a batch of two copies (main style, this device) and set
        :attr:`pad_single_windows` when the pair is faster; returns the decision. CPU only (GPUs have no such
        path); costs a few forward passes (the serving replica does it once, at warm-up)."""
        import time

        import torch

        if torch.device(self.device).type != "cpu":
            self.pad_single_windows = False
            return False
        net = self.unet_for(self.resolve("main")[0])
        roi = tuple(int(r) for r in self.config.preprocessing.roi_size)
        one = torch.randn(1, self.in_channels, *roi, generator=torch.Generator().manual_seed(0))
        two = torch.cat([one, one])
        best = {1: float("inf"), 2: float("inf")}
        with torch.no_grad():
            net(one), net(two)
            for _ in range(repeats):
                for x in (one, two):
                    t0 = time.perf_counter()
                    net(x)
                    best[x.shape[0]] = min(best[x.shape[0]], time.perf_counter() - t0)
        self.pad_single_windows = best[2] < best[1]
        return self.pad_single_windows

    def predict_prepared(
        self, prepared: PreparedInput, latent: Sequence[float], *, probabilities: bool = False, net: Any = None
    ) -> dict[str, Any]:
        """Segment a :class:`PreparedInput` with one latent (``net``: its UNet, when the caller already
        generated it); arrays in the input's grid.

        Returns:
            ``{"mask": (*shape) uint8, "probabilities": (K, *shape) float32 (when asked)}``.
        """
        from hypersort_ray.data.transforms import invert_to_original

        probs = self.predict_processed(prepared.prepared.image, latent, net=net)
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
        """Predict and write the mask NIfTI (the input's grid and header facts; uint8).

        With ``probabilities=True`` the class probabilities go to ``<out>_probs.nii.gz``
        (``(*shape, K)`` float32) and their path is returned as ``"probabilities_path"``.
        """
        out = nifti_path(out, "--out")
        prepared = image if isinstance(image, PreparedInput) else self.prepare(image)
        result = self.predict(prepared, **kwargs)
        save_like(out, result["mask"], prepared.geometry)
        if "probabilities" in result:
            path = sibling_path(out, "_probs")
            save_like(path, np.moveaxis(result["probabilities"], 0, -1), prepared.geometry)
            result["probabilities_path"] = str(path)
        result["path"] = str(out)
        return result


def _pad_lone_windows(net: Any):
    """``net`` with a batch of one window run as two copies (see ``HyperSortModel.pad_single_windows``)."""
    import torch

    def predictor(x):
        if x.shape[0] != 1:
            return net(x)
        return net(torch.cat([x, x]))[:1]

    return predictor


def _array_geometry(affine: np.ndarray, shape: tuple[int, ...]) -> NiftiGeometry:
    """An array input's geometry; a 2D model's in-plane affine is embedded in 3D (``(X, Y, 1)``)."""
    if affine.shape == (3, 3):
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = affine
        return NiftiGeometry.from_affine(full, (*shape, 1))
    return NiftiGeometry.from_affine(affine, shape)


def nifti_path(path: str | Path, what: str) -> Path:
    """``path`` when it ends with ``.nii.gz``/``.nii``, else :class:`ModelError` naming the flag."""
    path = Path(path)
    if not path.name.endswith(NIFTI_EXTENSIONS):
        raise ModelError(f"{what} {path}: must end with .nii.gz or .nii")
    return path


def sibling_path(path: Path, suffix: str) -> Path:
    """``case.nii.gz`` → ``case<suffix>.nii.gz``."""
    name = path.name
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + suffix + ext)
    return path.with_name(name + suffix)
