"""Import weights and latents trained with the public HyperSORT code (github.com/ImFusionGmbH/HyperSORT).

The reference ``HyperModel`` keeps, in its ``state_dict``:

* ``hypernetwork.{i}.0.weight`` / ``.bias`` — hidden Linear i (a Sequential of Sequential(Linear, ReLU));
* ``heads.{name with '.' replaced by ';'}.weight`` ``[numel, hidden[-1]]`` / ``.bias`` ``[numel]`` — one
  head per ``state_dict`` entry of the primary network, whose output is ``tanh(head(h)) · 5`` reshaped to
  the entry's shape;
* ``model.dummy_param`` — a placeholder, ignored here.

Our :class:`~hypersort_ray.model.hypernet.HyperNetwork` computes the same function with **one** fused
output layer: concatenating the heads' weights (rows) and biases in our spec order gives exactly it.
The reference saves latents as ``latent_dict``: sample index → tensor ``[1, d]``.

Example:
    >>> import torch
    >>> from hypersort_ray.model.unet import UNet
    >>> from hypersort_ray.model.hypernet import HyperNetwork
    >>> unet = UNet(n_down=1, n_fix=1, channels=2)
    >>> ours = HyperNetwork(unet, latent_dim=2, hidden=(4,))
    >>> ref = {"hypernetwork.0.0.weight": torch.zeros(4, 2), "hypernetwork.0.0.bias": torch.zeros(4),
    ...        "model.dummy_param": torch.zeros(1, 1)}
    >>> for name, value in unet.state_dict().items():
    ...     ref[f"heads.{name.replace('.', ';')}.weight"] = torch.zeros(value.numel(), 4)
    ...     ref[f"heads.{name.replace('.', ';')}.bias"] = value.reshape(-1)
    >>> ours.load_state_dict(convert_reference_state_dict(ref, unet, latent_dim=2, hidden=[4]))
    <All keys matched successfully>
    >>> idx, values = convert_reference_latents({7: torch.ones(1, 2), 3: torch.zeros(1, 2)})
    >>> idx.tolist(), values.shape
    ([3, 7], torch.Size([2, 2]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hypersort_ray.errors import ModelError
from hypersort_ray.model.hypernet import parameter_spec

__all__ = ["convert_reference_state_dict", "convert_reference_latents", "reference_head_name"]

_IGNORED = ("model.dummy_param",)


def reference_head_name(param_name: str) -> str:
    """The reference's head key prefix for a primary ``state_dict`` entry (``.`` → ``;``).

    Example:
        >>> reference_head_name("conv_init.weight")
        'heads.conv_init;weight'
    """
    return "heads." + param_name.replace(".", ";")


def _list(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _tensor(ref_sd: Mapping[str, Any], key: str) -> Tensor:
    value = ref_sd[key]
    if not isinstance(value, Tensor):
        raise ModelError(f"reference state dict: '{key}' is a {type(value).__name__}, not a tensor")
    return value.detach()


def _expect(key: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ModelError(
            f"reference state dict: '{key}' has shape {tuple(value.shape)}, expected {shape} "
            "(the primary network or the hidden sizes differ from the ones it was trained with)"
        )


def convert_reference_state_dict(
    ref_sd: Mapping[str, Any],
    primary: nn.Module,
    latent_dim: int,
    hidden: Sequence[int],
) -> dict[str, Tensor]:
    """A reference ``HyperModel`` state dict as the state dict of our :class:`HyperNetwork`.

    Args:
        ref_sd: the reference's ``model.state_dict()`` (``torch.load`` of its ``model_w.pt``).
        primary: the primary network it was trained for (same architecture; its values are not used).
        latent_dim: latent dimension d.
        hidden: hidden widths of H (the reference's ``hypernetwork_layers`` without its first entry).

    Returns:
        ``{"mlp.{i}.0.weight", "mlp.{i}.0.bias", ..., "out.weight", "out.bias"}`` for
        ``HyperNetwork(primary, latent_dim, hidden).load_state_dict``.

    Raises:
        ModelError: a missing, unexpected or mis-shaped entry (named in the message).
    """
    if not isinstance(ref_sd, Mapping):
        raise ModelError(f"reference state dict: expected a mapping, got {type(ref_sd).__name__}")
    hidden = [int(h) for h in hidden]
    widths = [int(latent_dim), *hidden]
    spec = parameter_spec(primary)
    out: dict[str, Tensor] = {}
    used: set[str] = set(k for k in _IGNORED if k in ref_sd)

    expected_hidden = []
    for i in range(len(hidden)):
        for part, shape in (("weight", (widths[i + 1], widths[i])), ("bias", (widths[i + 1],))):
            expected_hidden.append((f"hypernetwork.{i}.0.{part}", f"mlp.{i}.0.{part}", shape))
    expected_heads = [
        (f"{reference_head_name(s.name)}.{part}", s, part) for s in spec for part in ("weight", "bias")
    ]
    wanted = {k for k, _, _ in expected_hidden} | {k for k, _, _ in expected_heads}
    missing = [k for k in wanted if k not in ref_sd]
    extra = [k for k in ref_sd if k not in wanted and k not in used]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_list(missing)}")
        if extra:
            parts.append(f"unexpected {_list(extra)}")
        raise ModelError(
            "reference state dict does not match this primary network / hidden sizes "
            f"(latent_dim={latent_dim}, hidden={hidden}, {len(spec)} generated tensors): " + "; ".join(parts)
        )

    for ref_key, our_key, shape in expected_hidden:
        value = _tensor(ref_sd, ref_key)
        _expect(ref_key, value, shape)
        out[our_key] = value.clone()

    width = widths[-1]
    weights, biases = [], []
    for s in spec:
        key = reference_head_name(s.name)
        w, b = _tensor(ref_sd, f"{key}.weight"), _tensor(ref_sd, f"{key}.bias")
        _expect(f"{key}.weight", w, (s.numel, width))
        _expect(f"{key}.bias", b, (s.numel,))
        weights.append(w)
        biases.append(b)
    dtype = torch.promote_types(weights[0].dtype, biases[0].dtype)
    out["out.weight"] = torch.cat([w.to(dtype) for w in weights], dim=0)
    out["out.bias"] = torch.cat([b.to(dtype) for b in biases], dim=0)
    return out


def convert_reference_latents(latent_dict: Mapping[Any, Any]) -> tuple[Tensor, Tensor]:
    """The reference's ``latent_dict`` (sample index → ``[1, d]`` tensor) as sorted arrays.

    Args:
        latent_dict: ``torch.load`` of the reference's ``latent_dict.pt``. Keys are integers (or
            0-d integer tensors / digit strings).

    Returns:
        ``(indices [N] int64 ascending, values [N, d])`` — e.g. for ``LatentTable(indices, d)`` followed
        by copying the values in, or for analysis.

    Raises:
        ModelError: non-integer keys, duplicates, or latents of different sizes.
    """
    if not isinstance(latent_dict, Mapping) or not latent_dict:
        raise ModelError("reference latents: expected a non-empty dict {sample index: latent}")
    items: list[tuple[int, Tensor]] = []
    for key, value in latent_dict.items():
        try:
            if isinstance(key, Tensor):
                if key.numel() != 1 or key.dtype.is_floating_point:
                    raise ValueError
                idx = int(key.item())
            elif isinstance(key, str):
                idx = int(key.strip())
            elif isinstance(key, int) and not isinstance(key, bool):
                idx = key
            else:
                raise ValueError
        except ValueError:
            raise ModelError(f"reference latents: key {key!r} is not a sample index (integer)") from None
        if not isinstance(value, Tensor):
            raise ModelError(f"reference latents: sample {idx} has a {type(value).__name__}, not a tensor")
        items.append((idx, value.detach().reshape(-1)))
    dims = {v.numel() for _, v in items}
    if len(dims) != 1:
        raise ModelError(f"reference latents: latents have different sizes {sorted(dims)}")
    items.sort(key=lambda kv: kv[0])
    indices = torch.tensor([k for k, _ in items], dtype=torch.int64)
    if bool((indices[1:] == indices[:-1]).any()):
        raise ModelError("reference latents: the same sample index appears twice")
    values = torch.stack([v.cpu() for _, v in items]).clone()
    return indices, values
