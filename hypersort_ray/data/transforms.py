"""MONAI preprocessing built from :class:`~hypersort_ray.config.PreprocessConfig`, datasets, and the
inverse mapping of predictions back to the original image grid.

Training pipeline (dict keys ``image``, ``label``)::

    LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRangePercentilesd
    -> MapLabelsd -> crop to roi_size -> [RandFlipd, RandShiftIntensityd, RandScaleIntensityd,
    RandGaussianNoised] -> EnsureTyped

Everything up to the first random transform is deterministic, so ``CacheDataset``/``PersistentDataset``
cache it and an epoch only replays the random tail. Outputs: ``image`` float32 ``(C, *roi)`` scaled to
[0, 1]; ``label`` float32 ``(1, *roi)`` holding integer class indices (MONAI's convention; the loss uses
``DiceCELoss(to_onehot_y=True)``, which casts to long itself). Both are plain ``torch.Tensor``: training
needs no metadata and MetaTensor bookkeeping slows small convolutions down.

Crop modes (``pre.crop``):

* ``center`` -- ``ResizeWithPadOrCropd``: centre crop, zero-padded where the volume is smaller.
* ``random`` -- ``SpatialPadd`` to at least ``roi_size`` (cached), then ``RandSpatialCropd`` each epoch.
* ``foreground`` -- deterministic: the ROI is centred on the bounding box of the (mapped) foreground,
  shifted to stay inside the volume (centre crop when a label is empty). Chosen over
  ``RandCropByPosNegLabeld`` because HyperSORT learns one latent per *sample*: a patch that wanders from
  epoch to epoch adds variance the latent must not explain, and a fixed patch is cacheable.

Inference: :func:`load_image_for_inference` runs the same geometry and intensity steps without crop or
label; :func:`invert_to_original` maps a prediction made on that grid back to the input file's grid with
MONAI's traced inverses (``Invertd``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, list_data_collate
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)
from monai.transforms.utils import reset_ops_id

from hypersort_ray.config import LabelConfig, PreprocessConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.errors import ConfigError, DataError

__all__ = [
    "ForegroundCenterCropd",
    "MapLabelsd",
    "PreparedImage",
    "build_dataset",
    "build_inference_transforms",
    "build_train_transforms",
    "collate",
    "invert_prediction",
    "invert_to_original",
    "geometry_steps",
    "load_image_for_inference",
    "model_grid_shape",
]

KEYS = ("image", "label")
READER = "NibabelReader"
# Orientationd's axis labels, given explicitly: MONAI 1.6 warns that its default will change to "use the
# MetaTensor's space"; nibabel volumes are RAS either way, so pin today's meaning.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# ------------------------------------------------------------------------------- custom transforms
def map_label_values(raw: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Label file values -> class indices (int64), the numpy twin of :class:`MapLabelsd`.

    Analysis and correction use it to compare given labels with predictions the way training saw them.
    """
    values = np.round(np.asarray(raw))
    if cfg.class_map:
        out = np.zeros(values.shape, dtype=np.int64)
        for value, cls in cfg.class_map.items():
            out[values == value] = cls
        return out
    if cfg.foreground is not None:
        return np.isin(values, np.asarray(cfg.foreground)).astype(np.int64)
    return (values > 0).astype(np.int64)


