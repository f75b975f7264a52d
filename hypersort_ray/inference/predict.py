"""``hypersort predict``: one mask per image (a chosen style or latent), or one per style."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hypersort_ray.data.nifti import NIFTI_EXTENSIONS, nifti_stem
from hypersort_ray.errors import ModelError
from hypersort_ray.inference.loading import load_model

__all__ = ["predict_cli"]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "style"


def predict_cli(
    model: str,
    *,
    image: Path,
    out: Path,
    style: str | None = None,
    latent: str | None = None,
    all_styles: bool = False,
    probabilities: bool = False,
    device: str = "cpu",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """``hypersort predict``: one mask (``--out`` file), or one per style (``--out`` folder).

    Args:
        model: run folder, model folder or MLflow URI.
        image: the input NIfTI.
        out: the mask file, or a folder with ``all_styles``.
        style: ``main`` or a style id.
        latent: an explicit latent instead of a style.
        all_styles: one mask per style.
        probabilities: also write the class probabilities.
        device: where the UNets run (the volume stays on the CPU; windows go to the device).
        tracking_uri: MLflow store for ``models:/`` URIs.
    """
    m = load_model(model, device=device, tracking_uri=tracking_uri)
    if all_styles:
        if style or latent:
            raise ModelError("--all-styles cannot be combined with --style or --latent")
        out = Path(out)
        if out.name.endswith(NIFTI_EXTENSIONS) or out.is_file():
            raise ModelError(f"--out {out}: with --all-styles, --out is a folder (one mask per style)")
        prepared = m.prepare(image)
        masks: dict[str, str] = {}
        probs: dict[str, str] = {}
        for s in m.styles:
            target = out / f"{nifti_stem(image)}_style-{_safe_name(s.id)}.nii.gz"
            result = m.predict_file(prepared, target, style=s.id, probabilities=probabilities)
            masks[s.id] = str(target)
            if "probabilities_path" in result:
                probs[s.id] = result["probabilities_path"]
        summary: dict[str, Any] = {"image": str(image), "out": str(out), "masks": masks}
        if probs:
            summary["probabilities"] = probs
        return summary
    result = m.predict_file(image, out, style=style, latent=latent, probabilities=probabilities)
    summary = {
        "image": str(image),
        "mask": str(out),
        "style": result["style"],
        "latent": result["latent"],
        "foreground_voxels": int((result["mask"] > 0).sum()),
    }
    if "probabilities_path" in result:
        summary["probabilities"] = result["probabilities_path"]
    return summary

