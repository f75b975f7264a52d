"""A hypersort model as an MLflow ``pyfunc`` model, logged as *models from code* (nothing is pickled).

What the logged MLflow model holds::

    MLmodel                        loader: mlflow.pyfunc.loaders.code_model; python_model = model_code.py
    model_code.py                  hypersort_ray/tracking/model_code.py: builds HyperSortPyfunc, set_model()
    code/hypersort_ray/            this package (``code_paths``): a consumer needs torch, monai, nibabel,
                                   safetensors, pydantic, pyyaml, but not hypersort-ray itself
    artifacts/hypersort/           the model folder of :func:`hypersort_ray.runs.model_dir.write_model_dir`:
                                   hypernet.safetensors (tensors only), config.yaml, styles.json
                                   (ids, names, sizes, centroids), model.json (preprocessing, checksums)
    requirements.txt, python_env.yaml, conda.yaml    pinned to the versions installed at logging time
    input_example.json, serving_input_example.json   a small float32 volume

MLflow 3.17 refuses to unpickle a ``python_model.pkl`` unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``
is set; models from code store no pickle at all: loading executes ``model_code.py`` (our source, shipped
with the model) and :meth:`HyperSortPyfunc.load_context` reads the safetensors weights.

Inference (``mlflow.pyfunc.load_model(uri).predict(model_input, params=...)``):

``model_input``
    * a volume: numpy array ``(X, Y, Z)`` (any real dtype; channel-first ``(C, X, Y, Z)`` for C > 1),
      its affine in ``params["affine"]`` (16 numbers, row-major) — default: the training spacing;
    * ``{"image": volume, "affine": 4x4}`` (nested lists are fine: the JSON serving form);
    * a NIfTI path (``str``), a list of paths, or a DataFrame/Series with a ``path`` (or ``image``)
      column of paths — the file's own affine is used.

``params`` (validated here: MLflow only drops unknown names with a warning)
    * ``style``: ``"main"`` (λ = 0, default) or a style id;
    * ``latent``: an explicit latent (``latent_dim`` floats); ``[]`` = none. Not together with a
      non-main style;
    * ``affine``: see above; ``[]`` = none;
    * ``probabilities``: return class probabilities ``(K, *shape)`` float32 instead of the label map.

Returns the label map ``(*shape)`` uint8 in the input's grid — or a list of them for several inputs.

The signature comes from ``infer_signature(volume, mask, params=...)``; its *input* schema is left out
on purpose: MLflow's tensor-schema enforcement demands one exact dtype and rejects every other input
form (float64 volumes, as ``nibabel.get_fdata`` returns them; paths; the dict form) before the model
sees them. :meth:`HyperSortPyfunc.predict` validates its input itself and raises
:class:`~hypersort_ray.errors.ModelError` naming the problem.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from hypersort_ray.errors import ModelError
from hypersort_ray.inference import load_model
from hypersort_ray.inference.loading import ARTIFACT_KEY
from hypersort_ray.runs.model_dir import write_model_dir

__all__ = [
    "ARTIFACT_KEY",
    "MODEL_CODE",
    "HyperSortPyfunc",
    "build_signature",
    "input_example",
    "pip_requirements",
    "log_model",
]

MODEL_CODE = Path(__file__).with_name("model_code.py")
PARAMS = ("style", "latent", "affine", "probabilities")

# Distributions the inference path imports (besides the package itself, which travels as code).
_REQUIREMENTS = ("mlflow", "torch", "monai", "nibabel", "safetensors", "numpy", "pandas", "pydantic", "PyYAML")


class HyperSortPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper around :class:`~hypersort_ray.inference.HyperSortModel` (see module doc)."""

    def __init__(self) -> None:
        self.model = None

    def load_context(self, context) -> None:
        """Load the model folder; ``model_config={"device": "cuda"}`` (or ``auto``) puts it on a GPU."""
        from hypersort_ray.inference.devices import resolve_device

        folder = context.artifacts.get(ARTIFACT_KEY) if context is not None else None
        if not folder:
            raise ModelError(f"MLflow model: artifact {ARTIFACT_KEY!r} (the hypersort model folder) is missing")
        config = dict(getattr(context, "model_config", None) or {})
        unknown = sorted(set(config) - {"device"})
        if unknown:
            raise ModelError(f"MLflow model_config {unknown}: unknown keys (accepted: device)")
        self.model = load_model(folder, device=resolve_device(str(config.get("device", "cpu"))))

    # The np.ndarray hint only tells MLflow not to infer or enforce a schema from type hints; the
    # accepted inputs are listed in the module docstring.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        if self.model is None:
            raise ModelError("MLflow model: predict() called before load_context()")
        style, latent, affine, probabilities = _parse_params(params, self.model.latent_dim)
        values, _ = self.model.resolve(style, latent)
        items = _inputs(model_input, affine)
        key = "probabilities" if probabilities else "mask"
        outputs = [
            self.model.predict(image, affine=aff, latent=values, probabilities=probabilities)[key]
            for image, aff in items
        ]
        return outputs[0] if len(outputs) == 1 and not _is_batch(model_input) else outputs


