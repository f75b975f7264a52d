"""``analyze_run`` (the latent analysis) end to end on a run folder built through ``RunDir``."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.analysis.run import analysis_settings, analyze_run
from hypersort_ray.analysis.simulate import simulate_latents
from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.truth import resolve_truth_path
from hypersort_ray.errors import ConfigError, DataError, ProvenanceError, RunError
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import save_checkpoint
from hypersort_ray.runs.styles import PROVENANCE_KEY

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
) -> RunDir:
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
    run = RunDir(root / "run")
    run.path.mkdir(parents=True)
    cfg = ExperimentConfig(
        name="fake",
        output_dir=run.path,
        data={"datalist": data / "datalist.tsv"},
        model={"hypernet": {"latent_dim": config_dim or dim}},
    )
    run.write_config(cfg)
    run.write_latents(np.arange(n), ids, sim.latents)
    run.write_history(
        [
            {
                "epoch": e,
                "loss": 1.0 / e,
                "seg_loss": 0.9 / e,
                "dice_loss": 0.5 / e,
                "ce_loss": 0.4 / e,
                "l1": 0.1 / e,
                "latent_norm_mean": 0.05 * e,
                "latent_norm_max": 0.4 * e,
                "dice": 1 - 0.5 / e,
                "samples_per_s": 10.0,
            }
            for e in range(1, 6)
        ]
    )
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


def _names(*paths: Path) -> set[str]:
    return {p.name for p in paths}


def test_every_output_is_written_and_well_formed(analysed):
    run, summary = analysed
    out = run.analysis
    written = (
        out.suspicion_csv,
        out.styles_json,
        out.metrics_json,
        out.latent_map_png,
        out.latent_map_html,
        out.loss_curves_png,
        out.report_html,
    )
    assert _names(*written, out.provenance_json) == {p.name for p in out.folder.iterdir()}
    assert set(summary["files"]) == _names(*written)
    header = out.suspicion_csv.read_text().splitlines()[0]
    assert header == (
        "index,case_id,suspicion,flagged_by,latent_norm,mean_distance,outlier_score,style,"
        "main_style_disagreement,error_i,error_j,error_k,error_x_mm,error_y_mm,error_z_mm,error_volume_ml"
    )
    table = pd.read_csv(out.suspicion_csv, dtype={"style": str})
    assert len(table) == N and table["suspicion"].is_monotonic_decreasing
    assert set(table["main_style_disagreement"]) == {0.0, 1.0}  # the fake predictor's two outcomes
    styles = run.read_styles()
    assert {"method", "params", "main_style", "styles", "n_outliers", PROVENANCE_KEY} <= set(styles)
    assert styles["styles"][0]["id"] == "main" and styles["params"]["latent_dim"] == DIM
    metrics = run.read_metrics()
    assert {"truth", "scores", "styles", "directions", "notes"} <= set(metrics)
    assert metrics["truth"]["n_evaluated"] == N
    assert set(metrics["scores"]) == {
        "suspicion",
        "latent_norm",
        "mean_distance",
        "outlier_score",
        "main_style_disagreement",
    }
    for path in (out.latent_map_png, out.loss_curves_png):
        assert path.read_bytes().startswith(PNG_MAGIC)
    for path in (out.latent_map_html, out.report_html):
        page = path.read_text()
        assert page.lstrip().startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert not external_refs(page), path.name
    assert not list(out.folder.glob(".*tmp*"))


def test_summary_and_report_content(analysed):
    run, summary = analysed
    assert summary["n_cases"] == N and summary["latent_dim"] == DIM
    assert summary["n_styles"] >= 3 and summary["main_style_size"] >= 40
    table = pd.read_csv(run.analysis.suspicion_csv)
    assert summary["top_suspicious"] == table["case_id"].head(5).tolist()
    assert summary["truth"].endswith("truth.csv")  # found beside the datalist
    m = summary["metrics"]
    assert m["auroc_latent_norm"] > 0.9 and m["ari_styles"] >= 0.5 and m["opposite_cosine"] < 0
    report = run.analysis.report_html.read_text()
    styles = run.read_styles()["styles"]
    # map, curves, 4 thumbnails (top_k=4), one medoid montage per style
    assert report.count("data:image/png;base64,") == 2 + 4 + len(styles)
    # Each style's montage was predicted with that style's own segmenting latent, on its medoid case, and
    # each of the top 4 cases with its own latent (the own-style row of its location montage).
    latents = pd.read_csv(run.latents_csv).set_index("index")
    own = [(tuple(latents.loc[i, ["z0", "z1"]].tolist()), (int(i),)) for i in table["index"].head(4)]
    expected = [(tuple(s["latent"]), (s["medoid_index"],)) for s in styles] + own
    def rounded(calls):
        return sorted((tuple(round(v, 5) for v in z), i) for z, i in calls)

    assert rounded(STYLE_CALLS) == rounded(expected)
    assert "slices through the largest disagreement" in report and "What the scores mean" in report
    assert "style&#x27;s prediction (Dice)" in report or "style's prediction (Dice)" in report
    assert "Dice (main style vs given)" in report and "Metrics vs truth" in report
    # The report links the interactive map and names the full ranking by their file names.
    assert f"href='{run.analysis.latent_map_html.name}'" in report
    assert f"<code>{run.analysis.suspicion_csv.name}</code>" in report
    for case in table["case_id"].head(4):
        assert case in report


def test_missing_run_files(tmp_path):
    with pytest.raises(RunError, match="run folder .*not found"):
        analyze_run(tmp_path / "nope")
    run = _make_run(tmp_path, with_data=False)
    run.latents_csv.unlink()
    with pytest.raises(RunError, match=re.escape(f"{run.latents_csv}: not found")):
        analyze_run(run)
    run.config_path.unlink()
    with pytest.raises(RunError, match=re.escape(f"{run.config_path}: not found")):
        analyze_run(run)
    assert not run.analysis.folder.exists()  # nothing written before the inputs are read


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


def test_a_failing_analysis_leaves_the_previous_one_valid(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    analyze_run(run)
    before = run.read_suspicion()
    with pytest.raises(ConfigError, match="min_cluster_size"):
        analyze_run(run, overrides=["min_cluster_size=0"])
    assert run.read_suspicion() == before  # still tied to the checkpoint: nothing was rewritten


def test_bad_override(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    with pytest.raises(ConfigError, match="min_cluster_size"):
        analyze_run(run, overrides=["min_cluster_size=0"])
    with pytest.raises(ConfigError, match="nonsense"):
        analyze_run(run, overrides=["nonsense=1"])


def test_without_datalist_truth_or_history(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    run.history_csv.unlink()
    run.analysis.folder.mkdir()
    run.analysis.metrics_json.write_text("{}")  # stale from an earlier analysis with truth
    summary = analyze_run(run, overrides=["analysis.min_cluster_size=4", "cluster_selection_method=leaf"])
    out = run.analysis
    assert {p.name for p in out.folder.iterdir()} == _names(
        out.suspicion_csv, out.styles_json, out.latent_map_png, out.latent_map_html, out.report_html,
        out.provenance_json,
    )
    assert summary["truth"] is None and summary["metrics"] == {}
    notes = " ".join(summary["notes"])
    assert f"{run.history_csv.name} not found" in notes
    assert "no slice thumbnails" in notes and "predictor" in notes
    styles = run.read_styles()
    assert (
        styles["params"]["min_cluster_size"] == 4 and styles["params"]["cluster_selection_method"] == "leaf"
    )
    assert "Metrics vs truth" in out.report_html.read_text()


def test_settings_and_truth_resolution(tmp_path):
    run = _make_run(tmp_path)
    cfg = run.read_config()
    assert analysis_settings(cfg, ["top_k=3", "analysis.min_samples=2"]).model_dump()["top_k"] == 3
    found = resolve_truth_path(None, cfg.data.truth, cfg.data.datalist, base=run.path)
    assert found == tmp_path / "data" / "truth.csv"  # beside the datalist
    explicit = tmp_path / "data" / "truth.csv"
    assert resolve_truth_path(explicit, cfg.data.truth, cfg.data.datalist, base=run.path) == explicit


def test_extra_scores_and_ranking_column(tmp_path):
    run = _make_run(tmp_path, with_data=False)
    extra = pd.DataFrame(
        {"index": np.arange(N), "case_id": "x", "own_vs_main_disagreement": np.linspace(0, 1, N)}
    )
    with pytest.raises(ConfigError, match="cannot rank by 'nope'"):
        analyze_run(run, rank_by="nope")
    summary = analyze_run(run, extra_scores=extra, rank_by="own_vs_main_disagreement")
    table = pd.read_csv(run.analysis.suspicion_csv)
    assert list(table.columns)[-1] == "own_vs_main_disagreement"
    assert table["index"].tolist() == list(range(N - 1, -1, -1))
    assert summary["rank_by"] == "own_vs_main_disagreement"


def test_train_loss_from_the_sample_losses_is_a_score(tmp_path):
    run = _make_run(tmp_path)
    ids = run.read_latents()[1]
    truth = pd.read_csv(tmp_path / "data" / "truth.csv")
    perturbed = (truth["voxels_changed"] > 0).to_numpy()
    loss = np.where(perturbed, 0.8, 0.2) + np.linspace(0, 0.01, N)  # perturbed cases stayed costlier
    state = {"sum": (2 * loss).tolist(), "count": [2.0] * N, "last": loss.tolist()}
    run.write_sample_losses(state, ids)
    analyze_run(run, rank_by="train_loss")
    table = pd.read_csv(run.analysis.suspicion_csv)
    assert "train_loss" in table.columns and table["train_loss"].is_monotonic_decreasing
    np.testing.assert_allclose(table.sort_values("index")["train_loss"], loss, atol=1e-6)
    assert run.read_metrics()["scores"]["train_loss"]["auroc"] == 1.0
    # An unreadable file is a note, not a failure.
    run.sample_losses_csv.write_text("index,oops\n0,1\n")
    summary = analyze_run(run)
    assert any("train_loss skipped" in n for n in summary["notes"])


# ------------------------------------------------------------------------------------ provenance
def _recording_writes(monkeypatch) -> list[Path]:
    """Every atomic write from now on, in order (all writers of the project go through atomic_write_via)."""
    import hypersort_ray.atomic as atomic

    order: list[Path] = []
    real = atomic.atomic_write_via

    def record(path, write, *, suffix=""):
        order.append(Path(path))
        return real(path, write, suffix=suffix)

    monkeypatch.setattr(atomic, "atomic_write_via", record)
    return order


def _replace_checkpoint(run: RunDir, epoch: int) -> None:
    """A new final checkpoint, as a resumed training leaves it (same weights, more epochs)."""
    ckpt = run.load_checkpoint()
    save_checkpoint(
        run.checkpoint_dir,
        latent_state=ckpt.latents,
        hyper_state=ckpt.hyper_state,
        config=ckpt.config,
        epoch=epoch,
        global_step=epoch,
        case_ids=ckpt.case_ids,
    )


def test_provenance_is_written_last_and_names_the_checkpoint(tmp_path, monkeypatch):
    run = RunDir(make_tiny_run(tmp_path, with_styles=False))
    order = _recording_writes(monkeypatch)
    summary = analyze_run(run)
    assert order[-1] == run.analysis.provenance_json
    assert set(order[:-1]) == {Path(p) for p in summary["files"].values()}
    doc = json.loads(run.analysis.provenance_json.read_text())
    assert doc[PROVENANCE_KEY] == run.checkpoint_sha256() is not None
    assert doc["files"] == sorted(summary["files"])
    assert run.read_styles()[PROVENANCE_KEY] == run.checkpoint_sha256()
    run.check_analysis()  # does not raise


def test_outputs_of_an_older_checkpoint_are_refused_until_analysed_again(tmp_path):
    run = RunDir(make_tiny_run(tmp_path, with_styles=False))
    analyze_run(run)
    _replace_checkpoint(run, epoch=2)
    for read in (run.read_styles, run.read_suspicion, run.read_metrics, run.check_analysis):
        with pytest.raises(ProvenanceError, match="re-run `hypersort analyze"):
            read()
    analyze_run(run)
    assert run.read_styles()[PROVENANCE_KEY] == run.checkpoint_sha256()
    assert len(run.read_suspicion()) == 6


def test_an_interrupted_analysis_is_refused(tmp_path, monkeypatch):
    run = RunDir(make_tiny_run(tmp_path, with_styles=False))
    analyze_run(run)
    import hypersort_ray.analysis.run as run_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "atomic_write_text", crash)  # the report and the interactive map
    with pytest.raises(OSError, match="disk full"):
        analyze_run(run)
    with pytest.raises(ProvenanceError, match="missing"):
        run.read_suspicion()  # a half-rewritten folder never passes for a complete analysis
