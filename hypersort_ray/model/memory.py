"""Peak memory of one HyperSORT training step, and the micro-batch / checkpointing plan that fits a budget.

:func:`estimate_step_memory` counts, for the primary :class:`~hypersort_ray.model.unet.UNet` run by the
grouped path of :mod:`hypersort_ray.model.functional`, the feature maps that stay alive for the backward
pass (per level: what each conv → ReLU → norm unit keeps, the decoder's concatenation, the loss), the
largest transient of the backward pass, the generated parameters of a micro-batch and H's own state
(weights, Adam moments, gradient). :func:`choose_plan` then picks the largest micro-batch — and the least
recomputation — whose estimate fits a memory budget. Everything here is arithmetic on sizes: no tensor is
allocated.

The step's peak is ``fixed + max(H gradient, primary-network phase)``: ``zero_grad(set_to_none=True)``
frees H's gradient before the primary network runs, and the activations are gone before H's backward
allocates it again. Two constants were fitted to the resident-set peaks measured on CPU (paper UNet,
64³–168³): the estimates are 0–7 % above the measurements (``docs/benchmarks.md``, "Memory and
checkpointing"). On CUDA the same counts stand for ``torch.cuda.max_memory_allocated`` without the CPU
runtime; that was not measured (no GPU was available).

Example:
    >>> shape = UNetShape(in_channels=1, out_channels=2, channels=16, n_down=3, n_fix=3)
    >>> est = estimate_step_memory(shape, (64, 64, 64), micro_batch=1, batch=2, checkpoint="off",
    ...                            hyper_params=170_000_000, generated=3_400_000)
    >>> est.peak_bytes > est.fixed_bytes
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hypersort_ray.errors import ModelError

__all__ = [
    "UNetShape",
    "MemoryEstimate",
    "MemoryPlan",
    "CHECKPOINT_ORDER",
    "estimate_step_memory",
    "choose_plan",
    "available_memory_bytes",
    "hyper_sizes",
]

#: Checkpointing modes from the least to the most recomputation (and memory saved).
CHECKPOINT_ORDER: tuple[str, ...] = ("off", "blocks", "nested")

#: Resident memory of the process besides the step's tensors, counted in a CPU budget: the interpreter,
#: torch, MONAI and numpy (0.47 GiB right after the imports), thread pools, oneDNN's caches and what the
#: allocator keeps mapped. Fitted, with :data:`_CPU_ACTIVATION_CALIBRATION`, to 23 measured peaks (paper
#: UNet, 64³–168³, B 1–4, every checkpointing mode) so that no estimate falls below its measurement:
#: the estimates came out 0–7 % above the measured peaks (mean 3.7 %).
CPU_RUNTIME_BYTES = int(0.84 * 2**30)

#: Loss intermediates kept for backward (softmax, log-softmax, one-hot target, Dice products), in logit
#: maps.
_LOSS_MAPS = 6

#: The counted primary-network bytes times this give the measured resident peaks on CPU (fitted with
#: :data:`CPU_RUNTIME_BYTES`; the counts are a slight over-estimate, e.g. of transients that do not
#: coexist).
_CPU_ACTIVATION_CALIBRATION = 0.98


@dataclass(frozen=True)
class UNetShape:
    """The sizes of a :class:`~hypersort_ray.model.unet.UNet` that decide its activation memory.

    Attributes:
        in_channels: input channels.
        out_channels: output channels (logits).
        channels: channels at full resolution (level k has ``channels · 2**k``).
        n_down: down-sampling stages.
        n_fix: conv → ReLU → norm units per stage after the first.
    """

    in_channels: int
    out_channels: int
    channels: int
    n_down: int
    n_fix: int

    @classmethod
    def of(cls, primary: nn.Module) -> UNetShape | None:
        """The shape of ``primary`` if it is hypersort_ray's :class:`UNet` (grouped path), else None."""
        from hypersort_ray.model.functional import supports_grouped

        if not supports_grouped(primary):
            return None
        return cls(
            in_channels=int(primary.in_channels),
            out_channels=int(primary.out_channels),
            channels=int(primary.channels),
            n_down=int(primary.n_down),
            n_fix=int(primary.n_fix),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes.

    Attributes:
        fixed_bytes: present during the whole step: runtime (CPU only), H's weights and Adam moments, the
            primary network's template.
        h_grad_bytes: H's gradient (allocated by H's backward, after the primary network's activations
            are freed).
        activation_bytes: the peak of the primary-network phase of one micro-batch (feature maps kept for
            backward, the backward's largest transient, the loss, the micro-batch's generated parameters
            and their gradient, H's output for the batch).
    """

    fixed_bytes: int
    h_grad_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        """``fixed + max(H gradient, primary-network phase)``."""
        return self.fixed_bytes + max(self.h_grad_bytes, self.activation_bytes)

    @property
    def peak_gb(self) -> float:
        """:attr:`peak_bytes` in GiB."""
        return self.peak_bytes / 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`choose_plan` decided.

    Attributes:
        micro_batch: samples per evaluation of the primary network.
        checkpoint: ``"off"``, ``"blocks"`` or ``"nested"`` (:data:`~hypersort_ray.model.functional.CHECKPOINT_MODES`).
        estimate: the estimate for that choice.
        budget_bytes: the budget it was chosen for.
        fits: whether the estimate is within the budget (False: nothing fits; the leanest choice is made).
    """

    micro_batch: int
    checkpoint: str
    estimate: MemoryEstimate
    budget_bytes: int
    fits: bool


def hyper_sizes(hyper: nn.Module) -> tuple[int, int]:
    """``(trainable parameters of H, generated values P)`` of a :class:`~hypersort_ray.model.hypernet.HyperNetwork`."""
    params = sum(p.numel() for p in hyper.parameters() if p.requires_grad)
    return params, int(getattr(hyper, "num_generated", 0))


def _peak_maps(shape: UNetShape, mode: str, ratio: float) -> float:
    """Peak of the primary network's feature maps for one sample, in full-resolution maps
    (``channels`` channels on every voxel); a level-k map is ``ratio**k`` of one.

    The counts follow the grouped path. Without checkpointing a conv → ReLU → norm unit keeps its ReLU
    output (read by the ReLU's and the norm's backward) and its output (read by the next convolution), an
    up-sampling unit its ReLU output, a decoder level the skip concatenation; the backward pass adds about
    two maps of gradients. ``"blocks"`` keeps each unit's output only (the next unit's input), plus a
    recomputed unit's maps and gradients. ``"nested"`` keeps the output of every encoder stage and deeper
    decoder stage, and the units of the shallowest decoder stage; its second peak is the recomputation
    of the encoder's first stage (n unit outputs, the skip's gradient, a unit's transient).
    """
    n, D = shape.n_fix, shape.n_down

    def levels(per_level: list[float]) -> float:
        return sum(c * ratio**k for k, c in enumerate(per_level))

    if mode == "off":
        encoder = [2.0 * (n + 1)] * (D + 1)
        decoder = [3.0 + 2 * n] * D + [0.0]
        return levels([e + d for e, d in zip(encoder, decoder, strict=True)]) + 2.0
    if mode == "blocks":
        return levels([n + 1.0 + (n + 1.0 if k < D else 0.0) for k in range(D + 1)]) + 2.0
    if mode == "nested":
        skips = levels([1.0] * (D + 1))
        deeper_decoder = levels([0.0] + [1.0] * (D - 1) + [0.0]) if D > 1 else 0.0
        end_of_forward = skips + deeper_decoder + (1 + n) + 2.0
        encoder_recompute = n + 1.0 + 3.0
        return max(end_of_forward, encoder_recompute)
    raise ModelError(f"checkpoint must be one of {CHECKPOINT_ORDER}, got {mode!r}")


def estimate_step_memory(
    shape: UNetShape,
    roi: Sequence[int],
    *,
    micro_batch: int,
    batch: int,
    checkpoint: str,
    hyper_params: int,
    generated: int,
    element_bytes: int = 4,
    device_type: str = "cpu",
) -> MemoryEstimate:
    """Peak memory of one training step (see :class:`MemoryEstimate`).

    Args:
        shape: the primary UNet's sizes.
        roi: spatial size of one sample (e.g. ``(168, 168, 168)``).
        micro_batch: samples the primary network runs at once.
        batch: samples per step (H's output ``[batch, P]`` and its gradient).
        checkpoint: ``"off"``, ``"blocks"`` or ``"nested"``.
        hyper_params: trainable parameters of H (weights, gradient, two Adam moments each).
        generated: P, values H generates per sample.
        element_bytes: bytes per activation element (4: float32; mixed precision is not modelled, so
            the float32 count is a conservative bound for it).
        device_type: ``"cpu"`` adds the runtime's resident memory and applies the CPU calibration.

    Example:
        >>> s = UNetShape(1, 2, 16, 3, 3)
        >>> kw = dict(batch=2, hyper_params=10**6, generated=10**5)
        >>> off = estimate_step_memory(s, (96,) * 3, micro_batch=1, checkpoint="off", **kw)
        >>> lean = estimate_step_memory(s, (96,) * 3, micro_batch=1, checkpoint="nested", **kw)
        >>> lean.activation_bytes < off.activation_bytes
        True
    """
    if micro_batch < 1 or batch < 1:
        raise ModelError(f"estimate_step_memory: micro_batch and batch must be >= 1, got {micro_batch}, {batch}")
    voxels = math.prod(int(s) for s in roi)
    dims = len(roi)
    # A level-k map has channels·2**k channels on voxels / 2**(dims·k) voxels.
    elements = _peak_maps(shape, checkpoint, 2.0 / 2**dims) * shape.channels * voxels
    elements += (_LOSS_MAPS + 1) * shape.out_channels * voxels  # the loss's maps and the logits
    elements += shape.in_channels * voxels  # the image
    per_sample = elements * element_bytes + voxels * 8  # + the int64 label
    activations = micro_batch * per_sample
    if device_type == "cpu":
        activations *= _CPU_ACTIVATION_CALIBRATION
    # Generated parameters: H's output [batch, P] (+ tanh's saved output), a micro-batch leaf and its
    # gradient, all float32.
    activations += (2 * batch + 2 * micro_batch) * generated * 4
    fixed = 3 * hyper_params * 4 + generated * 4  # weights + two Adam moments; the template
    if device_type == "cpu":
        fixed += CPU_RUNTIME_BYTES
    return MemoryEstimate(
        fixed_bytes=int(fixed), h_grad_bytes=int(hyper_params * 4), activation_bytes=int(activations)
    )


def choose_plan(
    shape: UNetShape,
    roi: Sequence[int],
    *,
    batch: int,
    budget_bytes: int,
    hyper_params: int,
    generated: int,
    micro_batch: int | Literal["auto"] = "auto",
    checkpoint: str = "auto",
    max_micro_batch: int | None = None,
    element_bytes: int = 4,
    device_type: str = "cpu",
) -> MemoryPlan:
    """The largest micro-batch, then the least recomputation, whose estimated peak fits ``budget_bytes``.

    Candidates are tried from the largest micro-batch down, each with checkpointing ``"off"``, then
    ``"blocks"``, then ``"nested"``; the first that fits wins. An explicit ``micro_batch`` or
    ``checkpoint`` is kept as given (only the other is chosen). When nothing fits, the leanest candidate
    is returned with ``fits=False``.

    Args:
        shape, roi, batch, hyper_params, generated, element_bytes, device_type: as for
            :func:`estimate_step_memory`.
        budget_bytes: the memory the step may use.
        micro_batch: ``"auto"`` or a fixed number of samples (capped at ``batch``).
        checkpoint: ``"auto"`` or a fixed mode.
        max_micro_batch: an upper bound for an automatic micro-batch (e.g. a speed rule on CPU).

    Example:
        >>> s = UNetShape(1, 2, 16, 3, 3)
        >>> plan = choose_plan(s, (64,) * 3, batch=4, budget_bytes=2**40, hyper_params=10**6, generated=10**5)
        >>> plan.micro_batch, plan.checkpoint, plan.fits
        (4, 'off', True)
    """
    if micro_batch == "auto":
        top = batch if max_micro_batch is None else max(1, min(batch, int(max_micro_batch)))
        sizes = list(range(top, 0, -1))
    else:
        sizes = [max(1, min(batch, int(micro_batch)))]
    modes = list(CHECKPOINT_ORDER) if checkpoint == "auto" else [checkpoint]
    kw = dict(
        batch=batch,
        hyper_params=hyper_params,
        generated=generated,
        element_bytes=element_bytes,
        device_type=device_type,
    )
    last = None
    for size in sizes:
        for mode in modes:
            est = estimate_step_memory(shape, roi, micro_batch=size, checkpoint=mode, **kw)  # type: ignore[arg-type]
            last = (size, mode, est)
            if est.peak_bytes <= budget_bytes:
                return MemoryPlan(size, mode, est, int(budget_bytes), True)
    assert last is not None
    return MemoryPlan(last[0], last[1], last[2], int(budget_bytes), False)


def _proc_meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _own_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def available_memory_bytes(device: torch.device | str) -> int:
    """The memory a training step on ``device`` may use when no budget is configured.

    CUDA: 90 % of the device's total memory (the CUDA context and library workspaces are not in the
    estimate; the margin is a guess, not measured — no GPU was available). CPU: the machine's available
    memory (``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf`` available pages) plus what this
    process already holds (it counts towards the step's peak). Several workers sharing one machine each
    see all of it: give them a ``training.memory_budget_gb`` instead.

    Args:
        device: where the step runs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    available = _proc_meminfo("MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 8 * 2**30  # no way to ask: a modest default
    return int(available) + _own_rss_bytes()
