"""``hypersort export``: a plain fixed-style UNet (no hyper-network) for use outside hypersort.

Formats: ``torchscript`` (a scripted or traced module, checked against the eager network) and
``state_dict`` (safetensors with the UNet config in its metadata, rebuilt by :func:`load_exported_unet`).
Neither needs, nor allows, unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from hypersort_ray.atomic import atomic_write_via
from hypersort_ray.config import UNetConfig
from hypersort_ray.errors import ModelError
from hypersort_ray.inference.loading import load_model
from hypersort_ray.inference.model import HyperSortModel

__all__ = ["EXPORT_FORMAT", "EXPORT_FORMATS", "export_cli", "load_exported_unet"]

EXPORT_FORMAT = "hypersort-unet"


def _resolve_export_style(model: HyperSortModel, style: str) -> tuple[tuple[float, ...], str]:
    """A style id first; otherwise, when it parses as numbers, an explicit latent."""
    try:
        return model.resolve(style, None)
    except ModelError as unknown:
        try:
            return model.resolve(None, style)
        except ModelError:
            raise unknown from None


def load_exported_unet(path: str | Path):
    """Load a file written by ``hypersort export`` (except ONNX, which onnxruntime reads): a module.

    ``state_dict`` exports (safetensors) are rebuilt as ``build_primary(UNetConfig(**metadata["unet"]))``
    with ``strict=True``; ``torch_export`` programs (``.pt2``) with ``torch.export.load``; TorchScript
    exports with ``torch.jit.load``. None unpickles arbitrary objects.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hypersort_ray.model.unet import build_primary

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported model {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors: try TorchScript
        meta = None
    if meta is None:
        if path.suffix == ".pt2":
            try:
                return torch.export.load(str(path)).module()
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign archive
                raise ModelError(f"exported model {path}: not a torch.export program ({exc})") from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"exported model {path}: neither safetensors nor TorchScript ({exc})") from exc
    if meta.get("format") != EXPORT_FORMAT or "unet" not in meta:
        raise ModelError(f"exported model {path}: safetensors without hypersort metadata (format, unet)")
    net = build_primary(UNetConfig(**json.loads(meta["unet"])))
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"exported model {path}: weights do not match its UNet config ({exc})") from exc
    return net.requires_grad_(False).eval()


EXPORT_FORMATS = ("torchscript", "state_dict", "torch_export", "onnx")


def export_cli(
    model: str, *, style: str, out: Path, fmt: str, device: str = "cpu", tracking_uri: str | None = None
) -> dict[str, Any]:
    """Write a plain fixed-style UNet.

    Formats: ``torchscript`` (scripted or traced, checked against the eager network), ``state_dict``
    (safetensors for the primary class, :func:`load_exported_unet`), ``torch_export`` (a ``torch.export``
    program, ``.pt2``: TorchScript's successor, dynamic spatial size) and ``onnx`` (needs the ``onnx`` and
    ``onnxscript`` packages; checked with onnxruntime when it is installed).

    Args:
        model: run folder, model folder or MLflow URI.
        style: ``main``, a style id, or a latent like ``"0.1,-0.3"``.
        out: the output file.
        fmt: one of :data:`EXPORT_FORMATS`.
        device: where the UNet is generated (the file is always written for the CPU).
        tracking_uri: MLflow store for ``models:/`` URIs.

    Returns:
        ``{"out", "format", "style", "latent"}``.
    """
    from safetensors.torch import save_file

    if fmt not in EXPORT_FORMATS:
        raise ModelError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    m = load_model(model, device=device, tracking_uri=tracking_uri)
    values, used = _resolve_export_style(m, style)
    net = copy.deepcopy(m.unet_for(values)).cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": EXPORT_FORMAT,
        "version": "1",
        "unet": json.dumps(m.config.model.unet.model_dump(mode="json")),
        "preprocessing": json.dumps(m.config.preprocessing.model_dump(mode="json")),
        "style": used,
        "latent": json.dumps(list(values)),
        "source": str(m.info.get("source", model)),
    }
    if fmt == "torchscript":
        atomic_write_via(out, lambda tmp: _save_torchscript(net, m, tmp, meta))
    elif fmt == "state_dict":
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_write_via(out, lambda tmp: save_file(state, str(tmp), metadata=meta))
    elif fmt == "torch_export":
        atomic_write_via(out, lambda tmp: _save_torch_export(net, m, tmp, meta), suffix=".pt2")
    else:
        atomic_write_via(out, lambda tmp: _save_onnx(net, m, tmp), suffix=".onnx")
    return {"out": str(out), "format": fmt, "style": used, "latent": list(values)}


