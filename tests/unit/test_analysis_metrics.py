"""Metrics against a truth CSV (``hypersort_ray.analysis.metrics``; the truth is read by ``data.truth``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

from hypersort_ray.analysis.metrics import align_truth, compute_metrics, direction_cosines
from hypersort_ray.analysis.scores import suspicion_table
from hypersort_ray.data.truth import read_truth_csv
from hypersort_ray.errors import DataError


def _write(tmp_path, text: str, name: str = "truth.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------------------- reading
def test_read_truth_csv(tmp_path):
    path = _write(tmp_path, "index,case_id,perturbation,voxels_changed\n0,a,none,0\n1,b,eroded,120\n")
    frame = read_truth_csv(path)
    assert frame["index"].tolist() == [0, 1] and frame["case_id"].tolist() == ["a", "b"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("case,kind\na,none\n", "needs an 'index' or 'case_id' column"),
        ("index,case_id\n0,a\n", "no truth column"),
        ("index,kind\n0,none\n0,eroded\n", "duplicated index values 0"),
        ("index,kind\nzero,none\n", "non-negative integers; bad on lines 2"),
        ("index,kind\n1.5,none\n", "non-negative integers"),
        ("case_id,kind\na,none\na,eroded\n", "duplicated case_id values a"),
        ("index,kind\n", "no rows"),
        ("", "not a readable CSV"),
        ('index,kind\n0,"unterminated\n', "not a readable CSV"),
    ],
)
def test_malformed_truth_csv(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=message) as err:
        read_truth_csv(path)
    assert str(path) in str(err.value)


def test_missing_truth_csv(tmp_path):
    with pytest.raises(DataError, match="truth CSV not found"):
        read_truth_csv(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------- joining
def test_unknown_ids_raise_naming_them():
    truth = pd.DataFrame({"index": [0, 1, 7, 9], "perturbation": ["none"] * 4})
    with pytest.raises(DataError, match=r"2 index value\(s\) not in the run: 7, 9"):
        align_truth(truth, [0, 1, 2], ["a", "b", "c"], source="t.csv")
    by_id = pd.DataFrame({"case_id": ["a", "zz"], "perturbation": ["none", "eroded"]})
    with pytest.raises(DataError, match="not in the run: zz"):
        align_truth(by_id, [0, 1], ["a", "b"])


def test_missing_truth_warns_and_uses_intersection():
    truth = pd.DataFrame({"case_id": ["c", "a"], "perturbation": ["eroded", "none"]})
    with pytest.warns(UserWarning, match=r"no truth for 1 of 3 run case\(s\) \(b\)"):
        aligned = align_truth(truth, [0, 1, 2], ["a", "b", "c"])
    assert aligned.joined_on == "case_id"
    assert aligned.rows.tolist() == [0, 2] and aligned.indices.tolist() == [0, 2]
    assert aligned.perturbed.tolist() == [False, True]
    assert aligned.missing_case_ids == ["b"]


def test_index_join_checks_case_ids():
    truth = pd.DataFrame({"index": [0, 1, 2], "case_id": ["x", "y", "z"], "perturbation": ["none"] * 3})
    with pytest.raises(DataError, match="another dataset"):
        align_truth(truth, [0, 1, 2], ["a", "b", "c"])
    # One differing id (e.g. a datalist stripping "_0000") only warns.
    truth["case_id"] = ["case_0000", "b", "c"]
    with pytest.warns(UserWarning, match="case_id differs for 1"):
        align_truth(truth, [0, 1, 2], ["case", "b", "c"])


def test_column_detection():
    frame = pd.DataFrame({"case_id": ["a", "b", "c"], "rater": ["r1", "r2", "r1"], "score": [0.1, 0.5, 0.2]})
    aligned = align_truth(frame, [0, 1, 2], ["a", "b", "c"])
    assert aligned.kind_column == "rater" and aligned.numeric_column == "score"
    # No clean value among raters: clean-vs-perturbed falls back to the numeric column (> 0).
    assert aligned.perturbed.tolist() == [True, True, True]
    numeric_only = pd.DataFrame({"index": [0, 1, 2], "voxels_changed": [0, 10, 0], "iterations": [0, 1, 0]})
    aligned = align_truth(numeric_only, [0, 1, 2], ["a", "b", "c"])
    assert aligned.kind_column is None and aligned.numeric_columns == ["voxels_changed", "iterations"]
    assert aligned.perturbed.tolist() == [False, True, False]
    assert aligned.kinds.tolist() == ["clean", "perturbed", "clean"]


# ------------------------------------------------------------------------------------------- metrics
def _run(latents: np.ndarray, styles: list[str], truth: pd.DataFrame, extra=None):
    n = len(latents)
    idx, ids = np.arange(n), [f"c{i}" for i in range(n)]
    table = suspicion_table(idx, ids, latents, np.linspace(0, 1, n), styles, extra)
    aligned = align_truth(truth, idx, ids)
    main = latents[np.asarray(styles) == "main"].mean(axis=0)
    return compute_metrics(table, aligned, latents, styles, main), table


def test_tiny_example_by_hand():
    # Norms 0.1, 0.2, 0.3, 0.4; perturbed = cases 1 and 3 -> pairs (pos, neg): (0.2 > 0.1), (0.2 < 0.3),
    # (0.4 > 0.1), (0.4 > 0.3): AUROC 3/4. AP: ranks 0.4 (pos), 0.3, 0.2 (pos), 0.1 -> (1 + 2/3) / 2.
    z = np.array([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.4, 0.0]])
    truth = pd.DataFrame(
        {
            "index": range(4),
            "perturbation": ["none", "eroded", "none", "dilated"],
            "voxels_changed": [0, 5, 0, 9],
        }
    )
    doc, _ = _run(z, ["main", "1", "main", "2"], truth)
    ln = doc["scores"]["latent_norm"]
    assert ln["auroc"] == pytest.approx(0.75)
    assert ln["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert ln["spearman"] == pytest.approx(spearmanr([0.1, 0.2, 0.3, 0.4], [0, 5, 0, 9]).statistic)
    assert ln["auroc_by_kind"] == {"dilated": 1.0, "eroded": 0.5}
    assert doc["n_perturbed"] == 2 and doc["n_clean"] == 2
    assert doc["counts"] == {"dilated": 1, "eroded": 1, "none": 2}
    assert doc["styles"]["ari"] == pytest.approx(1.0)
    assert doc["styles"]["majority_style"] == {"dilated": "2", "eroded": "1", "none": "main"}
    assert doc["styles"]["eroded_dilated_separated"] is True


def test_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    n = 80
    z = rng.normal(size=(n, 3))
    kinds = rng.choice(["none", "eroded", "dilated"], size=n, p=[0.7, 0.15, 0.15])
    vox = np.where(kinds == "none", 0, rng.integers(10, 500, size=n))
    styles = rng.choice(["main", "1", "2", "outlier"], size=n).tolist()
    extra = {"model_score": rng.random(n)}
    truth = pd.DataFrame({"index": range(n), "perturbation": kinds, "voxels_changed": vox})
    doc, table = _run(z, styles, truth, extra)
    y = kinds != "none"
    for column, values in [("latent_norm", np.linalg.norm(z, axis=1)), ("model_score", extra["model_score"])]:
        m = doc["scores"][column]
        assert m["auroc"] == pytest.approx(roc_auc_score(y, values))
        assert m["average_precision"] == pytest.approx(average_precision_score(y, values))
        assert m["spearman"] == pytest.approx(spearmanr(values, vox).statistic)
        sel = (kinds == "none") | (kinds == "eroded")
        assert m["auroc_by_kind"]["eroded"] == pytest.approx(
            roc_auc_score(kinds[sel] == "eroded", values[sel])
        )
    assert set(doc["scores"]) == {"suspicion", "latent_norm", "mean_distance", "outlier_score", "model_score"}
    assert doc["styles"]["ari"] == pytest.approx(adjusted_rand_score(kinds, styles))


def test_all_clean_gives_null_auroc_not_a_crash():
    z = np.random.default_rng(1).normal(size=(10, 2))
    truth = pd.DataFrame({"index": range(10), "perturbation": ["none"] * 10, "voxels_changed": [0] * 10})
    doc, _ = _run(z, ["main"] * 10, truth)
    for m in doc["scores"].values():
        assert m["auroc"] is None and m["average_precision"] is None and m["spearman"] is None
    assert any("only one class" in note for note in doc["notes"])
    assert doc["directions"]["opposite_sides"] is None


def test_categorical_truth_without_clean_value():
    z = np.random.default_rng(2).normal(size=(12, 2))
    truth = pd.DataFrame({"index": range(12), "rater": ["A", "B", "C"] * 4})
    doc, _ = _run(z, ["main", "1", "2"] * 4, truth)
    assert doc["scores"]["latent_norm"]["auroc"] is None
    assert doc["styles"]["ari"] == pytest.approx(1.0)
    assert any("cannot tell clean" in note for note in doc["notes"])


def test_direction_cosines_and_opposite_sides():
    z = np.array([[0.0, 0.0], [0.1, 0.0], [2.0, 0.1], [2.5, -0.1], [-1.0, 1.0], [-1.5, 1.5]])
    kinds = np.array(["none", "none", "eroded", "eroded", "dilated", "dilated"])
    cos = direction_cosines(z, kinds, reference=np.zeros(2), exclude="none")
    # eroded ≈ +x, dilated along (-1, 1): cosine ≈ -1/sqrt(2).
    assert cos["dilated|eroded"] == pytest.approx(-1 / np.sqrt(2), abs=0.05)
    truth = pd.DataFrame({"index": range(6), "perturbation": kinds})
    doc, _ = _run(z, ["main", "main", "1", "1", "2", "2"], truth)
    opposite = doc["directions"]["opposite_sides"]
    assert opposite["kinds"] == ["eroded", "dilated"] and opposite["opposite"] is True
    assert opposite["cosine"] < 0
    same = np.array([[0.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 2.0]])
    cos = direction_cosines(same, np.array(["none", "none", "eroded", "dilated"]), np.zeros(2), "none")
    assert cos["dilated|eroded"] == pytest.approx(0.0, abs=1e-12)


def test_scores_with_nan_evaluated_on_available_cases():
    z = np.array([[0.1, 0], [0.2, 0], [0.3, 0], [0.4, 0]], dtype=float)
    truth = pd.DataFrame({"index": range(4), "perturbation": ["none", "eroded", "none", "eroded"]})
    doc, _ = _run(z, ["main"] * 4, truth, extra={"m": [0.0, np.nan, 0.5, 1.0]})
    assert doc["scores"]["m"]["n"] == 3
    assert doc["scores"]["m"]["auroc"] == pytest.approx(1.0)
