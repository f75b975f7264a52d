"""Inference: λ → UNet → sliding-window prediction → mask in the input's geometry.

* :mod:`.model`: :class:`HyperSortModel` (styles, the UNet cache, prepare/predict) and :class:`PreparedInput`.
* :mod:`.loading`: :func:`load_model` from a run folder, model folder, checkpoint or MLflow URI.
* :mod:`.inputs`: checks of latents, files, arrays and affines.
* :mod:`.export`: a plain fixed-style UNet (TorchScript or state_dict).
* :mod:`.predict`: the ``hypersort predict`` command.

Example:
    >>> model = load_model("runs/demo")                                        # doctest: +SKIP
    >>> model.predict_file("case.nii.gz", "mask.nii.gz", style="main")["style"]  # doctest: +SKIP
    'main'
"""

from hypersort_ray.inference.export import EXPORT_FORMAT, export_cli, load_exported_unet
from hypersort_ray.inference.inputs import parse_latent
from hypersort_ray.inference.loading import load_model
from hypersort_ray.inference.model import HyperSortModel, PreparedInput
from hypersort_ray.inference.predict import predict_cli
from hypersort_ray.runs.styles import Style

__all__ = [
    "EXPORT_FORMAT",
    "HyperSortModel",
    "PreparedInput",
    "Style",
    "export_cli",
    "load_exported_unet",
    "load_model",
    "parse_latent",
    "predict_cli",
]
