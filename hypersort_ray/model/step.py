"""One HyperSORT training step on a batch of samples, each with its own latent λ_n.

Objective (paper eq. 1): ``Σ_n L_n`` with ``L_n = L_Seg(U_{H(λ_n)}(X_n), S_n) + l1_weight · ‖λ_n‖₁``.

:class:`TrainStep` evaluates a batch of B samples at once (H forward on ``[B, d]``, the primary network
with B parameter sets via :func:`~hypersort_ray.model.functional.batched_forward`) and is built so that
**one batched step equals B separate per-sample evaluations**, as in the reference code (one sample per
step, one Adam per latent), apart from H being stepped once per batch:

* H's gradient is that of ``Σ_n w_n L_n``. The default ``w_n = 1/B`` makes it the batch mean; the
  distributed trainer passes other weights so that DDP's averaging across workers yields the global mean,
  and ``w_n = 0`` marks padding samples.
* Each λ_n is stepped with the gradient of **its own** loss, ``∂L_n/∂λ_n`` — independent of the batch size
  and of the weights (the weighted gradient is divided by ``w_n``); rows with ``w_n = 0`` are not stepped
  at all. Each latent row has its own Adam state and step count
  (:class:`~hypersort_ray.model.latents.LatentTable`).

Order inside :meth:`TrainStep.step`: gather λ → H forward → batched primary forward → losses → backward →
optional gradient clipping on H → H optimizer step → ``latents.apply_gradients``. The primary network may
run in micro-batches (``micro_batch``): each micro-batch's loss is back-propagated to H's output only,
then H's backward runs once for the whole batch (one DDP all-reduce), so results do not depend on it.

Memory (:mod:`hypersort_ray.model.memory`): with ``micro_batch="auto"`` and/or
``activation_checkpointing="auto"`` the step estimates its peak memory for each input size and picks the
largest micro-batch, then the least recomputation, that fits ``memory_budget_gb`` (default: what the
device has). Activation checkpointing recomputes the primary network's activations in backward instead of
keeping them: same gradients up to rounding, one or two more forward passes of the checkpointed parts.
Mixed precision: ``"bf16"`` autocasts the primary network to bfloat16 (CUDA, and CPU); ``"fp16"`` (CUDA
only) to float16 with a :class:`torch.amp.GradScaler` whose scale multiplies the loss; H's gradients are
unscaled by the scaler, the latents' by the step, and when any of them is inf/NaN neither H nor a latent
is stepped (the scaler lowers its scale).

The H optimizer is Adam (paper: lr 1e-4) with the *fused* implementation: at the paper's size H has
~170 M parameters (the output layer maps 50 hidden units to ~3.4 M UNet values) and the fused step was
measured ~10× faster than the for-each one on CPU (0.18 s vs 2–3 s per step here).

Example:
    >>> import torch
    >>> from hypersort_ray.model.unet import UNet
    >>> from hypersort_ray.model.hypernet import HyperNetwork
    >>> from hypersort_ray.model.latents import LatentTable
    >>> hyper = HyperNetwork(UNet(n_down=1, n_fix=1, channels=2), latent_dim=2, hidden=(8,))
    >>> step = TrainStep(hyper, LatentTable(range(4), dim=2), lr=1e-3)
    >>> x, y = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))
    >>> sorted(step.step(x, y, torch.tensor([0, 3])))[:3]
    ['ce_loss', 'dice', 'dice_loss']
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hypersort_ray.errors import ConfigError, ModelError
from hypersort_ray.model.functional import Method, batched_forward, supports_grouped
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.losses import hard_dice, l1_norm, seg_loss_terms
from hypersort_ray.model.memory import (
    MemoryPlan,
    UNetShape,
    available_memory_bytes,
    choose_plan,
    hyper_sizes,
)

__all__ = [
    "TrainStep",
    "METRIC_KEYS",
    "AUTO_MICRO_BATCH_VOXELS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "resolve_precision",
    "scheduled_lr",
]

_log = logging.getLogger(__name__)

#: ``precision`` values: float32, bfloat16 autocast, float16 autocast with loss scaling (CUDA only).
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: ``micro_batch="auto"`` on CPU: at most this many voxels per micro-batch of the primary network. Measured
#: (paper UNet, 2 threads): at 32³ the whole batch of 4 (131 k voxels) was fastest (1.5 vs 1.3 samples/s
#: one at a time); at 64³ one sample at a time (262 k) beat four (1 M) by 1.7× — the grouped batch's
#: feature maps no longer fit the caches — and used 0.6 GB less memory.
AUTO_MICRO_BATCH_VOXELS = 64**3


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold mapped:
    measured 0.3–0.5 GB of resident memory left over from one paper-UNet step at 96³)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

#: Keys of the dict returned by :meth:`TrainStep.step` (means over the valid samples of the batch, plus
#: ``samples``, their count).
METRIC_KEYS = ("loss", "seg_loss", "dice_loss", "ce_loss", "l1", "latent_norm_mean", "dice", "samples")


#: ``schedule`` values of :func:`scheduled_lr`.
LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(base: float, progress: float, epochs: float, schedule: str = "constant", warmup: float = 0.0) -> float:
    """H's learning rate at ``progress`` epochs into a run of ``epochs`` (fractions count: epoch + step /
    steps per epoch), so a resumed run, on any number of workers, continues the same curve.

    A linear warm-up from 0 over ``warmup`` epochs, then ``base`` (constant) or a half cosine from ``base``
    down to 0 at ``epochs`` (cosine).

    Example:
        >>> [round(scheduled_lr(1.0, t, 10, "cosine", warmup=2), 3) for t in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if schedule not in LR_SCHEDULES:
        raise ModelError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not (epochs > 0 and warmup >= 0 and base >= 0):
        raise ModelError(f"scheduled_lr: need epochs > 0, warmup >= 0, base >= 0; got {epochs}, {warmup}, {base}")
    t = min(max(float(progress), 0.0), float(epochs))
    if warmup > 0 and t < warmup:
        return base * t / warmup
    if schedule == "constant" or epochs <= warmup:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a step really uses on ``device``: ``"bf16"`` becomes ``"fp16"`` (with loss scaling)
    on a CUDA GPU without native bfloat16 (before Ampere: V100, T4), where bfloat16 is only emulated and
    slow. Everything else is kept as asked.

    Example:
        >>> resolve_precision("bf16", torch.device("cpu"))
        'bf16'
    """
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        _log.warning("training.precision = 'bf16': %s has no native bfloat16; training in fp16 with loss "
                     "scaling instead", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


class TrainStep:
    """The HyperSORT training step: owns H's optimizer, steps the latent table's rows of the batch.

    Args:
        hyper: the hyper-network H.
        latents: the latent table holding (at least) every sample index passed to :meth:`step`.
        lr: Adam learning rate of H (the paper: 1e-4).
        weight_decay: Adam weight decay (L2) of H.
        l1_weight: weight of ``‖λ_n‖₁`` in each sample's loss (the paper: 1; it is not scale-free, see
            :meth:`calibrate_l1`).
        grad_clip: clip the norm of H's gradient to this value; 0 disables.
        precision: ``"fp32"``, ``"bf16"`` (bfloat16 autocast of the primary network, on CUDA and on CPU)
            or ``"fp16"`` (float16 autocast with a ``GradScaler``; CUDA only: on CPU a :class:`ConfigError`).
        channels_last: channels-last activations in the primary network.
        hyper_module: the module called for H's forward — a ``DistributedDataParallel`` wrapper of
            ``hyper`` in distributed training (its backward all-reduces H's gradients); default ``hyper``.
        method: primary-network evaluation (see :func:`~hypersort_ray.model.functional.batched_forward`).
        micro_batch: evaluate the primary network on at most this many samples at a time (activation
            memory of a micro-batch; H still runs and steps once per batch, results unchanged up to
            rounding). None: the whole batch at once. ``"auto"``: the largest micro-batch whose
            estimated peak fits ``memory_budget_gb`` — on CPU at most :data:`AUTO_MICRO_BATCH_VOXELS`
            voxels (at least one sample), which was measured faster there. For a primary network other
            than hypersort_ray's UNet (no estimate): that voxel rule on CPU, the whole batch elsewhere.
        activation_checkpointing: recompute the primary network's activations in backward instead of
            keeping them (grouped path only). False: off; True or ``"blocks"``: each conv → ReLU → norm
            unit keeps only its input; ``"nested"``: in addition each encoder stage (and decoder stage
            but the shallowest) keeps only its inputs — least memory, most recomputation; ``"auto"``:
            the least recomputation whose estimate fits the budget with the chosen micro-batch (off for a
            primary network without an estimate).
        memory_budget_gb: the peak memory (GiB) the automatic choices must fit: resident memory of the
            process on CPU, allocated memory on CUDA. None: what the device has
            (:func:`~hypersort_ray.model.memory.available_memory_bytes`).

    Example:
        >>> import torch
        >>> from hypersort_ray.model.unet import UNet
        >>> from hypersort_ray.model.hypernet import HyperNetwork
        >>> from hypersort_ray.model.latents import LatentTable
        >>> hyper = HyperNetwork(UNet(n_down=1, n_fix=1, channels=2), latent_dim=2, hidden=(8,))
        >>> table = LatentTable(range(3), dim=2)
        >>> step = TrainStep(hyper, table)
        >>> x, y = torch.randn(3, 1, 8, 8, 8), torch.randint(0, 2, (3, 1, 8, 8, 8))
        >>> m = step.step(x, y, torch.tensor([0, 1, 2]), weight=torch.tensor([0.5, 0.5, 0.0]))
        >>> table.step_counts().tolist()                 # the padding row (weight 0) was not stepped
        [1, 1, 0]
    """

    def __init__(
        self,
        hyper: HyperNetwork,
        latents: LatentTable,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        l1_weight: float = 1.0,
        grad_clip: float = 0.0,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        channels_last: bool = False,
        hyper_module: nn.Module | None = None,
        method: Method = "auto",
        micro_batch: int | Literal["auto"] | None = "auto",
        activation_checkpointing: bool | Literal["auto", "blocks", "nested"] = "auto",
        memory_budget_gb: float | None = None,
    ) -> None:
        if not isinstance(hyper, HyperNetwork):
            raise ModelError(f"TrainStep: hyper must be a HyperNetwork, got {type(hyper).__name__}")
        if latents.dim != hyper.latent_dim:
            raise ModelError(
                f"TrainStep: the latent table has dim {latents.dim} but the hyper-network expects "
                f"latent_dim {hyper.latent_dim}"
            )
        if precision not in PRECISIONS:
            raise ModelError(f"TrainStep: precision must be one of {PRECISIONS}, got {precision!r}")
        device = hyper.out.weight.device
        precision = resolve_precision(precision, device)
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"training.precision = 'fp16' needs a CUDA device (float16 autocast with loss scaling); the "
                f"step runs on {device.type}. Use 'bf16' (bfloat16 autocast, no scaling needed) or 'fp32'"
            )
        if memory_budget_gb is not None and not memory_budget_gb > 0:
            raise ModelError(f"TrainStep: memory_budget_gb must be > 0 or None, got {memory_budget_gb}")
        for name, value in (
            ("lr", lr),
            ("weight_decay", weight_decay),
            ("l1_weight", l1_weight),
            ("grad_clip", grad_clip),
        ):
            if not value >= 0:
                raise ModelError(f"TrainStep: {name} must be >= 0, got {value}")
        self.hyper = hyper
        self.hyper_module = hyper_module if hyper_module is not None else hyper
        self.latents = latents
        self.l1_weight = float(l1_weight)
        self.grad_clip = float(grad_clip)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.method: Method = method
        if micro_batch not in (None, "auto") and not (isinstance(micro_batch, int) and micro_batch >= 1):
            raise ModelError(
                f"TrainStep: micro_batch must be an integer >= 1, 'auto' or None, got {micro_batch!r}"
            )
        self.micro_batch = micro_batch
        self.checkpointing = self._checkpoint_setting(activation_checkpointing)
        grouped = method == "grouped" or (method == "auto" and supports_grouped(hyper.primary))
        if self.checkpointing not in ("off", "auto") and not grouped:
            raise ModelError(
                "TrainStep: activation checkpointing needs the grouped path (hypersort_ray's UNet as the "
                f"primary network), not {type(hyper.primary).__name__} with method={method!r}"
            )
        self._shape = UNetShape.of(hyper.primary) if grouped else None
        self.memory_budget_gb = None if memory_budget_gb is None else float(memory_budget_gb)
        self._budget_bytes: int | None = None
        self._plans: dict[tuple[int, tuple[int, ...]], tuple[int, str, MemoryPlan | None]] = {}
        self.last_plan: MemoryPlan | None = None
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.last_seg_loss: Tensor | None = None
        self.optimizer = torch.optim.Adam(
            [p for p in hyper.parameters() if p.requires_grad],
            lr=lr,
            weight_decay=weight_decay,
            fused=self._fused_supported(hyper),
        )

    @staticmethod
    def _fused_supported(hyper: nn.Module) -> bool | None:
        params = list(hyper.parameters())
        devices = {p.device.type for p in params}
        ok = devices <= {"cpu", "cuda", "mps", "xpu"} and all(p.dtype.is_floating_point for p in params)
        return True if ok else None

    # ------------------------------------------------------------------------------- internals
    @property
    def _device(self) -> torch.device:
        return self.hyper.out.weight.device

    @staticmethod
    def _checkpoint_setting(value: Any) -> str:
        if value is True:
            return "blocks"
        if value is False:
            return "off"
        if value in ("auto", "off", "blocks", "nested"):
            return str(value)
        raise ModelError(
            "TrainStep: activation_checkpointing must be True, False, 'auto', 'blocks' or 'nested', "
            f"got {value!r}"
        )

    def _budget(self) -> int:
        if self._budget_bytes is None:
            if self.memory_budget_gb is not None:
                self._budget_bytes = int(self.memory_budget_gb * 2**30)
            else:
                self._budget_bytes = available_memory_bytes(self._device)
        return self._budget_bytes

    def _plan(self, image: Tensor) -> tuple[int, str]:
        """``(micro-batch size, checkpoint mode)`` for a batch shaped like ``image`` (cached per shape)."""
        B, spatial = int(image.shape[0]), tuple(int(s) for s in image.shape[2:])
        key = (B, spatial)
        if key in self._plans:
            size, mode, self.last_plan = self._plans[key]
            return size, mode
        cpu_cap = None
        if self._device.type == "cpu":
            cpu_cap = max(1, min(B, AUTO_MICRO_BATCH_VOXELS // max(1, math.prod(spatial))))
        explicit = None if self.micro_batch in ("auto", None) else int(self.micro_batch)
        if self.micro_batch is None:
            explicit = B
        plan = None
        needs_plan = self.micro_batch == "auto" or self.checkpointing == "auto"
        if self._shape is not None and needs_plan:
            params, generated = hyper_sizes(self.hyper)
            plan = choose_plan(
                self._shape,
                spatial,
                batch=B,
                budget_bytes=self._budget(),
                hyper_params=params,
                generated=generated,
                micro_batch="auto" if explicit is None else explicit,
                checkpoint=self.checkpointing,
                max_micro_batch=cpu_cap,
                device_type=self._device.type,
            )
            size, mode = plan.micro_batch, plan.checkpoint
            message = (
                f"training step, batch {B} of {'x'.join(map(str, spatial))}: micro-batch {size}, "
                f"activation checkpointing {mode}; estimated peak {plan.estimate.peak_gb:.2f} GiB of a "
                f"{plan.budget_bytes / 2**30:.2f} GiB budget"
            )
            if plan.fits:
                _log.info(message)
            else:
                warnings.warn(f"{message}: nothing fits the budget, using the leanest setting", stacklevel=3)
        else:
            if explicit is not None:
                size = min(B, explicit)
            else:
                size = cpu_cap if cpu_cap is not None else B
            mode = "off" if self.checkpointing == "auto" else self.checkpointing
        self._plans[key] = (size, mode, plan)
        self.last_plan = plan
        return size, mode

    def _weights(self, weight: Tensor | None, B: int) -> Tensor:
        dtype = self.hyper.out.weight.dtype
        if weight is None:
            return torch.full((B,), 1.0 / B, dtype=dtype, device=self._device)
        w = torch.as_tensor(weight).to(device=self._device, dtype=dtype)
        if w.shape != (B,):
            raise ModelError(
                f"TrainStep: weight must have shape [{B}] (one per sample), got {tuple(w.shape)}"
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ModelError(f"TrainStep: weights must be finite and >= 0, got {w.tolist()}")
        return w

    def _check_batch(self, image: Tensor, label: Tensor, index: Tensor) -> Tensor:
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.numel() != image.shape[0] or label.shape[0] != image.shape[0]:
            raise ModelError(
                f"TrainStep: image {tuple(image.shape)}, label {tuple(label.shape)} and index "
                f"{tuple(index.shape)} must share the batch size"
            )
        return index

    def _primary(self, flat: Tensor, image: Tensor, label: Tensor, checkpoint: str = "off") -> tuple[Any, Tensor]:
        """Per-sample seg-loss terms and hard Dice for generated parameters ``flat`` ``[b, P]``."""
        params = self.hyper.unflatten(flat)
        image = image.to(device=self._device, dtype=flat.dtype, non_blocking=True)
        logits = batched_forward(
            self.hyper.primary,
            params,
            image,
            method=self.method,
            channels_last=self.channels_last,
            autocast_dtype=_AUTOCAST.get(self.precision),
            checkpoint=checkpoint,  # type: ignore[arg-type]
        )
        logits = logits.to(flat.dtype)
        label = label.to(device=self._device, non_blocking=True)
        return seg_loss_terms(logits, label), hard_dice(logits.detach(), label).to(flat.dtype)

    def _seg_backward(
        self, flat: Tensor, image: Tensor, label: Tensor, w: Tensor, scaled: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Run the primary network on micro-batches and back-propagate ``Σ w_n seg_n`` to ``flat`` only.

        Returns ``(∂/∂flat, seg, dice_loss, ce, hard_dice)``, the last four detached ``[B]``. The primary
        network's activations live for one micro-batch at a time; H's backward (one call, so DDP
        all-reduces once) is left to the caller. ``scaled``: multiply the loss by the fp16 loss scale
        (the returned gradient is then scaled too).
        """
        B = flat.shape[0]
        size, checkpoint = self._plan(image)
        grads, seg, dice, ce, hard = [], [], [], [], []
        for start in range(0, B, size):
            part = slice(start, min(B, start + size))
            leaf = flat.detach()[part].requires_grad_(True)
            terms, hard_part = self._primary(leaf, image[part], label[part], checkpoint)
            loss = (w[part] * terms.seg).sum()
            if scaled and self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()
            grads.append(leaf.grad)
            seg.append(terms.seg.detach())
            dice.append(terms.dice.detach())
            ce.append(terms.ce.detach())
            hard.append(hard_part)
        grad = grads[0] if len(grads) == 1 else torch.cat(grads)
        if self._device.type == "cpu":
            _release_freed_heap()  # before H's backward allocates its gradient (the step's other peak)
        return grad, torch.cat(seg), torch.cat(dice), torch.cat(ce), torch.cat(hard)

    def _micro_batch_size(self, image: Tensor) -> int:
        """Samples per evaluation of the primary network for a batch shaped like ``image``."""
        return self._plan(image)[0]

    def plan(self, image: Tensor) -> tuple[int, str]:
        """``(micro-batch size, activation checkpointing mode)`` the step uses for a batch like ``image``.

        Args:
            image: ``[B, C, *spatial]`` (only its shape is read).
        """
        return self._plan(image)

    # ------------------------------------------------------------------------------- public
    def step(
        self,
        image: Tensor,
        label: Tensor,
        index: Tensor,
        weight: Tensor | None = None,
    ) -> dict[str, float]:
        """One training step on a batch; updates H and the latents of the batch's samples.

        Args:
            image: ``[B, C, *spatial]``.
            label: ``[B, 1, *spatial]`` class indices.
            index: ``[B]`` sample indices (rows of the latent table).
            weight: ``[B]`` non-negative weights of each sample's loss in H's gradient (default ``1/B``);
                0 marks a padding sample (not counted in the metrics, its latent not stepped).

        After the call, :attr:`last_seg_loss` holds each sample's segmentation loss (Dice + CE with its
        latent before the update; ``[B]`` float64 on CPU, padding rows included).

        Returns:
            Means over the valid samples (weight > 0) of ``loss`` (``seg + l1_weight·l1``), ``seg_loss``,
            ``dice_loss``, ``ce_loss``, ``l1`` (‖λ‖₁), ``latent_norm_mean`` (‖λ‖₂), ``dice`` (hard
            foreground Dice), all with the latents *before* the update, and ``samples`` (valid count).
            NaN means when no sample is valid.
        """
        index = self._check_batch(image, label, index)
        B = image.shape[0]
        w = self._weights(weight, B)

        lam_leaf = self.latents.gather(index)
        lam = lam_leaf.to(device=self._device, dtype=self.hyper.out.weight.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        flat = self.hyper_module(lam)
        grad_flat, seg, dice_loss, ce, dice = self._seg_backward(flat, image, label, w, scaled=True)
        l1 = l1_norm(lam)
        # H's backward: the segmentation part arrives as ∂/∂flat, the L1 part directly on λ.
        l1_loss = (w * self.l1_weight * l1).sum()
        if self.scaler is not None:
            l1_loss = self.scaler.scale(l1_loss)  # the same scale as the segmentation part
        torch.autograd.backward([flat, l1_loss], [grad_flat, None])
        grad = lam_leaf.grad if lam_leaf.grad is not None else torch.zeros_like(lam_leaf)
        stepped = self._step_h(grad)

        valid = w > 0
        rows = valid.to(grad.device)
        if stepped and bool(rows.any()):
            # λ_n moves with ∂L_n/∂λ_n: undo the weight that scaled it (padding rows are skipped).
            own = grad[rows] / w.to(grad.device, grad.dtype)[rows].unsqueeze(1)
            self.latents.apply_gradients(index.to(rows.device)[rows], own)

        with torch.no_grad():
            l1 = l1.detach()
            self.last_seg_loss = seg.detach().to("cpu", torch.float64)
            per_sample = seg + self.l1_weight * l1
            cols = torch.stack([per_sample, seg, dice_loss, ce, l1, lam.detach().norm(dim=1), dice], dim=1)
            cols = cols[valid]
            n = int(cols.shape[0])
            means = cols.mean(dim=0).tolist() if n else [float("nan")] * cols.shape[1]
        return dict(zip(METRIC_KEYS, [*means, float(n)], strict=True))

    def _step_h(self, lam_grad: Tensor) -> bool:
        """Clip and step H; with fp16 loss scaling also unscale ``lam_grad`` in place. Returns whether the
        step was taken (False: an inf/NaN gradient; the latents must not be stepped either)."""
        scaler = self.scaler
        if scaler is None:
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.hyper.parameters(), self.grad_clip)
            self.optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.unscale_(self.optimizer)
        lam_grad.mul_(1.0 / scale)
        lam_ok = bool(torch.isfinite(lam_grad).all())
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.hyper.parameters(), self.grad_clip)
        if lam_ok:
            scaler.step(self.optimizer)  # skipped by the scaler if H's gradients hold an inf/NaN
            scaler.update()
        else:
            # H's gradients may be finite while a latent's is not: skip H too, and back off the scale
            # as the scaler would have.
            scaler.update(scale * scaler.get_backoff_factor())
        # The scale goes down exactly when an inf/NaN was found (and H's step skipped).
        return lam_ok and scaler.get_scale() >= scale

    def calibrate_l1(self, image: Tensor, label: Tensor, index: Tensor) -> float:
        """Mean over the batch of ``‖∂seg_n/∂λ_n‖₂`` at the current state; changes nothing.

        The L1 penalty pulls every latent with gradient norm ``√d`` (``∂‖λ‖₁/∂λ = sign(λ)``), whereas the
        segmentation gradient on λ depends on the network's size (measured 1.35 for a small UNet vs 6.4
        for the paper's at initialisation). A trainer can scale ``l1_weight`` by this value to make one
        setting serve several network sizes. Runs H directly (not ``hyper_module``): no DDP
        communication, no gradient left on H.

        Args:
            image, label, index: a batch, as for :meth:`step`.
        """
        index = self._check_batch(image, label, index)
        lam = self.latents.gather(index).to(device=self._device, dtype=self.hyper.out.weight.dtype)
        flat = self.hyper(lam)
        ones = torch.ones(lam.shape[0], dtype=lam.dtype, device=lam.device)
        grad_flat = self._seg_backward(flat, image, label, ones)[0]
        (grad,) = torch.autograd.grad(flat, lam, grad_flat)
        return float(grad.norm(dim=1).mean())

    def set_lr(self, lr: float) -> None:
        """Set H's learning rate for the next steps (a schedule's value; the latents keep their own)."""
        if not lr >= 0:
            raise ModelError(f"TrainStep.set_lr: lr must be >= 0, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def state_dict(self) -> dict[str, Any]:
        """H optimizer state and ``l1_weight`` (which a calibration may have changed); tensors, numbers and
        strings only, so ``torch.load(weights_only=True)`` reads it."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "l1_weight": self.l1_weight}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (H's own weights are restored by ``hyper.load_state_dict``)."""
        if not isinstance(state, Mapping) or "optimizer" not in state:
            raise ModelError("TrainStep.load_state_dict: expected a dict with an 'optimizer' entry")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ModelError(
                f"TrainStep.load_state_dict: the optimizer state does not fit this hyper-network: {exc}"
            ) from exc
        if "l1_weight" in state:
            self.l1_weight = float(state["l1_weight"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
