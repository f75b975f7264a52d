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

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hypersort_ray.errors import ModelError
from hypersort_ray.model.functional import Method, batched_forward
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.losses import hard_dice, l1_norm, seg_loss_terms

__all__ = ["TrainStep", "METRIC_KEYS", "AUTO_MICRO_BATCH_VOXELS"]

#: ``micro_batch="auto"`` on CPU: at most this many voxels per micro-batch of the primary network. Measured
#: (paper UNet, 2 threads): at 32³ the whole batch of 4 (131 k voxels) was fastest (1.5 vs 1.3 samples/s
#: one at a time); at 64³ one sample at a time (262 k) beat four (1 M) by 1.7× — the grouped batch's
#: feature maps no longer fit the caches — and used 0.6 GB less memory.
AUTO_MICRO_BATCH_VOXELS = 64**3

#: Keys of the dict returned by :meth:`TrainStep.step` (means over the valid samples of the batch, plus
#: ``samples``, their count).
METRIC_KEYS = ("loss", "seg_loss", "dice_loss", "ce_loss", "l1", "latent_norm_mean", "dice", "samples")


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
        precision: ``"fp32"`` or ``"bf16"`` (bf16 autocast of the primary network on CUDA; no-op on CPU).
        channels_last: channels-last activations in the primary network.
        hyper_module: the module called for H's forward — a ``DistributedDataParallel`` wrapper of
            ``hyper`` in distributed training (its backward all-reduces H's gradients); default ``hyper``.
        method: primary-network evaluation (see :func:`~hypersort_ray.model.functional.batched_forward`).
        micro_batch: evaluate the primary network on at most this many samples at a time (activation
            memory of a micro-batch; H still runs and steps once per batch, results unchanged up to
            rounding). None: the whole batch at once. ``"auto"``: on CPU, as many samples as fit in
            :data:`AUTO_MICRO_BATCH_VOXELS` voxels (at least one), on other devices the whole batch.

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
        precision: Literal["fp32", "bf16"] = "fp32",
        channels_last: bool = False,
        hyper_module: nn.Module | None = None,
        method: Method = "auto",
        micro_batch: int | Literal["auto"] | None = "auto",
    ) -> None:
        if not isinstance(hyper, HyperNetwork):
            raise ModelError(f"TrainStep: hyper must be a HyperNetwork, got {type(hyper).__name__}")
        if latents.dim != hyper.latent_dim:
            raise ModelError(
                f"TrainStep: the latent table has dim {latents.dim} but the hyper-network expects "
                f"latent_dim {hyper.latent_dim}"
            )
        if precision not in ("fp32", "bf16"):
            raise ModelError(f"TrainStep: precision must be 'fp32' or 'bf16', got {precision!r}")
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

    def _primary(self, flat: Tensor, image: Tensor, label: Tensor) -> tuple[Any, Tensor]:
        """Per-sample seg-loss terms and hard Dice for generated parameters ``flat`` ``[b, P]``."""
        params = self.hyper.unflatten(flat)
        image = image.to(device=self._device, dtype=flat.dtype, non_blocking=True)
        logits = batched_forward(
            self.hyper.primary,
            params,
            image,
            method=self.method,
            channels_last=self.channels_last,
            bf16=self.precision == "bf16",
        )
        logits = logits.to(flat.dtype)
        label = label.to(device=self._device, non_blocking=True)
        return seg_loss_terms(logits, label), hard_dice(logits.detach(), label).to(flat.dtype)

    def _seg_backward(
        self, flat: Tensor, image: Tensor, label: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Run the primary network on micro-batches and back-propagate ``Σ w_n seg_n`` to ``flat`` only.

        Returns ``(∂/∂flat, seg, dice_loss, ce, hard_dice)``, the last four detached ``[B]``. The primary
        network's activations live for one micro-batch at a time; H's backward (one call, so DDP
        all-reduces once) is left to the caller.
        """
        B = flat.shape[0]
        size = self._micro_batch_size(image)
        grads, seg, dice, ce, hard = [], [], [], [], []
        for start in range(0, B, size):
            part = slice(start, min(B, start + size))
            leaf = flat.detach()[part].requires_grad_(True)
            terms, hard_part = self._primary(leaf, image[part], label[part])
            (w[part] * terms.seg).sum().backward()
            grads.append(leaf.grad)
            seg.append(terms.seg.detach())
            dice.append(terms.dice.detach())
            ce.append(terms.ce.detach())
            hard.append(hard_part)
        grad = grads[0] if len(grads) == 1 else torch.cat(grads)
        return grad, torch.cat(seg), torch.cat(dice), torch.cat(ce), torch.cat(hard)

    def _micro_batch_size(self, image: Tensor) -> int:
        B = image.shape[0]
        if self.micro_batch is None:
            return B
        if self.micro_batch == "auto":
            if self._device.type != "cpu":
                return B
            voxels = max(1, image.shape[2:].numel())
            return max(1, min(B, AUTO_MICRO_BATCH_VOXELS // voxels))
        return int(self.micro_batch)

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
        grad_flat, seg, dice_loss, ce, dice = self._seg_backward(flat, image, label, w)
        l1 = l1_norm(lam)
        # H's backward: the segmentation part arrives as ∂/∂flat, the L1 part directly on λ.
        torch.autograd.backward([flat, (w * self.l1_weight * l1).sum()], [grad_flat, None])
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.hyper.parameters(), self.grad_clip)
        self.optimizer.step()

        valid = w > 0
        grad = lam_leaf.grad if lam_leaf.grad is not None else torch.zeros_like(lam_leaf)
        rows = valid.to(grad.device)
        if bool(rows.any()):
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

    def state_dict(self) -> dict[str, Any]:
        """H optimizer state and ``l1_weight`` (which a calibration may have changed); tensors, numbers and
        strings only, so ``torch.load(weights_only=True)`` reads it."""
        return {"optimizer": self.optimizer.state_dict(), "l1_weight": self.l1_weight}

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