def _examples(m: HyperSortModel):
    """Two small inputs of different batch and spatial sizes (multiples of the UNet's stride): one to
    compile with, one to check the compiled network on."""
    import torch

    unet = m.config.model.unet
    factor = 2**unet.n_down if unet.kind == "hypersort_unet" else 16
    gen = torch.Generator().manual_seed(0)
    # Batch 2 and unequal axes: torch.export would otherwise specialise a size-1 or shared dimension.
    example = torch.randn(2, m.in_channels, *[factor * k for k in (2, 3, 4)[: m.spatial_dims]], generator=gen)
    other = torch.randn(1, m.in_channels, *[factor * k for k in (3, 2, 4)[: m.spatial_dims]], generator=gen)
    return example, other, factor


def _check_same(compiled_out: Any, eager_out: Any, what: str, *, loose: bool = False) -> None:
    """The exported network must reproduce the eager one: to float rounding for TorchScript and
    torch.export; for ONNX (another runtime's kernels, e.g. its instance norm) to 1e-3 of the logits'
    scale with the same class in at least 99.9 % of the voxels."""
    import torch

    got, want = torch.as_tensor(compiled_out).float(), eager_out.float()
    if not loose:
        same = torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    else:
        scale = max(1.0, float(want.abs().max()))
        agree = float((got.argmax(1) == want.argmax(1)).float().mean())
        same = float((got - want).abs().max()) <= 1e-3 * scale and agree >= 0.999
    if not same:
        raise ModelError(f"{what} export: the exported UNet does not reproduce the network")


def _save_torch_export(net: Any, m: HyperSortModel, path: Path, meta: dict[str, str]) -> None:
    """``torch.export`` with dynamic batch and spatial sizes (multiples of the stride), checked on a
    second input of another shape."""
    import torch
    from torch.export import Dim

    example, other, factor = _examples(m)
    spatial = {i + 2: Dim(f"s{i}", min=1, max=512 // factor) * factor for i in range(m.spatial_dims)}
    program = torch.export.export(net, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=64), **spatial},))
    with torch.no_grad():
        _check_same(program.module()(other), net(other), "torch.export")
    torch.export.save(program, str(path), extra_files={"hypersort.json": json.dumps(meta)})


def _save_onnx(net: Any, m: HyperSortModel, path: Path) -> None:
    """ONNX (opset of the torch exporter) with dynamic batch and spatial axes; verified with onnxruntime
    when it is installed."""
    import importlib.util

    import torch

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise ModelError("--format onnx needs the onnx and onnxscript packages: pip install 'hypersort-ray[onnx]'")
    example, other, _ = _examples(m)
    names = ["batch", *(f"s{i}" for i in range(m.spatial_dims))]
    axes = {0: names[0], **{i + 2: names[i + 1] for i in range(m.spatial_dims)}}
    with contextlib.redirect_stdout(sys.stderr):  # the exporter reports its stages on stdout
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, dynamo=True)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            _check_same(session.run(None, {"image": other.numpy()})[0], net(other), "ONNX", loose=True)


def _save_torchscript(net: Any, m: HyperSortModel, path: Path, meta: dict[str, str]) -> None:
    """Script the network, or trace it where scripting fails (our UNet's forward dispatches on layer
    names, which TorchScript cannot compile).

    A trace must not freeze shape-dependent logic, so the result is checked against the eager network
    on a second input of another batch size and another shape (small sizes: cheap for any ROI).
    """
    import torch

    example, other, _ = _examples(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the input-shape check; jit deprecation
        try:
            compiled = torch.jit.script(net)
        except Exception:  # noqa: BLE001 - TorchScript raises several types for unsupported Python
            compiled = torch.jit.trace(net, example, check_trace=False)
        with torch.no_grad():
            _check_same(compiled(other), net(other), "TorchScript")
        torch.jit.save(compiled, str(path), _extra_files={"hypersort.json": json.dumps(meta)})