class MapLabelsd(MapTransform):
    """Map raw label values to class indices as configured by :class:`LabelConfig`.

    * ``foreground=[v, ...]``: those values -> 1, everything else -> 0 (binary task);
    * ``class_map={value: class}``: mapped values -> their class, unmapped -> 0;
    * neither: every value > 0 -> 1.

    Args:
        keys: label keys.
        config: the label mapping.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: Sequence[Hashable] | Hashable, config: LabelConfig, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.config = config

    def map_tensor(self, label: torch.Tensor) -> torch.Tensor:
        # Labels were resampled with nearest interpolation but are float: round before comparing.
        values = torch.round(label)
        cfg = self.config
        if cfg.class_map:
            out = torch.zeros_like(values)
            for value, cls in cfg.class_map.items():
                out[values == value] = cls
            return out
        if cfg.foreground is not None:
            fg = torch.as_tensor(cfg.foreground, dtype=values.dtype, device=values.device)
            return torch.isin(values, fg).to(values.dtype)
        return (values > 0).to(values.dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.map_tensor(d[key])
        return d


class ForegroundCenterCropd(MapTransform):
    """Crop ``roi_size`` centred on the foreground bounding box of ``source_key`` (deterministic).

    The window is shifted to lie inside the volume, so pad to at least ``roi_size`` first. Uses MONAI's
    ``SpatialCrop`` so the crop is traced like any other MONAI crop.

    Args:
        keys: keys to crop.
        source_key: label whose voxels > 0 define the foreground.
        roi_size: output spatial size.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        source_key: str,
        roi_size: Sequence[int],
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.roi_size = [int(s) for s in roi_size]

    def window(self, label: torch.Tensor) -> tuple[list[int], list[int]]:
        """Start and end of the crop window for ``label`` (C, *spatial)."""
        shape = list(label.shape[1:])
        fg = torch.nonzero(torch.as_tensor(label).amax(0) > 0)
        if fg.numel():
            center = ((fg.amin(0) + fg.amax(0)).float() / 2).round().long().tolist()
        else:
            center = [s // 2 for s in shape]
        start = [
            min(max(c - r // 2, 0), max(s - r, 0))
            for c, r, s in zip(center, self.roi_size, shape, strict=True)
        ]
        return start, [b + r for b, r in zip(start, self.roi_size, strict=True)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start, end = self.window(d[self.source_key])
        crop = SpatialCrop(roi_start=start, roi_end=end)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


# ------------------------------------------------------------------------------------- pipelines
def _geometry(pre: PreprocessConfig, keys: Sequence[str], modes: Sequence[str]) -> list[Any]:
    """Orientation and resampling: the invertible part shared by training and inference."""
    return geometry_steps(pre.orientation, pre.spacing, len(pre.roi_size), keys, modes)


def geometry_steps(
    orientation: str | None, spacing: Sequence[float] | None, dims: int, keys: Sequence[str], modes: Sequence[str]
) -> list[Any]:
    """MONAI's orientation (to ``orientation``) and resampling (to ``spacing`` mm) steps for ``dims``
    spatial dims; either may be None (no such step)."""
    steps: list[Any] = []
    if orientation is not None:
        # "RAS" for a 2D model means "RA": MONAI warns about (and mishandles) longer codes.
        steps.append(Orientationd(keys=list(keys), axcodes=orientation[:dims], labels=RAS_LABELS))
    if spacing is not None:
        steps.append(Spacingd(keys=list(keys), pixdim=list(spacing), mode=list(modes)))
    return steps


def model_grid_shape(
    shape: Sequence[int], affine: np.ndarray, *, orientation: str | None, spacing: Sequence[float] | None
) -> tuple[int, ...]:
    """The spatial shape that the orientation and resampling steps give a volume of ``shape`` with
    ``affine``, in the model's axis order: MONAI's own transforms run lazily on a placeholder of that shape
    (metadata only, 4 bytes whatever the shape), so oblique and sheared affines get the very grid the
    real preprocessing builds, before a voxel is decoded.

    Example:
        >>> model_grid_shape((40, 30, 20), np.diag([1.0, 1.0, 4.0, 1.0]), orientation="RAS", spacing=(2, 2, 2))
        (20, 16, 39)
    """
    dims = len(shape)
    placeholder = torch.zeros((1,) * (dims + 1)).expand(1, *(int(s) for s in shape))
    data: Any = {"image": MetaTensor(placeholder, affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))}
    for step in geometry_steps(orientation, spacing, dims, ("image",), ("bilinear",)):
        data = step(data, lazy=True)
    return tuple(int(s) for s in data["image"].peek_pending_shape())


def _intensity(pre: PreprocessConfig) -> Any:
    it = pre.intensity
    return ScaleIntensityRangePercentilesd(
        keys="image", lower=it.lower_percentile, upper=it.upper_percentile, b_min=0.0, b_max=1.0, clip=it.clip
    )


def _crop(pre: PreprocessConfig) -> list[Any]:
    roi = list(pre.roi_size)
    keys = list(KEYS)
    if pre.crop == "center":
        return [ResizeWithPadOrCropd(keys=keys, spatial_size=roi)]
    pad = SpatialPadd(keys=keys, spatial_size=roi)
    if pre.crop == "random":
        return [pad, RandSpatialCropd(keys=keys, roi_size=roi, random_size=False)]
    return [pad, ForegroundCenterCropd(keys=keys, source_key="label", roi_size=roi)]


def _augment(pre: PreprocessConfig) -> list[Any]:
    aug = pre.augment
    if not aug.enabled:
        return []
    steps: list[Any] = []
    if aug.flip_prob > 0:
        # One flip per axis, each with its own coin: 2**dims orientations, not just "all or none".
        steps += [
            RandFlipd(keys=list(KEYS), prob=aug.flip_prob, spatial_axis=axis)
            for axis in range(len(pre.roi_size))
        ]
    if aug.intensity_shift > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=1.0))
    if aug.intensity_scale > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=1.0))
    if aug.noise_std > 0:
        steps.append(RandGaussianNoised(keys="image", prob=1.0, std=aug.noise_std))
    return steps


