"""Suspicion scores and the ranked table (``hypersort_ray.analysis.scores``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hypersort_ray.analysis import scores
from hypersort_ray.analysis.scores import (
    BASE_COLUMNS,
    LAMBDA_FLAG,
    MODEL_FLAG,
    combine_scores,
    flagged_by,
    latent_norm,
    mean_distance,
    rank_cases,
    score_columns,
    suspicion_table,
    write_suspicion_csv,
)


def _brute_mean_distance(z: np.ndarray) -> np.ndarray:
    return np.array([np.mean([np.linalg.norm(a - b) for b in z]) for a in z])


def test_latent_norm_and_mean_distance_by_hand():
    z = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert latent_norm(z).tolist() == [0.0, 5.0, 4.0]
    # |0-1| = 5, |0-2| = 4, |1-2| = 3; each mean over all 3 (self included).
    np.testing.assert_allclose(mean_distance(z), [(5 + 4) / 3, (5 + 3) / 3, (4 + 3) / 3])


@pytest.mark.parametrize("dim", [1, 2, 8])
def test_mean_distance_matches_brute_force(dim, monkeypatch):
    z = np.random.default_rng(dim).normal(size=(57, dim))
    monkeypatch.setattr(scores, "_CHUNK", 10)  # exercise the row blocks
    np.testing.assert_allclose(mean_distance(z), _brute_mean_distance(z), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(latent_norm(z), np.sqrt((z**2).sum(axis=1)))


def test_mean_distance_of_duplicates_is_zero():
    assert mean_distance(np.ones((4, 3))).tolist() == [0.0] * 4


def _table(**kwargs) -> pd.DataFrame:
    z = np.array([[0.1, 0.0], [2.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    return suspicion_table(
        indices=[10, 11, 12, 13],
        case_ids=["a", "b", "c", "d"],
        latents=z,
        outlier_scores=np.array([0.1, 0.9, 0.5, 0.0]),
        styles=["main", "1", "outlier", "main"],
        **kwargs,
    )


def test_table_columns_and_ranking():
    table = _table()
    assert tuple(table.columns) == BASE_COLUMNS
    assert table["case_id"].tolist() == ["b", "c", "a", "d"]  # latent-only: suspicion ranks by latent norm
    assert table["index"].tolist() == [11, 12, 10, 13]
    assert table["style"].tolist() == ["1", "outlier", "main", "main"]
    np.testing.assert_allclose(table["latent_norm"], [2.0, 1.0, 0.1, 0.0])


def test_extra_scores_and_other_ranking():
    extra = {"main_style_disagreement": [0.3, np.nan, 0.9, 0.1]}
    table = _table(extra=extra, rank_by="main_style_disagreement")
    assert list(table.columns) == [*BASE_COLUMNS, "main_style_disagreement"]
    # NaN (not computed) sorts last.
    assert table["case_id"].tolist() == ["c", "a", "d", "b"]
    assert rank_cases(table, "outlier_score")["case_id"].tolist() == ["b", "c", "a", "d"]


def test_ties_broken_by_index():
    table = suspicion_table([5, 2, 9], ["x", "y", "z"], np.zeros((3, 2)), np.zeros(3), ["main"] * 3)
    assert table["index"].tolist() == [2, 5, 9]


def test_bad_inputs():
    with pytest.raises(ValueError, match="clashes"):
        _table(extra={"latent_norm": [0, 0, 0, 0]})
    with pytest.raises(ValueError, match="shape"):
        _table(extra={"x": [0, 1]})
    with pytest.raises(ValueError, match="cannot rank by 'nope'"):
        _table(rank_by="nope")
    with pytest.raises(ValueError, match="cannot rank by 'style'"):
        _table(rank_by="style")


def test_csv_round_trip(tmp_path):
    table = _table(extra={"main_style_disagreement": [0.3, np.nan, 0.9, 0.1]})
    path = write_suspicion_csv(table, tmp_path / "out" / "ranking.csv")
    text = path.read_text()
    assert (
        text.splitlines()[0]
        == "index,case_id,suspicion,flagged_by,latent_norm,mean_distance,outlier_score,style,"
        "main_style_disagreement"
    )
    back = pd.read_csv(path, dtype={"style": str})
    assert back["case_id"].tolist() == table["case_id"].tolist()
    assert back["style"].tolist() == table["style"].tolist()
    np.testing.assert_allclose(back["latent_norm"], table["latent_norm"], rtol=1e-5)
    assert back["main_style_disagreement"].isna().sum() == 1
    assert not list(tmp_path.joinpath("out").glob(".*tmp*"))  # no temporary file left behind


# -------------------------------------------------------------------------- the combined ranking
def test_robust_z_and_percentile_rank():
    np.testing.assert_allclose(scores.robust_z([1.0, 2.0, 3.0, np.nan]), [-1 / 1.4826, 0, 1 / 1.4826, np.nan])
    # A zero MAD falls back to the mean absolute deviation; all equal gives zeros, not NaN.
    assert np.isfinite(scores.robust_z([0.0, 0.0, 0.0, 5.0])).all()
    assert scores.robust_z([2.0, 2.0]).tolist() == [0.0, 0.0]
    assert scores.percentile_rank([np.nan, 1.0, 3.0]).tolist()[1:] == [0.5, 1.0]


def test_suspicion_takes_the_larger_rank_of_the_lambda_and_the_model_evidence():
    # b: a style of its own far from λ = 0, agreeing model; c: the main style disagrees (a non-style
    # error); a: in the main style with some ‖λ‖, which does not count there; d: neither.
    table = _table(extra={"main_style_disagreement": [0.05, 0.02, 0.9, 0.01]})
    by_case = table.set_index("case_id")
    assert table["case_id"].tolist()[:2] in (["b", "c"], ["c", "b"])  # both lead the default ranking
    assert by_case.loc["b", "suspicion"] == by_case.loc["c", "suspicion"] == 1.0
    assert by_case.loc["a", "suspicion"] == 0.75  # its model rank only
    assert by_case.loc["d", "suspicion"] == min(table["suspicion"])
    assert list(table.columns[:4]) == ["index", "case_id", "suspicion", "flagged_by"]
    assert by_case.loc["b", "flagged_by"] == LAMBDA_FLAG and by_case.loc["d", "flagged_by"] == ""


def test_combine_methods_and_missing_evidence():
    table = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "b": [3.0, np.nan, 1.0, 0.0], "c": np.nan})
    assert combine_scores(table, ["a", "b"], "rank_max").tolist() == [1.0, 2 / 4, 3 / 4, 1.0]
    np.testing.assert_allclose(combine_scores(table, ["a", "b"], "rank_mean"), [(0.25 + 1) / 2, 0.5, (0.75 + 2 / 3) / 2, (1 + 1 / 3) / 2])
    # An all-NaN or absent column is left out; no usable column at all gives NaN.
    np.testing.assert_array_equal(combine_scores(table, ["a", "c", "zzz"]), combine_scores(table, ["a"]))
    assert np.isnan(combine_scores(table, ["c"])).all()
    assert combine_scores(table, ["a", "b"], "z_max").argmax() in (0, 3)
    with pytest.raises(ValueError, match="unknown combination"):
        combine_scores(table, ["a"], "median")
    # A column that counts only outside the main style: left out for main-style cases...
    table["style"] = ["main", "main", "1", "outlier"]
    gated = combine_scores(table, ["b", "a"], "rank_max", outside_main=["a"])
    np.testing.assert_allclose(gated, [1.0, np.nan, 0.75, 1.0])
    # ... unless it is the only evidence (a latent-only analysis): then it ranks every case.
    np.testing.assert_array_equal(combine_scores(table, ["a"], outside_main=["a"]), combine_scores(table, ["a"]))
    for spec in scores.CANDIDATES.values():
        assert spec["method"] in ("rank_max", "rank_mean", "z_max", "z_mean")
    assert scores.DEFAULT_SUSPICION in scores.CANDIDATES.values()


def test_flagged_by_names_the_evidence_that_stands_out():
    n = 30
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {"latent_norm": rng.uniform(0.0, 0.1, n), "main_style_disagreement": rng.uniform(0.05, 0.1, n)}
    )
    table.loc[0, "latent_norm"] = 3.0
    table.loc[1, "main_style_disagreement"] = 0.9
    table.loc[2, ["latent_norm", "main_style_disagreement"]] = [3.0, 0.9]
    flags = flagged_by(table)
    assert flags[0] == LAMBDA_FLAG and flags[1] == MODEL_FLAG
    assert flags[2] == f"{LAMBDA_FLAG}; {MODEL_FLAG}"
    assert set(flags[3:]) == {""}
    assert flagged_by(table.drop(columns="main_style_disagreement"))[1] == ""  # latent-only analysis
    # With styles, the λ evidence flags the cases outside the main style.
    table["style"] = ["1"] + ["main"] * (n - 1)
    assert flagged_by(table)[0] == LAMBDA_FLAG and flagged_by(table)[2] == MODEL_FLAG


def test_locations_are_not_scores():
    table = _table(locations={"error_volume_ml": [1.0, 2.0, 3.0, 4.0]})
    assert "error_volume_ml" in table.columns and "error_volume_ml" not in score_columns(table)
    with pytest.raises(ValueError, match="cannot rank by 'error_volume_ml'"):
        rank_cases(table, "error_volume_ml")
    with pytest.raises(ValueError, match="clashes"):
        _table(extra={"suspicion": [0, 0, 0, 0]})
