"""A run's training cases and the evaluation grid, shared by the model-based scores, the baselines, the
report's thumbnails and the correction.

* :func:`load_run_cases` / :func:`read_run_latents`: the run's config, its datalist's cases and its latents
  in datalist order (read through :class:`~hypersort_ray.runs.RunDir`).
* :func:`evaluation_dataset` / :func:`segment`: the training grid without augmentation (a ``random`` crop
  becomes the whole padded volume) and a network's softmax on it (sliding window when the volume is
  larger than the ROI).
* :class:`SegmentationModel` and :data:`Predictor`: what the analysis needs of a trained hyper-network.
  The analysis never loads a model itself (inference sits above it): its callers load one, e.g.
  ``hypersort_ray.inference.load_model``, and pass it in; :func:`check_model_provenance` refuses a model
  made from another checkpoint than the run's.
* :func:`read_volume`, :func:`predict_cases`, :func:`progress_bar`: small shared helpers.

Example:
    >>> cfg, cases = load_run_cases("runs/demo")                          # doctest: +SKIP
    >>> item = evaluation_dataset(cases, cfg.preprocessing, 2)[0]         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hypersort_ray.config import ExperimentConfig, PreprocessConfig
from hypersort_ray.data.datalist import Case, load_datalist
from hypersort_ray.errors import DataError, ProvenanceError, RunError
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.styles import PROVENANCE_KEY

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Predictor",
    "SegmentationModel",
    "check_model_provenance",
    "datalist_path",
    "evaluation_dataset",
    "load_run_cases",
    "predict_cases",
    "progress_bar",
    "read_run_latents",
    "read_volume",
    "segment",
]

logger = logging.getLogger(__name__)

#: Segments training cases: (style id or latent vector, sample indices) -> {index: class map in the case's
#: label grid}. A string is a style (``"main"``, a style id); anything else an explicit latent.
Predictor = Callable[[str | np.ndarray, Sequence[int]], Mapping[int, np.ndarray]]

SW_BATCH_SIZE = 4
SW_OVERLAP = 0.25


class SegmentationModel(Protocol):
    """What the analysis uses of a loaded hyper-network (``hypersort_ray.inference.HyperSortModel`` is one).

    Attributes:
        config: the training configuration (network, preprocessing).
        device: where the generated UNets run.
        info: provenance; ``info["checkpoint_sha256"]`` names the checkpoint the weights come from.
    """

    config: ExperimentConfig
    device: Any
    info: dict[str, Any]

    @property
    def latent_dim(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def resolve(self, style: str | None = None, latent: Any = None) -> tuple[tuple[float, ...], str]:
        """The latent and the style id for a style name (or an explicit latent)."""
        ...

    def unet_for(self, latent: Sequence[float]) -> Any:
        """The primary UNet with H(λ)'s parameters (eval mode, read-only)."""
        ...

    def predict(self, image: Any, **kwargs: Any) -> dict[str, Any]:
        """Segment an image file; ``["mask"]`` is the class map in the image's own grid."""
        ...


# --------------------------------------------------------------------------------------- the run
def check_model_provenance(run: RunDir, model: SegmentationModel) -> None:
    """Refuse a model whose weights come from another checkpoint than the run's final one.

    Scores of another network would be written as this run's analysis. A model that does not record its
    checkpoint (or a run without a final checkpoint) passes.

    Args:
        run: the run folder.
        model: the loaded model.

    Raises:
        ProvenanceError: the model names another checkpoint.
    """
    made = (getattr(model, "info", None) or {}).get(PROVENANCE_KEY)
    current = run.checkpoint_sha256()
    if made and current and made != current:
        raise ProvenanceError(
            f"the model comes from checkpoint {str(made)[:12]}, but {run.path} holds checkpoint "
            f"{current[:12]}; load the model from {run.path} itself"
        )


def datalist_path(cfg: ExperimentConfig, run: RunDir) -> Path | None:
    """The run's datalist as configured, else relative to the run folder (runs move with their data).

    Returns:
        The path, or None when ``data.datalist`` is unset or found in neither place.
    """
    if cfg.data.datalist is None:
        return None
    given = Path(cfg.data.datalist).expanduser()
    for candidate in (given, run.path / given):
        if candidate.exists():
            return candidate
    return None