def build_train_transforms(pre: PreprocessConfig, num_classes: int, *, seed: int | None = None) -> Compose:
    """Training pipeline for dicts with ``image`` and ``label`` file paths.

    Args:
        pre: preprocessing settings.
        num_classes: classes the model predicts; must agree with ``pre.label`` (2 unless ``class_map``).
        seed: seeds the random transforms (crop position, augmentation) for reproducible epochs.

    Returns:
        A ``Compose``: deterministic steps first, random steps after (cache-friendly).

    Example:
        >>> t = build_train_transforms(PreprocessConfig(roi_size=[16, 16, 16]), num_classes=2)  # doctest: +SKIP
        >>> item = t({"image": "img.nii.gz", "label": "lab.nii.gz"})                            # doctest: +SKIP
        >>> item["image"].shape, item["label"].shape                                             # doctest: +SKIP
        (torch.Size([1, 16, 16, 16]), torch.Size([1, 16, 16, 16]))
    """
    if num_classes != pre.label.num_classes:
        raise ConfigError(
            f"preprocessing.label gives {pre.label.num_classes} classes but the model predicts {num_classes}"
        )
    steps = [
        LoadImaged(keys=list(KEYS), reader=READER, image_only=True),
        EnsureChannelFirstd(keys=list(KEYS)),
        *_geometry(pre, KEYS, ("bilinear", "nearest")),
        _intensity(pre),
        MapLabelsd(keys="label", config=pre.label),
        *_crop(pre),
        *_augment(pre),
        # Plain tensors for training (no meta); float32 even after augmentation.
        EnsureTyped(keys=list(KEYS), data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    compose = Compose(steps)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


# --------------------------------------------------------------------------------------- datasets
def _items(cases: Sequence[Case], indices: Sequence[int] | None) -> list[dict[str, Any]]:
    by_index = {c.index: c for c in cases}
    if indices is None:
        chosen = list(cases)
    else:
        unknown = [i for i in indices if i not in by_index]
        if unknown:
            raise DataError(
                f"sample indices {unknown[:10]} are not in the datalist (indices 0..{len(cases) - 1})"
            )
        if len(set(indices)) != len(indices):
            raise DataError("sample indices given to build_dataset contain duplicates")
        chosen = [by_index[i] for i in indices]
    return [
        {"image": str(c.image), "label": str(c.label), "index": int(c.index), "case_id": c.case_id}
        for c in chosen
    ]


def _cache_key(pre: PreprocessConfig, num_classes: int) -> str:
    """Disk-cache folder name: changes whenever preprocessing (or MONAI) changes."""
    import monai

    text = json.dumps(
        {"pre": pre.model_dump(mode="json"), "k": num_classes, "monai": monai.__version__}, sort_keys=True
    )
    return "pre-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _item_hash(item: Mapping[str, Any]) -> bytes:
    """PersistentDataset key: the item plus size and mtime of its files, so an edited file is re-read."""
    stamp = {k: item[k] for k in ("image", "label", "index", "case_id")}
    for key in ("image", "label"):
        st = os.stat(item[key])
        stamp[f"{key}_stat"] = [st.st_size, st.st_mtime_ns]
    return hashlib.md5(json.dumps(stamp, sort_keys=True).encode()).hexdigest().encode()


def build_dataset(
    cases: Sequence[Case],
    pre: PreprocessConfig,
    num_classes: int,
    cache: str = "memory",
    cache_dir: Path | None = None,
    indices: Sequence[int] | None = None,
    *,
    seed: int | None = None,
) -> torch.utils.data.Dataset:
    """Dataset of the given samples; items are dicts ``image``, ``label``, ``index`` (int), ``case_id``.

    Args:
        cases: the whole datalist (from :func:`~hypersort_ray.data.datalist.load_datalist`).
        pre: preprocessing settings.
        num_classes: classes the model predicts.
        cache: ``memory`` (CacheDataset, preprocessed once per process), ``disk`` (PersistentDataset under
            ``cache_dir``, shared across runs and workers), ``none`` (plain Dataset).
        cache_dir: required for ``disk``; a sub-folder per preprocessing configuration is used.
        indices: sample indices to include (a Ray worker loads only the samples it owns), in this order;
            None = all.
        seed: seeds the random transforms.

    Returns:
        A MONAI dataset; batch it with ``DataLoader(ds, collate_fn=collate)``.
    """
    items = _items(cases, indices)
    transform = build_train_transforms(pre, num_classes, seed=seed)
    if cache == "memory":
        # copy_cache: only random transforms could modify cached items in place.
        has_random = bool(_augment(pre)) or pre.crop == "random"
        return CacheDataset(items, transform, num_workers=1, progress=False, copy_cache=has_random)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("data.cache=disk needs data.cache_dir")
        folder = Path(cache_dir) / _cache_key(pre, num_classes)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=folder, hash_func=_item_hash)
    if cache == "none":
        return Dataset(items, transform)
    raise ConfigError(f"data.cache must be memory, disk or none, got {cache!r}")


def collate(batch: Sequence[Any]) -> dict[str, Any]:
    """``list_data_collate`` with ``index`` guaranteed to be a LongTensor (B,) and ``case_id`` a list."""
    out = list_data_collate(batch)
    out["index"] = torch.as_tensor(out["index"], dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------- inference
def _inference_steps(pre: PreprocessConfig) -> list[Any]:
    return [*_geometry(pre, ("image",), ("bilinear",)), _intensity(pre)]


def build_inference_transforms(pre: PreprocessConfig) -> Compose:
    """Inference pipeline for ``{"image": path}``: same geometry and intensity as training, no crop/label.

    Args:
        pre: preprocessing settings (``roi_size``/``crop``/``augment``/``label`` are not used).
    """
    return Compose(
        [
            LoadImaged(keys="image", reader=READER, image_only=True),
            EnsureChannelFirstd(keys="image"),
            *_inference_steps(pre),
        ]
    )


@dataclass
class PreparedImage:
    """A preprocessed image and the input geometry it came from.

    Attributes:
        image: MetaTensor (C, *spatial) in the processed space; its ``applied_operations`` trace is what
            :func:`invert_to_original` replays backwards.
        original_affine: 4x4 (3x3 for 2D) affine of the input.
        original_shape: spatial shape of the input.
    """

    image: MetaTensor
    original_affine: np.ndarray
    original_shape: tuple[int, ...]


def load_image_for_inference(
    path_or_array: str | Path | np.ndarray | torch.Tensor,
    pre: PreprocessConfig,
    affine: np.ndarray | None = None,
) -> PreparedImage:
    """Preprocess one image for inference.

    Args:
        path_or_array: a NIfTI file, or an array of spatial shape (or channel-first ``(C, *spatial)``).
        pre: preprocessing settings.
        affine: voxel-to-world affine of an array input; default ``diag(pre.spacing)`` (identity if
            ``pre.spacing`` is None). Ignored for files (their header is used).

    Returns:
        The processed image and the original geometry.
    """
    dims = len(pre.roi_size)
    if isinstance(path_or_array, str | Path):
        path = Path(path_or_array)
        if not path.is_file():
            raise DataError(f"{path}: image file not found")
        try:
            image = build_inference_transforms(pre)({"image": str(path)})["image"]
        except Exception as exc:  # MONAI wraps reader errors in a RuntimeError chain
            raise DataError(f"{path}: cannot preprocess image: {_root_cause(exc)}") from exc
    else:
        arr = torch.as_tensor(
            np.asarray(path_or_array) if not isinstance(path_or_array, torch.Tensor) else path_or_array
        )
        if arr.ndim == dims:
            arr = arr[None]
        if arr.ndim != dims + 1:
            raise DataError(
                f"image array has shape {tuple(arr.shape)}: expected {dims} spatial dims (optionally channel-first)"
            )
        if not torch.isfinite(arr.float()).all():
            raise DataError("image array contains NaN/inf")
        if affine is None:
            spacing = list(pre.spacing) if pre.spacing is not None else [1.0] * dims
            affine = np.diag([*spacing, 1.0])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (dims + 1, dims + 1) and not (dims == 3 and affine.shape == (4, 4)):
            raise DataError(f"affine has shape {affine.shape}: expected ({dims + 1}, {dims + 1})")
        meta = {"original_affine": affine.copy(), "spatial_shape": np.asarray(arr.shape[1:])}
        mt = MetaTensor(arr.float(), affine=torch.as_tensor(affine), meta=meta)
        image = Compose(_inference_steps(pre))({"image": mt})["image"]
    if not torch.isfinite(image).all():
        # Finite voxels near float32's limit (±3e38) overflow the percentile scaling to inf/NaN, and the
        # network would return an all-background mask for them as if it were an answer.
        raise DataError(
            "image intensities overflow float32 when normalised (values near ±3.4e38); rescale the image"
        )
    # Trace IDs name transform *instances*; reset them so a freshly built pipeline (another process,
    # a serve replica) can invert this image.
    reset_ops_id(image)
    orig_affine = np.asarray(image.meta.get("original_affine"), dtype=np.float64)
    orig_shape = tuple(int(s) for s in np.asarray(image.meta.get("spatial_shape")).tolist())
    return PreparedImage(image=image, original_affine=orig_affine, original_shape=orig_shape)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def invert_prediction(
    pred: torch.Tensor | np.ndarray,
    processed_image: MetaTensor | PreparedImage,
    pre: PreprocessConfig,
    *,
    is_label: bool | None = None,
) -> MetaTensor:
    """Like :func:`invert_to_original` but returns the MetaTensor (its ``affine`` is the input's).

    Args:
        pred: ``(K, *processed_spatial)`` class probabilities/logits or a label map (K=1).
        processed_image: the image returned by :func:`load_image_for_inference` (or its ``.image``).
        pre: the preprocessing settings that produced ``processed_image``.
        is_label: nearest interpolation; default: True for integer/bool ``pred``, False for floats.
    """
    image = processed_image.image if isinstance(processed_image, PreparedImage) else processed_image
    if not isinstance(image, MetaTensor):
        raise DataError(
            "processed_image must be the MetaTensor from load_image_for_inference (it carries the trace)"
        )
    t = torch.as_tensor(pred)
    if t.ndim != image.ndim or tuple(t.shape[1:]) != tuple(image.shape[1:]):
        raise DataError(
            f"prediction shape {tuple(t.shape)} does not match the processed image (K, {tuple(image.shape[1:])})"
        )
    if is_label is None:
        is_label = not torch.is_floating_point(t)
    inverter = Invertd(
        keys="pred", transform=Compose(_inference_steps(pre)), orig_keys="image", nearest_interp=is_label
    )
    # Invertd copies the trace and meta of "image" onto "pred", but only when "pred" is a MetaTensor: a
    # plain tensor is returned *un-inverted* with just a warning. Resampling also needs floats.
    pred_mt = MetaTensor(t.detach().float().cpu())
    result = inverter({"image": image, "pred": pred_mt})["pred"]
    expected = tuple(int(s) for s in np.asarray(image.meta.get("spatial_shape")).tolist())
    if tuple(result.shape[1:]) != expected:
        raise RuntimeError(f"inversion gave spatial shape {tuple(result.shape[1:])}, expected {expected}")
    if is_label:
        result = torch.round(result)
    return result


def invert_to_original(
    pred: torch.Tensor | np.ndarray,
    processed_image: MetaTensor | PreparedImage,
    pre: PreprocessConfig,
    *,
    is_label: bool | None = None,
) -> np.ndarray:
    """Map a prediction on the processed grid back to the original image's voxel grid.

    Replays the traced Orientation/Spacing operations of ``processed_image`` backwards (MONAI ``Invertd``):
    nearest-neighbour for label maps, linear for probabilities.

    Args:
        pred: ``(K, *processed_spatial)`` class probabilities/logits or a label map (K=1).
        processed_image: the image returned by :func:`load_image_for_inference` (or its ``.image``).
        pre: the preprocessing settings that produced ``processed_image``.
        is_label: nearest interpolation; default: True for integer/bool ``pred``, False for floats.

    Returns:
        ``(K, *original_spatial)``: same dtype as ``pred`` for label maps, float32 otherwise. The affine
        is the input's (``PreparedImage.original_affine``).
    """
    t = torch.as_tensor(pred)
    if is_label is None:
        is_label = not torch.is_floating_point(t)
    result = invert_prediction(t, processed_image, pre, is_label=is_label)
    arr = result.as_tensor() if isinstance(result, MetaTensor) else torch.as_tensor(result)
    return arr.to(t.dtype if is_label else torch.float32).numpy()
