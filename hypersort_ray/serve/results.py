"""What a segmentation request returns: mask encoding (NIfTI, zip, 4D) and the model's identity.

Kept apart from :mod:`hypersort_ray.serve.app` so the deployment class (which Ray pickles by value)
refers to importable functions, and so these can be tested without Ray. Masks are written by the
project's one NIfTI writer (:mod:`hypersort_ray.data.nifti`) on the upload's own geometry.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from hypersort_ray.serve.validation import DecodedVolume, safe_stem

__all__ = ["ZIP_MANIFEST", "describe_model", "encode_mask", "header_value", "public_info", "public_source", "zip_masks"]

#: The zip answer's manifest (one entry per mask).
ZIP_MANIFEST = "manifest.json"
# Provenance keys /v1/model may show: numbers and names, never a path on the server.
_PUBLIC_INFO = ("epoch", "num_samples", "registry_name", "registry_version", "format", "version")


def _geometry(volume: DecodedVolume) -> Any:
    """The upload's NiftiGeometry (shape, affine, qform/sform and their codes, units, NIfTI version)."""
    from hypersort_ray.data.nifti import NiftiGeometry

    if volume.geometry is not None:
        return volume.geometry
    # A volume built by hand (tests): its header facts are the best we have.
    return NiftiGeometry(
        shape=tuple(volume.shape), affine=volume.affine,
        qform=volume.affine if volume.qform_code else None, sform=volume.affine if volume.sform_code else None,
        qform_code=volume.qform_code, sform_code=volume.sform_code, xyzt_units=volume.xyzt_units,
    )


def encode_mask(mask: np.ndarray, volume: DecodedVolume, shape: tuple[int, ...] | None = None) -> bytes:
    """A uint8 mask as ``.nii.gz`` bytes on the input's grid (``shape``: e.g. spatial + a styles axis)."""
    from hypersort_ray.data.nifti import encode_like

    geometry = _geometry(volume)
    if shape is not None:
        # Styles along a trailing axis: the grid is the spatial part, the extra axis rides along.
        spatial = tuple(volume.array.shape)
        geometry = dataclasses.replace(geometry, shape=spatial)
        mask = np.asarray(mask).reshape(shape)
    return encode_like(np.asarray(mask, dtype=np.uint8), geometry, dtype=np.uint8)


def zip_masks(
    stem: str, volume: DecodedVolume, results: list[dict[str, Any]], summarize: Callable[..., Any]
) -> bytes:
    """A zip of one `.nii.gz` per style plus `manifest.json` (what `summarize` says about each mask).

    The manifest is not named after the run folder's ``styles.json``: it describes masks, not styles.
    """
    buf = io.BytesIO()
    manifest = []
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for r in results:
            entry = f"{stem}_style-{safe_stem(str(r['style']), default='style')}.nii.gz"
            zf.writestr(entry, encode_mask(r["mask"], volume))
            manifest.append({"file": entry, **summarize(volume, r, False).model_dump(exclude={"mask_base64"})})
        zf.writestr(ZIP_MANIFEST, json.dumps(manifest, indent=2))
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


def public_source(source: str) -> str:
    """A model source fit for clients: MLflow URIs as they are, a local folder as ``local:<name>``."""
    if ":/" in source and not source.startswith("file:"):
        return source
    name = Path(source.removeprefix("file://").rstrip("/")).name if source else "model"
    return f"local:{name or 'model'}"


def public_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance /v1/model shows: an allow-list of plain values (no run paths, no tracking URIs)."""
    return {k: info[k] for k in _PUBLIC_INFO if k in info and isinstance(info[k], str | int | float | None)}


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


