"""Suspicion scores that use the trained hyper-network, not only the geometry of the latent map.

Why: ‖λ_n‖ and the mean latent distance only see how far a case had to travel from the main mode. On
*subtle* label errors (a shifted slab, a partial erosion) the hyper-UNet can fit the wrong label
with a small λ, because the UNet also memorises the image: the latent norm alone then ranks poorly
(AUROC 0.69 on the synthetic ``subtle`` benchmark, issue #5) while out-of-fold baselines reach
0.97–1.00. The hyper-network already holds the missing information, for the price of two forward
passes per case:

* ``main_style_disagreement`` = 1 − Dice(UNet_main(image_n), label_n): how far the given label is from
  what the main annotation style predicts for that image. λ = 0 is shared by every clean case, so it
  is the closest thing to a consensus model the run has (it is *not* out of fold: a case the main
  mode absorbed may still be memorised; see :mod:`.baselines` for the out-of-fold reference).
* ``own_vs_main_disagreement`` = 1 − Dice(UNet_{λ_n}(image_n), UNet_main(image_n)): how much the case's
  own latent changes the segmentation, i.e. the effect of λ_n measured in voxels rather than in
  latent units (a large λ that changes nothing scores 0; a small λ that moves a boundary scores high).

Both are computed on the training grid: the run's preprocessing (orientation, spacing, intensity,
label mapping and the deterministic crop the hyper-network was trained on) without augmentation;
a ``random`` crop is replaced by the whole padded volume, segmented with a sliding window. Dice is
the mean over foreground classes present in either mask (1 when both are empty).

:func:`make_predictor` builds the ``predictor`` hook of ``analysis.run.analyze_run`` (main-style masks
in each case's label grid, for its thumbnails). The helpers here (:func:`load_run_cases`,
:func:`evaluation_dataset`, :func:`segment`, :func:`dice_score`) are shared with :mod:`.baselines`
and :mod:`.correct`.

Example:
    >>> df = model_scores("runs/demo")                        # doctest: +SKIP
    >>> df.sort_values("main_style_disagreement", ascending=False).head()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hypersort_ray.errors import HypersortError, RunError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    from hypersort_ray.config import ExperimentConfig, PreprocessConfig
    from hypersort_ray.data.datalist import Case
    from hypersort_ray.inference import HyperSortModel

__all__ = [
    "MODEL_SCORE_COLUMNS",
    "dice_score",
    "evaluation_dataset",
    "load_run_cases",
    "make_predictor",
    "model_scores",
    "analyze_with_model",
    "read_run_latents",
    "run_epochs",
    "segment",
]

MODEL_SCORE_COLUMNS = ("main_style_disagreement", "own_vs_main_disagreement")
SW_BATCH_SIZE = 4
SW_OVERLAP = 0.25


# ------------------------------------------------------------------------------------------- run folder
def _run_config_path(run_dir: Path) -> Path:
    for candidate in (run_dir / "config.yaml", run_dir / "checkpoint" / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise RunError(f"{run_dir}: no config.yaml (nor checkpoint/config.yaml); is it a hypersort run folder?")


def load_run_cases(run_dir: str | Path) -> tuple[ExperimentConfig, list[Case]]:
    """The run's configuration and its training cases (the datalist named in its config).

    Args:
        run_dir: a run folder (``hypersort train`` output).

    Raises:
        RunError: not a run folder, unreadable config, or a config without a datalist.
        DataError: the datalist or one of its files is missing (message from ``load_datalist``).
    """
    from hypersort_ray.config import load_config
    from hypersort_ray.data.datalist import load_datalist

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir}: not found")
    path = _run_config_path(run_dir)
    try:
        cfg = load_config(path)
    except HypersortError as exc:
        raise RunError(f"{path}: cannot load the run's config: {exc}") from exc
    datalist = cfg.data.datalist
    if datalist is None:
        raise RunError(f"{path}: data.datalist is not set, so the run's training cases are unknown")
    datalist = Path(datalist).expanduser()
    if not datalist.is_absolute() and not datalist.exists() and (run_dir / datalist).exists():
        datalist = run_dir / datalist
    return cfg, load_datalist(datalist)


def read_run_latents(run_dir: str | Path, cases: Sequence[Case]) -> np.ndarray:
    """``RUN_DIR/latents.csv`` as an ``[N, d]`` array in datalist order, checked against the cases.

    Raises:
        RunError: missing/malformed file, or rows that do not match the datalist (a stale file).
    """
    from hypersort_ray.train.latents_io import read_latents_csv

    path = Path(run_dir) / "latents.csv"
    indices, ids, values = read_latents_csv(path)
    if indices.tolist() != [c.index for c in cases]:
        raise RunError(
            f"{path}: holds sample indices {_span(indices.tolist())} but the run's datalist has "
            f"{len(cases)} cases (0..{len(cases) - 1}); was the datalist changed?"
        )
    _warn_id_mismatch(path, ids, cases)
    return np.asarray(values, dtype=np.float64)


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]} ({len(values)} rows)" if values else "none"


def _warn_id_mismatch(path: Path, ids: Sequence[str], cases: Sequence[Case]) -> None:
    """Sample identity is the index; a case id that differs only gets a warning (the datalist's wins)."""
    bad = [(c.index, i, c.case_id) for i, c in zip(ids, cases, strict=True) if str(i) != c.case_id]
    if bad:
        index, found, expected = bad[0]
        warnings.warn(
            f"{path}: {len(bad)} case id(s) differ from the run's datalist (first: index {index} is "
            f"{found!r} there, {expected!r} in the datalist); rows are matched by index, ids taken from "
            "the datalist",
            stacklevel=3,
        )


def run_epochs(run_dir: str | Path, cfg: ExperimentConfig) -> int:
    """Epochs the run actually trained (checkpoint meta), else the configured ``training.epochs``."""
    meta = Path(run_dir) / "checkpoint" / "meta.json"
    try:
        epoch = int(json.loads(meta.read_text()).get("epoch") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        epoch = 0
    return epoch if epoch > 0 else int(cfg.training.epochs)


# ------------------------------------------------------------------------------------------ evaluation
def _evaluation_transforms(pre: PreprocessConfig, num_classes: int):
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
):
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


def dice_score(a: Any, b: Any, num_classes: int = 2) -> float:
    """Mean Dice over the foreground classes 1..K-1 present in ``a`` or ``b`` (1.0 when none is).

    Args:
        a, b: integer class maps of equal shape (numpy arrays or tensors; a leading channel of 1 is fine).
        num_classes: K.

    Example:
        >>> dice_score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
        0.6666666666666666
        >>> dice_score(np.zeros(3), np.zeros(3))
        1.0
    """
    a = np.asarray(a.cpu() if hasattr(a, "cpu") else a).astype(np.int64).reshape(-1)
    b = np.asarray(b.cpu() if hasattr(b, "cpu") else b).astype(np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"dice_score: shapes differ ({a.shape} vs {b.shape})")
    scores = []
    for c in range(1, max(int(num_classes), 2)):
        in_a, in_b = a == c, b == c
        denom = int(in_a.sum()) + int(in_b.sum())
        if denom:
            scores.append(2.0 * int(np.logical_and(in_a, in_b).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def progress_bar(
    items: Iterable[Any], enabled: bool, desc: str, total: int | None = None, unit: str = "case"
):
    """``items`` wrapped in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ scores
def model_scores(
    run_dir: str | Path,
    progress: bool = False,
    *,
    model: HyperSortModel | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Model-based suspicion scores of every training case (module docstring).

    The main-style UNet is generated once; each case's own UNet costs one hyper-network forward pass
    and is dropped after use.

    Args:
        run_dir: a trained run folder (``checkpoint/``, ``latents.csv``, ``config.yaml``).
        progress: progress bar on stderr.
        model: an already loaded :class:`~hypersort_ray.inference.HyperSortModel` of this run (saves
            loading it again); default ``load_model(run_dir)``.
        device: where the UNets run when the model is loaded here.

    Returns:
        ``DataFrame[index, case_id, main_style_disagreement, own_vs_main_disagreement]`` in index
        order; both scores in [0, 1], higher = more suspicious.

    Raises:
        RunError: not a trained run folder, or a ``latents.csv`` that does not match the datalist.
        DataError: missing/unreadable data files.
    """
    import pandas as pd

    from hypersort_ray.inference import load_model

    cfg, cases = load_run_cases(run_dir)
    latents = read_run_latents(run_dir, cases)
    if model is None:
        # cache_size 0: the main UNet is held below; per-case UNets must not pile up in an LRU.
        model = load_model(run_dir, device=device, cache_size=0)
    if latents.shape[1] != model.latent_dim:
        raise RunError(
            f"{Path(run_dir) / 'latents.csv'}: latents have {latents.shape[1]} dims, the model {model.latent_dim}"
        )
    pre, k = model.config.preprocessing, model.num_classes
    roi = pre.roi_size
    main_latent, _ = model.resolve("main")
    main_net = model.unet_for(main_latent)
    dataset = evaluation_dataset(cases, pre, k)
    rows = []
    for pos in progress_bar(range(len(cases)), progress, "model scores", total=len(cases)):
        item = dataset[pos]
        case = cases[pos]
        label = np.asarray(item["label"])[0]
        main_mask = segment(main_net, item["image"], roi, model.device).argmax(0).numpy()
        own_net = model.unet_for(tuple(float(v) for v in latents[pos]))
        own_mask = segment(own_net, item["image"], roi, model.device).argmax(0).numpy()
        del own_net
        rows.append(
            {
                "index": case.index,
                "case_id": case.case_id,
                "main_style_disagreement": 1.0 - dice_score(main_mask, label, k),
                "own_vs_main_disagreement": 1.0 - dice_score(own_mask, main_mask, k),
            }
        )
    return pd.DataFrame(rows, columns=["index", "case_id", *MODEL_SCORE_COLUMNS])


def make_predictor(
    run_dir: str | Path,
    *,
    model: HyperSortModel | None = None,
    device: str = "cpu",
) -> Callable[[str | np.ndarray, Sequence[int]], dict[int, np.ndarray]]:
    """The ``predictor`` hook of ``analysis.run.analyze_run``: segment training cases of this run.

    ``predictor(style_or_latent, indices) -> {index: class map}``, each map in the case's own image
    grid (= its label grid; ``load_model(run).predict(image, style=...)``: the run's preprocessing,
    sliding window, geometry replayed back). A string is a style (``"main"``, a style id); anything
    else is an explicit latent vector.

    Args:
        run_dir: the run folder (its config names the datalist).
        model: an already loaded model of the run (default ``load_model(run_dir)``).
        device: where the UNets run when the model is loaded here.

    Raises:
        RunError / DataError: the run or its datalist cannot be read (at creation, not per call).
    """
    from hypersort_ray.inference import load_model

    _, cases = load_run_cases(run_dir)
    by_index = {c.index: c for c in cases}
    model = model if model is not None else load_model(run_dir, device=device)

    def predictor(style_or_latent: str | np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray]:
        if isinstance(style_or_latent, str):
            kwargs: dict[str, Any] = {"style": style_or_latent}
        else:
            kwargs = {"latent": [float(v) for v in np.asarray(style_or_latent, dtype=np.float64).reshape(-1)]}
        unknown = [int(i) for i in indices if int(i) not in by_index]
        if unknown:
            raise RunError(f"{run_dir}: sample indices {unknown[:10]} are not in the run's datalist")
        return {int(i): model.predict(by_index[int(i)].image, **kwargs)["mask"] for i in indices}

    return predictor


def analyze_with_model(
    run_dir: str | Path,
    truth: Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    *,
    baselines: bool = False,
) -> dict[str, Any]:
    """``hypersort analyze``: latent-geometry scores plus the model-based ones (and, on request, the
    out-of-fold baselines at equal compute), thumbnails with main-style predictions, the report."""
    import pandas as pd

    from hypersort_ray.analysis.run import analyze_run
    from hypersort_ray.inference import load_model

    run_dir = Path(run_dir)
    model = load_model(run_dir)
    extra = model_scores(run_dir, progress=progress, model=model)
    if baselines:
        from hypersort_ray.analysis.baselines import run_baselines

        extra = extra.merge(run_baselines(run_dir, progress=progress).drop(columns="case_id"), on="index")
    elif (run_dir / "analysis" / "baselines.csv").is_file():
        previous = pd.read_csv(run_dir / "analysis" / "baselines.csv")
        keep = [c for c in previous.columns if c not in ("case_id",)]
        extra = extra.merge(previous[keep], on="index", how="left")
    return analyze_run(
        run_dir,
        truth=truth,
        overrides=overrides,
        progress=progress,
        predictor=make_predictor(run_dir, model=model),
        extra_scores=extra,
    )
