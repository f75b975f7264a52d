"""Label-error detection on the synthetic benchmark: HyperSORT's scores vs out-of-fold baselines.

One run of the whole comparison, on phantoms with known perturbations (``hypersort synth``):

1. generate ``--cases`` volumes of ``--size``³ with ``--perturbations paper|subtle|mixed``;
2. train HyperSORT for ``--epochs`` (in-process loop ``train_worker`` by default, the same code Ray
   Train runs per worker; ``--trainer ray`` uses ``run_training`` with ``--workers`` Ray workers) and
   write a normal run folder;
3. score every case with
   * the paper's latent scores: ``latent_norm`` = ‖λ_n‖₂ and ``mean_distance`` = mean_m ‖λ_m − λ_n‖₂,
   * ``train_loss``: each case's own Dice+CE loss during HyperSORT training, averaged over the epochs
     (the run's per-sample loss table; no extra compute),
   * the model-based scores (:func:`hypersort_ray.analysis.model_scores.model_scores`):
     ``main_style_disagreement`` and ``own_vs_main_disagreement``,
   * the baselines at equal compute (:func:`hypersort_ray.analysis.baselines.run_baselines`, k-fold
     plain UNet, ``epochs_per_fold = round(E / (k − 1))``): ``test_dice`` and ``cleanlab``;
4. against the truth (a case is positive when its label was perturbed, ``voxels_changed > 0``):
   AUROC, average precision and Spearman's ρ with ``voxels_changed`` (all cases), per score, plus
   AUROC per perturbation kind (that kind vs the clean cases) in the JSON;
5. styles: the run's latent analysis (``hypersort analyze``), adjusted Rand index of the styles vs the
   perturbation kind (``--no-styles`` skips);
6. correction: ``hypersort correct --style main`` on every case, mean Dice of the given and of the
   corrected label against ``labels_clean/``, for perturbed and clean cases (``--no-correct`` skips).

Usage::

    python benchmarks/detection.py --perturbations subtle --cases 200 --size 64 --epochs 60 \\
        --json detection_subtle.json [--config configs/demo.yaml] [--set key=value ...] [--threads 2]

Smoke (minutes on 2 cores): ``--cases 16 --size 24 --epochs 3``. Prints the table on stdout, progress
and timings on stderr; ``--json`` also holds the settings, timings and every case's scores.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCORES = (
    "latent_norm",
    "mean_distance",
    "train_loss",
    "main_style_disagreement",
    "own_vs_main_disagreement",
    "test_dice",
    "cleanlab",
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ training
def _config(args: argparse.Namespace, data: Path, run_dir: Path):
    from hypersort_ray.config import load_config

    base = load_config(args.config, args.set)
    factor = 2**base.model.unet.n_down if base.model.unet.kind == "hypersort_unet" else 16
    roi = int(math.ceil(args.size / factor) * factor)  # the volume is padded up to a valid ROI
    overrides = [
        f"preprocessing.roi_size=[{roi},{roi},{roi}]",
        f"preprocessing.spacing=[{args.spacing},{args.spacing},{args.spacing}]",
        f"training.epochs={args.epochs}",
        f"training.seed={args.seed}",
        f"data.datalist={data / 'datalist.tsv'}",
        f"output_dir={run_dir}",
        "tracking.enabled=false",
        "analysis.run_after_training=false",
        f"training.scaling.num_workers={args.workers if args.trainer == 'ray' else 1}",
        *(args.set or []),  # the user's overrides win
    ]
    return load_config(args.config, overrides)


def _train_in_process(cfg, cases, run_dir: Path, device: str) -> dict[str, Any]:
    import torch

    from hypersort_ray.runs import RunDir
    from hypersort_ray.runs.checkpoint import save_checkpoint
    from hypersort_ray.train.loop import WorkerContext, train_worker

    def report(metrics: dict[str, Any], part: Path | None) -> None:
        _log(
            f"  epoch {metrics['epoch']:>3}: loss {metrics['loss']:.4f} dice {metrics['dice']:.3f} "
            f"|λ| mean {metrics['latent_norm_mean']:.3f}"
            + (f" auroc|λ| {metrics['auroc_latent_norm']:.3f}" if "auroc_latent_norm" in metrics else "")
        )
        if part is not None:  # the loop's checkpoint parts: the final state is saved below instead
            shutil.rmtree(part, ignore_errors=True)

    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    result = train_worker(cfg, cases, WorkerContext(device=torch.device(device), report=report))
    last = result.history[-1]
    case_ids = [c.case_id for c in cases]
    save_checkpoint(
        run.checkpoint_dir,
        latent_state=result.latent_state,
        hyper_state=result.hyper_state,
        config=cfg,
        epoch=int(last["epoch"]),
        global_step=int(last["global_step"]),
        case_ids=case_ids,
        extra={"history": result.history},
    )
    state = result.latent_state
    run.write_latents(state["indices"], [case_ids[i] for i in state["indices"].tolist()], state["values"])
    run.write_history(result.history)
    run.write_sample_losses(result.sample_losses, case_ids)
    return {
        "epochs": int(last["epoch"]),
        "final_loss": float(last["loss"]),
        "final_dice": float(last["dice"]),
    }


def _train_ray(cfg) -> dict[str, Any]:
    from hypersort_ray.train.trainer import run_training

    summary = run_training(cfg, progress=True)
    return {k: summary.get(k) for k in ("epochs", "loss", "dice", "seconds")}


# ------------------------------------------------------------------------------------------- metrics
def latent_scores(latents):
    """‖λ_n‖₂ and the paper's isolation score mean_m ‖λ_m − λ_n‖₂ (self included, as in §4.2)."""
    import numpy as np
    from scipy.spatial.distance import cdist

    z = np.asarray(latents, dtype=np.float64)
    return np.linalg.norm(z, axis=1), cdist(z, z).mean(axis=1)


