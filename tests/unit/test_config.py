"""Config validation: good files load, bad values name their key path, reference YAML translates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hypersort_ray.config import (
    SHIPPED_CONFIGS,
    ExperimentConfig,
    SweepConfig,
    apply_overrides,
    flatten,
    load_config,
    load_serve_settings,
    load_sweep_config,
    parse_config,
    read_yaml,
    resolve_config_path,
)
from hypersort_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

REFERENCE_AMOS = """\
OutputPath: ./Results/AMOS_Experiment
DataFile: ./data_files/data_list_AMOS.txt
Pipeline:
  - MarkAsTarget: {apply_to: label}
  - SetLabelModality: {label_names: ["liver"], apply_to: label}
  - MakeFloat: {apply_to: image}
  - BakeTransformation: {apply_to: [image, label]}
  - NormalizePercentile: {min_percentile: 0.005, max_percentile: 0.995, clamp_values: True, apply_to: image}
  - Resample: {resolution: [2, 2, 2], apply_to: [image, label]}
  - CenterROISampler: {roi_size: [168, 168, 168]}
ModelConfig:
  HyperNetworkLayers: [2, 50, 50, 50]
  UNet: {in_c: 1, out_c: 2, n_down: 3, n_fix: 3, C: 16, n_dim: 3}
"""


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED_CONFIGS.glob("*.yaml")))
def test_every_shipped_config_validates(name):
    path = resolve_config_path(Path(name).stem)
    assert path == SHIPPED_CONFIGS / name and (ROOT / "configs" / name).read_bytes() == path.read_bytes()
    data = yaml.safe_load(path.read_text())
    if name.startswith("sweep"):
        load_sweep_config(path)
    elif name.startswith("serve"):
        load_serve_settings(path)
    else:
        assert isinstance(load_config(path), ExperimentConfig), data


def test_demo_yaml_equals_embedded_defaults():
    assert load_config(ROOT / "configs" / "demo.yaml") == ExperimentConfig()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.hypernet.latent_dim=0", "model.hypernet.latent_dim = 0"),
        ("training.epochs=-3", "training.epochs = -3"),
        ("training.batch_size=two", "training.batch_size"),
        ("preprocessing.roi_size=[600,600,600]", "exceeds the maximum edge"),
        ("preprocessing.roi_size=[30,32,32]", "divisible by 2**n_down"),
        ("preprocessing.spacing=[1,1]", "differ in length"),
        ("preprocessing.intensity.lower_percentile=99.9", "must be below upper_percentile"),
        ("trainin.epochs=3", "trainin"),
        ("model.unet.out_channels=3", "out_channels"),
        ("training.latent.betas=[0.7,1.5]", "training.latent.betas.1"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_bad_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: training.epoch"):
        load_config(typo)
    twice = tmp_path / "twice.yaml"
    twice.write_text("training:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: line 4: duplicate key 'lr'"):
        load_config(twice)
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        parse_config("name: a\nname: b\n", "upload.yaml")


def test_shipped_configs_have_no_repeated_keys():
    """Every config the package ships loads with repeated keys refused (PyYAML would keep the last)."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(read_yaml(path), dict), path


