"""Evaluate a primary network on B samples, each with its own generated parameter set.

A HyperSORT batch holds samples with different latents λ_n, hence different UNet parameters
θ_n = H(λ_n). :func:`batched_forward` evaluates ``primary`` on sample n with θ_n for every n at once —
without ever assigning tensors to the module (the reference deletes the module's Parameters and sets
attributes, one sample at a time).

Two implementations, same outputs and gradients (tests check both against a per-sample loop):

* **generic** — ``torch.func.functional_call`` under ``torch.vmap`` over (params, x): any ``nn.Module``
  whose layers support vmap (MONAI ``BasicUNet`` included).
* **grouped** — for :class:`~hypersort_ray.model.unet.UNet`: the B samples become the *groups* of one
  grouped convolution. The batch is laid out as ``(1, B·C, *spatial)``, weights as ``(B·C_out, C_in, k…)``
  and ``F.conv3d(..., groups=B)`` applies sample n's kernel to sample n's channels only; transposed
  convolutions likewise; instance norm is per (sample, channel) already, so ``F.instance_norm`` on the
  ``(1, B·C, …)`` view with the ``(B·C,)`` affine of every sample is exact. Why it pays on CPU: PyTorch
  sends a single-sample, ungrouped 3D convolution with few channels to its slow generic kernel, while a
  grouped one goes to oneDNN (a 16-channel 32³ convolution ran 5–10× faster per sample here).
  With B = 1 the same trick is played with two groups that each compute half the output channels from a
  copy of the input — the identical arithmetic, no extra multiply-adds — whenever PyTorch would otherwise
  choose the slow kernel.

  oneDNN's *weight* gradient, however, is 10–20× slower than its forward pass once a sample's feature
  map is large (≥ 32³ voxels here; measured for grouped and ungrouped convolutions alike), and it
  dominated the step. On CPU, float32, :class:`_FastWeightGradConv` therefore computes that gradient
  itself as a *forward* convolution: ``∂L/∂w[g, o, i, k] = Σ_s ∂L/∂y[g, o, s] · x_pad[g, i, stride·s + k]``
  is a grouped convolution of the padded input (input channels as the batch) with the output gradient
  as a huge, dilated kernel — 1.3–15× faster than oneDNN's backward for those layers, same result to
  float32 rounding (the sum runs over the whole feature map in one accumulation).

  **Activation checkpointing** (``checkpoint=``, grouped path only): the walk of
  :meth:`~hypersort_ray.model.unet.UNet.walk` is cut into segments (each conv → ReLU → norm unit; each
  encoder / decoder stage) and :class:`GroupedOps` wraps them in ``torch.utils.checkpoint`` (non-reentrant,
  so the gradients reach the generated weights the segments read). ``"blocks"`` keeps one map per unit
  instead of two, and the decoder's first unit convolves the up-sampled map and the skip separately (no
  concatenated map, nor its gradient); ``"nested"`` also checkpoints the stages. Peak memory per mode:
  :mod:`hypersort_ray.model.memory`.

Example:
    >>> import torch
    >>> from hypersort_ray.model.unet import UNet
    >>> from hypersort_ray.model.hypernet import HyperNetwork
    >>> hyper = HyperNetwork(UNet(n_down=1, n_fix=1, channels=2), latent_dim=2, hidden=(8,))
    >>> params = hyper.unflatten(hyper(torch.randn(3, 2)))
    >>> batched_forward(hyper.primary, params, torch.randn(3, 1, 8, 8, 8)).shape
    torch.Size([3, 2, 8, 8, 8])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call

from hypersort_ray.errors import ModelError
from hypersort_ray.model.unet import UNet

__all__ = ["batched_forward", "supports_grouped", "GroupedOps", "CHECKPOINT_MODES", "Checkpointing"]

Method = Literal["auto", "grouped", "vmap", "loop"]
Checkpointing = Literal["off", "blocks", "nested"]
#: Activation checkpointing of the grouped path. ``"off"``; ``"blocks"``: every conv → ReLU → norm unit
#: keeps only its input for backward and recomputes the rest; ``"nested"``: in addition every encoder
#: stage (and every decoder stage but the shallowest) keeps only its inputs, its units' inputs being
#: recomputed as well — less memory, one more forward of those stages.
CHECKPOINT_MODES: tuple[str, ...] = ("off", "blocks", "nested")

# PyTorch's CPU convolution heuristic (aten ConvParams::use_mkldnn): a float32 convolution with one
# sample and one group goes to oneDNN only if N·C·D·H (4-D prefix of the input) exceeds this many elements.
_MKLDNN_MIN_ELEMENTS = 20480
# Compute the weight gradient as a forward convolution once the reduction (the positions summed over:
# the output map of a convolution, the input map of a transposed one) has this many voxels per sample.
# Measured here: oneDNN was as fast or faster at 16³ (4096), 4–15× slower at 32³ and 64³.
_WEIGHT_GRAD_MIN_VOXELS = 16384


def supports_grouped(primary: nn.Module) -> bool:
    """Whether ``primary`` can use the grouped-convolution path (our :class:`UNet`, forward not overridden)."""
    return (
        isinstance(primary, UNet)
        and type(primary).forward is UNet.forward
        and type(primary).walk is UNet.walk
    )


def _would_use_slow_kernel(x: Tensor, groups: int) -> bool:
    """True where CPU PyTorch would pick its generic (slow) convolution kernel for a float32 input."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or groups != 1 or x.shape[0] != 1:
        return False
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    return x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= _MKLDNN_MIN_ELEMENTS


