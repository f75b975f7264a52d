"""``load_model``: a run folder, a model folder, a checkpoint folder or an MLflow model URI → a
:class:`~hypersort_ray.inference.model.HyperSortModel`.

* a run folder (``hypersort train``): its final checkpoint, with the styles of ``hypersort analyze``
  (refused when they were fitted for another checkpoint);
* a model folder (the payload of the MLflow model, :func:`hypersort_ray.runs.model_dir.write_model_dir`);
* a bare checkpoint folder (e.g. one Ray Train persisted);
* an MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/3``, ``runs:/RUN_ID/model``), resolved
  against ``tracking_uri`` / ``MLFLOW_TRACKING_URI`` / the workspace store (:mod:`hypersort_ray.mlflow_store`).

Every file is checked against its recorded sha256 before it is parsed; weights are safetensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypersort_ray.errors import ModelError
from hypersort_ray.inference.model import HyperSortModel
from hypersort_ray.mlflow_store import download_artifacts, is_mlflow_uri
from hypersort_ray.runs.model_dir import ModelFiles, is_model_dir, read_model_files
from hypersort_ray.runs.styles import parse_styles_doc

__all__ = ["ARTIFACT_KEY", "load_model"]

#: Name of the model folder inside a logged MLflow model's artifacts.
ARTIFACT_KEY = "hypersort"


def load_model(
    ref: str | Path,
    *,
    device: str = "cpu",
    cache_size: int = 32,
    tracking_uri: str | None = None,
) -> HyperSortModel:
    """Load a model (see the module docstring).

    Args:
        ref: the model reference.
        device: ``cpu`` or ``cuda[:i]``.
        cache_size: generated UNets kept (LRU).
        tracking_uri: MLflow store for ``models:/``/``runs:/`` URIs.

    Raises:
        ModelError: not found, not a hypersort model, corrupt or mismatched weights.
        ProvenanceError: styles made from another checkpoint than the weights.
    """
    text = str(ref)
    if is_mlflow_uri(text):
        with tempfile.TemporaryDirectory(prefix="hypersort-model-") as tmp:
            # Everything is read into memory below, so the download can go when we are done.
            local = download_artifacts(text, Path(tmp), tracking_uri)
            files = read_model_files(_model_folder_in(local, text), text)
            files.info["tracking_uri"] = tracking_uri
            return _build(files, device, cache_size)
    path = Path(text)
    if not path.exists():
        raise ModelError(f"model {text!r}: no such run folder or model folder, and not an MLflow URI")
    return _build(read_model_files(path, text), device, cache_size)


def _model_folder_in(local: Path, uri: str) -> Path:
    """The hypersort model folder inside a downloaded MLflow model (named by its MLmodel file)."""
    import yaml

    candidates = []
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        conf = yaml.safe_load(mlmodel.read_text()) or {}
        art = (conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {}).get(ARTIFACT_KEY)
        if isinstance(art, dict) and art.get("path"):
            candidates.append(local / art["path"])
    candidates += [local / "artifacts" / ARTIFACT_KEY, local]
    for candidate in candidates:
        if is_model_dir(candidate):
            return candidate
    raise ModelError(f"model {uri!r}: the MLflow model holds no hypersort model folder")


def _build(files: ModelFiles, device: str, cache_size: int) -> HyperSortModel:
    import torch
    from safetensors.torch import load as load_safetensors

    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.unet import build_primary

    cfg = files.config
    hn = cfg.model.hypernet
    try:
        state = load_safetensors(files.weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a bad header
        raise ModelError(f"{files.where}: cannot read weights ({exc})") from exc
    hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)
    try:
        hyper.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{files.where}: weights do not match the network of the model's config ({str(exc).splitlines()[0]})"
        ) from exc
    hyper.requires_grad_(False).eval().to(torch.device(device))
    styles, aliases = parse_styles_doc(files.styles, hn.latent_dim, f"styles of {files.info.get('source')}")
    info: dict[str, Any] = {k: v for k, v in files.info.items() if v is not None}
    return HyperSortModel(cfg, hyper, styles, info=info, cache_size=cache_size, device=device, aliases=aliases)