def test_overrides_parse_like_yaml():
    cfg = load_config(None, ["training.epochs=7", "preprocessing.roi_size=[16,16,16]", "training.l1_calibrate=true",
                             "model.unet.n_down=2", "tracking.register_as=null"])
    assert cfg.training.epochs == 7
    assert cfg.preprocessing.roi_size == [16, 16, 16]
    assert cfg.training.l1_calibrate is True
    assert cfg.tracking.register_as is None
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["training.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"training": {"epochs": 3}}, ["training.epochs.x=1"])


def test_label_mapping_and_classes():
    cfg = load_config(None, ["preprocessing.label.class_map={1: 1, 2: 2}", "model.unet.out_channels=3"])
    assert cfg.preprocessing.label.num_classes == 3
    with pytest.raises(ConfigError, match="either foreground or class_map"):
        load_config(None, ["preprocessing.label.class_map={1: 1}", "preprocessing.label.foreground=[1]"])


def test_reference_config_translates(tmp_path):
    path = tmp_path / "AMOS.yaml"
    path.write_text(REFERENCE_AMOS)
    cfg = load_config(path)
    assert cfg.model.unet.channels == 16 and cfg.model.unet.n_down == 3 and cfg.model.unet.n_fix == 3
    assert cfg.model.hypernet.latent_dim == 2 and cfg.model.hypernet.hidden == [50, 50, 50]
    assert cfg.preprocessing.roi_size == [168, 168, 168] and cfg.preprocessing.crop == "center"
    assert cfg.preprocessing.spacing == [2.0, 2.0, 2.0]
    assert cfg.preprocessing.intensity.lower_percentile == pytest.approx(0.5)
    assert cfg.preprocessing.intensity.upper_percentile == pytest.approx(99.5)
    assert cfg.training.l1_weight == 1.0 and cfg.training.batch_size == 1
    assert str(cfg.data.datalist).endswith("data_list_AMOS.txt")
    assert cfg.output_dir == Path("Results/AMOS_Experiment")


def test_reference_oriented_sampler_and_overrides(tmp_path):
    text = REFERENCE_AMOS.replace(
        "  - CenterROISampler: {roi_size: [168, 168, 168]}",
        "  - OrientedROISampler: {roi_size: [96, 96, 96], roi_spacing: [1.5, 1.5, 1.5], num_samples: 1, "
        "sample_from_labels_proportion: 1.0}",
    )
    path = tmp_path / "TS.yaml"
    path.write_text(text)
    cfg = load_config(path, ["training.epochs=2"])
    assert cfg.preprocessing.crop == "foreground" and cfg.preprocessing.spacing == [1.5, 1.5, 1.5]
    assert cfg.training.epochs == 2


def test_reference_unknown_op_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(REFERENCE_AMOS.replace("  - MakeFloat: {apply_to: image}", "  - RandomGamma: {gamma: 2}"))
    with pytest.raises(ConfigError, match=r"Pipeline\[2\]\.RandomGamma: no translation"):
        load_config(path)
    path.write_text(REFERENCE_AMOS.replace("C: 16", "C: 16, dropout: 0.1"))
    with pytest.raises(ConfigError, match="dropout"):
        load_config(path)


def test_sweep_space_keys_are_checked():
    assert set(SweepConfig().space) >= {"model.hypernet.latent_dim", "training.l1_weight"}
    with pytest.raises(ConfigError, match="space key 'training.l1_weigth'"):
        load_sweep_config(None, ["space={training.l1_weigth: {type: choice, values: [1]}}"])
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_sweep_config(None, ["space={training.l1_weight: {type: loguniform, low: 0, high: 1}}"])


def test_flatten_is_dotted():
    flat = flatten(ExperimentConfig().model_dump(mode="json"))
    assert flat["model.hypernet.latent_dim"] == 2
    assert "training.latent.lr" in flat


def test_configuration_reference_is_current():
    from hypersort_ray.config_docs import render

    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m hypersort_ray.config_docs > docs/configuration.md"
    )


@pytest.mark.parametrize("name", ["/data/exp #3", "null", "yes", "2024-01-01", "a: b", "[x]"])
def test_path_values_are_never_parsed_as_yaml(name):
    """Path flags reach the config as the typed path given: no YAML comment, null, bool or date."""
    cfg = load_config(None, ["training.epochs=3"], {"output_dir": Path(name), "data.datalist": Path(name)})
    assert cfg.output_dir == Path(name) and cfg.data.datalist == Path(name)
    sweep = load_sweep_config(None, [], {"base.output_dir": Path(name)})
    assert sweep.base.output_dir == Path(name)


def test_config_by_name_or_path(tmp_path):
    assert resolve_config_path(None) is None
    assert resolve_config_path("paper_amos") == SHIPPED_CONFIGS / "paper_amos.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("training: {epochs: 2}\n")
    assert resolve_config_path(own) == own
    with pytest.raises(ConfigError, match="not found.*shipped config: .*paper_amos"):
        resolve_config_path("no_such_config")
