"""``analyze_run`` end to end on a fake run folder (analysis/run.py)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hypersort_ray.analysis.run import analysis_settings, analyze_run, dice, resolve_truth_path
from hypersort_ray.analysis.simulate import simulate_latents
from hypersort_ray.config import ExperimentConfig, config_to_yaml, load_config
from hypersort_ray.errors import ConfigError, DataError, RunError
from hypersort_ray.train.latents_io import write_latents_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Refs(HTMLParser):
    """src/href attributes of the page's real tags (script bodies are not parsed as tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


def external_refs(page: str) -> list[str]:
    """Resources a browser would fetch from the network (http(s) or protocol-relative URLs)."""
    parser = _Refs()
    parser.feed(page)
    return [r for r in parser.refs if r.strip().lower().startswith(("http:", "https:", "//"))]


N, DIM, SHAPE = 60, 2, (10, 10, 6)


def _make_run(
    root: Path, n: int = N, dim: int = DIM, with_data: bool = True, config_dim: int | None = None
) -> Path:
    """A run folder as the trainer writes it, plus a tiny NIfTI dataset with a datalist and truth.csv."""
    sim = simulate_latents(n_cases=n, latent_dim=dim, seed=3)
    ids = [f"pat{i:03d}" for i in range(n)]
    data = root / "data"
    if with_data:
        (data / "images").mkdir(parents=True)
        (data / "labels").mkdir()
        rng = np.random.default_rng(0)
        lines = ["DataPath\tLabelPath"]
        for cid in ids:
            label = np.zeros(SHAPE, np.uint8)
            label[2:7, 3:8, 1:5] = 1
            nib.save(
                nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), np.eye(4)),
                data / "images" / f"{cid}.nii.gz",
            )
            nib.save(nib.Nifti1Image(label, np.eye(4)), data / "labels" / f"{cid}.nii.gz")
            lines.append(f"images/{cid}.nii.gz\tlabels/{cid}.nii.gz")
        (data / "datalist.tsv").write_text("\n".join(lines) + "\n")
        truth = sim.truth.assign(case_id=ids)
        truth.to_csv(data / "truth.csv", index=False)
    run = root / "run"
    run.mkdir(parents=True)
    cfg = ExperimentConfig(
        name="fake",
        output_dir=run,
        data={"datalist": data / "datalist.tsv"},
        model={"hypernet": {"latent_dim": config_dim or dim}},
    )
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    write_latents_csv(run / "latents.csv", np.arange(n), ids, sim.latents)
    epochs = np.arange(1, 6)
    pd.DataFrame(
        {
            "epoch": epochs,
            "loss": 1.0 / epochs,
            "seg_loss": 0.9 / epochs,
            "dice_loss": 0.5 / epochs,
            "ce_loss": 0.4 / epochs,
            "l1": 0.1 / epochs,
            "latent_norm_mean": 0.05 * epochs,
            "latent_norm_max": 0.4 * epochs,
            "dice": 1 - 0.5 / epochs,
            "samples_per_s": 10.0,
        }
    ).to_csv(run / "history.csv", index=False)
    return run


STYLE_CALLS: list = []


def _predictor(style, indices):
    """Main style predicts the clean box for even indices and nothing for odd ones; an explicit latent
    (the style montages pass each style's segmenting latent) predicts the clean box everywhere."""
    out = {}
    if not isinstance(style, str):
        STYLE_CALLS.append((tuple(np.asarray(style).tolist()), tuple(indices)))
    else:
        assert style == "main"
    for i in indices:
        pred = np.zeros(SHAPE, np.int64)
        if i % 2 == 0 or not isinstance(style, str):
            pred[2:7, 3:8, 1:5] = 1
        out[i] = pred
    return out


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    run = _make_run(tmp_path_factory.mktemp("e2e"))
    summary = analyze_run(run, overrides=["top_k=4"], predictor=_predictor)
    return run, summary


