"""Sweep config → Tune search space, trial configs, validation split, results table (no Ray cluster)."""

from __future__ import annotations

import math

import pytest

from hypersort_ray.config import SearchDim, SweepConfig, load_sweep_config
from hypersort_ray.errors import ConfigError
from hypersort_ray.tune.results import plot_objective, results_frame, write_results
from hypersort_ray.tune.space import (
    build_param_space,
    grid_size,
    split_validation,
    trial_experiment,
    validate_space,
)


def _sweep(space: dict, **kw) -> SweepConfig:
    return SweepConfig(space={k: SearchDim(**v) for k, v in space.items()}, **kw)


# ----------------------------------------------------------------------------------- space mapping
def test_each_type_maps_to_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = _sweep({
        "model.hypernet.latent_dim": {"type": "choice", "values": [2, 4, 8]},
        "training.batch_size": {"type": "grid", "values": [2, 4]},
        "training.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "training.latent.init_std": {"type": "uniform", "low": 0.01, "high": 0.1},
        "training.seed": {"type": "randint", "low": 0, "high": 3},
    })
    space = build_param_space(cfg)
    assert isinstance(space["model.hypernet.latent_dim"], Categorical)
    assert space["model.hypernet.latent_dim"].categories == [2, 4, 8]
    assert space["training.batch_size"] == {"grid_search": [2, 4]}
    lr = space["training.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert type(lr.get_sampler()).__name__ == "_LogUniform"
    std = space["training.latent.init_std"]
    assert isinstance(std, Float) and type(std.get_sampler()).__name__ == "_Uniform"
    seed = space["training.seed"]
    # Ours is inclusive, Tune's randint upper bound exclusive.
    assert isinstance(seed, Integer) and (seed.lower, seed.upper) == (0, 4)
    samples = {seed.sample() for _ in range(200)}
    assert samples == {0, 1, 2, 3}


def test_grid_search_crosses_choice_dimensions():
    cfg = _sweep(
        {"model.hypernet.latent_dim": {"type": "choice", "values": [2, 4, 8]},
         "training.l1_weight": {"type": "loguniform", "low": 1e-3, "high": 1.0},
         "training.batch_size": {"type": "grid", "values": [2, 4]}},
        search="grid",
    )
    space = build_param_space(cfg)
    assert space["model.hypernet.latent_dim"] == {"grid_search": [2, 4, 8]}
    assert not isinstance(space["training.l1_weight"], dict)  # ranges stay random
    assert grid_size(cfg) == 6
    assert grid_size(cfg.model_copy(update={"search": "random"})) == 2


def test_default_space_is_the_papers_knobs():
    space = build_param_space(SweepConfig())
    assert set(space) == {"model.hypernet.latent_dim", "training.l1_weight", "training.lr"}


def test_grid_points_are_expanded_by_tunes_generator():
    from ray.tune.search.variant_generator import generate_variants

    cfg = _sweep({"model.hypernet.latent_dim": {"type": "grid", "values": [2, 4]},
                  "training.l1_weight": {"type": "loguniform", "low": 1e-3, "high": 1.0}}, num_samples=2)
    configs = [
        spec for _ in range(cfg.num_samples) for _, spec in generate_variants(build_param_space(cfg))
    ]
    assert len(configs) == cfg.num_samples * grid_size(cfg) == 4
    assert sorted(c["model.hypernet.latent_dim"] for c in configs) == [2, 2, 4, 4]
    assert all(1e-3 <= c["training.l1_weight"] <= 1.0 for c in configs)


# ----------------------------------------------------------------------------------- trial configs
def test_nested_dotted_keys_are_applied_to_the_base_config():
    cfg = _sweep({"model.hypernet.latent_dim": {"type": "choice", "values": [2, 4]},
                  "training.latent.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
                  "preprocessing.augment.flip_prob": {"type": "uniform", "low": 0.0, "high": 0.5}},
                 workers_per_trial=3, cpus_per_worker=2.0)
    exp = trial_experiment(cfg, {"model.hypernet.latent_dim": 4, "training.latent.lr": 0.02,
                                 "preprocessing.augment.flip_prob": 0.25})
    assert exp.model.hypernet.latent_dim == 4
    assert exp.training.latent.lr == 0.02
    assert exp.preprocessing.augment.flip_prob == 0.25
    # untouched keys keep the base values; resources come from the sweep
    assert exp.model.hypernet.hidden == cfg.base.model.hypernet.hidden
    assert exp.training.scaling.num_workers == 3 and exp.training.scaling.cpus_per_worker == 2.0
    assert exp.training.scaling.use_gpu is False
    # the base config itself is not modified
    assert cfg.base.model.hypernet.latent_dim == 2


def test_a_sampled_resource_key_wins_over_workers_per_trial():
    cfg = _sweep({"training.scaling.num_workers": {"type": "grid", "values": [1, 2]}}, workers_per_trial=4)
    assert trial_experiment(cfg, {"training.scaling.num_workers": 2}).training.scaling.num_workers == 2


def test_gpus_per_worker_turns_on_use_gpu():
    cfg = _sweep({"training.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, gpus_per_worker=0.5)
    exp = trial_experiment(cfg, {"training.lr": 1e-3})
    assert exp.training.scaling.use_gpu and exp.training.scaling.gpus_per_worker == 0.5


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"model.hypernet.latent_dim": {"type": "choice", "values": [2, 0]}}, "latent_dim"),
        ({"model.hypernet.latent_dim": {"type": "randint", "low": 0, "high": 4}}, "value 0"),
        ({"preprocessing.roi_size": {"type": "choice", "values": [[32, 32, 32], [30, 30, 30]]}}, "divisible"),
        ({"training.l1_weight": {"type": "uniform", "low": -1.0, "high": 1.0}}, "l1_weight"),
        ({"training.seed": {"type": "randint", "low": 0.2, "high": 0.8}}, "no integer"),
        ({"training.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2, "values": [1]}}, "takes low/high"),
        ({"training.lr": {"type": "choice", "values": [1e-3], "low": 1.0, "high": 2.0}}, "takes values"),
    ],
)
def test_bad_space_values_raise_config_error(space, needle):
    cfg = _sweep(space)
    with pytest.raises(ConfigError, match=needle):
        build_param_space(cfg)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"space": {"model.hypernet.nope": {"type": "choice", "values": [1]}}}, "not a key"),
        ({"space": {"training.lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}}, "low > 0"),
        ({"space": {"training.lr": {"type": "uniform", "low": 1.0, "high": 1.0}}}, "low < high"),
        ({"space": {"training.lr": {"type": "choice", "values": []}}}, "non-empty"),
        ({"space": {"training.lr": {"type": "normal", "low": 0.0, "high": 1.0}}}, "type"),
        ({"reduction_factor": 1.0}, "reduction_factor"),
    ],
)
def test_bad_sweep_yaml_raises_config_error(tmp_path, data, needle):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=needle):
        load_sweep_config(path)