def _weight_grad_by_forward_conv(
    x: Tensor,
    gy: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    groups: int,
    transposed: bool,
) -> Tensor:
    """The weight gradient of a (transposed) convolution with batch 1, computed by a forward convolution.

    Convolution, weight ``[G·Co, Ci, k…]``: ``gw[g,o,i,k] = Σ_s gy[g,o,s] · x_pad[g,i,stride·s+k]`` — a
    grouped convolution of ``x_pad`` laid out as ``(Ci, G, …)`` (channels as the batch) with ``gy`` as a
    ``(G·Co, 1, So…)`` kernel dilated by the stride. Transposed convolution, weight ``[G·Ci, Co, k…]``:
    the roles of input and output gradient swap (``gw[g,i,o,k] = Σ_s x[g,i,s] · gy_pad[g,o,stride·s+k]``).
    """
    nd = x.dim() - 2
    conv = F.conv3d if nd == 3 else F.conv2d
    if transposed:
        signal, kern = gy, x  # signal: padded and correlated; kern: the "kernel" side
    else:
        signal, kern = x, gy
    G = groups
    c_sig, c_ker = signal.shape[1] // G, kern.shape[1] // G
    # (c_sig, G, ...): the signal's channels become the batch, the groups its channels. The zero padding
    # is the convolution's own (same sums as padding a copy first, without a copy of the map: measured
    # as fast at 64³).
    sig = signal.reshape(G, c_sig, *signal.shape[2:]).transpose(0, 1)
    ker = kern.reshape(G * c_ker, 1, *kern.shape[2:])
    out = conv(sig, ker, padding=padding, dilation=stride, groups=G)  # (c_sig, G·c_ker, ≥k...)
    out = out[(slice(None), slice(None), *(slice(0, k) for k in kernel))]
    # Convolution weight [G·Co, Ci, k]: Co = c_ker, Ci = c_sig. Transposed [G·Ci, Co, k]: Ci = c_ker
    # (x's channels), Co = c_sig. Both are (G, c_ker, c_sig, k).
    out = out.reshape(c_sig, G, c_ker, *kernel).permute(1, 2, 0, *range(3, 3 + nd))
    return out.reshape(G * c_ker, c_sig, *kernel)


