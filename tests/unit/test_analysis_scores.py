"""Suspicion scores and the ranked table (``hypersort_ray.analysis.scores``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hypersort_ray.analysis import scores
from hypersort_ray.analysis.scores import (
    BASE_COLUMNS,
    latent_norm,
    mean_distance,
    rank_cases,
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
    assert table["case_id"].tolist() == ["b", "c", "a", "d"]  # by latent norm, descending
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
        == "index,case_id,latent_norm,mean_distance,outlier_score,style,main_style_disagreement"
    )
    back = pd.read_csv(path, dtype={"style": str})
    assert back["case_id"].tolist() == table["case_id"].tolist()
    assert back["style"].tolist() == table["style"].tolist()
    np.testing.assert_allclose(back["latent_norm"], table["latent_norm"], rtol=1e-5)
    assert back["main_style_disagreement"].isna().sum() == 1
    assert not list(tmp_path.joinpath("out").glob(".*tmp*"))  # no temporary file left behind