def test_empty_space_and_unknown_sample_keys_are_refused():
    with pytest.raises(ConfigError, match="empty"):
        validate_space(SweepConfig(space={}))
    with pytest.raises(ConfigError, match="not in the sweep space"):
        trial_experiment(SweepConfig(), {"training.epochs": 3})


def test_optuna_without_the_package_or_with_grid_dims_is_refused():
    try:
        import optuna  # noqa: F401

        pytest.skip("optuna is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="optuna"):
        build_param_space(SweepConfig(search="optuna"))
    grid = _sweep({"training.batch_size": {"type": "grid", "values": [2, 4]}}, search="optuna")
    with pytest.raises(ConfigError, match="grid"):
        build_param_space(grid)


def test_shipped_sweep_configs_build_a_space():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs").glob("sweep*.yaml")):
        assert build_param_space(load_sweep_config(path)), path


def test_mode_defaults_follow_the_metric():
    assert SweepConfig(metric="seg_loss").resolved_mode == "min"
    assert SweepConfig(metric="val_dice").resolved_mode == "max"
    assert SweepConfig(metric="auroc_latent_norm").resolved_mode == "max"
    assert SweepConfig(metric="val_dice", mode="min").resolved_mode == "min"


# ------------------------------------------------------------------------------- validation split
def test_validation_split_is_deterministic_spread_and_disjoint():
    train, val = split_validation(40, 0.2)
    assert len(val) == 8 and len(train) == 32
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(40))
    assert split_validation(40, 0.2) == (train, val)
    assert max(val) - min(val) >= 30  # spread over the datalist, not a block at one end
    assert split_validation(10, 0.0) == (list(range(10)), [])


