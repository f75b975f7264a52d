"""The paper's primary UNet: shapes, reference parameter names, config builder."""

from __future__ import annotations

import pytest
import torch

from hypersort_ray.config import UNetConfig
from hypersort_ray.errors import ModelError
from hypersort_ray.model.unet import UNet, build_primary, unet_layer_names

# The reference layout for n_down=2, n_fix=2, written out by hand (registration order of the reference:
# encoder, then decoder levels shallow-first, then conv_final).
REFERENCE_LAYERS_2_2 = [
    "conv_init", "norm_init",
    "conv_0_0", "norm_0_0", "conv_0_1", "norm_0_1",
    "down_0", "down_norm_0", "conv_1_0", "norm_1_0", "conv_1_1", "norm_1_1",
    "down_1", "down_norm_1", "conv_2_0", "norm_2_0", "conv_2_1", "norm_2_1",
    "up_0", "up_norm_0", "dec_conv_0_0", "dec_norm_0_0", "dec_conv_0_1", "dec_norm_0_1",
    "up_1", "up_norm_1", "dec_conv_1_0", "dec_norm_1_0", "dec_conv_1_1", "dec_norm_1_1",
    "conv_final",
]  # fmt: skip


def test_state_dict_keys_follow_reference_layout():
    net = UNet(in_channels=1, out_channels=2, n_down=2, n_fix=2, channels=4)
    expected = [f"{layer}.{p}" for layer in REFERENCE_LAYERS_2_2 for p in ("weight", "bias")]
    assert list(net.state_dict()) == expected
    assert unet_layer_names(2, 2) == REFERENCE_LAYERS_2_2
    # Parameters only: InstanceNorm keeps no running statistics.
    assert [n for n, _ in net.named_parameters()] == expected
    assert list(net.buffers()) == []


def test_channel_layout():
    C = 4
    sd = UNet(in_channels=3, out_channels=5, n_down=2, n_fix=2, channels=C).state_dict()
    assert sd["conv_init.weight"].shape == (C, 3, 3, 3, 3)
    assert sd["down_1.weight"].shape == (4 * C, 2 * C, 3, 3, 3)
    # ConvTranspose weight is [in, out, k...]: up_{lvl} maps 2^(lvl+1)C -> 2^lvl C with k=4.
    assert sd["up_1.weight"].shape == (4 * C, 2 * C, 4, 4, 4)
    assert sd["up_0.weight"].shape == (2 * C, C, 4, 4, 4)
    assert sd["dec_conv_1_0.weight"].shape == (2 * C, 4 * C, 3, 3, 3)
    assert sd["dec_conv_1_1.weight"].shape == (2 * C, 2 * C, 3, 3, 3)
    assert sd["dec_norm_0_1.weight"].shape == (C,)
    assert sd["conv_final.weight"].shape == (5, C, 3, 3, 3)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shape(spatial_dims):
    net = UNet(in_channels=2, out_channels=3, n_down=2, n_fix=1, channels=4, spatial_dims=spatial_dims)
    x = torch.randn(2, 2, *([16] * spatial_dims))
    y = net(x)
    assert y.shape == (2, 3, *([16] * spatial_dims))
    assert torch.isfinite(y).all()


def test_paper_network_size():
    # The paper's UNet: 3 down-sampling stages, 16 channels, 3 convolutions per stage.
    net = UNet(in_channels=1, out_channels=2, n_down=3, n_fix=3, channels=16)
    n = sum(p.numel() for p in net.parameters())
    assert 3_000_000 < n < 4_000_000
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_bad_inputs_and_arguments():
    net = UNet(n_down=2, n_fix=1, channels=2)
    with pytest.raises(ModelError, match="divisible by 4"):
        net(torch.zeros(1, 1, 10, 16, 16))
    with pytest.raises(ModelError, match="spatial_dims"):
        UNet(spatial_dims=1)
    with pytest.raises(ModelError, match="n_fix"):
        UNet(n_fix=0)


def test_build_primary_from_config():
    ours = build_primary(UNetConfig(channels=4, n_down=2, n_fix=2))
    assert isinstance(ours, UNet) and ours.channels == 4 and ours.n_down == 2
    monai = build_primary(UNetConfig(kind="monai_basic_unet", channels=4, spatial_dims=2))
    assert type(monai).__name__ == "BasicUNet"
    assert monai(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