# -------------------------------------------------------------------------------------- validation
def _parse_params(params: Mapping[str, Any] | None, dim: int) -> tuple[str | None, list[float] | None, Any, bool]:
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ModelError(f"unknown inference params {unknown}; accepted: {list(PARAMS)}")
    style = params.get("style")
    if style is not None and not isinstance(style, str):
        raise ModelError(f"param style={style!r}: expected a string ('main' or a style id)")
    latent = params.get("latent")
    if latent is not None and len(np.asarray(latent).reshape(-1)) == 0:
        latent = None
    if latent is not None and style not in (None, "", "main"):
        raise ModelError(f"give either param style ({style!r}) or param latent, not both")
    affine = params.get("affine")
    if affine is not None and len(np.asarray(affine).reshape(-1)) == 0:
        affine = None
    probabilities = params.get("probabilities", False)
    if not isinstance(probabilities, bool | np.bool_):
        raise ModelError(f"param probabilities={probabilities!r}: expected true or false")
    return (None if latent is not None else style) or None, latent, affine, bool(probabilities)


def _is_batch(model_input: Any) -> bool:
    import pandas as pd

    return isinstance(model_input, pd.DataFrame | pd.Series | list | tuple)


def _inputs(model_input: Any, affine: Any) -> list[tuple[Any, Any]]:
    """``[(image, affine), ...]`` from any accepted input form."""
    import pandas as pd

    if isinstance(model_input, str | Path):
        return [(str(model_input), None)]
    if isinstance(model_input, pd.DataFrame):
        column = next((c for c in ("path", "image") if c in model_input.columns), None)
        if column is None:
            raise ModelError(
                f"DataFrame input: expected a 'path' column of NIfTI paths, got columns {list(model_input.columns)}"
            )
        return _paths(model_input[column].tolist(), f"DataFrame column {column!r}")
    if isinstance(model_input, pd.Series):
        return _paths(model_input.tolist(), "Series")
    if isinstance(model_input, Mapping):
        unknown = sorted(set(model_input) - {"image", "affine", "path"})
        if unknown or ("image" in model_input) == ("path" in model_input):
            raise ModelError(
                f"dict input: expected keys 'image' (+ optional 'affine') or 'path', got {sorted(model_input)}"
            )
        if "path" in model_input:
            return _paths(np.asarray(model_input["path"]).reshape(-1).tolist(), "dict key 'path'")
        image = model_input["image"]
        if isinstance(image, str | Path):
            return [(str(image), None)]
        own = model_input.get("affine")
        return [(np.asarray(image), affine if own is None else np.asarray(own, dtype=np.float64))]
    if isinstance(model_input, list | tuple) and model_input and all(isinstance(v, str | Path) for v in model_input):
        return _paths(list(model_input), "list")
    arr = np.asarray(model_input)
    if arr.dtype.kind in "US" or (arr.dtype == object and arr.size and isinstance(arr.reshape(-1)[0], str)):
        return _paths(arr.reshape(-1).tolist(), "array of strings")
    if arr.dtype.kind not in "biuf":
        raise ModelError(
            f"input of type {type(model_input).__name__} (dtype {arr.dtype}): expected a numeric volume, "
            "{'image', 'affine'}, a NIfTI path, or a DataFrame with a 'path' column"
        )
    return [(arr, affine)]