def detection_metrics(score, truth) -> dict[str, Any]:
    """AUROC / AP (perturbed vs clean), Spearman with voxels_changed, AUROC per perturbation kind."""
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.asarray(score, dtype=np.float64)
    changed = truth["voxels_changed"].to_numpy(dtype=np.float64)
    positive = changed > 0
    out: dict[str, Any] = {"auroc": None, "average_precision": None, "spearman": None, "auroc_by_kind": {}}
    if not np.isfinite(s).all():
        return out
    if 0 < positive.sum() < len(positive):
        out["auroc"] = float(roc_auc_score(positive, s))
        out["average_precision"] = float(average_precision_score(positive, s))
        kinds = truth["perturbation"].astype(str).to_numpy()
        for kind in sorted(set(kinds[positive])):
            sel = (kinds == kind) | ~positive
            out["auroc_by_kind"][kind] = float(roc_auc_score(positive[sel], s[sel]))
    if np.ptp(s) > 0 and np.ptp(changed) > 0:
        rho = spearmanr(s, changed).statistic
        out["spearman"] = float(rho) if np.isfinite(rho) else None
    return out


def _styles(run_dir: Path, truth_csv: Path) -> dict[str, Any]:
    """Styles of the trained run (``hypersort analyze --latent-only``) and their agreement with the truth."""
    from hypersort_ray.analysis.run import analyze_run
    from hypersort_ray.runs import RunDir

    summary = analyze_run(run_dir, truth=truth_csv)
    metrics = RunDir(run_dir).read_metrics()
    st = metrics.get("styles") or {}
    return {
        "n_styles": summary.get("n_styles"),
        "ari": st.get("ari"),
        "ari_without_outliers": st.get("ari_without_outliers"),
        "crosstab": st.get("crosstab"),
        "eroded_dilated_separated": st.get("eroded_dilated_separated"),
        "opposite_sides": (metrics.get("directions") or {}).get("opposite_sides"),
    }


