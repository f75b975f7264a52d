"""The public HyperSORT reference code's YAML configs, translated into ours.

(Its trained weights are imported by :mod:`hypersort_ray.runs.reference_import`.) Config translation maps the reference keys onto :class:`hypersort_ray.config.ExperimentConfig`:

=====================================  ======================================================
reference                              ours
=====================================  ======================================================
``OutputPath``                         ``output_dir``
``DataFile``                           ``data.datalist`` (same tab-separated format)
``ModelConfig.HyperNetworkLayers``     ``[latent_dim, *hypernet.hidden]``
``ModelConfig.UNet.{in_c,out_c,...}``  ``model.unet.{in_channels,out_channels,n_down,n_fix,channels,spatial_dims}``
``NormalizePercentile``                ``preprocessing.intensity`` (fractions become percent)
``Resample.resolution``                ``preprocessing.spacing``
``CenterROISampler.roi_size``          ``preprocessing.roi_size``, ``crop: center``
``OrientedROISampler``                 ``roi_size``, ``spacing = roi_spacing``, ``crop: foreground|random``
``MarkAsTarget``, ``SetLabelModality``,  nothing to do: the label file is the target and every value
``MakeFloat``, ``BakeTransformation``  > 0 is the organ; orientation/spacing are always baked
=====================================  ======================================================

The reference trains with batch size 1, L1 weight 1, latent Adam lr 1e-3 (betas 0.7/0.9) and H Adam
lr 1e-3 in its code (the paper text says 1e-4); a translated config keeps those values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypersort_ray.errors import ConfigError

REFERENCE_TOP_KEYS = {"OutputPath", "DataFile", "Pipeline", "ModelConfig"}
_NOOP_OPS = {"MarkAsTarget", "SetLabelModality", "MakeFloat", "BakeTransformation"}
_UNET_KEYS = {"in_c": "in_channels", "out_c": "out_channels", "n_down": "n_down", "n_fix": "n_fix", "C": "channels", "n_dim": "spatial_dims"}


def is_reference_config(data: dict[str, Any]) -> bool:
    """True when the mapping uses the reference repository's top-level keys."""
    return bool(REFERENCE_TOP_KEYS & set(data))


def _resolve(path: str, source: Path | None) -> str:
    """The reference resolves paths against its working directory; fall back to the YAML's folder."""
    p = Path(path)
    if p.is_absolute() or p.exists() or source is None:
        return str(p)
    beside = Path(source).parent / p
    return str(beside) if beside.exists() else str(p)


def _op_spacing(value: Any, where: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * 3
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    raise ConfigError(f"{where}: expected a number or a list of numbers, got {value!r}")


def translate_reference_config(data: dict[str, Any], source: Path | None = None) -> dict[str, Any]:
    """Translate a reference YAML mapping into our config dict (validated later by pydantic).

    Raises:
        ConfigError: naming the key or pipeline op that has no translation.
    """
    where = str(source) if source else "<reference config>"
    unknown = set(data) - REFERENCE_TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown reference keys {sorted(unknown)} (known: {sorted(REFERENCE_TOP_KEYS)})")
    out: dict[str, Any] = {
        "training": {"batch_size": 1, "l1_weight": 1.0, "lr": 1e-3, "latent": {"lr": 1e-3, "betas": [0.7, 0.9]}},
        "preprocessing": {},
    }
    if "OutputPath" in data:
        out["output_dir"] = str(data["OutputPath"])
        out["name"] = Path(str(data["OutputPath"])).name or "hypersort"
    if "DataFile" in data:
        out["data"] = {"datalist": _resolve(str(data["DataFile"]), source)}

    model = data.get("ModelConfig") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: ModelConfig must be a mapping")
    extra_model = set(model) - {"HyperNetworkLayers", "UNet"}
    if extra_model:
        raise ConfigError(f"{where}: ModelConfig has keys we cannot translate: {sorted(extra_model)}")
    out_model: dict[str, Any] = {}
    layers = model.get("HyperNetworkLayers")
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(isinstance(v, int) for v in layers):
            raise ConfigError(f"{where}: ModelConfig.HyperNetworkLayers = {layers!r}: expected [latent_dim, hidden...]")
        out_model["hypernet"] = {"latent_dim": layers[0], "hidden": layers[1:]}
    unet = model.get("UNet")
    if unet is not None:
        bad = set(unet) - set(_UNET_KEYS)
        if bad:
            raise ConfigError(f"{where}: ModelConfig.UNet has keys we cannot translate: {sorted(bad)} (known: {sorted(_UNET_KEYS)})")
        out_model["unet"] = {_UNET_KEYS[k]: v for k, v in unet.items()}
    if out_model:
        out["model"] = out_model

    pre = out["preprocessing"]
    pipeline = data.get("Pipeline") or []
    if not isinstance(pipeline, list):
        raise ConfigError(f"{where}: Pipeline must be a list of operations")
    for i, op in enumerate(pipeline):
        if not isinstance(op, dict) or len(op) != 1:
            raise ConfigError(f"{where}: Pipeline[{i}] must be a mapping with one operation name, got {op!r}")
        name, args = next(iter(op.items()))
        args = dict(args or {})
        args.pop("apply_to", None)
        args.pop("phase", None)
        loc = f"{where}: Pipeline[{i}].{name}"
        if name in _NOOP_OPS:
            continue
        if name == "NormalizePercentile":
            pre["intensity"] = {
                "lower_percentile": 100.0 * float(args.get("min_percentile", 0.005)),
                "upper_percentile": 100.0 * float(args.get("max_percentile", 0.995)),
                "clip": bool(args.get("clamp_values", True)),
            }
        elif name == "Resample":
            pre["spacing"] = _op_spacing(args.get("resolution"), f"{loc}.resolution")
        elif name == "CenterROISampler":
            pre["roi_size"] = list(args["roi_size"])
            pre["crop"] = "center"
        elif name == "OrientedROISampler":
            pre["roi_size"] = list(args["roi_size"])
            if "roi_spacing" in args:
                pre["spacing"] = _op_spacing(args["roi_spacing"], f"{loc}.roi_spacing")
            pre["crop"] = "foreground" if float(args.get("sample_from_labels_proportion", 0)) > 0 else "random"
        else:
            known = sorted(_NOOP_OPS | {"NormalizePercentile", "Resample", "CenterROISampler", "OrientedROISampler"})
            raise ConfigError(f"{loc}: no translation for reference operation '{name}' (supported: {', '.join(known)})")
    if "spacing" in pre and "roi_size" in pre and len(pre["spacing"]) != len(pre["roi_size"]):
        pre["spacing"] = pre["spacing"][: len(pre["roi_size"])]
    return out