def _paths(values: list[Any], what: str) -> list[tuple[Any, Any]]:
    if not values:
        raise ModelError(f"{what}: no inputs")
    bad = [v for v in values if not isinstance(v, str | Path)]
    if bad:
        raise ModelError(f"{what}: expected NIfTI paths, got {bad[0]!r}")
    return [(str(v), None) for v in values]


# ------------------------------------------------------------------------------------ logging
def input_example(model) -> np.ndarray:
    """A small float32 volume (a bright ball in a darker box): cheap to store and to validate."""
    dims = model.spatial_dims
    edge = max(8, 2 * 2 ** model.config.model.unet.n_down)
    grid = np.indices((edge,) * dims, dtype=np.float32) - (edge - 1) / 2
    ball = (np.sqrt((grid**2).sum(axis=0)) < edge / 3).astype(np.float32)
    volume = np.round(100.0 * ball + np.linspace(0, 10, edge ** dims).reshape((edge,) * dims), 1)
    if model.in_channels > 1:
        volume = np.repeat(volume[None], model.in_channels, axis=0)
    return volume.astype(np.float32)


def build_signature(model, example: np.ndarray | None = None):
    """``infer_signature(volume, mask, params)``; input schema dropped (module docstring says why)."""
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import DataType, ParamSchema, ParamSpec

    example = input_example(model) if example is None else example
    mask = np.zeros(example.shape[-model.spatial_dims :], dtype=np.uint8)
    dim = model.latent_dim
    sig = infer_signature(
        example,
        mask,
        params={"style": "main", "latent": [0.0] * dim, "affine": [1.0] * 16, "probabilities": False},
    )
    # "Not given" must be distinguishable from λ = 0 / identity: MLflow always fills in the defaults.
    params = ParamSchema(
        [
            p
            if p.name not in ("latent", "affine")
            else ParamSpec(p.name, DataType.double, default=[], shape=(-1,))
            for p in sig.params.params
        ]
    )
    return ModelSignature(inputs=None, outputs=sig.outputs, params=params)


def pip_requirements() -> list[str]:
    """Exact pins of the installed inference dependencies (``torch==2.13.0``, no local ``+cpu`` tag)."""
    pins = []
    for dist in _REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins


def log_model(
    run_dir: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
):
    """Log ``run_dir``'s model as a pyfunc into the *active* MLflow run (models from code).

    Args:
        run_dir: a run folder (or anything :func:`~hypersort_ray.runs.model_dir.write_model_dir` accepts).
        name: the model's name in the run.
        registered_model_name: also register a new version under this name.
        metadata: extra keys for the MLmodel ``metadata``.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``, ...).
    """
    import hypersort_ray

    tmp = Path(tempfile.mkdtemp(prefix="hypersort-pyfunc-"))
    try:
        folder = write_model_dir(run_dir, tmp / ARTIFACT_KEY)
        model = load_model(folder, cache_size=1)
        example = input_example(model)
        meta = {
            "hypersort_version": hypersort_ray.__version__,
            "latent_dim": model.latent_dim,
            "spatial_dims": model.spatial_dims,
            "num_classes": model.num_classes,
            "styles": [s.id for s in model.styles],
            **dict(metadata or {}),
        }
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT_KEY: str(folder)},
            code_paths=[str(Path(hypersort_ray.__file__).parent)],
            signature=build_signature(model, example),
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            metadata=meta,
            # load_model(uri, model_config={"device": "cuda"}) moves the model at load time
            model_config={"device": "cpu"},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