def load_run_cases(run_dir: str | os.PathLike[str]) -> tuple[ExperimentConfig, list[Case]]:
    """The run's configuration and its training cases (the datalist named in its config).

    Args:
        run_dir: a run folder (``hypersort train`` output) or a :class:`RunDir`.

    Raises:
        RunError: not a run folder, unreadable config, or a config without a datalist.
        DataError: the datalist or one of its files is missing (message from ``load_datalist``).
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.data.datalist is None:
        raise RunError(
            f"{run.config_path}: data.datalist is not set, so the run's training cases are unknown"
        )
    # When found nowhere, the configured path goes to load_datalist, whose message names it.
    datalist = datalist_path(cfg, run) or Path(cfg.data.datalist).expanduser()
    return cfg, load_datalist(datalist)


def read_run_latents(run_dir: str | os.PathLike[str], cases: Sequence[Case]) -> np.ndarray:
    """The run's latents as an ``[N, d]`` float64 array in datalist order, checked against the cases.

    Rows are matched by sample index; a case id that differs from the datalist's is logged, not fatal
    (the datalist's id wins).

    Raises:
        RunError: missing/malformed latents, or rows that do not match the datalist (a stale file).
    """
    run = RunDir(run_dir)
    indices, ids, values = run.read_latents()
    if indices.tolist() != [c.index for c in cases]:
        raise RunError(
            f"{run.latents_csv}: holds sample indices {_span(indices.tolist())} but the run's datalist has "
            f"{len(cases)} cases (0..{len(cases) - 1}); was the datalist changed?"
        )
    _log_id_mismatch(run.latents_csv, ids, cases)
    return np.asarray(values, dtype=np.float64)


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]} ({len(values)} rows)" if values else "none"


def _log_id_mismatch(path: Path, ids: Sequence[str], cases: Sequence[Case]) -> None:
    bad = [(c.index, i, c.case_id) for i, c in zip(ids, cases, strict=True) if str(i) != c.case_id]
    if bad:
        index, found, expected = bad[0]
        logger.warning(
            "%s: %d case id(s) differ from the run's datalist (first: index %d is %r there, %r in the "
            "datalist); rows are matched by index, ids taken from the datalist",
            path, len(bad), index, found, expected,
        )


def read_volume(path: Path, what: str, case_id: str) -> tuple[Any, np.ndarray]:
    """A case's NIfTI and its voxels, trailing singleton axes dropped.

    Args:
        path: the file.
        what: ``image`` or ``label``, for the message.
        case_id: the case, for the message.

    Raises:
        DataError: the file is missing or not a readable NIfTI.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise DataError(
            f"case {case_id}: {what} {path}: not a readable NIfTI ({type(exc).__name__}: {exc})"
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return img, data


def predict_cases(
    predictor: Predictor, style: str | np.ndarray, indices: Sequence[int]
) -> Mapping[int, np.ndarray]:
    """``predictor(style, indices)``, checked to answer for every index asked.

    Raises:
        RunError: the predictor left a case out.
    """
    out = predictor(style, list(indices))
    missing = [i for i in indices if i not in out]
    if missing:
        raise RunError(f"predictor returned no prediction for sample indices {missing[:10]}")
    return out


# ------------------------------------------------------------------------------------ evaluation
def _evaluation_transforms(pre: PreprocessConfig, num_classes: int) -> Any:
    """The training pipeline without augmentation; a random crop becomes the whole (padded) volume."""
    from monai.transforms import Compose, RandSpatialCropd

    from hypersort_ray.config import AugmentConfig
    from hypersort_ray.data.transforms import build_train_transforms

    pre_eval = pre.model_copy(update={"augment": AugmentConfig()})
    compose = build_train_transforms(pre_eval, num_classes)
    if pre.crop == "random":
        compose = Compose([t for t in compose.transforms if not isinstance(t, RandSpatialCropd)])
    return compose


def evaluation_dataset(
    cases: Sequence[Case], pre: PreprocessConfig, num_classes: int, indices: Sequence[int] | None = None
) -> Any:
    """Deterministic dataset of the training grid (items ``image``, ``label``, ``index``, ``case_id``).

    Args:
        cases: the whole datalist.
        pre: the run's preprocessing.
        num_classes: classes the model predicts.
        indices: sample indices to include, in this order (default: all).
    """
    from monai.data import Dataset

    by_index = {c.index: c for c in cases}
    chosen = [by_index[i] for i in indices] if indices is not None else list(cases)
    items = [
        {"image": str(c.image), "label": str(c.label), "index": c.index, "case_id": c.case_id} for c in chosen
    ]
    return Dataset(items, _evaluation_transforms(pre, num_classes))


def segment(
    net: Any, image: torch.Tensor, roi_size: Sequence[int], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Softmax probabilities ``(K, *spatial)`` (CPU float32) of ``net`` on one image ``(C, *spatial)``.

    A single forward pass when the image has the ROI's shape (the training crop), else MONAI's
    Gaussian-weighted sliding window with the ROI as window.

    Args:
        net: the network (eval mode).
        image: the preprocessed image.
        roi_size: the training ROI.
        device: where ``net`` lives.
    """
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(image).float()
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    x = x.unsqueeze(0).to(device)
    roi = tuple(int(r) for r in roi_size)
    with torch.no_grad():
        if tuple(x.shape[2:]) == roi:
            logits = net(x)
        else:
            logits = sliding_window_inference(x, roi, SW_BATCH_SIZE, net, overlap=SW_OVERLAP, mode="gaussian")
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        return torch.softmax(logits.float(), dim=1)[0].cpu()


def progress_bar(
    items: Iterable[Any], enabled: bool, desc: str, total: int | None = None, unit: str = "case"
) -> Iterable[Any]:
    """``items`` wrapped in a tqdm bar on stderr when ``enabled`` (else ``items`` unchanged).

    Args:
        items: what to iterate.
        enabled: show the bar.
        desc: its label.
        total: its length, when ``items`` has none.
        unit: what one item is.
    """
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