def correction_quality(run_dir: Path, cases, data: Path, truth, out: Path, device: str) -> dict[str, Any]:
    """Correct every case with the main style; Dice of the given and of the corrected label vs the clean one.

    The clean label of a case is ``labels_clean/`` + the file name of its given label (the synthetic
    generator's layout). Reported per group (perturbed / clean cases): mean Dice(given, clean),
    mean Dice(corrected, clean), and how many cases got better / worse.
    """
    import nibabel as nib
    import numpy as np

    from hypersort_ray.analysis.correct import correct_cases
    from hypersort_ray.analysis.dice import dice_score
    from hypersort_ray.inference import load_model

    model = load_model(run_dir, device=device)
    summary = correct_cases(run_dir, model, ",".join(c.case_id for c in cases), style="main", out_dir=out)
    changed = dict(zip(truth["index"], truth["voxels_changed"], strict=True))
    groups: dict[str, dict[str, list[float]]] = {
        "perturbed": {"given": [], "corrected": []},
        "clean": {"given": [], "corrected": []},
    }
    for case in cases:
        clean_path = data / "labels_clean" / Path(case.label).name
        if not clean_path.exists():
            raise SystemExit(f"{clean_path}: no clean label for case {case.case_id}")
        clean = np.asarray(nib.load(clean_path).dataobj) > 0
        given = np.asarray(nib.load(case.label).dataobj) > 0
        corrected = np.asarray(nib.load(out / f"{case.case_id}.nii.gz").dataobj) > 0
        g = groups["perturbed" if changed[case.index] > 0 else "clean"]
        g["given"].append(dice_score(given, clean))
        g["corrected"].append(dice_score(corrected, clean))
    result: dict[str, Any] = {"style": summary["style"], "cases": summary["cases"]}
    for name, g in groups.items():
        given, corrected = np.asarray(g["given"]), np.asarray(g["corrected"])
        result[name] = {
            "n": int(len(given)),
            "dice_given_vs_clean": float(given.mean()) if len(given) else None,
            "dice_corrected_vs_clean": float(corrected.mean()) if len(given) else None,
            "improved": int((corrected > given + 1e-9).sum()),
            "worse": int((corrected < given - 1e-9).sum()),
        }
    return result


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'score':<26} {'AUROC':>6} {'AP':>6} {'Spearman(voxels_changed)':>25}"]
    for name in SCORES:
        m = results["scores"].get(name)
        if m is None:
            continue
        lines.append(
            f"{name:<26} {_fmt(m['auroc'])} {_fmt(m['average_precision'])} {_fmt(m['spearman']):>25}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import torch

    from hypersort_ray.analysis.baselines import equal_compute_epochs, run_baselines
    from hypersort_ray.analysis.evaluation import load_run_cases, read_run_latents
    from hypersort_ray.analysis.model_scores import model_scores
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.inference import load_model
    from hypersort_ray.runs import RunDir

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hypersort-detection-"))
    data, run_dir = out / "data", out / "run"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    _log(f"[1/7] synthetic data: {args.cases} cases, {args.size}³, {args.perturbations} -> {data}")
    synth = generate_dataset(
        data,
        cases=args.cases,
        size=args.size,
        seed=args.seed,
        perturbations=args.perturbations,
        spacing=args.spacing,
    )
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = _config(args, data, run_dir)
    _log(f"[2/7] HyperSORT: {args.epochs} epochs ({args.trainer}) -> {run_dir}")
    if args.trainer == "ray":
        train = _train_ray(cfg)
    else:
        from hypersort_ray.data.datalist import load_datalist

        train = _train_in_process(cfg, load_datalist(data / "datalist.tsv"), run_dir, args.device)
    timings["hypersort_train_s"] = time.perf_counter() - t

    _, cases = load_run_cases(run_dir)
    # Rows are matched by sample index (the synthetic truth's case ids may be spelled differently).
    truth = pd.read_csv(data / "truth.csv").sort_values("index").reset_index(drop=True)
    table = pd.DataFrame({"index": [c.index for c in cases], "case_id": [c.case_id for c in cases]})

    t = time.perf_counter()
    _log("[3/7] latent scores")
    table["latent_norm"], table["mean_distance"] = latent_scores(read_run_latents(run_dir, cases))
    losses = RunDir(run_dir).read_sample_losses() or {}
    table["train_loss"] = [losses.get(int(i), math.nan) for i in table["index"]]
    timings["latent_scores_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if not args.no_model_scores:
        _log("[4/7] model-based scores (main-style and own-λ UNets)")
        # cache_size 0: each case's own UNet is used once; only the main one is held (by model_scores).
        model = load_model(RunDir(run_dir).checkpoint_dir, device=args.device, cache_size=0)
        ms = model_scores(run_dir, model, progress=True)
        table = table.merge(ms.drop(columns="case_id"), on="index", how="left")
    timings["model_scores_s"] = time.perf_counter() - t

    t = time.perf_counter()
    baseline_epochs = args.baseline_epochs or equal_compute_epochs(cfg.training.epochs, args.folds)
    if not args.no_baselines:
        _log(f"[5/7] baselines: {args.folds}-fold plain UNet, {baseline_epochs} epochs per fold")
        bl = run_baselines(
            run_dir,
            folds=args.folds,
            epochs=baseline_epochs,
            progress=True,
            seed=args.seed,
            device=args.device,
        )
        table = table.merge(bl.drop(columns="case_id"), on="index", how="left")
        table["fold"] = [bl.attrs["fold"][i] for i in table["index"]]
    timings["baselines_s"] = time.perf_counter() - t

    t = time.perf_counter()
    styles = None
    if not args.no_styles:
        _log("[6/7] styles: latent analysis vs the truth (ARI)")
        styles = _styles(run_dir, data / "truth.csv")
    timings["styles_s"] = time.perf_counter() - t

    t = time.perf_counter()
    correction = None
    if not args.no_correct:
        _log("[7/7] correction: `hypersort correct --style main` on every case, Dice vs labels_clean/")
        correction = correction_quality(run_dir, cases, data, truth, out / "corrected", args.device)
    timings["correct_s"] = time.perf_counter() - t

    if len(truth) != len(table) or truth["index"].tolist() != table["index"].tolist():
        raise SystemExit(f"{data / 'truth.csv'}: rows do not match the datalist")
    table = table.merge(truth[["index", "perturbation", "voxels_changed"]], on="index")
    scores = {name: detection_metrics(table[name], truth) for name in SCORES if name in table}
    return {
        "settings": {
            "perturbations": args.perturbations,
            "cases": args.cases,
            "size": args.size,
            "epochs": args.epochs,
            "trainer": args.trainer,
            "folds": args.folds,
            "baseline_epochs": baseline_epochs,
            "equal_compute_rule": "baseline_epochs = round(epochs / (folds - 1))",
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "network": cfg.model.unet.model_dump(mode="json"),
            "hypernet": cfg.model.hypernet.model_dump(mode="json"),
            "l1_weight": cfg.training.l1_weight,
            "latent_lr": cfg.training.latent.lr,
            "out": str(out),
        },
        "counts": synth.get("counts"),
        "n_perturbed": int((truth["voxels_changed"] > 0).sum()),
        "train": train,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}
        | {"total": round(sum(timings.values()), 1)},
        "scores": scores,
        "styles": styles,
        "correction": correction,
        "cases": json.loads(table.to_json(orient="records")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--perturbations", choices=["paper", "subtle", "mixed"], default="paper")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="volume edge (voxels)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel spacing (mm) of data and model")
    parser.add_argument("--epochs", type=int, default=60, help="HyperSORT epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config", type=Path, default=None, help="experiment config (default: embedded demo)"
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--folds", type=int, default=3, help="baseline cross-validation folds")
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        default=None,
        help="epochs per fold (default: equal compute, round(epochs / (folds - 1)))",
    )
    parser.add_argument("--trainer", choices=["inprocess", "ray"], default="inprocess")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers with --trainer ray")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (in-process training, scores, baselines)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder (default: a new temp folder, kept)"
    )
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--no-model-scores", action="store_true")
    parser.add_argument("--no-styles", action="store_true", help="skip the style analysis (ARI)")
    parser.add_argument("--no-correct", action="store_true", help="skip the correction check")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    results = run(args)
    s = results["settings"]
    baselines = (
        "baselines skipped"
        if args.no_baselines
        else f"baselines {s['folds']}-fold x {s['baseline_epochs']} epochs (equal compute)"
    )
    print(
        f"detection: {s['perturbations']}, {s['cases']} cases at {s['size']}³ "
        f"({results['n_perturbed']} perturbed), HyperSORT {s['epochs']} epochs, {baselines}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(format_table(results))
    if results.get("styles"):
        st = results["styles"]
        print(
            f"styles: {st['n_styles']} found; ARI vs perturbation kind {_fmt(st['ari'])} "
            f"({_fmt(st['ari_without_outliers'])} without outliers); eroded/dilated in different styles: "
            f"{st['eroded_dilated_separated']}"
        )
    if results.get("correction"):
        c = results["correction"]
        for group in ("perturbed", "clean"):
            g = c[group]
            if g["n"]:
                print(
                    f"correct --style {c['style']}, {group} cases ({g['n']}): Dice vs labels_clean "
                    f"given {g['dice_given_vs_clean']:.3f} -> corrected {g['dice_corrected_vs_clean']:.3f} "
                    f"({g['improved']} improved, {g['worse']} worse)"
                )
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
