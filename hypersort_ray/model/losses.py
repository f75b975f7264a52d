"""Per-sample losses of HyperSORT: Dice + cross-entropy (the paper's L_Seg), the L1 latent penalty, and a
hard Dice metric for logging.

Every sample of a batch has its own latent, so the training step needs one loss value *per sample*
(``[B]``), not a batch mean. MONAI's ``DiceCELoss`` only offers ``"mean"``/``"sum"`` reductions; its
``"mean"`` is ``mean_{n,k} dice_{n,k} + mean_{n,voxels} ce`` (CE averaged over every voxel of the
batch). :func:`seg_loss_terms` splits exactly that into per-sample terms — Dice from MONAI's
``DiceLoss(to_onehot_y=True, softmax=True, reduction="none")`` averaged over classes, CE averaged over the
sample's voxels — so that for equally sized samples ``seg.mean() == DiceCELoss(to_onehot_y=True,
softmax=True)(logits, label)`` (a test checks it). The reference computes the same two terms (Dice
including background on softmax probabilities, CE on logits; it smooths with 1e-8 in the denominator
where MONAI uses 1e-5 in numerator and denominator).

Example:
    >>> import torch
    >>> logits, label = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 1, 8, 8))
    >>> terms = seg_loss_terms(logits, label)
    >>> terms.seg.shape, torch.allclose(terms.seg, terms.dice + terms.ce)
    (torch.Size([2]), True)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

from hypersort_ray.errors import ModelError

__all__ = ["SegLossTerms", "seg_loss_terms", "l1_norm", "hard_dice"]

_DICE = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")


class SegLossTerms(NamedTuple):
    """Per-sample segmentation loss terms, each ``[B]``: ``seg = dice + ce``."""

    seg: Tensor
    dice: Tensor
    ce: Tensor


def _check(logits: Tensor, label: Tensor) -> Tensor:
    if logits.dim() < 3 or logits.shape[1] < 2:
        raise ModelError(f"loss: logits must be [B, K>=2, *spatial], got shape {tuple(logits.shape)}")
    if label.dim() == logits.dim() - 1:
        label = label.unsqueeze(1)
    if label.shape[0] != logits.shape[0] or label.shape[1] != 1 or label.shape[2:] != logits.shape[2:]:
        raise ModelError(
            f"loss: label must be [B, 1, *spatial] matching logits {tuple(logits.shape)}, got {tuple(label.shape)}"
        )
    return label


def seg_loss_terms(logits: Tensor, label: Tensor) -> SegLossTerms:
    """Dice + CE per sample, as MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` would give it per item.

    Args:
        logits: ``[B, K, *spatial]`` raw network outputs.
        label: ``[B, 1, *spatial]`` (or ``[B, *spatial]``) class indices in ``0..K-1`` (any dtype).

    Returns:
        :class:`SegLossTerms` of ``[B]`` tensors (differentiable w.r.t. ``logits``).
    """
    label = _check(logits, label)
    target = label.long()
    dice = _DICE(logits, target).reshape(logits.shape[0], -1).mean(dim=1)
    ce = F.cross_entropy(logits, target[:, 0], reduction="none").reshape(logits.shape[0], -1).mean(dim=1)
    return SegLossTerms(seg=dice + ce, dice=dice, ce=ce)


def l1_norm(latents: Tensor) -> Tensor:
    """``‖λ_n‖₁`` per row: ``[B, d] -> [B]`` (the paper's L_reg).

    Example:
        >>> l1_norm(torch.tensor([[1.0, -2.0], [0.5, 0.0]])).tolist()
        [3.0, 0.5]
    """
    return latents.abs().sum(dim=-1)


@torch.no_grad()
def hard_dice(logits: Tensor, label: Tensor, *, empty: float = 1.0) -> Tensor:
    """Foreground Dice of ``argmax(logits)`` vs ``label`` per sample (a metric, not differentiable).

    With K > 2 classes it is the mean Dice over the foreground classes 1..K-1. A class absent from both
    prediction and label scores ``empty``.

    Args:
        logits: ``[B, K, *spatial]``.
        label: ``[B, 1, *spatial]`` class indices.
        empty: the score of a class absent from both.

    Returns:
        ``[B]`` float tensor in [0, 1].

    Example:
        >>> logits = torch.tensor([[[[-1.0, 1.0]], [[1.0, -1.0]]]])   # [1, 2, 1, 2]: predicts 1, 0
        >>> round(hard_dice(logits, torch.tensor([[[[1, 1]]]])).item(), 4)
        0.6667
    """
    label = _check(logits, label)
    K = logits.shape[1]
    if K == 2:  # same as argmax (ties go to class 0), several times cheaper on CPU
        pred = (logits[:, 1] > logits[:, 0]).long().reshape(logits.shape[0], -1)
    else:
        pred = logits.argmax(dim=1).reshape(logits.shape[0], -1)
    target = label[:, 0].long().reshape(logits.shape[0], -1)
    scores = []
    for k in range(1, K):
        p, t = pred == k, target == k
        inter = (p & t).sum(dim=1).double()
        total = p.sum(dim=1).double() + t.sum(dim=1).double()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.full_like(total, empty)))
    return torch.stack(scores, dim=1).mean(dim=1).float()
