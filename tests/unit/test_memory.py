"""The training step's memory model (hypersort_ray.model.memory) and the plan it chooses."""

from __future__ import annotations

import pytest
import torch

from hypersort_ray.errors import ModelError
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.memory import (
    CHECKPOINT_ORDER,
    UNetShape,
    available_memory_bytes,
    choose_plan,
    estimate_step_memory,
    hyper_sizes,
)
from hypersort_ray.model.unet import UNet

PAPER = UNetShape(in_channels=1, out_channels=2, channels=16, n_down=3, n_fix=3)
SMALL = UNetShape(in_channels=1, out_channels=2, channels=8, n_down=2, n_fix=2)
H = dict(hyper_params=169_688_472, generated=3_327_122)  # the paper's H over the paper's UNet
GB = 2**30


def est(shape=PAPER, size=96, micro=1, batch=2, mode="off", **kw):
    return estimate_step_memory(
        shape, (size,) * 3, micro_batch=micro, batch=batch, checkpoint=mode, **{**H, **kw}
    )


@pytest.mark.parametrize("shape", [PAPER, SMALL])
@pytest.mark.parametrize("mode", CHECKPOINT_ORDER)
def test_estimate_grows_with_roi_and_micro_batch(shape, mode):
    sizes = [32, 64, 96, 128, 168]
    acts = [est(shape, s, mode=mode).activation_bytes for s in sizes]
    assert acts == sorted(acts) and len(set(acts)) == len(acts)
    by_micro = [est(shape, 96, micro=m, batch=4, mode=mode).activation_bytes for m in (1, 2, 3, 4)]
    assert by_micro == sorted(by_micro) and len(set(by_micro)) == 4
    peaks = [est(shape, s, mode=mode).peak_bytes for s in sizes]
    assert peaks == sorted(peaks)


@pytest.mark.parametrize("shape", [PAPER, SMALL, UNetShape(1, 3, 4, 1, 1)])
def test_checkpointing_lowers_the_estimate(shape):
    for size in (64, 168):
        off, blocks, nested = (est(shape, size, mode=m).activation_bytes for m in CHECKPOINT_ORDER)
        assert off > blocks > nested


def test_peak_is_fixed_plus_the_larger_of_h_gradient_and_activations():
    small, big = est(size=16), est(size=168)
    assert small.peak_bytes == small.fixed_bytes + small.h_grad_bytes  # H's gradient sets the peak
    assert big.peak_bytes == big.fixed_bytes + big.activation_bytes
    assert small.fixed_bytes == big.fixed_bytes
    # Weights + two Adam moments of H, the template, the CPU runtime; H's gradient once more.
    assert small.h_grad_bytes == 4 * H["hyper_params"]
    assert est(size=16, device_type="cuda").fixed_bytes < small.fixed_bytes


def test_unknown_mode_and_bad_sizes_raise():
    with pytest.raises(ModelError, match="checkpoint"):
        est(mode="sometimes")
    with pytest.raises(ModelError, match=">= 1"):
        est(micro=0)


def test_chooser_prefers_the_largest_micro_batch_then_the_least_recomputation():
    kw = dict(batch=4, **H)
    roomy = choose_plan(PAPER, (96,) * 3, budget_bytes=1000 * GB, **kw)
    assert (roomy.micro_batch, roomy.checkpoint, roomy.fits) == (4, "off", True)
    # A budget between "4 with nested" and "4 without": the whole batch, checkpointed.
    whole_nested = est(size=96, micro=4, batch=4, mode="nested").peak_bytes
    whole_off = est(size=96, micro=4, batch=4, mode="off").peak_bytes
    plan = choose_plan(PAPER, (96,) * 3, budget_bytes=(whole_nested + whole_off) // 2, **kw)
    assert plan.micro_batch == 4 and plan.checkpoint in ("blocks", "nested") and plan.fits
    assert plan.estimate.peak_bytes <= plan.budget_bytes


@pytest.mark.parametrize("budget_gb", [4, 5, 6, 8, 12, 24, 80])
def test_chooser_respects_the_budget(budget_gb):
    plan = choose_plan(PAPER, (168,) * 3, batch=4, budget_bytes=budget_gb * GB, **H)
    if plan.fits:
        assert plan.estimate.peak_bytes <= budget_gb * GB
        # Nothing with a larger micro-batch fits.
        for mode in CHECKPOINT_ORDER:
            if plan.micro_batch < 4:
                assert est(size=168, micro=plan.micro_batch + 1, batch=4, mode=mode).peak_bytes > budget_gb * GB
    else:  # nothing fits: the leanest choice
        assert (plan.micro_batch, plan.checkpoint) == (1, "nested")


def test_chooser_keeps_explicit_settings_and_the_cap():
    tight = 5 * GB
    plan = choose_plan(PAPER, (168,) * 3, batch=4, budget_bytes=tight, micro_batch=3, **H)
    assert plan.micro_batch == 3  # explicit: kept even though it does not fit
    assert plan.checkpoint == "nested" and not plan.fits
    plan = choose_plan(PAPER, (168,) * 3, batch=4, budget_bytes=1000 * GB, checkpoint="blocks", **H)
    assert (plan.micro_batch, plan.checkpoint) == (4, "blocks")
    plan = choose_plan(PAPER, (168,) * 3, batch=4, budget_bytes=1000 * GB, max_micro_batch=2, **H)
    assert (plan.micro_batch, plan.checkpoint) == (2, "off")
    assert choose_plan(PAPER, (32,) * 3, batch=2, budget_bytes=GB, micro_batch=9, **H).micro_batch == 2


def test_the_paper_batch_of_two_at_168_fits_6_gb_on_cpu():
    """The target setting (paper network, 168³, B=2, 6 GiB on CPU) has a plan that fits."""
    plan = choose_plan(PAPER, (168,) * 3, batch=2, budget_bytes=6 * GB, max_micro_batch=1, **H)
    assert plan.fits and plan.micro_batch == 1 and plan.checkpoint != "off"


def test_shape_and_sizes_of_real_modules():
    unet = UNet(1, 2, n_down=2, n_fix=1, channels=4)
    assert UNetShape.of(unet) == UNetShape(1, 2, 4, 2, 1)
    assert UNetShape.of(torch.nn.Conv3d(1, 2, 3)) is None
    hyper = HyperNetwork(unet, latent_dim=2, hidden=(8,))
    params, generated = hyper_sizes(hyper)
    assert generated == sum(p.numel() for p in unet.parameters())
    assert params == sum(p.numel() for p in hyper.parameters())


def test_available_memory_is_positive_on_cpu():
    assert available_memory_bytes("cpu") > 2**20
