"""Style discovery (``analysis.styles``) and the latent simulator it is tuned on (``analysis.simulate``)."""

from __future__ import annotations

import hdbscan
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from hypersort_ray.analysis.simulate import simulate_latents
from hypersort_ray.analysis.styles import (
    MAIN_ID,
    METHOD,
    OUTLIER_ID,
    _selected_clusters,
    assign_styles,
    default_min_cluster_size,
    discover_styles,
    style_key,
)


def _blobs(seed: int = 0, n: tuple[int, int, int] = (60, 25, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated blobs: a large one at the origin, two small ones far away."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, -3.0]])
    parts = [c + rng.normal(scale=0.1, size=(k, 2)) for c, k in zip(centres, n, strict=True)]
    truth = np.repeat(np.arange(3), n)
    return np.vstack(parts), truth


def _majority(keys: np.ndarray, truth: np.ndarray, kind: str) -> str:
    members = keys[truth == kind].tolist()
    return max(sorted(set(members)), key=members.count)


# ------------------------------------------------------------------------------------ known clusters
def test_three_blobs_give_three_styles_with_main_at_origin():
    z, truth = _blobs()
    ids = [f"c{i:03d}" for i in range(len(z))]
    model = discover_styles(z, ids)
    assert model.method == METHOD
    assert len(model.styles) == 3
    assert model.n_outliers <= 2
    assert adjusted_rand_score(truth, model.labels) > 0.95
    main = model.main
    assert main.key == "main" and main.numeric_id == MAIN_ID and main.name == "main"
    assert main.size >= 58
    np.testing.assert_allclose(main.centroid, z[truth == 0].mean(axis=0), atol=0.02)
    assert main.latent == [0.0, 0.0]  # the paper's canonical main latent
    # The others are numbered by size: 25 cases at (3, 0), 20 at (0, -3).
    s1, s2 = model.style("1"), model.style(2)
    np.testing.assert_allclose(s1.centroid, [3.0, 0.0], atol=0.06)
    np.testing.assert_allclose(s2.centroid, [0.0, -3.0], atol=0.06)
    assert s1.latent == s1.centroid
    for style in model.styles:
        rows = np.asarray(style.member_indices)
        members = z[rows]
        # The medoid is a member and minimises the summed distance to the other members.
        totals = np.linalg.norm(members[:, None] - members[None], axis=2).sum(axis=1)
        assert style.medoid_index == rows[np.argmin(totals)]
        assert style.medoid_case_id == ids[style.medoid_index]
        assert style.members == [ids[i] for i in rows]
        assert style.mean_norm == pytest.approx(np.linalg.norm(members, axis=1).mean())


def test_main_is_the_style_at_the_origin_not_the_largest():
    # The largest blob is far from the origin; the main style is still the one around λ = 0.
    rng = np.random.default_rng(1)
    z = np.vstack([rng.normal(scale=0.1, size=(40, 2)), [2.5, 2.5] + rng.normal(scale=0.1, size=(70, 2))])
    model = discover_styles(z)
    assert model.labels[:40].tolist().count(MAIN_ID) >= 38
    assert model.main.size < model.style("1").size


def test_style_lookup_and_keys():
    z, _ = _blobs()
    model = discover_styles(z)
    assert style_key(0) == "main" and style_key(-1) == "outlier" and style_key(3) == "3"
    assert model.style(0) is model.main and model.style("main") is model.main
    with pytest.raises(KeyError, match="known styles"):
        model.style("99")
    assert set(model.keys) <= {"main", "1", "2", "outlier"}
    doc = model.to_json()
    assert {"method", "params", "main_style", "styles", "n_outliers"} <= set(doc)
    assert doc["main_style"] == "main" and doc["styles"][0]["id"] == "main"
    assert {
        "id",
        "name",
        "size",
        "centroid",
        "medoid_index",
        "medoid_case_id",
        "members",
        "mean_norm",
    } <= set(doc["styles"][0])
    assert doc["params"]["min_cluster_size"] == default_min_cluster_size(len(z))
    assert doc["params"]["space"]["scatter"] == "mcd"


def test_deterministic():
    sim = simulate_latents(n_cases=120, latent_dim=4, seed=3)
    a, b = discover_styles(sim.latents), discover_styles(sim.latents)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.outlier_scores, b.outlier_scores)


# --------------------------------------------------------------------------- the simulated benchmark
@pytest.mark.parametrize("n_cases", [80, 200])
@pytest.mark.parametrize("dim", [2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_simulator_styles_match_perturbation_kinds(n_cases, dim, seed):
    sim = simulate_latents(n_cases=n_cases, latent_dim=dim, seed=seed)
    model = discover_styles(sim.latents, sim.case_ids)
    keys = np.asarray(model.keys)
    kinds = sim.truth["perturbation"].to_numpy()
    assert adjusted_rand_score(kinds, keys) >= 0.5
    eroded, dilated = _majority(keys, kinds, "eroded"), _majority(keys, kinds, "dilated")
    assert _majority(keys, kinds, "none") == "main"
    assert eroded != "main" and dilated != "main" and eroded != dilated


@pytest.mark.parametrize("seed", range(3))
def test_simulator_higher_dimension(seed):
    sim = simulate_latents(n_cases=200, latent_dim=8, seed=seed)
    model = discover_styles(sim.latents, sim.case_ids)
    assert adjusted_rand_score(sim.truth["perturbation"], model.keys) >= 0.5


def test_default_hdbscan_on_raw_latents_fails_where_styles_work():
    """The difficulty the prototype hit: plain HDBSCAN shatters the diffuse clean cloud (ARI ≈ 0)."""
    raw, ours = [], []
    for seed in range(5):
        sim = simulate_latents(n_cases=80, latent_dim=2, seed=seed)
        kinds = sim.truth["perturbation"]
        raw.append(adjusted_rand_score(kinds, hdbscan.HDBSCAN(min_cluster_size=5).fit(sim.latents).labels_))
        ours.append(adjusted_rand_score(kinds, discover_styles(sim.latents).keys))
    assert np.mean(raw) < 0.2
    assert min(ours) >= 0.6


def test_clean_dataset_is_one_main_style():
    # No label errors: everything is the main style except a few tail cases.
    sim = simulate_latents(
        n_cases=150, latent_dim=2, seed=4, eroded_fraction=0, dilated_fraction=0, hard_fraction=0
    )
    model = discover_styles(sim.latents)
    assert model.main.size >= 140
    assert all(s.size <= 6 for s in model.styles[1:])


# ---------------------------------------------------------------------------------------- assigning
def test_assign_reproduces_training_labels_and_places_new_points():
    z, _ = _blobs(seed=2)
    model = discover_styles(z)
    assert (assign_styles(model, z) == model.labels).mean() >= 0.97
    new = np.array([[0.0, 0.0], [3.02, 0.01], [0.01, -2.98], [40.0, 40.0]])
    assert assign_styles(model, new).tolist() == [MAIN_ID, 1, 2, OUTLIER_ID]
    assert model.assign(new[:1]).tolist() == [MAIN_ID]
    with pytest.raises(ValueError, match="dimension"):
        assign_styles(model, np.zeros((1, 3)))


def test_assign_on_simulated_latents_matches_fit():
    sim = simulate_latents(n_cases=200, latent_dim=4, seed=1)
    model = discover_styles(sim.latents)
    assert (assign_styles(model, sim.latents) == model.labels).mean() >= 0.97


def test_single_cluster_mode_prediction_is_repaired():
    # hdbscan 0.8.44 builds prediction data for the wrong cluster when the root is selected.
    z = np.random.default_rng(0).normal(size=(200, 2))
    model = discover_styles(z, allow_single_cluster=True, min_cluster_size=5)
    assert model.params["allow_single_cluster"] is True
    assert (assign_styles(model, z) == model.labels).mean() >= 0.97
    assert assign_styles(model, np.array([[0.0, 0.0], [50.0, 0.0]])).tolist() == [MAIN_ID, OUTLIER_ID]


def test_selected_clusters_is_the_common_ancestor():
    z = np.random.default_rng(0).normal(size=(200, 2))
    clusterer = hdbscan.HDBSCAN(min_cluster_size=5, allow_single_cluster=True).fit(z)
    raw = clusterer.condensed_tree_._raw_tree
    root = int(raw["parent"].min())
    if len(set(clusterer.labels_) - {-1}) == 1:
        assert _selected_clusters(raw, clusterer.labels_) == [root]


# ------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dim", [1, 3, 8])
def test_any_latent_dimension(dim):
    sim = simulate_latents(n_cases=100, latent_dim=dim, seed=0)
    model = discover_styles(sim.latents)
    assert model.labels.shape == (100,) and len(model.main.centroid) == dim
    assert np.isfinite(model.outlier_scores).all()


def test_tiny_run_is_one_main_style():
    model = discover_styles(np.array([[0.0, 0.1], [0.2, 0.0], [1.0, 1.0]]))
    assert model.method == "trivial"
    assert model.labels.tolist() == [0, 0, 0] and model.main.size == 3
    assert assign_styles(model, np.zeros((2, 2))).tolist() == [0, 0]


def test_identical_latents():
    model = discover_styles(np.zeros((30, 2)))
    assert model.main.size == 30


def test_overrides_and_bad_inputs():
    z, _ = _blobs()
    model = discover_styles(z, min_cluster_size=10, min_samples=3, cluster_selection_method="leaf")
    assert model.params["min_cluster_size"] == 10 and model.params["min_samples"] == 3
    assert model.params["cluster_selection_method"] == "leaf" and not model.params["min_cluster_size_default"]
    with pytest.raises(ValueError, match="non-empty"):
        discover_styles(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="NaN"):
        discover_styles(np.array([[0.0, np.nan]] * 10))
    with pytest.raises(ValueError, match="cluster_selection_method"):
        discover_styles(z, cluster_selection_method="bad")
    with pytest.raises(ValueError, match="case ids"):
        discover_styles(z, case_ids=["a"])


def test_default_min_cluster_size_scales_with_n():
    assert default_min_cluster_size(20) == 3
    assert default_min_cluster_size(200) == 6
    assert default_min_cluster_size(1204) == 36


# -------------------------------------------------------------------------------------- simulator
def test_simulator_shapes_and_geometry():
    sim = simulate_latents(n_cases=200, latent_dim=3, seed=5)
    assert sim.latents.shape == (200, 3)
    assert list(sim.truth.columns) == ["index", "case_id", "perturbation", "iterations", "voxels_changed"]
    counts = sim.truth["perturbation"].value_counts()
    assert counts["eroded"] == 15 and counts["dilated"] == 15 and counts["none"] == 170
    kinds = sim.truth["perturbation"].to_numpy()
    clean = sim.latents[kinds == "none"]
    centre = np.median(clean, axis=0)
    unit = {}
    for kind in ("eroded", "dilated"):
        d = sim.latents[kinds == kind] - centre
        unit[kind] = (d / np.linalg.norm(d, axis=1, keepdims=True)).mean(axis=0)
    cos = unit["eroded"] @ unit["dilated"] / np.linalg.norm(unit["eroded"]) / np.linalg.norm(unit["dilated"])
    assert -0.8 < cos < -0.4
    # Radius grows with the iteration count.
    eroded = sim.truth[kinds == "eroded"]
    radius = np.linalg.norm(sim.latents[kinds == "eroded"] - centre, axis=1)
    assert np.corrcoef(eroded["iterations"], radius)[0, 1] > 0.7
    assert (sim.truth.loc[kinds == "none", "voxels_changed"] == 0).all()
    np.testing.assert_array_equal(simulate_latents(n_cases=200, latent_dim=3, seed=5).latents, sim.latents)