class _FastWeightGradConv(torch.autograd.Function):
    """A (transposed) convolution of batch 1 whose backward computes large-map weight gradients with
    :func:`_weight_grad_by_forward_conv` instead of oneDNN's slow backward-weights kernel."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, output_padding, dilation, groups, transposed):  # type: ignore[override]
        nd = x.dim() - 2
        if transposed:
            fn = F.conv_transpose3d if nd == 3 else F.conv_transpose2d
            y = fn(x, w, b, stride, padding, output_padding, groups, dilation)
        else:
            fn = F.conv3d if nd == 3 else F.conv2d
            y = fn(x, w, b, stride, padding, dilation, groups)
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, output_padding, dilation, groups, transposed, b is not None)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        stride, padding, output_padding, dilation, groups, transposed, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        nd = x.dim() - 2
        gx = gw = gb = None
        reduction = gy.shape[2:].numel() if not transposed else x.shape[2:].numel()
        trick = need_w and reduction >= _WEIGHT_GRAD_MIN_VOXELS and all(d == 1 for d in dilation)
        if need_x or (need_w and not trick):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gy,
                x,
                w,
                None,
                list(stride),
                list(padding),
                list(dilation),
                transposed,
                list(output_padding),
                groups,
                [bool(need_x), bool(need_w and not trick), False],
            )
        if trick:
            kernel = tuple(w.shape[2:])
            gw = _weight_grad_by_forward_conv(x, gy, kernel, stride, padding, groups, transposed)
        if need_b and has_bias:
            gb = gy.sum(dim=(0, *range(2, 2 + nd)))
        return gx, gw, gb, None, None, None, None, None, None


def _conv(x, w, b, layer, groups: int, transposed: bool, fast_backward: bool) -> Tensor:
    nd = x.dim() - 2
    stride, padding, dilation = tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)
    output_padding = tuple(layer.output_padding) if transposed else (0,) * nd
    if fast_backward:
        return _FastWeightGradConv.apply(
            x, w, b, stride, padding, output_padding, dilation, groups, transposed
        )
    if transposed:
        fn = F.conv_transpose3d if nd == 3 else F.conv_transpose2d
        return fn(x, w, b, stride, padding, output_padding, groups, dilation)
    fn = F.conv3d if nd == 3 else F.conv2d
    return fn(x, w, b, stride, padding, dilation, groups)


class GroupedOps:
    """:class:`~hypersort_ray.model.unet.UNetOps` running B parameter sets as convolution groups.

    Tensors flow as ``(1, B·C, *spatial)``; weights are read from ``params`` (``name.weight`` of shape
    ``[B, *shape]``), falling back to the template's own tensor (shared by all samples) for a name that
    is absent. The template's layers supply stride, padding, eps, … (read only).

    Args:
        net: the template :class:`UNet`.
        params: generated tensors, ``name -> [B, *shape]``.
        batch: B.
        split_single: with B = 1, run convolutions as two groups of half the output channels (same
            arithmetic, oneDNN kernel): ``None`` where PyTorch would otherwise pick its slow CPU kernel,
            ``True`` always (where the channel count is even), ``False`` never.
        fast_backward: compute large-map weight gradients by a forward convolution
            (:class:`_FastWeightGradConv`).
        checkpoint: activation checkpointing of the walk's segments (see :data:`CHECKPOINT_MODES`).
    """

    def __init__(
        self,
        net: UNet,
        params: Mapping[str, Tensor],
        batch: int,
        *,
        split_single: bool | None = None,
        fast_backward: bool = False,
        checkpoint: Checkpointing = "off",
    ) -> None:
        if checkpoint not in CHECKPOINT_MODES:
            raise ModelError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        self.net = net
        self.params = params
        self.B = batch
        self.split_single = split_single
        self.fast_backward = fast_backward
        self.checkpoint = checkpoint

    def segment(self, kind: str, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        """Run one segment of :meth:`UNet.walk`, checkpointed where :attr:`checkpoint` says so."""
        if self.checkpoint == "off" or not torch.is_grad_enabled():
            return fn(*tensors)
        # The shallowest decoder stage is the first to be back-propagated: keeping only its input would
        # recompute it at once, for nothing.
        if kind != "block" and (self.checkpoint != "nested" or kind == "decoder_0"):
            return fn(*tensors)
        # Non-reentrant: gradients reach the generated weights the segment reads from ``params`` (not
        # passed as inputs). No RNG state to restore: the UNet has no random operation.
        return torch.utils.checkpoint.checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)

    def _get(self, name: str, fallback: Tensor) -> Tensor:
        value = self.params.get(name)
        if value is None:
            return fallback.unsqueeze(0).expand(self.B, *fallback.shape)
        return value

    def _split(self, x: Tensor, layer: nn.Module, c_out: int) -> bool:
        if self.B != 1 or self.split_single is False or c_out % 2 or layer.groups != 1:
            return False
        return self.split_single is True or _would_use_slow_kernel(x, layer.groups)

    def conv(self, name: str, x: Tensor) -> Tensor:
        layer = self.net.get_submodule(name)
        w = self._get(f"{name}.weight", layer.weight)  # [B, C_out, C_in / groups, k...]
        b = self._get(f"{name}.bias", layer.bias) if layer.bias is not None else None
        return self._conv_with(layer, x, w, b)

    def _conv_with(self, layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Convolution ``layer`` (its stride, padding, groups) with per-sample weights ``w`` ``[B, ...]``."""
        B = self.B
        c_out = w.shape[1]
        b = b.reshape(B * c_out) if b is not None else None
        if self._split(x, layer, c_out):
            # Two groups, each half of the output channels from its own copy of the input: exactly the
            # same sums, but the oneDNN kernel instead of the generic one.
            return _conv(torch.cat([x, x], dim=1), w[0], b, layer, 2, False, self.fast_backward)
        w = w.reshape(B * c_out, *w.shape[2:])
        return _conv(x, w, b, layer, B * layer.groups, False, self.fast_backward)

    def conv_cat(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """Convolution ``name`` of the per-sample concatenation of ``a`` and ``b`` (decoder skip).

        Without checkpointing: ``conv(cat(a, b))``. With it, the sum of the convolutions of ``a`` and
        ``b`` with the matching halves of the weight (same sums up to rounding): the concatenated map,
        its gradient and the weight-gradient input are then never materialised — the largest transient
        of a checkpointed decoder level, twice a feature map.
        """
        if self.checkpoint == "off":
            return self.conv(name, self.cat(a, b))
        layer = self.net.get_submodule(name)
        if layer.groups != 1:
            return self.conv(name, self.cat(a, b))
        w = self._get(f"{name}.weight", layer.weight)  # [B, C_out, C_a + C_b, k...]
        bias = self._get(f"{name}.bias", layer.bias) if layer.bias is not None else None
        c_a = a.shape[1] // self.B
        out = self._conv_with(layer, a, w[:, :, :c_a], bias)
        # In place: the first convolution's output is saved by nothing (its backward needs its input).
        return out.add_(self._conv_with(layer, b, w[:, :, c_a:], None))

    def conv_transpose(self, name: str, x: Tensor) -> Tensor:
        layer = self.net.get_submodule(name)
        B = self.B
        w = self._get(f"{name}.weight", layer.weight)  # [B, C_in, C_out / groups, k...]
        c_in, c_out = w.shape[1], w.shape[2] * layer.groups
        b = self._get(f"{name}.bias", layer.bias).reshape(B * c_out) if layer.bias is not None else None
        if self._split(x, layer, c_out):
            half = c_out // 2
            w2 = torch.cat([w[0, :, :half], w[0, :, half:]], dim=0)  # [2·C_in, C_out/2, k...]
            return _conv(torch.cat([x, x], dim=1), w2, b, layer, 2, True, self.fast_backward)
        w = w.reshape(B * c_in, *w.shape[2:])
        return _conv(x, w, b, layer, B * layer.groups, True, self.fast_backward)

    def norm(self, name: str, x: Tensor) -> Tensor:
        layer = self.net.get_submodule(name)
        weight = bias = None
        if layer.affine:
            weight = self._get(f"{name}.weight", layer.weight).reshape(-1)
            bias = self._get(f"{name}.bias", layer.bias).reshape(-1)
        return F.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=layer.eps)

    def cat(self, a: Tensor, b: Tensor) -> Tensor:
        B = self.B
        spatial = a.shape[2:]
        both = torch.cat([a.view(B, -1, *spatial), b.view(B, -1, *spatial)], dim=1)
        return both.reshape(1, -1, *spatial)


