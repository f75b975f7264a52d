"""The hyper-network H(λ): latent vector → every parameter of a primary network.

HyperSORT (MICCAI 2025, §3–4) does not train the UNet's parameters θ directly: an MLP H_β maps each
sample's latent λ_n to θ_n = H_β(λ_n), and the UNet runs with θ_n. :class:`HyperNetwork` is that MLP,
"bring your own architecture" style (HyperLight): it wraps *any* primary ``nn.Module`` and never edits
its code or its parameters.

Layout (same maths as the reference's ``HyperModel``): ``latent_dim → hidden[0] → … → hidden[-1]``
(Linear + ReLU after *every* hidden layer), then **one fused** ``nn.Linear(hidden[-1], P)`` emitting all
P generated values at once (the reference has one head per parameter: the same numbers, ~100 small
matmuls instead of one), then ``tanh(x) · bound``. The fused layer's bias starts at the primary network's
own initial values (``bias = θ₀`` — not ``atanh(θ₀ / bound)`` — exactly as the reference), its weight
with the default ``nn.Linear`` initialisation.

What is generated: every floating-point entry of ``primary.state_dict()`` — parameters (norm affines
included) and persistent float buffers, as the reference does — in ``state_dict`` order; the
:attr:`HyperNetwork.spec` lists (name, shape, offset, numel) of each. Non-float buffers (e.g. counters)
and non-persistent buffers are not generated: they stay those of the template. Norm layers that *track
running statistics* (BatchNorm, or InstanceNorm with ``track_running_stats=True``) are rejected: each
sample runs with its own parameters under ``torch.vmap``/grouped convolutions, where running statistics
would be updated in place by every sample (and fail under vmap) — use InstanceNorm(affine=True), as the
paper does.

The primary module is kept as a frozen *template* (a private deep copy): it is not a sub-module, so its
weights are neither in :meth:`HyperNetwork.parameters` nor in :meth:`HyperNetwork.state_dict`
(``.to()``/``.double()`` still move it along). H's own ``state_dict`` keys are
``mlp.{i}.0.weight``/``.bias`` for hidden layer i and ``out.weight``/``out.bias`` for the fused output.

Example:
    >>> import torch
    >>> from hypersort_ray.model.unet import UNet
    >>> hyper = HyperNetwork(UNet(n_down=1, n_fix=1, channels=2), latent_dim=2, hidden=(8,))
    >>> flat = hyper(torch.zeros(3, 2))                       # [B, P]
    >>> params = hyper.unflatten(flat)                         # name -> [B, *shape]
    >>> params["conv_init.weight"].shape
    torch.Size([3, 2, 1, 3, 3, 3])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hypersort_ray.errors import ModelError

__all__ = ["HyperNetwork", "ParamSpec", "parameter_spec"]


@dataclass(frozen=True)
class ParamSpec:
    """Where one generated tensor lives in H's flat output.

    Attributes:
        name: the ``state_dict`` key in the primary network (e.g. ``"conv_init.weight"``).
        shape: its shape.
        offset: first column in the flat ``[B, P]`` output.
        numel: number of values (``prod(shape)``).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def _check_primary(primary: nn.Module) -> None:
    """Reject primaries that cannot run per sample with generated parameters."""
    for mod_name, mod in primary.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            raise ModelError(
                f"primary network: layer '{mod_name or type(mod).__name__}' ({type(mod).__name__}) tracks "
                "running statistics. Every sample of a batch runs with its own generated parameters "
                "(torch.vmap / grouped convolutions), where running statistics would be updated in place "
                "per sample and are not supported; use InstanceNorm(affine=True) (the paper's choice) or "
                "a norm with track_running_stats=False"
            )


