"""The Ray-free training loop in one process: per-sample training losses, their checkpoint and CSV."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_model import TINY_NETWORK

from hypersort_ray.config import load_config
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.errors import ConfigError, RunError
from hypersort_ray.runs.checkpoint import load_checkpoint
from hypersort_ray.runs.tables import read_sample_losses_csv, write_sample_losses_csv
from hypersort_ray.train.loop import SampleLosses, WorkerContext, train_worker

TINY = [*TINY_NETWORK, "training.batch_size=2", "tracking.enabled=false"]


def test_sample_losses_accumulate_and_round_trip():
    rec = SampleLosses(4)
    rec.add_epoch(np.array([0, 2]), np.array([1.0, 3.0]))
    rec.add_epoch(np.array([2, 0, 1]), np.array([5.0, 2.0, float("nan")]))  # a NaN is not counted
    np.testing.assert_allclose(rec.mean(), [1.5, np.nan, 4.0, np.nan])
    assert rec.count.tolist() == [2, 0, 2, 0]
    again = SampleLosses(4, rec.state_dict())
    np.testing.assert_allclose(again.mean(), rec.mean())
    assert np.isnan(again.last[1]) and again.last[2] == 5.0
    # A record of another size (e.g. a resume on another datalist) is not used.
    assert SampleLosses(3, rec.state_dict()).count.tolist() == [0, 0, 0]


def test_sample_losses_csv(tmp_path):
    rec = SampleLosses(3)
    rec.add_epoch(np.array([0, 1]), np.array([0.5, 0.25]))
    path = write_sample_losses_csv(tmp_path / "s.csv", rec.state_dict(), ["a", "b", "c"])
    lines = path.read_text().splitlines()
    assert lines[0] == "index,case_id,train_loss_mean,train_loss_last,epochs"
    assert lines[3] == "2,c,,,0"
    assert read_sample_losses_csv(path) == {0: 0.5, 1: 0.25}
    with pytest.raises(RunError, match="3 rows for 2 cases"):
        write_sample_losses_csv(tmp_path / "t.csv", rec.state_dict(), ["a", "b"])
    bad = tmp_path / "bad.csv"
    bad.write_text("index,loss\n0,1\n")
    with pytest.raises(RunError, match="needs the columns index and train_loss_mean"):
        read_sample_losses_csv(bad)
    bad.write_text("index,train_loss_mean\nx,1\n")
    with pytest.raises(RunError, match="line 2: bad index"):
        read_sample_losses_csv(bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "synth"
    generate_dataset(out, cases=5, size=16, seed=2)
    return out


def _config(tiny: Path, out: Path, *extra: str):
    return load_config(None, [*TINY, *extra], {"data.datalist": tiny / "datalist.tsv", "output_dir": out})


def test_loop_records_every_samples_own_loss_and_resumes_it(tiny, tmp_path):
    cases = load_datalist(tiny / "datalist.tsv")
    cfg = _config(tiny, tmp_path, "training.epochs=2", "training.checkpoint_every=1")
    parts: list[Path] = []
    seen: list[dict] = []

    def report(metrics, part):
        seen.append(metrics)
        if part is not None:
            parts.append(part)

    try:
        _check_loop(cfg, cases, report, seen, parts)
    finally:  # the loop writes its checkpoint parts to fresh temp folders, as for Ray
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)


def _check_loop(cfg, cases, report, seen, parts):
    result = train_worker(cfg, cases, WorkerContext(report=report))
    losses = SampleLosses(len(cases), result.sample_losses)
    assert losses.count.tolist() == [2] * len(cases)  # every sample, once per epoch
    mean = losses.mean()
    assert np.isfinite(mean).all() and (mean > 0).all()
    # The per-sample losses average to the epoch's reported seg loss (every sample counted once).
    last_epoch = SampleLosses(len(cases))
    last_epoch.add_epoch(np.arange(len(cases)), losses.last)
    assert last_epoch.mean().mean() == pytest.approx(seen[-1]["seg_loss"], rel=1e-6)
    # Saved with the checkpoint and continued on resume: counts go on from 2.
    ck = load_checkpoint(parts[-1])
    assert ck.extra["sample_losses"]["count"] == [2.0] * len(cases)
    more = cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 3})})
    resumed = train_worker(more, cases, WorkerContext(report=report, resume_from=parts[-1]))
    assert SampleLosses(len(cases), resumed.sample_losses).count.tolist() == [3] * len(cases)
    assert not math.isnan(resumed.sample_losses["sum"][0])
    # A resume continues only on the run's own datalist, and only with more epochs to train.
    with pytest.raises(RunError, match="sample identity is the datalist index"):
        train_worker(more, cases[:-1], WorkerContext(resume_from=parts[-1]))
    with pytest.raises(ConfigError, match="already trained 3 epochs"):
        train_worker(cfg, cases, WorkerContext(resume_from=parts[-1]))


def test_loader_workers_prepare_the_same_batches(tiny, tmp_path):
    """Batches prepared ahead by DataLoader processes train exactly like batches made in the loop,
    random augmentation included (its seed depends on the step, not on the process)."""
    cases = load_datalist(tiny / "datalist.tsv")
    augment = ["preprocessing.augment.enabled=true", "preprocessing.augment.flip_prob=0.5",
               "preprocessing.augment.noise_std=0.05", "data.cache=none"]
    results = [
        train_worker(_config(tiny, tmp_path / str(w), "training.epochs=2", f"data.loader_workers={w}", *augment), cases)
        for w in (0, 2)
    ]
    for a, b in zip(results[0].history, results[1].history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    np.testing.assert_allclose(results[0].latent_state["values"], results[1].latent_state["values"], rtol=1e-6)


def test_cosine_schedule_sets_hs_lr_per_step_and_a_resume_continues_the_curve(tiny, tmp_path):
    """The loop steps H at the schedule's learning rate (recorded per epoch), and a resumed run continues
    the same curve: equal to the uninterrupted run."""
    from hypersort_ray.model.step import scheduled_lr

    cases = load_datalist(tiny / "datalist.tsv")
    sched = ["training.lr_schedule=cosine", "training.warmup_fraction=0.25", "training.checkpoint_every=1"]
    cfg = _config(tiny, tmp_path / "a", "training.epochs=4", *sched)
    parts: list[Path] = []
    try:
        whole = train_worker(cfg, cases, WorkerContext(report=lambda m, p: parts.append(p) if p else None))
        n_steps = whole.history[0]["global_step"]
        for row in whole.history:  # the last step's lr of each epoch
            e = row["epoch"] - 1
            assert row["lr"] == pytest.approx(scheduled_lr(cfg.training.lr, e + (n_steps - 1) / n_steps, 4, "cosine", 1))
        assert whole.history[0]["lr"] < cfg.training.lr  # still warming up in epoch 1
        assert whole.history[-1]["lr"] < whole.history[1]["lr"]  # decaying
        # Resume after epoch 2 and finish: the same numbers as the uninterrupted run.
        resumed = train_worker(cfg, cases, WorkerContext(resume_from=parts[1]))
        assert resumed.history[-1]["lr"] == pytest.approx(whole.history[-1]["lr"])
        assert resumed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-5)
        np.testing.assert_allclose(resumed.latent_state["values"], whole.latent_state["values"], rtol=1e-5)
    finally:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)


def test_schedule_settings_are_checked(tiny, tmp_path):
    with pytest.raises(ConfigError, match="warmup_fraction"):
        _config(tiny, tmp_path, "training.warmup_fraction=1")
    with pytest.raises(ConfigError, match="lr_schedule"):
        _config(tiny, tmp_path, "training.lr_schedule=linear")
    # The paper's configuration keeps its constant learning rate.
    paper = load_config(Path(__file__).parents[2] / "configs" / "paper_amos.yaml")
    assert (paper.training.lr_schedule, paper.training.warmup_fraction) == ("constant", 0.0)