def _onednn_cpu(x: Tensor) -> bool:
    # Not under CPU autocast: the convolutions then run in bfloat16 and the fast weight-gradient path
    # (which saves the float32 input) would mix dtypes in backward.
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and not torch.is_autocast_enabled("cpu")
    )


def _grouped(
    primary: UNet,
    params: Mapping[str, Tensor],
    x: Tensor,
    channels_last: bool,
    *,
    split_single: bool | None = None,
    fast_backward: bool | None = None,
    checkpoint: Checkpointing = "off",
) -> Tensor:
    """The grouped path. ``split_single``: see :class:`GroupedOps`; ``fast_backward`` ``None``: on for
    CPU float32 (where oneDNN runs the convolutions)."""
    primary.check_input(x)
    B, spatial = x.shape[0], x.shape[2:]
    xg = x.reshape(1, B * x.shape[1], *spatial)
    if channels_last:
        xg = xg.contiguous(memory_format=_channels_last(x.dim()))
    ops = GroupedOps(
        primary,
        params,
        B,
        split_single=split_single,
        fast_backward=_onednn_cpu(x) if fast_backward is None else fast_backward,
        checkpoint=checkpoint,
    )
    out = primary.walk(xg, ops)
    return out.reshape(B, -1, *spatial)


def _vmap(primary: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(primary, p, (xi.unsqueeze(0),)).squeeze(0)

    return torch.vmap(one, in_dims=(0, 0))(dict(params), x)


def _loop(primary: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    outs = [
        functional_call(primary, {k: v[i] for k, v in params.items()}, (x[i : i + 1],))
        for i in range(x.shape[0])
    ]
    return torch.cat(outs, dim=0)


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _check(params: Mapping[str, Tensor], x: Tensor) -> None:
    if x.dim() < 3:
        raise ModelError(f"batched_forward: x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    B = x.shape[0]
    bad = {k: tuple(v.shape) for k, v in params.items() if v.dim() == 0 or v.shape[0] != B}
    if bad:
        raise ModelError(f"batched_forward: x has batch size {B} but these parameters do not: {bad}")


def batched_forward(
    primary: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    *,
    method: Method = "auto",
    channels_last: bool = False,
    bf16: bool = False,
    autocast_dtype: torch.dtype | None = None,
    checkpoint: Checkpointing = "off",
) -> Tensor:
    """Output of ``primary`` on sample n with parameter set n, for all n at once.

    Never modifies ``primary``: its parameters and buffers are only read where ``params`` lacks a name.

    Args:
        primary: the template network (e.g. ``HyperNetwork.primary``).
        params: ``name -> [B, *shape]`` (e.g. ``HyperNetwork.unflatten(H(λ))``).
        x: ``[B, C, *spatial]``.
        method: ``"auto"`` (grouped for :class:`UNet`, else vmap), ``"grouped"``, ``"vmap"``, or ``"loop"``
            (a Python loop of ``functional_call``; the plain reference for tests).
        channels_last: use the channels-last memory format for the activations (meant for CUDA; on
            CPU it is honoured too, but a convolution micro-benchmark here showed no gain).
        bf16: autocast to bfloat16 on CUDA; ignored on other devices (same as
            ``autocast_dtype=torch.bfloat16``, kept for callers of the older signature).
        autocast_dtype: run under ``torch.autocast`` with this dtype on the input's device (``None``:
            no autocast, unless ``bf16``). Mixed precision is meant for CUDA; on CPU bfloat16 autocast works
            (oneDNN), float16 is the caller's business.
        checkpoint: activation checkpointing of the grouped path (:data:`CHECKPOINT_MODES`): the
            activations inside each checkpointed segment are recomputed in backward instead of kept.
            Same outputs and gradients up to rounding; only for the grouped path.

    Returns:
        ``[B, K, *spatial]``.

    Example:
        >>> import torch
        >>> net = torch.nn.Conv2d(1, 2, 3, padding=1)
        >>> params = {"weight": torch.randn(4, 2, 1, 3, 3), "bias": torch.zeros(4, 2)}
        >>> batched_forward(net, params, torch.randn(4, 1, 5, 5)).shape
        torch.Size([4, 2, 5, 5])
    """
    _check(params, x)
    if method == "auto":
        method = "grouped" if supports_grouped(primary) else "vmap"
    if method == "grouped" and not supports_grouped(primary):
        raise ModelError(
            f"batched_forward: the grouped path needs hypersort_ray's UNet, got {type(primary).__name__}; "
            "use method='vmap'"
        )
    if method not in ("grouped", "vmap", "loop"):
        raise ModelError(f"batched_forward: unknown method {method!r}")
    if checkpoint not in CHECKPOINT_MODES:
        raise ModelError(f"batched_forward: checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    if checkpoint != "off" and method != "grouped":
        raise ModelError(
            f"batched_forward: activation checkpointing needs the grouped path (hypersort_ray's UNet), "
            f"not method={method!r}"
        )
    if autocast_dtype is None and bf16 and x.device.type == "cuda":
        autocast_dtype = torch.bfloat16
    autocast = (
        torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        if method == "grouped":
            return _grouped(primary, params, x, channels_last, checkpoint=checkpoint)  # type: ignore[arg-type]
        if channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=_channels_last(x.dim()))
        if method == "vmap":
            return _vmap(primary, params, x)
        return _loop(primary, params, x)