def parameter_spec(primary: nn.Module) -> list[ParamSpec]:
    """The generated entries of ``primary``: every float ``state_dict`` entry, in ``state_dict`` order.

    Args:
        primary: the primary network.

    Raises:
        ModelError: no float entries, tied (shared) tensors, or running-statistics norm layers.

    Example:
        >>> [s.name for s in parameter_spec(nn.Linear(3, 2))]
        ['weight', 'bias']
    """
    _check_primary(primary)
    specs: list[ParamSpec] = []
    seen: dict[int, str] = {}
    offset = 0
    for name, value in primary.state_dict(keep_vars=True).items():
        if not torch.is_floating_point(value):
            continue
        key = value.data_ptr() if value.numel() else id(value)
        if key in seen:
            raise ModelError(
                f"primary network: '{name}' shares its tensor with '{seen[key]}' (tied weights); the "
                "hyper-network generates every state_dict entry separately, so tied weights are not supported"
            )
        seen[key] = name
        n = value.numel()
        specs.append(ParamSpec(name=name, shape=tuple(value.shape), offset=offset, numel=n))
        offset += n
    if not specs:
        raise ModelError(
            f"primary network {type(primary).__name__} has no floating-point parameters or buffers: "
            "there is nothing for the hyper-network to generate"
        )
    return specs


