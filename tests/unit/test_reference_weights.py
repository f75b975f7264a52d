"""Importing the public HyperSORT code's hyper-network weights and latents.

The reference-layout state dict and the reference-side forward are written here from the paper's and
the issue's description (per-parameter heads, ``tanh(head(h)) * 5``, parameters set by name and the
primary called functionally) — not copied from the reference code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from hypersort_ray.errors import ModelError
from hypersort_ray.model.functional import batched_forward
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.reference_weights import (
    convert_reference_latents,
    convert_reference_state_dict,
    reference_head_name,
)
from hypersort_ray.model.unet import UNet

LATENT_DIM, HIDDEN = 2, [6, 5, 4]


def reference_state_dict(primary: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 'trained' reference HyperModel state dict: hidden MLP + one head per primary state entry."""
    g = torch.Generator().manual_seed(seed)
    widths = [LATENT_DIM, *HIDDEN]
    sd: dict[str, torch.Tensor] = {}
    for i in range(len(HIDDEN)):
        sd[f"hypernetwork.{i}.0.weight"] = torch.randn(widths[i + 1], widths[i], generator=g)
        sd[f"hypernetwork.{i}.0.bias"] = torch.randn(widths[i + 1], generator=g) * 0.1
    for name, value in primary.state_dict().items():
        key = "heads." + name.replace(".", ";")
        sd[f"{key}.weight"] = torch.randn(value.numel(), HIDDEN[-1], generator=g) * 0.1
        sd[f"{key}.bias"] = value.reshape(-1) + 0.01 * torch.randn(value.numel(), generator=g)
    sd["model.dummy_param"] = torch.rand(1, 1, generator=g)
    return sd


