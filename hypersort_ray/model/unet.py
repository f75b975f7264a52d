"""The paper's primary network: a plain UNet whose parameter names follow the reference code.

HyperSORT (MICCAI 2025, §4) uses "a standard 3D UNet architecture with 3 down-sampling stages, 16 channels
at the highest resolution and 3 convolutional layers at every resolution stage (ReLU activation, followed
by instance normalization)". :class:`UNet` is that network, with every parameter named as in the public
HyperSORT repository (``conv_init``, ``norm_init``, ``conv_{level}_{l}``, ``down_{lvl}``, ``up_{lvl}``,
``dec_conv_{lvl}_{l}``, ...), so ``state_dict()`` keys and their order equal the reference's and its
hyper-network weights can be imported (:mod:`hypersort_ray.model.reference`).

The topology is written once, in :meth:`UNet.walk`, against a tiny "ops" interface (convolution,
transposed convolution, normalisation, skip concatenation, each looked up by layer name). The module's
own :meth:`UNet.forward` runs it with its ``nn.Module`` layers; :mod:`hypersort_ray.model.functional`
runs the very same walk with grouped convolutions over B generated parameter sets. Nothing is duplicated
and nothing mutates the module.

Any other ``nn.Module`` works as a primary network too (:func:`build_primary` also builds MONAI's
``BasicUNet``); this one only gets the grouped-convolution fast path.

Example:
    >>> import torch
    >>> net = UNet(in_channels=1, out_channels=2, n_down=2, n_fix=2, channels=4)
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 2, 16, 16, 16])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypersort_ray.errors import ModelError

__all__ = ["UNet", "UNetOps", "ModuleOps", "build_primary", "unet_layer_names"]


class UNetOps(Protocol):
    """What :meth:`UNet.walk` needs: layer applications addressed by the reference layer names.

    Implementations decide where the weights come from (the module itself, or B generated sets) and
    how the batch is laid out; the walk only threads tensors between them.
    """

    def conv(self, name: str, x: Tensor) -> Tensor:
        """Apply convolution ``name`` (its stride/padding are those of the module's layer)."""
        ...

    def conv_transpose(self, name: str, x: Tensor) -> Tensor:
        """Apply transposed convolution ``name``."""
        ...

    def norm(self, name: str, x: Tensor) -> Tensor:
        """Apply instance normalisation ``name`` (per sample, per channel, with affine)."""
        ...

    def cat(self, a: Tensor, b: Tensor) -> Tensor:
        """Concatenate ``a`` and ``b`` along each sample's channels (decoder skip connection)."""
        ...


def _run_segment(kind: str, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """The default segment runner of :meth:`UNet.walk`: just call ``fn``."""
    return fn(*tensors)


class ModuleOps:
    """:class:`UNetOps` backed by the module's own layers (the ordinary ``forward``)."""

    def __init__(self, net: UNet) -> None:
        self.net = net

    def conv(self, name: str, x: Tensor) -> Tensor:
        return self.net.get_submodule(name)(x)

    def conv_transpose(self, name: str, x: Tensor) -> Tensor:
        return self.net.get_submodule(name)(x)

    def norm(self, name: str, x: Tensor) -> Tensor:
        return self.net.get_submodule(name)(x)

    def cat(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=1)


def unet_layer_names(n_down: int, n_fix: int) -> list[str]:
    """The layer names of :class:`UNet` in registration (= ``state_dict``) order.

    Each name owns a ``.weight`` and a ``.bias`` entry.

    Args:
        n_down: number of down-sampling stages.
        n_fix: convolutions per resolution stage.

    Example:
        >>> unet_layer_names(1, 1)
        ['conv_init', 'norm_init', 'conv_0_0', 'norm_0_0', 'down_0', 'down_norm_0', 'conv_1_0', 'norm_1_0', 'up_0', 'up_norm_0', 'dec_conv_0_0', 'dec_norm_0_0', 'conv_final']
    """
    names = ["conv_init", "norm_init"]
    for l in range(n_fix):  # noqa: E741 - the reference's loop variable, kept for the names
        names += [f"conv_0_{l}", f"norm_0_{l}"]
    for lvl in range(n_down):
        names += [f"down_{lvl}", f"down_norm_{lvl}"]
        for l in range(n_fix):  # noqa: E741
            names += [f"conv_{lvl + 1}_{l}", f"norm_{lvl + 1}_{l}"]
    # Registered shallow-first (as the reference does); the decoder *runs* deepest-first.
    for lvl in range(n_down):
        names += [f"up_{lvl}", f"up_norm_{lvl}"]
        for l in range(n_fix):  # noqa: E741
            names += [f"dec_conv_{lvl}_{l}", f"dec_norm_{lvl}_{l}"]
    names.append("conv_final")
    return names


class UNet(nn.Module):
    """The HyperSORT primary UNet (2D or 3D), parameter names as in the reference implementation.

    Encoder: ``conv_init`` (k3, ``channels``) → ReLU → InstanceNorm(affine), then ``n_fix`` × (conv k3 →
    ReLU → IN) at level 0; per down level a strided conv (k3, s2, p1) doubling the channels → ReLU → IN
    and ``n_fix`` × (conv → ReLU → IN). Decoder, deepest level first: transposed conv (k4, s2, p1) halving
    the channels → ReLU → IN, concatenation with the encoder feature of that level, ``n_fix`` × (conv →
    ReLU → IN) (the first takes twice the channels). ``conv_final`` (k3) gives ``out_channels`` logits.

    Norm layers keep no running statistics, so the network can be evaluated per sample with generated
    parameters (``torch.func`` / grouped convolutions).

    Args:
        in_channels: input channels.
        out_channels: output channels (class logits).
        n_down: number of down-sampling stages (the paper: 3). Spatial sizes must be divisible by
            ``2**n_down``.
        n_fix: convolutions per resolution stage (the paper: 3). At least 1.
        channels: channels at full resolution (the paper: 16); level ``k`` has ``channels * 2**k``.
        spatial_dims: 2 or 3.

    Example:
        >>> net = UNet(n_down=1, n_fix=1, channels=2, spatial_dims=2)
        >>> list(net.state_dict())[:4]
        ['conv_init.weight', 'conv_init.bias', 'norm_init.weight', 'norm_init.bias']
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 2, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        n_down: int = 3,
        n_fix: int = 3,
        channels: int = 16,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"UNet: spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("n_down", n_down, 0),
            ("n_fix", n_fix, 1),
            ("channels", channels, 1),
        ):
            if int(value) != value or value < low:
                raise ModelError(f"UNet: {name} must be an integer >= {low}, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_down = n_down
        self.n_fix = n_fix
        self.channels = channels
        self.spatial_dims = spatial_dims

        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        C = channels

        # Registration order = state_dict order = the reference's (see unet_layer_names).
        self.conv_init = conv(in_channels, C, 3, 1, 1)
        self.norm_init = norm(C, affine=True)
        for l in range(n_fix):  # noqa: E741
            self.add_module(f"conv_0_{l}", conv(C, C, 3, 1, 1))
            self.add_module(f"norm_0_{l}", norm(C, affine=True))
        for lvl in range(n_down):
            c_in, c_out = C * 2**lvl, C * 2 ** (lvl + 1)
            self.add_module(f"down_{lvl}", conv(c_in, c_out, 3, 2, 1))
            self.add_module(f"down_norm_{lvl}", norm(c_out, affine=True))
            for l in range(n_fix):  # noqa: E741
                self.add_module(f"conv_{lvl + 1}_{l}", conv(c_out, c_out, 3, 1, 1))
                self.add_module(f"norm_{lvl + 1}_{l}", norm(c_out, affine=True))
        for lvl in range(n_down):
            c_deep, c = C * 2 ** (lvl + 1), C * 2**lvl
            self.add_module(f"up_{lvl}", up(c_deep, c, 4, 2, 1))
            self.add_module(f"up_norm_{lvl}", norm(c, affine=True))
            for l in range(n_fix):  # noqa: E741
                self.add_module(f"dec_conv_{lvl}_{l}", conv(c_deep if l == 0 else c, c, 3, 1, 1))
                self.add_module(f"dec_norm_{lvl}_{l}", norm(c, affine=True))
        self.conv_final = conv(C, out_channels, 3, 1, 1)

    def walk(self, x: Tensor, ops: UNetOps) -> Tensor:
        """Run the UNet topology on ``x`` with the given layer implementations.

        The walk is cut into *segments* that ``ops`` may wrap (activation checkpointing): if ``ops`` has
        a ``segment(kind, fn, *tensors)`` method, every segment runs as ``ops.segment(kind, fn, *tensors)``
        instead of ``fn(*tensors)``. ``kind`` is ``"block"`` for one conv → ReLU → norm unit (the decoder's
        first unit of a level takes the skip concatenation inside it, so the concatenated map is never
        kept), ``"encoder_{lvl}"`` for all units of encoder level ``lvl`` and ``"decoder_{lvl}"`` for all
        units of decoder level ``lvl`` (stages contain blocks: segments nest). The arithmetic is the same
        whatever ``segment`` does, as long as it returns ``fn(*tensors)``. An ``ops`` with a
        ``conv_cat(name, a, b)`` method computes the decoder's ``conv(name, cat(a, b))`` itself (e.g. without
        materialising the concatenation).

        Args:
            x: input in whatever layout ``ops`` expects.
            ops: the layer implementations (:class:`ModuleOps` for the module's own weights).

        Returns:
            The logits, in ``ops``' layout.
        """
        segment = getattr(ops, "segment", None) or _run_segment
        conv_cat = getattr(ops, "conv_cat", None)

        def unit(conv_name: str, norm_name: str) -> Callable[[Tensor], Tensor]:
            return lambda t: ops.norm(norm_name, F.relu(ops.conv(conv_name, t)))

        def encoder(lvl: int) -> Callable[[Tensor], Tensor]:
            def run(t: Tensor) -> Tensor:
                first = ("conv_init", "norm_init") if lvl == 0 else (f"down_{lvl - 1}", f"down_norm_{lvl - 1}")
                t = segment("block", unit(*first), t)
                for l in range(self.n_fix):  # noqa: E741
                    t = segment("block", unit(f"conv_{lvl}_{l}", f"norm_{lvl}_{l}"), t)
                return t

            return run

        def decoder(lvl: int) -> Callable[[Tensor, Tensor], Tensor]:
            def up(t: Tensor) -> Tensor:
                return ops.norm(f"up_norm_{lvl}", F.relu(ops.conv_transpose(f"up_{lvl}", t)))

            def first(u: Tensor, skip: Tensor) -> Tensor:
                name = f"dec_conv_{lvl}_0"
                y = conv_cat(name, u, skip) if conv_cat is not None else ops.conv(name, ops.cat(u, skip))
                return ops.norm(f"dec_norm_{lvl}_0", F.relu(y))

            def run(t: Tensor, skip: Tensor) -> Tensor:
                t = segment("block", first, segment("block", up, t), skip)
                for l in range(1, self.n_fix):  # noqa: E741
                    t = segment("block", unit(f"dec_conv_{lvl}_{l}", f"dec_norm_{lvl}_{l}"), t)
                return t

            return run

        skips = []
        for lvl in range(self.n_down + 1):
            x = segment(f"encoder_{lvl}", encoder(lvl), x)
            skips.append(x)
        for lvl in range(self.n_down - 1, -1, -1):
            x = segment(f"decoder_{lvl}", decoder(lvl), x, skips[lvl])
        return ops.conv("conv_final", x)

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`ModelError` unless ``x`` is ``[B, in_channels, *spatial]`` with every spatial size
        divisible by ``2**n_down`` (the decoder's skip connections need matching sizes)."""
        factor = 2**self.n_down
        if (
            x.dim() != self.spatial_dims + 2
            or x.shape[1] != self.in_channels
            or any(s % factor for s in x.shape[2:])
        ):
            raise ModelError(
                f"UNet: expected input [B, {self.in_channels}, {self.spatial_dims} spatial sizes divisible by "
                f"{factor}], got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, out_channels, *spatial]`` for ``x`` ``[B, in_channels, *spatial]``."""
        self.check_input(x)
        return self.walk(x, ModuleOps(self))


def build_primary(cfg) -> nn.Module:  # cfg: hypersort_ray.config.UNetConfig
    """Build the primary network described by a :class:`hypersort_ray.config.UNetConfig`.

    ``kind="hypersort_unet"`` gives :class:`UNet`; ``kind="monai_basic_unet"`` gives MONAI's
    ``BasicUNet`` with features ``(C, C, 2C, 4C, 8C, C)`` (MONAI's default ratios, scaled so that
    ``channels`` plays the same role) and InstanceNorm(affine) — it has no running statistics, so it
    works under the hyper-network unchanged (``n_down``/``n_fix`` do not apply to it: BasicUNet has 4
    down-sampling stages with two convolutions each, so use spatial sizes divisible by 16 and of at least
    32, leaving instance norm more than one voxel at the deepest level).

    Args:
        cfg: the ``model.unet`` section of the experiment config.

    Example:
        >>> from hypersort_ray.config import UNetConfig
        >>> type(build_primary(UNetConfig(channels=4))).__name__
        'UNet'
    """
    if cfg.kind == "hypersort_unet":
        return UNet(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            n_down=cfg.n_down,
            n_fix=cfg.n_fix,
            channels=cfg.channels,
            spatial_dims=cfg.spatial_dims,
        )
    if cfg.kind == "monai_basic_unet":
        from monai.networks.nets import BasicUNet

        C = cfg.channels
        return BasicUNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            features=(C, C, 2 * C, 4 * C, 8 * C, C),
            norm=("instance", {"affine": True}),
        )
    raise ModelError(f"model.unet.kind = {cfg.kind!r}: unknown primary network kind")