@pytest.mark.parametrize(("n", "fraction"), [(3, 0.1), (2, 1.0)])
def test_unusable_validation_fractions_raise(n, fraction):
    with pytest.raises(ConfigError, match="validation_fraction"):
        split_validation(n, fraction)


# --------------------------------------------------------------------------------- results table
def _rows():
    return [
        {"val_dice": 0.61, "model.hypernet.latent_dim": 2, "training.l1_weight": 0.01, "auroc_latent_norm": 0.7,
         "spearman_latent_norm": 0.3, "seg_loss": 0.5, "status": "finished", "trial_id": "a", "run_dir": "/r/a"},
        {"val_dice": 0.83, "model.hypernet.latent_dim": 8, "training.l1_weight": 0.1, "auroc_latent_norm": 0.9,
         "spearman_latent_norm": 0.6, "seg_loss": 0.3, "status": "finished", "trial_id": "b", "run_dir": "/r/b"},
        {"val_dice": math.nan, "model.hypernet.latent_dim": 4, "training.l1_weight": 1.0, "status": "failed",
         "trial_id": "c", "run_dir": "/r/c", "error": "RuntimeError: boom"},
        {"val_dice": 0.42, "model.hypernet.latent_dim": 4, "training.l1_weight": 0.5, "auroc_latent_norm": 0.5,
         "status": "stopped", "trial_id": "d", "run_dir": "/r/d"},
    ]


PARAMS = ["model.hypernet.latent_dim", "training.l1_weight"]


def test_results_table_is_objective_first_and_sorted_best_first(tmp_path):
    df = results_frame(_rows(), metric="val_dice", mode="max", params=PARAMS)
    cols = list(df.columns)
    assert cols[0] == "val_dice"
    assert cols[1:3] == PARAMS
    assert cols[3:5] == ["auroc_latent_norm", "spearman_latent_norm"]
    assert cols.index("status") > cols.index("seg_loss")
    assert cols.index("run_dir") > cols.index("status")
    assert list(df["trial_id"]) == ["b", "a", "d", "c"]  # failed trial (no objective) last
    assert df.loc[3, "status"] == "failed" and df.loc[3, "error"] == "RuntimeError: boom"

    path = write_results(df, tmp_path / "results.csv")
    import pandas as pd

    back = pd.read_csv(path)
    assert list(back.columns) == cols and len(back) == 4


def test_results_table_min_mode_and_other_objective_first():
    rows = _rows()
    df = results_frame(rows, metric="seg_loss", mode="min", params=PARAMS)
    assert df.columns[0] == "seg_loss"
    assert list(df["trial_id"])[:2] == ["b", "a"]
    assert "val_dice" in df.columns  # kept as an extra column
    with pytest.raises(ValueError):
        results_frame(rows, metric="seg_loss", mode="best", params=PARAMS)


def test_empty_results_table_and_plot(tmp_path):
    df = results_frame([], metric="val_dice", mode="max", params=PARAMS)
    assert list(df.columns)[:3] == ["val_dice", *PARAMS] and len(df) == 0
    assert plot_objective(df, tmp_path / "o.png", metric="val_dice", x_keys=PARAMS) is None


def test_objective_plot_is_written(tmp_path):
    df = results_frame(_rows(), metric="val_dice", mode="max", params=PARAMS)
    out = plot_objective(df, tmp_path / "objective.png", metric="val_dice", x_keys=PARAMS)
    assert out is not None and out.stat().st_size > 1000


# ------------------------------------------------------------------------------ trial plumbing
def test_effective_sweep_aligns_checkpoints_with_asha_rungs(tmp_path):
    from hypersort_ray.tune.sweep import effective_sweep

    cfg = SweepConfig.model_validate({"metric": "val_dice", "grace_period": 4,
                                      "base": {"output_dir": str(tmp_path), "training": {"checkpoint_every": 6}}})
    eff = effective_sweep(cfg)
    assert eff.base.training.checkpoint_every == 2  # gcd(6, 4): every rung 4·2^k is a validated epoch
    assert eff.base.output_dir.is_absolute()
    fifo = effective_sweep(cfg.model_copy(update={"scheduler": "fifo"}))
    assert fifo.base.training.checkpoint_every == 6


