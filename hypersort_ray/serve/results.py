"""What a segmentation request returns: mask encoding (NIfTI, zip, 4D) and the model's identity.

Kept apart from :mod:`hypersort_ray.serve.app` so the deployment class (which Ray pickles by value)
refers to importable functions, and so these can be tested without Ray.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from hypersort_ray.serve.validation import DecodedVolume, safe_stem

__all__ = ["describe_model", "encode_mask", "header_value", "zip_masks"]


def encode_mask(mask: np.ndarray, volume: DecodedVolume, shape: tuple[int, ...] | None = None) -> bytes:
    """A uint8 mask as ``.nii.gz`` bytes in the input's geometry (affine, q/sform codes, units)."""
    import nibabel as nib

    data = np.asarray(mask, dtype=np.uint8).reshape(shape or volume.shape)
    img = nib.Nifti1Image(data, volume.affine)
    if volume.sform_code:
        img.set_sform(volume.affine, code=volume.sform_code)
    if volume.qform_code:
        img.set_qform(volume.affine, code=volume.qform_code)
    if volume.xyzt_units:
        img.header["xyzt_units"] = volume.xyzt_units
    img.header.set_data_dtype(np.uint8)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def zip_masks(
    stem: str, volume: DecodedVolume, results: list[dict[str, Any]], summarize: Callable[..., Any]
) -> bytes:
    """A zip of one `.nii.gz` per style plus `styles.json` (what `summarize` says about each mask)."""
    buf = io.BytesIO()
    manifest = []
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for r in results:
            entry = f"{stem}_style-{safe_stem(str(r['style']), default='style')}.nii.gz"
            zf.writestr(entry, encode_mask(r["mask"], volume))
            manifest.append({"file": entry, **summarize(volume, r, False).model_dump(exclude={"mask_base64"})})
        zf.writestr("styles.json", json.dumps(manifest, indent=2))
    return buf.getvalue()


def header_value(value: Any) -> str:
    """HTTP header values must be latin-1: percent-encode anything else (style ids come from files)."""
    return quote(str(value), safe=" ,.:/@+-_=;\"'()[]")


# ---------------------------------------------------------------------------- identity
def describe_model(model: Any) -> dict[str, str | None]:
    """Registry name/version (when from MLflow), source, and the string X-Model-Version reports."""
    info = dict(getattr(model, "info", {}) or {})
    source = str(info.get("source", ""))
    name = _first(info, "registry_name", "registered_model_name")
    version = _first(info, "registry_version", "registered_model_version")
    alias = None
    if source.startswith("models:/"):
        ref = source[len("models:/") :]
        if "@" in ref:
            uri_name, alias = ref.split("@", 1)
        else:
            uri_name, _, uri_version = ref.partition("/")
            version = version or (uri_version or None)
        name = name or uri_name
        if version is None and alias:
            version = _alias_version(name, alias, info.get("tracking_uri"))
    if name:
        label = f"{name}/{version}" if version else f"{name}@{alias}" if alias else name
    elif ":/" in source:  # runs:/ID/model, mlflow-artifacts:/..., s3://...
        label = source
    else:
        run = Path(source.rstrip("/")).name if source else "model"
        label = f"local:{run}" + (f"@epoch{info['epoch']}" if info.get("epoch") is not None else "")
    return {
        "registry_name": name,
        "registry_version": str(version) if version is not None else None,
        "source": source,
        "model_version": label,
    }


def _first(info: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        if info.get(key) not in (None, ""):
            return str(info[key])
    return None


def _alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """The version an alias pointed to when the replica loaded the model (best effort)."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - provenance is best effort; the model itself already loaded
        return None