def test_every_output_is_written_and_well_formed(analysed):
    run, summary = analysed
    out = run / "analysis"
    expected = {
        "suspicion.csv",
        "styles.json",
        "metrics.json",
        "latent_map.png",
        "latent_map.html",
        "loss_curves.png",
        "report.html",
    }
    assert expected == {p.name for p in out.iterdir()}
    assert set(summary["files"]) == expected
    header = (out / "suspicion.csv").read_text().splitlines()[0]
    assert header == "index,case_id,latent_norm,mean_distance,outlier_score,style,main_style_disagreement"
    table = pd.read_csv(out / "suspicion.csv", dtype={"style": str})
    assert len(table) == N and table["latent_norm"].is_monotonic_decreasing
    assert set(table["main_style_disagreement"]) == {0.0, 1.0}  # the fake predictor's two outcomes
    styles = json.loads((out / "styles.json").read_text())
    assert {"method", "params", "main_style", "styles", "n_outliers"} <= set(styles)
    assert styles["styles"][0]["id"] == "main" and styles["params"]["latent_dim"] == DIM
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"truth", "scores", "styles", "directions", "notes"} <= set(metrics)
    assert metrics["truth"]["n_evaluated"] == N
    assert set(metrics["scores"]) == {
        "latent_norm",
        "mean_distance",
        "outlier_score",
        "main_style_disagreement",
    }
    for name in ("latent_map.png", "loss_curves.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    for name in ("latent_map.html", "report.html"):
        page = (out / name).read_text()
        assert page.lstrip().startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert not external_refs(page), name
    assert not list(out.glob(".*tmp*"))


def test_summary_and_report_content(analysed):
    run, summary = analysed
    assert summary["n_cases"] == N and summary["latent_dim"] == DIM
    assert summary["n_styles"] >= 3 and summary["main_style_size"] >= 40
    table = pd.read_csv(run / "analysis" / "suspicion.csv")
    assert summary["top_suspicious"] == table["case_id"].head(5).tolist()
    assert summary["truth"].endswith("truth.csv")  # found beside the datalist
    m = summary["metrics"]
    assert m["auroc_latent_norm"] > 0.9 and m["ari_styles"] >= 0.5 and m["opposite_cosine"] < 0
    report = (run / "analysis" / "report.html").read_text()
    styles = json.loads((run / "analysis" / "styles.json").read_text())["styles"]
    # map, curves, 4 thumbnails (top_k=4), one medoid montage per style
    assert report.count("data:image/png;base64,") == 2 + 4 + len(styles)
    # Each style's montage was predicted with that style's own segmenting latent, on its medoid case.
    assert sorted(STYLE_CALLS) == sorted((tuple(s["latent"]), (s["medoid_index"],)) for s in styles)
    assert "style&#x27;s prediction (Dice)" in report or "style's prediction (Dice)" in report
    assert "Dice (main style vs given)" in report and "Metrics vs truth" in report
    for case in table["case_id"].head(4):
        assert case in report


def test_missing_run_files(tmp_path):
    with pytest.raises(RunError, match="run folder not found"):
        analyze_run(tmp_path / "nope")
    run = _make_run(tmp_path, with_data=False)
    (run / "latents.csv").unlink()
    with pytest.raises(RunError, match=r"latents\.csv: not found"):
        analyze_run(run)
    (run / "config.yaml").unlink()
    with pytest.raises(RunError, match=r"config\.yaml: not found"):
        analyze_run(run)


def test_latent_dim_mismatch(tmp_path):
    run = _make_run(tmp_path, with_data=False, config_dim=4)
    with pytest.raises(RunError, match="latents have 2 dimensions but .*latent_dim = 4"):
        analyze_run(run)


def test_truth_problems(tmp_path):
    run = _make_run(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("index,perturbation\n0,none\n500,eroded\n501,none\n")
    with pytest.raises(DataError, match=r"2 index value\(s\) not in the run: 500, 501"):
        analyze_run(run, truth=bad)
    with pytest.raises(DataError, match="truth CSV not found"):
        analyze_run(run, truth=tmp_path / "absent.csv")
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("case,kind\na,none\n")
    with pytest.raises(DataError, match="malformed.csv: needs an 'index' or 'case_id' column"):
        analyze_run(run, truth=malformed)


def test_bad_override(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    with pytest.raises(ConfigError, match="min_cluster_size"):
        analyze_run(run, overrides=["min_cluster_size=0"])
    with pytest.raises(ConfigError, match="nonsense"):
        analyze_run(run, overrides=["nonsense=1"])


def test_without_datalist_truth_or_history(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    (run / "history.csv").unlink()
    (run / "analysis").mkdir()
    (run / "analysis" / "metrics.json").write_text("{}")  # stale from an earlier analysis with truth
    summary = analyze_run(run, overrides=["analysis.min_cluster_size=4", "cluster_selection_method=leaf"])
    names = {p.name for p in (run / "analysis").iterdir()}
    assert names == {"suspicion.csv", "styles.json", "latent_map.png", "latent_map.html", "report.html"}
    assert summary["truth"] is None and summary["metrics"] == {}
    notes = " ".join(summary["notes"])
    assert "history.csv not found" in notes and "no slice thumbnails" in notes and "predictor" in notes
    styles = json.loads((run / "analysis" / "styles.json").read_text())
    assert (
        styles["params"]["min_cluster_size"] == 4 and styles["params"]["cluster_selection_method"] == "leaf"
    )
    assert "Metrics vs truth" in (run / "analysis" / "report.html").read_text()


def test_settings_and_truth_resolution(tmp_path):
    run = _make_run(tmp_path)
    cfg = load_config(run / "config.yaml")
    assert analysis_settings(cfg, ["top_k=3", "analysis.min_samples=2"]).model_dump()["top_k"] == 3
    assert resolve_truth_path(cfg, run, None) == tmp_path / "data" / "truth.csv"
    explicit = tmp_path / "data" / "truth.csv"
    assert resolve_truth_path(cfg, run, explicit) == explicit


def test_dice():
    assert dice(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == pytest.approx(2 / 3)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(np.array([1, 2, 2]), np.array([1, 2, 0]), num_classes=3) == pytest.approx((1 + 2 / 3) / 2)


def test_extra_scores_and_ranking_column(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    extra = pd.DataFrame(
        {"index": np.arange(N), "case_id": "x", "own_vs_main_disagreement": np.linspace(0, 1, N)}
    )
    with pytest.raises(ConfigError, match="cannot rank by 'nope'"):
        analyze_run(run, rank_by="nope")
    summary = analyze_run(run, extra_scores=extra, rank_by="own_vs_main_disagreement")
    table = pd.read_csv(run / "analysis" / "suspicion.csv")
    assert list(table.columns)[-1] == "own_vs_main_disagreement"
    assert table["index"].tolist() == list(range(N - 1, -1, -1))
    assert summary["rank_by"] == "own_vs_main_disagreement"


def test_train_loss_from_sample_losses_csv_is_a_score(tmp_path):
    from hypersort_ray.train.latents_io import write_sample_losses_csv

    run = _make_run(tmp_path)
    ids = pd.read_csv(run / "latents.csv")["case_id"].tolist()
    truth = pd.read_csv(tmp_path / "data" / "truth.csv")
    perturbed = (truth["voxels_changed"] > 0).to_numpy()
    loss = np.where(perturbed, 0.8, 0.2) + np.linspace(0, 0.01, N)  # perturbed cases stayed costlier
    state = {"sum": (2 * loss).tolist(), "count": [2.0] * N, "last": loss.tolist()}
    write_sample_losses_csv(run / "sample_losses.csv", state, ids)
    analyze_run(run, rank_by="train_loss")
    table = pd.read_csv(run / "analysis" / "suspicion.csv")
    assert "train_loss" in table.columns and table["train_loss"].is_monotonic_decreasing
    np.testing.assert_allclose(table.sort_values("index")["train_loss"], loss, atol=1e-6)
    metrics = json.loads((run / "analysis" / "metrics.json").read_text())
    assert metrics["scores"]["train_loss"]["auroc"] == 1.0
    # An unreadable file is a note, not a failure.
    (run / "sample_losses.csv").write_text("index,oops\n0,1\n")
    summary = analyze_run(run)
    assert any("train_loss skipped" in n for n in summary["notes"])
