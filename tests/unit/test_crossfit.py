"""Cross-fitted latents (``hypersort_ray.crossfit``) without Ray: the folds' training is replaced by
seeded random hyper-networks, so the tests check the folds, the out-of-fold λ fit and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_model import make_tiny_run

from hypersort_ray import crossfit
from hypersort_ray.analysis.baselines import assign_folds
from hypersort_ray.crossfit import CROSSFIT_COLUMNS, fit_latents, fold_config, run_crossfit
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.errors import ConfigError
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.unet import build_primary
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import save_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:transform info of:UserWarning")]


@pytest.fixture()
def run(tmp_path) -> RunDir:
    return RunDir(make_tiny_run(tmp_path, n_cases=6, with_styles=False))


def _hyper(cfg, seed: int = 0) -> HyperNetwork:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hn = cfg.model.hypernet
        return HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)


def _fake_training(trained: list):
    """Stands in for the Ray Train runs: each fold gets a seeded random H as its final checkpoint."""

    def train(configs, address):
        for cfg in configs:
            cases = load_datalist(cfg.data.datalist)
            fold = RunDir(cfg.output_dir)
            fold.path.mkdir(parents=True)
            fold.write_config(cfg)
            save_checkpoint(
                fold.checkpoint_dir,
                latent_state=LatentTable(range(len(cases)), 2),
                hyper_state=_hyper(cfg, seed=len(trained)).state_dict(),
                config=cfg,
                epoch=cfg.training.epochs,
                global_step=1,
                case_ids=[c.case_id for c in cases],
                meta={"l1_weight_effective": 0.1},
            )
            trained.append(cfg)

    return train


def test_fold_config_trains_the_other_folds_cases_quietly(run):
    cfg = run.read_config()
    fold = fold_config(cfg, run, 1, epochs=3, seed=7, workers=1)
    assert fold.output_dir == run.crossfit_fold(1).path
    assert fold.data.datalist == run.crossfit_datalist(1) and fold.data.truth is None
    assert fold.training.epochs == 3 and fold.training.seed == 7 and fold.training.scaling.num_workers == 1
    assert not fold.tracking.enabled and not fold.analysis.run_after_training
    assert fold.model == cfg.model and fold.preprocessing == cfg.preprocessing


def test_fit_latents_moves_only_lambda_and_lowers_the_loss(run):
    cfg = run.read_config()
    hyper = _hyper(cfg)
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    rng = torch.Generator().manual_seed(0)
    image = torch.randn(3, 1, 16, 16, 16, generator=rng)
    label = (torch.rand(3, 1, 16, 16, 16, generator=rng) > 0.7).long()
    got = fit_latents(hyper, image, label, l1_weight=0.0, steps=15, lr=0.1)
    assert got["latent"].shape == (3, 2) and got["pred_main"].shape == (3, 16, 16, 16)
    assert (np.linalg.norm(got["latent"], axis=1) > 0).all()
    assert (got["loss_fit"] < got["loss_main"]).all()  # without the pull, a λ of its own only helps
    assert all(torch.equal(before[k], v) for k, v in hyper.state_dict().items())  # H frozen
    assert all(p.requires_grad for p in hyper.parameters())  # and given back as it was
    strong = fit_latents(hyper, image, label, l1_weight=100.0, steps=15, lr=0.1)
    assert np.abs(strong["latent"]).sum() < np.abs(got["latent"]).sum()  # the L1 pull of eq. (1)


def test_run_crossfit_scores_every_case_out_of_fold(run, monkeypatch):
    trained: list = []
    monkeypatch.setattr(crossfit, "_train_folds", _fake_training(trained))
    df = run_crossfit(run, folds=2, epochs=1, seed=3, steps=2)
    assert df.columns.tolist() == ["index", "case_id", *CROSSFIT_COLUMNS]
    assert df["index"].tolist() == list(range(6))
    assert np.isfinite(df[list(CROSSFIT_COLUMNS)].to_numpy()).all()
    assert df["crossfit_main_disagreement"].between(0, 1).all()
    fold_of = assign_folds(6, 2, 3)
    assert df.attrs["fold"] == fold_of.tolist() and df.attrs["steps"] == 2 and df.attrs["epochs"] == 1
    cases = load_datalist(run.read_config().data.datalist)
    for fold in range(2):  # each fold trains exactly on the other fold's cases
        trained_on = [c.case_id for c in load_datalist(run.crossfit_datalist(fold))]
        assert trained_on == [c.case_id for c, f in zip(cases, fold_of, strict=True) if f != fold]
    saved = run.read_crossfit()
    np.testing.assert_allclose(saved["crossfit_latent_norm"], df["crossfit_latent_norm"], rtol=1e-5)
    assert json.loads(run.analysis.crossfit_json.read_text())["folds"] == 2
    # Folds already trained with the same settings are reused; others are trained again.
    assert len(trained) == 2
    run_crossfit(run, folds=2, epochs=1, seed=3, steps=2)
    assert len(trained) == 2
    run_crossfit(run, folds=2, epochs=2, seed=3, steps=2)
    assert len(trained) == 4


def test_bad_settings(run):
    with pytest.raises(ConfigError, match="steps"):
        run_crossfit(run, folds=2, steps=0)
    with pytest.raises(ConfigError, match="folds"):
        run_crossfit(run, folds=1)


def test_analyze_cli_trains_the_folds_where_address_says(run, monkeypatch):
    from typer.testing import CliRunner

    from hypersort_ray.cli import app

    addresses: list = []
    fake = _fake_training([])
    monkeypatch.setattr(crossfit, "_train_folds", lambda configs, address: (addresses.append(address),
                                                                             fake(configs, address)))
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(run.path), "--crossfit", "2", "--address", "auto", "--json"])
    assert result.exit_code == 0, result.output
    assert addresses == ["auto"]
    assert json.loads(result.stdout)["rank_by"] == "suspicion"
    refused = runner.invoke(app, ["analyze", str(run.path), "--address", "auto"])
    assert refused.exit_code != 0 and "give --crossfit K" in str(refused.exception)  # main() prints it