def test_trial_data_holds_out_cases_and_reindexes_truth(tmp_path):
    import pandas as pd

    from hypersort_ray.data.datalist import load_datalist
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.tune.trial import prepare_trial_data

    generate_dataset(tmp_path / "data", cases=10, size=16, seed=0)
    cfg = SweepConfig.model_validate({"base": {"data": {"datalist": str(tmp_path / "data" / "datalist.tsv"),
                                                        "validation_fraction": 0.2}}})
    exp, held_out = prepare_trial_data(cfg.base, tmp_path / "trial")
    train_idx, val_idx = split_validation(10, 0.2)
    assert [c["index"] for c in held_out] == val_idx
    sub = load_datalist(exp.data.datalist)
    everything = load_datalist(tmp_path / "data" / "datalist.tsv")
    assert [c.case_id for c in sub] == [everything[i].case_id for i in train_idx]
    truth = pd.read_csv(exp.data.truth)
    assert list(truth["index"]) == list(range(len(train_idx)))
    assert list(truth["source_index"]) == train_idx
    original = pd.read_csv(tmp_path / "data" / "truth.csv").set_index("index")
    assert list(truth["case_id"]) == [original.loc[i, "case_id"] for i in train_idx]
    for case in held_out:
        assert case["perturbed"] == (original.loc[case["index"], "perturbation"] != "none")
    # no validation fraction: the trial trains on the datalist as it is
    same, none = prepare_trial_data(cfg.base.model_copy(update={"data": cfg.base.data.model_copy(
        update={"validation_fraction": 0.0})}), tmp_path / "trial2")
    assert none == [] and same.data.datalist == cfg.base.data.datalist


class _FakeResult:
    def __init__(self, trial_id, metrics, error=None, history=None, config=None):
        import pandas as pd

        self.metrics = {"trial_id": trial_id, **metrics}
        self.error = error
        self.path = f"/x/trial_{trial_id}"
        self.config = config or {}
        self.metrics_dataframe = pd.DataFrame(history) if history else None


def test_collect_rows_statuses_and_objective_of_stopped_trials(tmp_path):
    from hypersort_ray.tune.sweep import collect_rows

    cfg = SweepConfig(metric="val_dice", space={"model.hypernet.latent_dim": SearchDim(type="choice", values=[2, 4])})
    nan = float("nan")
    grid = [
        _FakeResult("a", {"val_dice": 0.8, "trial_done": 1, "auroc_latent_norm": 0.9, "epoch": 4},
                    config={"model.hypernet.latent_dim": 4}),
        # stopped by ASHA at an epoch without validation: objective = last validated value
        _FakeResult("b", {"val_dice": nan, "epoch": 3},
                    history=[{"epoch": 1, "val_dice": nan}, {"epoch": 2, "val_dice": 0.4}, {"epoch": 3, "val_dice": nan}]),
        _FakeResult("c", {}, error=RuntimeError("Traceback ...\nConfigError: workers exceed cases")),
        _FakeResult("d", {"val_dice": 0.5, "epoch": 2}),
    ]
    rows = collect_rows(grid, cfg, tmp_path, states={"a": "TERMINATED", "b": "TERMINATED", "c": "ERROR", "d": "RUNNING"})
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["a"]["status"] == "finished" and by_id["a"]["val_dice"] == 0.8
    assert by_id["a"]["model.hypernet.latent_dim"] == 4 and by_id["a"]["auroc_latent_norm"] == 0.9
    assert by_id["b"]["status"] == "stopped" and by_id["b"]["val_dice"] == 0.4
    assert by_id["c"]["status"] == "failed" and by_id["c"]["error"] == "ConfigError: workers exceed cases"
    assert by_id["d"]["status"] == "interrupted"
    assert by_id["a"]["run_dir"] == str(tmp_path / "trials" / "a")
