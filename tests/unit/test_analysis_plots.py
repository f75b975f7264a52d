"""Figures (``hypersort_ray.analysis.plots``) and the report page (``hypersort_ray.analysis.report``)."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from hypersort_ray.analysis import plots
from hypersort_ray.analysis.report import CaseThumbnail, ReportInputs, build_report
from hypersort_ray.analysis.scores import suspicion_table
from hypersort_ray.analysis.styles import discover_styles

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


def _fixture(dim: int = 2, n: int = 40):
    rng = np.random.default_rng(dim)
    z = np.vstack([rng.normal(scale=0.1, size=(n - 10, dim)), 2.0 + rng.normal(scale=0.1, size=(10, dim))])
    ids = [f"c{i}" for i in range(n)]
    model = discover_styles(z, ids)
    table = suspicion_table(np.arange(n), ids, z, model.outlier_scores, model.keys)
    return z, ids, model, table


def test_embedding_uses_latent_dims_for_d2_and_pca_otherwise():
    z = np.random.default_rng(0).normal(size=(20, 2))
    emb = plots.embed_2d(z)
    assert emb.how == "latent" and emb.xlabel == "z0" and emb.ylabel == "z1"
    np.testing.assert_array_equal(emb.xy, z)
    z4 = np.random.default_rng(0).normal(size=(30, 4)) * [3.0, 1.0, 0.1, 0.1]
    emb = plots.embed_2d(z4)
    assert emb.how == "pca" and emb.xlabel.startswith("PC1") and "% var." in emb.ylabel
    # PCA keeps distances in the dominant plane; the origin is projected like the data.
    centred = z4 - z4.mean(axis=0)
    assert np.var(emb.xy[:, 0]) == pytest.approx(np.linalg.svd(centred, compute_uv=False)[0] ** 2 / 30)
    np.testing.assert_allclose(plots.embed_2d(np.vstack([z4, np.zeros(4)])).xy[-1], emb.origin, atol=0.1)
    assert plots.embed_2d(np.ones((5, 1))).how == "latent"


@pytest.mark.parametrize("dim", [2, 5])
def test_latent_map_png(dim):
    z, ids, model, table = _fixture(dim)
    kinds = ["none"] * 30 + ["eroded"] * 10
    png = plots.latent_map_png(z, model.keys, ids, highlight=[0, 35], kinds=kinds)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert plots.latent_map_png(z, model.keys, ids).startswith(PNG_MAGIC)


def test_external_refs_detects_network_resources():
    page = '<script src="https://cdn.plot.ly/p.js"></script><img src="data:image/png;base64,AA">'
    page += "<link href='//fonts.example/x.css'><a href='map.html'>map</a>"
    page += '<script>var u = "<img src=https://not.a.tag>";</script>'
    assert external_refs(page) == ["https://cdn.plot.ly/p.js", "//fonts.example/x.css"]


def test_latent_map_html_is_self_contained_with_hover():
    z, ids, model, table = _fixture()
    thumb = plots.data_uri(plots.slice_montage_png(np.random.rand(6, 6, 3), np.ones((6, 6, 3))))
    page = plots.latent_map_html(z, table.sort_values("index"), thumbnails={3: thumb}, kinds=["none"] * 40)
    assert page.startswith("<!DOCTYPE html>")
    assert not external_refs(page)
    assert "Plotly" in page  # plotly.js is inlined, not loaded
    assert "plotly_hover" in page and "hs-thumb" in page
    assert thumb.replace("/", "\\u002f") in page  # plotly's JSON escapes "/"
    assert "c35" in page and "latent_norm" in page and "outlier_score" in page


def test_loss_curves_png():
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "loss": [1.0, 0.5, 0.3],
            "seg_loss": [0.9, 0.4, 0.25],
            "l1": [0.1, 0.09, 0.05],
            "dice": [0.2, 0.6, 0.8],
            "latent_norm_mean": [0.05, 0.1, 0.2],
            "auroc_latent_norm": [0.5, 0.7, 0.9],
        }
    )
    assert plots.loss_curves_png(history).startswith(PNG_MAGIC)
    assert plots.loss_curves_png(history[["loss"]]).startswith(PNG_MAGIC)  # no epoch column
    with pytest.raises(ValueError, match="no metric column"):
        plots.loss_curves_png(pd.DataFrame({"epoch": [1], "other": [2]}))


def test_mid_slice_and_montage():
    label = np.zeros((8, 8, 10))
    label[2:5, 2:5, 6:9] = 1
    assert plots.mid_slice_index(label) == 7
    assert plots.mid_slice_index(label, axis=0) == 3
    assert plots.mid_slice_index(np.zeros((4, 4, 6))) == 3
    image = np.random.default_rng(0).normal(size=(8, 8, 10))
    two = plots.slice_montage_png(image, label)
    three = plots.slice_montage_png(image, label, prediction=label[::-1])
    assert two.startswith(PNG_MAGIC) and three.startswith(PNG_MAGIC) and len(three) > len(two)
    assert plots.slice_montage_png(image[..., 0], label[..., 7]).startswith(PNG_MAGIC)  # a 2-D slice


def test_style_colors_are_stable():
    colors = plots.style_colors(["main", "2", "1", "outlier", "10"])
    assert colors["main"] != colors["1"] != colors["2"]
    assert colors == plots.style_colors(["10", "1", "2", "main", "outlier"])
    assert plots.style_label("3") == "style 3" and plots.style_label("outlier") == "outliers"


def test_report_page():
    z, ids, model, table = _fixture()
    thumb = CaseThumbnail(plots.slice_montage_png(np.random.rand(6, 6, 3), np.ones((6, 6, 3))), dice=0.8)
    metrics = {
        "truth": {
            "source": "t.csv",
            "joined_on": "index",
            "numeric_column": "voxels_changed",
            "n_evaluated": 40,
        },
        "scores": {
            "latent_norm": {
                "auroc": 0.9,
                "average_precision": 0.7,
                "spearman": 0.4,
                "auroc_by_kind": {"eroded": 0.9},
            },
            "outlier_score": {"auroc": None, "average_precision": 0.2, "spearman": 0.1, "auroc_by_kind": {}},
        },
        "styles": {"ari": 0.8, "crosstab": {"none": {"main": 30}, "eroded": {"1": 10}}, "majority_style": {}},
        "directions": {"opposite_sides": {"kinds": ["eroded", "dilated"], "cosine": -0.6, "opposite": True}},
        "notes": ["a note <b>escaped</b>"],
    }
    page = build_report(
        ReportInputs(
            run_dir="/runs/x",
            run_name="demo <run>",
            datalist="data/datalist.tsv",
            truth="t.csv",
            styles=model,
            table=table,
            top_k=5,
            rank_by="latent_norm",
            latent_map_png=plots.latent_map_png(z, model.keys, ids),
            latent_map_html="map.html",
            loss_curves_png=None,
            ranking_csv="ranking.csv",
            metrics=metrics,
            thumbnails={int(table["index"].iloc[0]): thumb},
            settings={"analysis config": {"top_k": 5}},
            notes=["datalist missing"],
        )
    )
    assert not external_refs(page)
    assert "demo &lt;run&gt;" in page and "&lt;b&gt;escaped" in page
    for section in (
        "Dataset summary",
        "Latent map",
        "Styles",
        "Top 5 suspicious",
        "Metrics vs truth",
        "Settings",
    ):
        assert section in page
    assert page.count("data:image/png;base64,") == 2  # map + one thumbnail
    assert "0.900" in page and "n/a" in page and "opposite sides" in page
    assert "href='map.html'" in page and "Full ranking: <code>ranking.csv</code>" in page
