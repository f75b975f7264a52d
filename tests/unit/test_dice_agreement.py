"""The sweep's objective and the analysis report score a segmentation with the same Dice, also on a
multi-class label where a class is absent from both the label and the prediction (one definition:
hypersort_ray/analysis/dice.py)."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers_model import make_tiny_run

from hypersort_ray.analysis.dice import dice_score
from hypersort_ray.analysis.run import analyze_run
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.runs import RunDir


def _three_class_run(tmp_path):
    """A tiny run whose config maps label values to 3 classes; the binary labels never use class 2."""
    run = RunDir(make_tiny_run(tmp_path, with_styles=False))
    cfg = run.read_config()
    label = cfg.preprocessing.label.model_copy(update={"class_map": {1: 1, 2: 2}})
    cfg = cfg.model_copy(update={
        "preprocessing": cfg.preprocessing.model_copy(update={"label": label}),
        "model": cfg.model.model_copy(update={"unet": cfg.model.unet.model_copy(update={"out_channels": 3})}),
    })
    run.write_config(cfg)
    return run, load_datalist(cfg.data.datalist)


def _prediction(label_path) -> np.ndarray:
    """The label with half of its foreground dropped (class 2 stays absent from both maps)."""
    label = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
    pred = label.copy()
    fg = np.flatnonzero(pred > 0)
    pred.reshape(-1)[fg[: len(fg) // 2]] = 0
    return pred


def test_sweep_objective_and_analysis_agree_on_three_classes(tmp_path, monkeypatch):
    import hypersort_ray.tune.trial as trial

    run, cases = _three_class_run(tmp_path)
    case = cases[0]
    pred = _prediction(case.label)
    label = np.asarray(nib.load(case.label).dataobj)
    present_only = dice_score(pred, label, 3)
    assert present_only < 0.99 and present_only != pytest.approx((present_only + 1) / 2)

    # The analysis: main-style disagreement = 1 - Dice(main-style prediction, given label).
    def predictor(style, indices):
        return {int(i): _prediction(cases[int(i)].label) for i in indices}

    analyze_run(run.path, predictor=predictor, overrides=["top_k=1"])
    table = pd.read_csv(run.analysis.suspicion_csv).set_index("index")
    analysis_dice = 1.0 - float(table.loc[case.index, "main_style_disagreement"])

    # The sweep: held-out Dice of λ = 0 on the same case and prediction (the fake model "prepares" a
    # case by its label path and predicts the same half-dropped label as the analysis' predictor).
    fake = SimpleNamespace(
        styles=[SimpleNamespace(id="main")], num_classes=3, config=run.read_config(),
        prepare=lambda path: path, predict=lambda prepared, style: {"mask": _prediction(prepared)},
    )
    monkeypatch.setattr(trial, "load_model", lambda ref, cache_size=8: fake)
    held_out = [{"index": case.index, "case_id": case.case_id, "image": str(case.label), "label": str(case.label)}]
    sweep_dice = trial.evaluate_validation(run.path, held_out, all_styles=False)["val_dice"]

    assert analysis_dice == pytest.approx(present_only)
    assert sweep_dice == pytest.approx(analysis_dice)