def reference_forward(sd, primary, lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference-side evaluation for one latent: per-head parameters, then the primary functionally."""
    h = lam.reshape(1, -1)
    for i in range(len(HIDDEN)):
        h = torch.relu(h @ sd[f"hypernetwork.{i}.0.weight"].T + sd[f"hypernetwork.{i}.0.bias"])
    params = {}
    for name, value in primary.state_dict().items():
        key = "heads." + name.replace(".", ";")
        out = torch.tanh(h @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]) * 5
        params[name] = out.reshape(value.shape)
    return functional_call(primary, params, (x,))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=2, n_down=2, n_fix=2, channels=4)
    return unet, reference_state_dict(unet)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converted_weights_reproduce_reference_output(setup, dtype):
    unet, sd = setup
    unet = copy.deepcopy(unet).to(dtype)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    ours = HyperNetwork(unet, latent_dim=LATENT_DIM, hidden=HIDDEN).to(dtype)
    result = ours.load_state_dict(convert_reference_state_dict(sd, unet, LATENT_DIM, HIDDEN))
    assert not result.missing_keys and not result.unexpected_keys
    assert ours.out.weight.dtype == dtype
    lams = torch.tensor([[0.0, 0.0], [0.7, -1.2], [-0.3, 2.0]], dtype=dtype)
    x = torch.randn(3, 1, 16, 16, 16, dtype=dtype)
    # float64: rounding only. float32: one fused matmul vs per-head matmuls round differently and the
    # instance norms amplify it (measured 2e-6 of the output scale), so compare relative to that scale.
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        expected = torch.cat([reference_forward(sd, unet, lams[i], x[i : i + 1]) for i in range(3)])
        batched = batched_forward(ours.primary, ours.unflatten(ours(lams)), x)
        scale = expected.abs().max()
        torch.testing.assert_close(batched / scale, expected / scale, **tol)
        for i in range(3):
            net = ours.make_primary(lams[i])
            torch.testing.assert_close(net(x[i : i + 1]) / scale, expected[i : i + 1] / scale, **tol)
        # The generated parameters themselves agree to float rounding.
        gen = ours.params_for(lams[1])
    h = lams[1:2]
    for i in range(len(HIDDEN)):
        h = torch.relu(h @ sd[f"hypernetwork.{i}.0.weight"].T + sd[f"hypernetwork.{i}.0.bias"])
    for name in ("conv_init.weight", "up_1.bias", "conv_final.weight"):
        key = reference_head_name(name)
        ref = (torch.tanh(h @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]) * 5).reshape(gen[name].shape)
        torch.testing.assert_close(gen[name], ref, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_missing_extra_and_misshaped_heads_are_named(setup):
    unet, sd = setup
    missing = dict(sd)
    del missing["heads.up_0;weight.weight"]
    with pytest.raises(ModelError, match=r"missing heads\.up_0;weight\.weight"):
        convert_reference_state_dict(missing, unet, LATENT_DIM, HIDDEN)

    extra = dict(sd)
    extra["heads.extra_layer;weight.weight"] = torch.zeros(3, HIDDEN[-1])
    with pytest.raises(ModelError, match=r"unexpected heads\.extra_layer;weight\.weight"):
        convert_reference_state_dict(extra, unet, LATENT_DIM, HIDDEN)

    bad = dict(sd)
    bad["heads.conv_init;bias.weight"] = torch.zeros(5, HIDDEN[-1])
    with pytest.raises(ModelError, match=r"heads\.conv_init;bias\.weight' has shape \(5, 4\)"):
        convert_reference_state_dict(bad, unet, LATENT_DIM, HIDDEN)

    # Wrong hidden sizes / another primary network are caught as shape or key mismatches.
    with pytest.raises(ModelError, match="has shape"):
        convert_reference_state_dict(sd, unet, LATENT_DIM, [6, 5, 3])
    with pytest.raises(ModelError, match="missing|unexpected"):
        convert_reference_state_dict(sd, UNet(n_down=1, n_fix=2, channels=4), LATENT_DIM, HIDDEN)
    with pytest.raises(ModelError, match="unexpected hypernetwork.2"):
        convert_reference_state_dict(sd, unet, LATENT_DIM, [6, 5])


def test_convert_reference_latents():
    latent_dict = {
        12: torch.tensor([[0.5, -0.1]], requires_grad=True),
        3: torch.tensor([[0.0, 1.0]]),
        torch.tensor(7): torch.tensor([[2.0, 2.0]]),
    }
    indices, values = convert_reference_latents(latent_dict)
    assert indices.dtype == torch.int64 and indices.tolist() == [3, 7, 12]
    assert values.shape == (3, 2) and not values.requires_grad
    torch.testing.assert_close(values[2], torch.tensor([0.5, -0.1]))
    with pytest.raises(ModelError, match="different sizes"):
        convert_reference_latents({0: torch.zeros(1, 2), 1: torch.zeros(1, 3)})
    with pytest.raises(ModelError, match="not a sample index"):
        convert_reference_latents({"case_a": torch.zeros(1, 2)})


def test_import_reference_run_gives_a_loadable_run_folder(tmp_path, setup):
    """`hypersort import-reference`: reference files on disk -> run folder -> same UNet output."""
    from hypersort_ray.errors import RunExistsError
    from hypersort_ray.inference import load_model
    from hypersort_ray.runs import RunDir
    from hypersort_ray.runs.reference_import import import_reference_run

    unet, sd = setup
    torch.save(sd, tmp_path / "model_w.pt")
    lat = {i: torch.randn(1, LATENT_DIM) * 0.3 for i in range(3)}
    torch.save(lat, tmp_path / "latent_dict.pt")
    (tmp_path / "REF.yaml").write_text(
        "OutputPath: ./Results/x\nDataFile: ./missing.txt\n"
        "Pipeline:\n  - Resample: {resolution: [2, 2, 2]}\n  - CenterROISampler: {roi_size: [16, 16, 16]}\n"
        f"ModelConfig:\n  HyperNetworkLayers: {[LATENT_DIM, *HIDDEN]}\n"
        "  UNet: {in_c: 1, out_c: 2, n_down: 2, n_fix: 2, C: 4, n_dim: 3}\n"
    )
    result = import_reference_run(tmp_path / "model_w.pt", tmp_path / "latent_dict.pt", tmp_path / "REF.yaml",
                                  tmp_path / "run")
    assert result["num_samples"] == 3
    idx, _, values = RunDir(tmp_path / "run").read_latents()
    assert idx.tolist() == [0, 1, 2]
    torch.testing.assert_close(torch.as_tensor(values, dtype=torch.float32), torch.cat([lat[i] for i in range(3)]))
    model = load_model(tmp_path / "run")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ours = model.unet_for(lat[1].reshape(-1).tolist())(x)
        ref = reference_forward(sd, unet, lat[1].reshape(-1), x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    with pytest.raises(RunExistsError, match="already holds a training run"):  # never over an existing run
        import_reference_run(tmp_path / "model_w.pt", tmp_path / "latent_dict.pt", tmp_path / "REF.yaml",
                             tmp_path / "run")
    torch.save({"not": "a latent dict"}, tmp_path / "bad.pt")
    with pytest.raises(ModelError):
        import_reference_run(tmp_path / "model_w.pt", tmp_path / "bad.pt", tmp_path / "REF.yaml", tmp_path / "run2")
