"""``--device``: where the generated UNets run (and, for large volumes, where the volume stays)."""

from __future__ import annotations

import re

from hypersort_ray.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(value: str | None) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU when torch sees one, else ``cpu``).

    Raises:
        ConfigError: an unknown name, or a GPU asked for that this machine does not have.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    import torch

    text = (value or "cpu").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise ConfigError(f"--device {value!r}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {value}: torch sees no CUDA device here (install a CUDA build of torch, or use cpu)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