class HyperNetwork(nn.Module):
    """H(λ): an MLP mapping a latent vector to every parameter of a primary network.

    Args:
        primary: any ``nn.Module`` (the template; deep-copied and frozen, never edited).
        latent_dim: dimension d of λ (the paper: 2).
        hidden: hidden layer widths (the paper: 50, 50, 50); each is Linear + ReLU. May be empty.
        bound: output activation ``tanh(x) · bound`` (the paper: 5).

    Attributes:
        spec: one :class:`ParamSpec` per generated tensor, in ``state_dict`` order.
        num_generated: P, the total number of generated values.

    Example:
        >>> from hypersort_ray.model.unet import UNet
        >>> hyper = HyperNetwork(UNet(n_down=1, n_fix=1, channels=2), latent_dim=2, hidden=(4, 4))
        >>> net = hyper.make_primary(torch.zeros(2))             # an ordinary UNet with H(0)'s weights
        >>> net(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 2, 8, 8, 8])
    """

    def __init__(
        self,
        primary: nn.Module,
        latent_dim: int,
        hidden: Sequence[int] = (50, 50, 50),
        bound: float = 5.0,
    ) -> None:
        super().__init__()
        if not isinstance(primary, nn.Module):
            raise ModelError(f"HyperNetwork: primary must be an nn.Module, got {type(primary).__name__}")
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ModelError(f"HyperNetwork: latent_dim must be an integer >= 1, got {latent_dim!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ModelError(f"HyperNetwork: hidden widths must be >= 1, got {list(hidden)}")
        if not bound > 0:
            raise ModelError(f"HyperNetwork: bound must be > 0, got {bound}")
        self.spec: list[ParamSpec] = parameter_spec(primary)
        self.num_generated = sum(s.numel for s in self.spec)
        self.latent_dim = int(latent_dim)
        self.hidden = hidden
        self.bound = float(bound)

        template = copy.deepcopy(primary)
        template.requires_grad_(False)
        # A plain attribute, not a sub-module: the template's tensors must stay out of parameters()
        # and state_dict() (they are never trained; H generates them). _apply below still moves it.
        self.__dict__["_template"] = template

        widths = (self.latent_dim, *hidden)
        self.mlp = nn.Sequential(
            *[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.out = nn.Linear(widths[-1], self.num_generated)
        with torch.no_grad():
            self.out.bias.copy_(self._template_flat())

    # ----------------------------------------------------------------------------------- template
    @property
    def primary(self) -> nn.Module:
        """The frozen template of the primary network (architecture, non-generated buffers)."""
        return self.__dict__["_template"]

    def _template_flat(self) -> Tensor:
        state = self.primary.state_dict()
        return torch.cat([state[s.name].detach().reshape(-1).to(self.out.bias.dtype) for s in self.spec])

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HyperNetwork:  # type: ignore[override]
        # .to(), .cuda(), .double() ... also move/cast the template, so generated parameters and the
        # template's remaining buffers stay on one device.
        super()._apply(fn, recurse)
        self.primary._apply(fn, recurse)
        return self

    # ----------------------------------------------------------------------------------- forward
    def forward(self, latents: Tensor) -> Tensor:
        """Generated parameters, flat: ``tanh(out(mlp(λ))) · bound``.

        Args:
            latents: ``[B, latent_dim]``.

        Returns:
            ``[B, P]``; column ranges per tensor are given by :attr:`spec`.
        """
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim:
            raise ModelError(
                f"HyperNetwork: latents must have shape [B, {self.latent_dim}], got {tuple(latents.shape)}"
            )
        return torch.tanh(self.out(self.mlp(latents))) * self.bound

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split H's flat output into named tensors ``[B, *shape]`` (views, no copy).

        Args:
            flat: ``[B, P]`` as returned by :meth:`forward`.

        Example:
            >>> h = HyperNetwork(nn.Linear(3, 2), latent_dim=1, hidden=())
            >>> {k: tuple(v.shape) for k, v in h.unflatten(h(torch.zeros(4, 1))).items()}
            {'weight': (4, 2, 3), 'bias': (4, 2)}
        """
        if flat.dim() != 2 or flat.shape[1] != self.num_generated:
            raise ModelError(
                f"HyperNetwork.unflatten: expected [B, {self.num_generated}], got {tuple(flat.shape)}"
            )
        B = flat.shape[0]
        # One split (its backward is a single concatenation) rather than a slice per tensor: the
        # backward of each slice would zero-fill a full [B, P] gradient, O(P · #tensors) work.
        chunks = flat.split([s.numel for s in self.spec], dim=1)
        return {s.name: c.view(B, *s.shape) for s, c in zip(self.spec, chunks, strict=True)}

    def _one_latent(self, latent: Tensor) -> Tensor:
        latent = torch.as_tensor(latent)
        if latent.dim() == 1:
            latent = latent.unsqueeze(0)
        if latent.shape != (1, self.latent_dim):
            raise ModelError(
                f"HyperNetwork: expected one latent of shape [{self.latent_dim}] or [1, {self.latent_dim}], "
                f"got {tuple(latent.shape)}"
            )
        return latent.to(device=self.out.weight.device, dtype=self.out.weight.dtype)

    def params_for(self, latent: Tensor) -> dict[str, Tensor]:
        """One set of generated parameters (unbatched: ``name -> [*shape]``), e.g. for inference.

        Gradients flow to H (wrap in ``torch.no_grad()`` for inference).

        Args:
            latent: ``[d]`` or ``[1, d]``.
        """
        return {k: v[0] for k, v in self.unflatten(self(self._one_latent(latent))).items()}

    @torch.no_grad()
    def primary_state_dict(self, latent: Tensor) -> dict[str, Tensor]:
        """A full, detached state dict of the primary network for ``latent`` (loadable with ``strict=True``).

        Generated entries come from H; entries H does not generate (non-float buffers) from the template.

        Args:
            latent: ``[d]`` or ``[1, d]``.
        """
        generated = self.params_for(latent)
        state = {}
        for name, value in self.primary.state_dict().items():
            state[name] = generated[name].detach().clone() if name in generated else value.detach().clone()
        return state

    def make_primary(self, latent: Tensor) -> nn.Module:
        """An ordinary, independent copy of the primary network carrying the weights for ``latent``.

        Its parameters require grad and its train/eval mode is the template's; call ``.eval()`` for
        inference.

        Args:
            latent: ``[d]`` or ``[1, d]``.
        """
        net = copy.deepcopy(self.primary)
        net.load_state_dict(self.primary_state_dict(latent))
        net.requires_grad_(True)
        return net

    def extra_repr(self) -> str:
        return (
            f"primary={type(self.primary).__name__}, latent_dim={self.latent_dim}, hidden={list(self.hidden)}, "
            f"generated={self.num_generated} values in {len(self.spec)} tensors, bound={self.bound}"
        )
