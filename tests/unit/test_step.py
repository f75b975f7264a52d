"""Losses, batched evaluation paths, and the training step's per-sample semantics.

The central check (GitHub issue #3): one batched step on B samples with different latents gives the same
loss, H gradients, H update and latent updates as B separate per-sample evaluations done the way the
reference code does them (one sample at a time, one Adam per latent, H gradients accumulated / B).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from monai.losses import DiceCELoss
from torch.func import functional_call

from hypersort_ray.errors import ModelError
from hypersort_ray.model import functional
from hypersort_ray.model.functional import batched_forward
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.losses import hard_dice, l1_norm, seg_loss_terms
from hypersort_ray.model.step import METRIC_KEYS, TrainStep
from hypersort_ray.model.unet import UNet

F64 = dict(rtol=1e-10, atol=1e-12)


def make_setup(seed=0, dtype=torch.float64, n=5, **unet_kw):
    torch.manual_seed(seed)
    kw = dict(in_channels=1, out_channels=2, n_down=2, n_fix=1, channels=4)
    kw.update(unet_kw)
    hyper = HyperNetwork(UNet(**kw), latent_dim=2, hidden=(8, 8)).to(dtype)
    table = LatentTable(range(n), dim=2, lr=1e-2, init_std=0.5, seed=seed, dtype=dtype)
    return hyper, table


def make_batch(B, size=16, seed=0, dtype=torch.float64, spatial_dims=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, *([size] * spatial_dims), generator=g, dtype=dtype)
    y = (x + 0.5 * torch.randn(x.shape, generator=g, dtype=dtype) > 0.3).long()
    return x, y


def record_gradients(table: LatentTable) -> list:
    """Wrap table.apply_gradients to keep what the step passes in."""
    calls = []
    original = table.apply_gradients

    def spy(index, grad):
        calls.append((torch.as_tensor(index).clone(), grad.detach().clone()))
        original(index, grad)

    table.apply_gradients = spy  # type: ignore[method-assign]
    return calls


# ------------------------------------------------------------------------------------------- losses
def test_per_sample_seg_loss_matches_monai_dicece():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 6, 6, 6, dtype=torch.float64)
    label = torch.randint(0, 3, (3, 1, 6, 6, 6))
    terms = seg_loss_terms(logits, label)
    assert terms.seg.shape == (3,)
    reference = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    torch.testing.assert_close(terms.seg.mean(), reference, **F64)
    for i in range(3):  # each sample on its own = DiceCELoss on that sample alone
        one = DiceCELoss(to_onehot_y=True, softmax=True)(logits[i : i + 1], label[i : i + 1])
        torch.testing.assert_close(terms.seg[i], one, **F64)
    torch.testing.assert_close(terms.seg, terms.dice + terms.ce, **F64)


def test_l1_and_hard_dice():
    assert l1_norm(torch.tensor([[1.0, -2.0], [0.0, 0.5]])).tolist() == [3.0, 0.5]
    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1
    logits = torch.zeros(2, 2, 4, 4)
    logits[0, 1, :1] = 1.0  # predicts 4 of the 8 foreground voxels
    dice = hard_dice(logits, label)
    assert dice[0].item() == pytest.approx(2 * 4 / (4 + 8))
    assert dice[1].item() == 1.0  # nothing predicted, nothing labelled


# --------------------------------------------------------------------------------- evaluation paths
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grouped_vmap_and_loop_agree_in_outputs_and_gradients(spatial_dims):
    hyper, _ = make_setup(seed=1, spatial_dims=spatial_dims)
    lam = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x, y = make_batch(3, spatial_dims=spatial_dims)
    results = {}
    for method in ("grouped", "vmap", "loop"):
        lam.grad = None
        hyper.zero_grad()
        logits = batched_forward(hyper.primary, hyper.unflatten(hyper(lam)), x, method=method)
        seg_loss_terms(logits, y).seg.sum().backward()
        results[method] = [logits.detach(), lam.grad.clone()] + [p.grad.clone() for p in hyper.parameters()]
    for method in ("grouped", "vmap"):
        for a, b in zip(results[method], results["loop"], strict=True):
            torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("spatial_dims, B", [(3, 3), (3, 1), (2, 1)])
def test_fast_weight_gradient_and_single_sample_split_are_exact(monkeypatch, spatial_dims, B):
    """The CPU fast paths (weight gradient as a forward convolution, B=1 as two half groups) give the
    loop's outputs and gradients in float64 (forced on: by default they only run for float32)."""
    monkeypatch.setattr(functional, "_WEIGHT_GRAD_MIN_VOXELS", 1)  # every layer, incl. strided/transposed
    hyper, _ = make_setup(seed=9, spatial_dims=spatial_dims)
    lam = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    x, y = make_batch(B, seed=9, spatial_dims=spatial_dims)
    results = {}
    for name in ("fast", "loop"):
        lam.grad = None
        hyper.zero_grad()
        params = hyper.unflatten(hyper(lam))
        if name == "loop":
            logits = batched_forward(hyper.primary, params, x, method="loop")
        else:
            logits = functional._grouped(
                hyper.primary, params, x, False, split_single=True, fast_backward=True
            )
        seg_loss_terms(logits, y).seg.sum().backward()
        results[name] = [logits.detach(), lam.grad.clone()] + [p.grad.clone() for p in hyper.parameters()]
    for a, b in zip(results["fast"], results["loop"], strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_grouped_channels_last_and_single_sample_split():
    hyper, _ = make_setup(seed=2)
    lam = torch.randn(2, 2, dtype=torch.float64)
    x, _ = make_batch(2)
    with torch.no_grad():
        params = hyper.unflatten(hyper(lam))
        ref = batched_forward(hyper.primary, params, x, method="loop")
        cl = batched_forward(hyper.primary, params, x, method="grouped", channels_last=True)
    torch.testing.assert_close(cl, ref, **F64)
    # B = 1 in float32 takes the two-group split (same arithmetic, oneDNN kernel): same result and grads.
    hyper32 = copy.deepcopy(hyper).float()
    lam32 = lam[:1].float().requires_grad_(True)
    grads = {}
    for method in ("grouped", "loop"):
        lam32.grad = None
        out = batched_forward(
            hyper32.primary, hyper32.unflatten(hyper32(lam32)), x[:1].float(), method=method
        )
        (out.square().mean()).backward()
        grads[method] = (out.detach(), lam32.grad.clone())
    for a, b in zip(grads["grouped"], grads["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batched_forward_rejects_bad_input():
    hyper, _ = make_setup()
    params = hyper.unflatten(hyper(torch.zeros(2, 2, dtype=torch.float64)))
    with pytest.raises(ModelError, match="batch size 3"):
        batched_forward(hyper.primary, params, torch.zeros(3, 1, 16, 16, 16, dtype=torch.float64))
    with pytest.raises(ModelError, match="grouped path"):
        batched_forward(torch.nn.Conv2d(1, 1, 1), {}, torch.zeros(1, 1, 4, 4), method="grouped")


# ------------------------------------------------------------------------------------ equivalence
def reference_steps(hyper, table_values, x, y, index, *, lr_h, lr_lat, l1_weight, steps):
    """The reference's semantics, written from the paper/issue description.

    For each sample alone: H forward with its λ, primary via functional_call, DiceCE + l1·‖λ‖₁;
    H gradients accumulated / B; each λ stepped by its own Adam (betas 0.7, 0.9) with ∂L_n/∂λ_n;
    then one H Adam step.
    """
    hyper = copy.deepcopy(hyper)
    opt_h = torch.optim.Adam(hyper.parameters(), lr=lr_h, foreach=False)
    lams = {int(i): table_values[int(i)].clone().unsqueeze(0).requires_grad_(True) for i in index}
    opts = {i: torch.optim.Adam([lam], lr=lr_lat, betas=(0.7, 0.9), eps=1e-8) for i, lam in lams.items()}
    dicece = DiceCELoss(to_onehot_y=True, softmax=True)
    B = len(index)
    history = []
    for _ in range(steps):
        opt_h.zero_grad(set_to_none=True)
        losses, lam_grads = [], []
        for n in range(B):
            i = int(index[n])
            lam = lams[i]
            flat = hyper(lam)
            params = {k: v[0] for k, v in hyper.unflatten(flat).items()}
            logits = functional_call(hyper.primary, params, (x[n : n + 1],))
            loss = dicece(logits, y[n : n + 1]) + l1_weight * lam.abs().sum()
            grads = torch.autograd.grad(loss, [lam, *hyper.parameters()])
            for p, g in zip(hyper.parameters(), grads[1:], strict=True):
                p.grad = g / B if p.grad is None else p.grad + g / B
            opts[i].zero_grad()
            lam.grad = grads[0]
            opts[i].step()
            losses.append(loss.detach())
            lam_grads.append(grads[0][0])
        h_grads = [p.grad.clone() for p in hyper.parameters()]
        opt_h.step()
        history.append((torch.stack(losses).mean(), torch.stack(lam_grads), h_grads))
    return hyper, {i: lam.detach()[0] for i, lam in lams.items()}, history


@pytest.mark.parametrize("method, micro_batch", [("grouped", None), ("vmap", None), ("grouped", 2)])
def test_batched_step_equals_per_sample_reference(method, micro_batch):
    hyper, table = make_setup(seed=3)
    x, y = make_batch(3, seed=3)
    index = torch.tensor([4, 1, 2])
    start = {i: table.values()[i].clone() for i in range(len(table))}
    ref_hyper, ref_lams, history = reference_steps(
        hyper, start, x, y, index, lr_h=1e-3, lr_lat=1e-2, l1_weight=0.3, steps=2
    )
    calls = record_gradients(table)
    step = TrainStep(hyper, table, lr=1e-3, l1_weight=0.3, method=method, micro_batch=micro_batch)
    for k in range(2):
        metrics = step.step(x, y, index)
        ref_loss, ref_lam_grads, ref_h_grads = history[k]
        assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-10)
        assert metrics["samples"] == 3
        for p, g in zip(hyper.parameters(), ref_h_grads, strict=True):
            torch.testing.assert_close(p.grad, g, **F64)
        torch.testing.assert_close(calls[k][1], ref_lam_grads, **F64)  # ∂L_n/∂λ_n, not scaled by 1/B
    for p, q in zip(hyper.parameters(), ref_hyper.parameters(), strict=True):
        torch.testing.assert_close(p, q, **F64)
    for i, lam in ref_lams.items():
        torch.testing.assert_close(table.values(torch.tensor([i]))[0], lam, **F64)
    assert table.step_counts().tolist() == [0, 2, 2, 0, 2]
    torch.testing.assert_close(table.values(torch.tensor([0, 3])), torch.stack([start[0], start[3]]))


def test_weights_scale_h_but_not_latents_and_zero_rows_are_padding():
    hyper, table = make_setup(seed=4)
    x, y = make_batch(3, seed=4)
    index = torch.tensor([0, 2, 3])
    hyper_b, table_b = copy.deepcopy(hyper), copy.deepcopy(table)
    before = table.values()
    with torch.no_grad():  # per-sample seg loss at the state the step sees
        seg = seg_loss_terms(batched_forward(hyper.primary, hyper.unflatten(hyper(before[index])), x), y).seg
    calls_a, calls_b = record_gradients(table), record_gradients(table_b)

    w_a = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    w_b = torch.tensor([0.2, 0.3, 0.1], dtype=torch.float64)
    m_a = TrainStep(hyper, table, lr=1e-3).step(x, y, index, weight=w_a)
    m_b = TrainStep(hyper_b, table_b, lr=1e-3).step(x, y, index, weight=w_b)

    # λ gradients are each sample's own ∂L_n/∂λ_n whatever the weights; the padding row is not passed.
    assert calls_a[0][0].tolist() == [0, 3]
    torch.testing.assert_close(calls_a[0][1], calls_b[0][1][[0, 2]], **F64)
    after = table.values()
    assert torch.equal(after[[1, 2, 4]], before[[1, 2, 4]])  # padding row 2, rows 1 and 4 not in batch
    assert not torch.equal(after[[0, 3]], before[[0, 3]])
    assert table.step_counts().tolist() == [1, 0, 0, 1, 0]
    # Metrics average the valid samples only; H's gradient is that of the weighted sum.
    assert m_a["samples"] == 2 and m_b["samples"] == 3
    assert m_a["seg_loss"] == pytest.approx(seg[[0, 2]].mean().item(), rel=1e-10)
    assert m_b["seg_loss"] == pytest.approx(seg.mean().item(), rel=1e-10)


def test_all_padding_batch_steps_nothing():
    hyper, table = make_setup(seed=5)
    x, y = make_batch(2, seed=5)
    before = table.values()
    w = torch.zeros(2, dtype=torch.float64)
    m = TrainStep(hyper, table).step(x, y, torch.tensor([0, 1]), weight=w)
    assert m["samples"] == 0 and m["loss"] != m["loss"]  # NaN means
    assert torch.equal(table.values(), before)
    assert table.step_counts().tolist() == [0] * 5


def test_loss_decreases_on_a_tiny_problem():
    hyper, table = make_setup(seed=6, dtype=torch.float32, n=4)
    x, y = make_batch(4, seed=6, dtype=torch.float32)
    step = TrainStep(hyper, table, lr=1e-3, l1_weight=0.1)
    losses = [step.step(x, y, torch.arange(4))["loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0]
    assert all(k in step.step(x, y, torch.arange(4)) for k in METRIC_KEYS)


def test_optimizer_state_round_trip_is_bit_identical():
    hyper, table = make_setup(seed=7, dtype=torch.float32)
    x, y = make_batch(3, seed=7, dtype=torch.float32)
    index = torch.tensor([1, 3, 4])
    step = TrainStep(hyper, table, lr=1e-3, l1_weight=0.5)
    step.step(x, y, index)
    step.step(x, y, torch.tensor([0, 1, 2]))

    blobs = {}
    for name, state in (("h", hyper.state_dict()), ("lat", table.state_dict()), ("opt", step.state_dict())):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        blobs[name] = torch.load(buf, weights_only=True)

    hyper2, table2 = make_setup(seed=99, dtype=torch.float32)
    hyper2.load_state_dict(blobs["h"])
    table2.load_state_dict(blobs["lat"])
    step2 = TrainStep(hyper2, table2, lr=1e-3, l1_weight=123.0)
    step2.load_state_dict(blobs["opt"])
    assert step2.l1_weight == 0.5

    m1 = step.step(x, y, index)
    m2 = step2.step(x, y, index)
    assert m1 == m2
    for p, q in zip(hyper.parameters(), hyper2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(table.values(), table2.values())


def test_calibrate_l1_measures_without_side_effects():
    hyper, table = make_setup(seed=8)
    x, y = make_batch(3, seed=8)
    index = torch.tensor([0, 1, 2])
    step = TrainStep(hyper, table)
    params = [p.detach().clone() for p in hyper.parameters()]
    values = table.values()
    value = step.calibrate_l1(x, y, index)
    assert all(p.grad is None for p in hyper.parameters())
    assert all(torch.equal(p, q) for p, q in zip(hyper.parameters(), params, strict=True))
    assert torch.equal(table.values(), values) and table.step_counts().sum() == 0
    # The same number by hand: per-sample ‖∂seg_n/∂λ_n‖₂, averaged.
    lam = values[index].clone().requires_grad_(True)
    seg = seg_loss_terms(batched_forward(hyper.primary, hyper.unflatten(hyper(lam)), x), y).seg
    (grad,) = torch.autograd.grad(seg.sum(), lam)
    assert value == pytest.approx(grad.norm(dim=1).mean().item(), rel=1e-10)
    assert value > 0


def test_step_rejects_inconsistent_batches():
    hyper, table = make_setup()
    x, y = make_batch(2)
    step = TrainStep(hyper, table)
    with pytest.raises(ModelError, match="batch size"):
        step.step(x, y, torch.tensor([0, 1, 2]))
    with pytest.raises(ModelError, match="weight must have shape"):
        step.step(x, y, torch.tensor([0, 1]), weight=torch.ones(3))
    with pytest.raises(ModelError, match=">= 0"):
        step.step(x, y, torch.tensor([0, 1]), weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ModelError, match="latent_dim"):
        TrainStep(hyper, LatentTable(range(3), dim=3, dtype=torch.float64))
    with pytest.raises(ModelError, match="not in this latent table"):
        step.step(x, y, torch.tensor([0, 17]))


def test_micro_batch_auto_size_and_bad_values(monkeypatch):
    from hypersort_ray.model import step as step_mod

    hyper, table = make_setup(seed=6)
    monkeypatch.setattr(step_mod, "AUTO_MICRO_BATCH_VOXELS", 2 * 16**3)
    auto = TrainStep(hyper, table)  # default "auto": at most 2 × 16³ voxels per micro-batch on CPU
    assert auto._micro_batch_size(torch.zeros(5, 1, 16, 16, 16)) == 2
    assert auto._micro_batch_size(torch.zeros(5, 1, 32, 32, 32)) == 1  # never fewer than one sample
    assert auto._micro_batch_size(torch.zeros(1, 1, 8, 8, 8)) == 1  # never more than the batch
    assert TrainStep(hyper, table, micro_batch=None)._micro_batch_size(torch.zeros(5, 1, 32, 32, 32)) == 5
    for bad in (0, -1, "big", 1.5):
        with pytest.raises(ModelError, match="micro_batch"):
            TrainStep(hyper, table, micro_batch=bad)


def test_hard_dice_two_class_ties_go_to_background_like_argmax():
    logits = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float64)  # all ties → background everywhere
    logits[0, 1, 0] = 1.0  # half the voxels foreground
    label = (logits.argmax(dim=1, keepdim=True)).long()
    assert hard_dice(logits, label).item() == pytest.approx(1.0)
    three = torch.cat([logits, torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)], dim=1)
    assert hard_dice(three, label).shape == (1,)


# ------------------------------------------------------------------------- memory: checkpointing, precision
def one_step_gradients(hyper, table, x, y, index, **step_kw):
    """H's gradients and the λ gradients passed to the latent table after one step."""
    calls = record_gradients(table)
    TrainStep(hyper, table, lr=1e-3, l1_weight=0.3, **step_kw).step(x, y, index)
    return [p.grad.clone() for p in hyper.parameters()], calls[0][1]


@pytest.mark.parametrize("mode", [True, "blocks", "nested"])
@pytest.mark.parametrize("micro_batch", [None, 2])
def test_activation_checkpointing_gives_the_same_gradients_float64(mode, micro_batch):
    """Checkpointed and plain steps: same H and λ gradients (B = 3, different λ per sample, float64)."""
    results = {}
    for name, ckpt in (("plain", False), ("ckpt", mode)):
        hyper, table = make_setup(seed=11, n_down=2, n_fix=2)
        x, y = make_batch(3, seed=11)
        results[name] = one_step_gradients(
            hyper, table, x, y, torch.tensor([4, 0, 2]), micro_batch=micro_batch, activation_checkpointing=ckpt
        )
    for a, b in zip(results["ckpt"][0], results["plain"][0], strict=True):
        torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(results["ckpt"][1], results["plain"][1], **F64)
    assert not torch.allclose(results["plain"][1][0], results["plain"][1][1])  # the λ differ per sample


@pytest.mark.parametrize("mode", ["blocks", "nested"])
def test_activation_checkpointing_float32_fast_paths(monkeypatch, mode):
    """float32 on CPU (the weight-gradient-by-forward-convolution path, forced on for every layer, and the
    split decoder convolution): same gradients as without checkpointing up to float32 rounding."""
    monkeypatch.setattr(functional, "_WEIGHT_GRAD_MIN_VOXELS", 1)
    results = {}
    for name, ckpt in (("plain", False), ("ckpt", mode)):
        hyper, table = make_setup(seed=12, dtype=torch.float32, n_down=2, n_fix=2)
        x, y = make_batch(2, seed=12, dtype=torch.float32)
        results[name] = one_step_gradients(
            hyper, table, x, y, torch.tensor([1, 3]), micro_batch=None, activation_checkpointing=ckpt
        )
    for a, b in zip(results["ckpt"][0], results["plain"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results["ckpt"][1], results["plain"][1], rtol=1e-4, atol=1e-6)


def test_plan_follows_the_memory_budget_and_explicit_settings(monkeypatch):
    from hypersort_ray.model import step as step_mod

    monkeypatch.setattr(step_mod, "AUTO_MICRO_BATCH_VOXELS", 10**9)  # no CPU speed cap here
    hyper, table = make_setup(seed=13, dtype=torch.float32, channels=8)
    image = torch.zeros(4, 1, 64, 64, 64)
    assert TrainStep(hyper, table, memory_budget_gb=1000).plan(image) == (4, "off")
    roomy = TrainStep(hyper, table, memory_budget_gb=1000)
    roomy.plan(image)
    assert roomy.last_plan is not None and roomy.last_plan.fits
    # A budget the whole batch only fits checkpointed.
    from hypersort_ray.model.memory import UNetShape, estimate_step_memory, hyper_sizes

    params, generated = hyper_sizes(hyper)
    kw = dict(batch=4, hyper_params=params, generated=generated)
    shape = UNetShape.of(hyper.primary)
    off = estimate_step_memory(shape, (64,) * 3, micro_batch=4, checkpoint="off", **kw).peak_bytes
    nested = estimate_step_memory(shape, (64,) * 3, micro_batch=4, checkpoint="nested", **kw).peak_bytes
    budget = (off + nested) / 2 / 2**30
    micro, mode = TrainStep(hyper, table, memory_budget_gb=budget).plan(image)
    assert micro == 4 and mode in ("blocks", "nested")
    # Explicit settings win; an explicit micro-batch still gets automatic checkpointing.
    assert TrainStep(hyper, table, memory_budget_gb=budget, activation_checkpointing=False).plan(image)[1] == "off"
    assert TrainStep(hyper, table, memory_budget_gb=1000, micro_batch=3).plan(image) == (3, "off")
    assert TrainStep(hyper, table, micro_batch=2, activation_checkpointing="nested").plan(image) == (2, "nested")
    # Nothing fits: the leanest setting, with a warning.
    with pytest.warns(UserWarning, match="nothing fits"):
        assert TrainStep(hyper, table, memory_budget_gb=0.01).plan(image) == (1, "nested")


def test_checkpointing_needs_the_grouped_path_and_bad_values_raise():
    hyper, table = make_setup(seed=14)
    with pytest.raises(ModelError, match="grouped path"):
        TrainStep(hyper, table, method="vmap", activation_checkpointing=True)
    assert TrainStep(hyper, table, method="vmap").plan(torch.zeros(2, 1, 16, 16, 16))[1] == "off"
    with pytest.raises(ModelError, match="activation_checkpointing"):
        TrainStep(hyper, table, activation_checkpointing="sometimes")
    with pytest.raises(ModelError, match="memory_budget_gb"):
        TrainStep(hyper, table, memory_budget_gb=0)
    with pytest.raises(ModelError, match="precision"):
        TrainStep(hyper, table, precision="fp8")


def test_fp16_on_cpu_is_a_config_error():
    from hypersort_ray.errors import ConfigError

    hyper, table = make_setup(seed=15, dtype=torch.float32)
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        TrainStep(hyper, table, precision="fp16")


@pytest.mark.parametrize("ckpt", [False, "nested"])
def test_bf16_autocast_trains_on_cpu(ckpt):
    hyper, table = make_setup(seed=16, dtype=torch.float32, n=4)
    x, y = make_batch(4, seed=16, dtype=torch.float32)
    before_h = [p.detach().clone() for p in hyper.parameters()]
    before_lat = table.values()
    step = TrainStep(hyper, table, lr=1e-3, l1_weight=0.1, precision="bf16", activation_checkpointing=ckpt)
    losses = [step.step(x, y, torch.arange(4))["loss"] for _ in range(4)]
    assert all(loss == loss and abs(loss) < float("inf") for loss in losses)
    assert all(torch.isfinite(p).all() for p in hyper.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(hyper.parameters(), before_h, strict=True))
    assert not torch.equal(table.values(), before_lat)
    assert hyper.out.weight.dtype == torch.float32  # H and the latents stay float32
    # The primary network really ran in bfloat16 (CPU autocast), checkpointed or not.
    with torch.no_grad():
        params = hyper.unflatten(hyper(table.values()[:2]))
        out = batched_forward(
            hyper.primary, params, x[:2], autocast_dtype=torch.bfloat16, checkpoint="off" if not ckpt else ckpt
        )
    assert out.dtype == torch.bfloat16


def test_loss_scaling_unscales_latents_and_skips_non_finite_steps():
    """The GradScaler logic of the fp16 path, exercised on CPU with float32 (a CPU GradScaler)."""
    hyper, table = make_setup(seed=17, dtype=torch.float32)
    x, y = make_batch(2, seed=17, dtype=torch.float32)
    index = torch.tensor([0, 3])
    ref_hyper, ref_table = copy.deepcopy(hyper), copy.deepcopy(table)
    ref_calls, calls = record_gradients(ref_table), record_gradients(table)
    TrainStep(ref_hyper, ref_table, lr=1e-3).step(x, y, index)
    step = TrainStep(hyper, table, lr=1e-3)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step.step(x, y, index)
    # A power-of-two scale: the same λ gradients and the same H update as without scaling.
    torch.testing.assert_close(calls[0][1], ref_calls[0][1], rtol=1e-5, atol=1e-7)
    for p, q in zip(hyper.parameters(), ref_hyper.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert "grad_scaler" in step.state_dict()
    # A NaN in the batch: neither H nor a latent moves, the scale backs off.
    h_before = [p.detach().clone() for p in hyper.parameters()]
    lat_before, counts = table.values(), table.step_counts()
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    scale = step.scaler.get_scale()
    step.step(bad, y, index)
    assert step.scaler.get_scale() < scale
    assert all(torch.equal(p, q) for p, q in zip(hyper.parameters(), h_before, strict=True))
    assert torch.equal(table.values(), lat_before) and torch.equal(table.step_counts(), counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling needs CUDA")
def test_fp16_trains_on_cuda():
    hyper, table = make_setup(seed=18, dtype=torch.float32, n=4)
    hyper = hyper.cuda()
    table = table.to("cuda")
    x, y = make_batch(4, seed=18, dtype=torch.float32)
    before = [p.detach().clone() for p in hyper.parameters()]
    step = TrainStep(hyper, table, lr=1e-3, precision="fp16", activation_checkpointing="blocks")
    losses = [step.step(x.cuda(), y.cuda(), torch.arange(4, device="cuda"))["loss"] for _ in range(4)]
    assert all(loss == loss for loss in losses)
    assert any(not torch.equal(p, q) for p, q in zip(hyper.parameters(), before, strict=True))
    assert step.state_dict()["grad_scaler"]["scale"] > 0


def test_bf16_falls_back_to_fp16_on_a_gpu_without_native_bfloat16(monkeypatch, caplog):
    from hypersort_ray.model.step import resolve_precision

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with caplog.at_level("WARNING", logger="hypersort_ray.model.step"):
        assert resolve_precision("bf16", cuda) == "fp16"
    assert "Tesla V100 has no native bfloat16" in caplog.text
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("fp16", cuda) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("bf16", cuda) == "bf16"  # Ampere and newer keep bf16


def test_scheduled_lr_against_a_plain_formula():
    import math

    from hypersort_ray.model.step import scheduled_lr

    for t in torch.linspace(0, 10, 41).tolist():
        warm = t / 2 if t < 2 else None
        cos = 0.5 * (1 + math.cos(math.pi * (t - 2) / 8))
        assert scheduled_lr(1e-3, t, 10, "cosine", 2) == pytest.approx(1e-3 * (warm if warm is not None else cos))
        assert scheduled_lr(1e-3, t, 10, "constant", 2) == pytest.approx(1e-3 * (warm if warm is not None else 1))
        assert scheduled_lr(1e-3, t, 10) == 1e-3
    assert scheduled_lr(1.0, 12, 10, "cosine") == 0.0  # clamped to the run
    with pytest.raises(ModelError, match="schedule"):
        scheduled_lr(1.0, 1, 10, "step")
