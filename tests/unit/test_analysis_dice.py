"""The one Dice (``hypersort_ray.analysis.dice``): its rule for a class absent from both maps, and that
every analysis module uses it.

The sweep's validation Dice and the analysis' scores must agree on multi-class labels, so both use
``dice_score`` with its default rule: a class absent from both maps is left out of the mean.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypersort_ray.analysis.dice import dice_score


def test_binary_and_empty_maps():
    assert dice_score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == pytest.approx(2 / 3)
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0
    assert dice_score(np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1])) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice_score(np.zeros(3), np.zeros(4))


def test_three_classes_with_one_absent_from_both_maps():
    # Class 1 overlaps 1 of 2 + 1 voxels (Dice 2/3); class 2 appears in neither map.
    given = np.array([[0, 1, 1, 0], [0, 0, 0, 0]])
    predicted = np.array([[0, 1, 0, 0], [0, 0, 0, 0]])
    assert dice_score(predicted, given, num_classes=3) == pytest.approx(2 / 3)  # class 2 left out
    assert dice_score(predicted, given, num_classes=3, empty="one") == pytest.approx((2 / 3 + 1) / 2)
    # The sweep scores (B, 1, *spatial) tensors: the same maps as tensors give the same number.
    as_tensors = dice_score(torch.as_tensor(predicted)[None, None], torch.as_tensor(given)[None, None], 3)
    assert as_tensors == dice_score(predicted, given, 3)
    # A class present in one map only counts 0 (not skipped).
    one_sided = dice_score(np.array([0, 1, 2]), np.array([0, 1, 1]), num_classes=3)
    assert one_sided == pytest.approx((2 / 3 + 0) / 2)


def test_every_analysis_module_uses_the_one_dice():
    from hypersort_ray.analysis import baselines, correct, figures, model_scores, run

    for module in (baselines, correct, figures, model_scores, run):
        assert module.dice_score is dice_score, module.__name__
