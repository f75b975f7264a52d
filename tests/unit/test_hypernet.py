"""The hyper-network H(λ): initialisation, output, spec, template handling, any primary network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypersort_ray.errors import ModelError
from hypersort_ray.model.functional import batched_forward
from hypersort_ray.model.hypernet import HyperNetwork, parameter_spec
from hypersort_ray.model.unet import UNet


def tiny_unet(**kw) -> UNet:
    args = dict(in_channels=1, out_channels=2, n_down=1, n_fix=1, channels=4)
    args.update(kw)
    return UNet(**args)


def test_bias_starts_at_primary_parameters_and_weight_default_init():
    torch.manual_seed(0)
    unet = tiny_unet()
    hyper = HyperNetwork(unet, latent_dim=2, hidden=(6, 5))
    flat = torch.cat([v.reshape(-1) for v in unet.state_dict().values()])
    assert torch.equal(hyper.out.bias.detach(), flat)  # bias = θ0 itself, as the reference
    assert hyper.out.weight.shape == (flat.numel(), 5)
    # Default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert hyper.out.weight.abs().max() <= 1 / 5**0.5
    assert hyper.out.weight.std() > 0.1


def test_forward_is_tanh_times_bound_of_mlp():
    torch.manual_seed(1)
    hyper = HyperNetwork(tiny_unet(), latent_dim=3, hidden=(7, 7, 7), bound=2.5)
    lam = torch.randn(4, 3)
    h = lam
    for i in range(3):  # Linear + ReLU after every hidden layer
        h = torch.relu(h @ hyper.mlp[i][0].weight.T + hyper.mlp[i][0].bias)
    expected = torch.tanh(h @ hyper.out.weight.T + hyper.out.bias) * 2.5
    out = hyper(lam)
    assert out.shape == (4, hyper.num_generated)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 2.5
    with torch.no_grad():
        hyper.out.weight.zero_()
    torch.testing.assert_close(hyper(lam)[0], torch.tanh(hyper.out.bias) * 2.5)


def test_state_dict_and_parameters_hold_only_h():
    unet = tiny_unet()
    hyper = HyperNetwork(unet, latent_dim=2, hidden=(4,))
    assert list(hyper.state_dict()) == ["mlp.0.0.weight", "mlp.0.0.bias", "out.weight", "out.bias"]
    n_h = sum(p.numel() for p in hyper.parameters())
    assert n_h == 2 * 4 + 4 + (4 + 1) * hyper.num_generated
    # The user's module is untouched (still has its Parameters, still trainable); the template is frozen.
    assert all(p.requires_grad for p in unet.parameters())
    assert hyper.primary is not unet
    assert not any(p.requires_grad for p in hyper.primary.parameters())
    # .double() moves the template along.
    hyper.double()
    assert all(p.dtype == torch.float64 for p in hyper.primary.parameters())


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0))  # float, persistent: generated
        self.register_buffer("count", torch.tensor(3))  # integer: kept from the template
        self.register_buffer("tmp", torch.ones(2), persistent=False)  # not in state_dict: kept

    def forward(self, x):
        return self.lin(x) * self.scale * self.tmp + self.count


def test_spec_covers_every_float_state_entry():
    unet = tiny_unet(n_down=2, n_fix=2)
    spec = parameter_spec(unet)
    assert [s.name for s in spec] == list(unet.state_dict())
    offsets = [s.offset for s in spec]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for a, b in zip(spec[:-1], spec[1:], strict=True):
        assert b.offset == a.offset + a.numel
    assert all(s.numel == torch.Size(s.shape).numel() for s in spec)

    mod = WithBuffers()
    hyper = HyperNetwork(mod, latent_dim=2, hidden=(4,))
    assert [s.name for s in hyper.spec] == ["scale", "lin.weight", "lin.bias"]  # state_dict order
    sd = hyper.primary_state_dict(torch.zeros(2))
    assert sd.keys() == mod.state_dict().keys()
    assert sd["count"].item() == 3
    fresh = WithBuffers()
    fresh.load_state_dict(sd)  # strict


def test_unflatten_params_for_and_primary_state_dict():
    torch.manual_seed(2)
    hyper = HyperNetwork(tiny_unet(), latent_dim=2, hidden=(4,))
    lam = torch.randn(3, 2)
    flat = hyper(lam)
    params = hyper.unflatten(flat)
    for s in hyper.spec:
        assert params[s.name].shape == (3, *s.shape)
        torch.testing.assert_close(params[s.name][1].reshape(-1), flat[1, s.offset : s.offset + s.numel])
    one = hyper.params_for(lam[1])
    assert one.keys() == params.keys()
    for k in one:
        torch.testing.assert_close(one[k], params[k][1])
    sd = hyper.primary_state_dict(lam[1:2])
    assert all(not v.requires_grad for v in sd.values())
    with pytest.raises(ModelError, match="latents must have shape"):
        hyper(torch.zeros(3, 5))
    with pytest.raises(ModelError, match="expected one latent"):
        hyper.params_for(torch.zeros(2, 2))


def test_make_primary_matches_batched_forward():
    torch.manual_seed(3)
    hyper = HyperNetwork(tiny_unet(n_down=2), latent_dim=2, hidden=(8, 8)).double()
    lam = torch.randn(2, 2, dtype=torch.float64)
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        batched = batched_forward(hyper.primary, hyper.unflatten(hyper(lam)), x)
        for i in range(2):
            net = hyper.make_primary(lam[i])
            assert isinstance(net, UNet) and net is not hyper.primary
            torch.testing.assert_close(net(x[i : i + 1]), batched[i : i + 1], rtol=1e-10, atol=1e-10)


def test_monai_basic_unet_works_unchanged():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(4)
    unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(2, 2, 2, 2, 2, 2))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hyper = HyperNetwork(unet, latent_dim=2, hidden=(4,)).double()
    assert [s.name for s in hyper.spec] == list(unet.state_dict())
    lam = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    out = {}
    for method in ("vmap", "loop"):
        lam.grad = None
        hyper.zero_grad()
        y = batched_forward(hyper.primary, hyper.unflatten(hyper(lam)), x, method=method)
        (y**2).mean().backward()
        out[method] = (y.detach(), lam.grad.clone(), hyper.out.weight.grad.clone())
    for a, b in zip(out["vmap"], out["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        net = hyper.make_primary(lam[0].detach())
        torch.testing.assert_close(net(x[:1]), out["loop"][0][:1], rtol=1e-9, atol=1e-12)
    # The user's module was neither edited nor re-registered.
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert len(list(unet.parameters())) == len(before)


def test_batchnorm_with_running_stats_rejected():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ModelError, match="running statistics.*InstanceNorm"):
        HyperNetwork(net, latent_dim=2)
    # Without running statistics it is fine.
    HyperNetwork(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)), 2)


def test_primary_without_float_parameters_rejected():
    with pytest.raises(ModelError, match="nothing for the hyper-network to generate"):
        HyperNetwork(nn.ReLU(), latent_dim=2)
    with pytest.raises(ModelError, match="nn.Module"):
        HyperNetwork("unet", latent_dim=2)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="latent_dim"):
        HyperNetwork(nn.Linear(2, 2), latent_dim=0)


def test_tied_weights_rejected():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)
            self.b.weight = self.a.weight

    with pytest.raises(ModelError, match="tied"):
        HyperNetwork(Tied(), latent_dim=2)
