"""Label-error detection, the matrix: HyperSORT's scores vs out-of-fold baselines on every benchmark set.

For every set (``paper``, ``subtle``, ``mixed`` phantoms and the ``brain`` real-anatomy set of
``hypersort synth``) and every seed, one *cell* in ``OUT/<set>_s<seed>/``, built in stages (a stage
whose output exists is skipped, so an interrupted matrix continues where it stopped):

1. ``data``: ``hypersort synth`` (``--cases`` volumes of ``--size``³; brain: its own spacing);
2. ``train``: HyperSORT with Ray Train (``--workers`` workers, the embedded defaults, ``--epochs``): a
   normal run folder, latent trajectory included;
3. ``baselines``: ``analyze --baselines``' k-fold plain UNets at equal compute (Test-Dice, cleanlab);
4. ``crossfit``: ``analyze --crossfit K``: K HyperSORT folds in parallel, λ fitted out of fold;
5. ``analyze``: ``hypersort analyze --maps`` with the truth (every score, the default ``suspicion``
   ranking, styles, the largest disagreement component per case and its map);
6. ``evaluate`` (always): AUROC / AP overall and per kind of every score column of ``suspicion.csv``,
   styles ARI (brain: reference + protocols only, the non-style errors left out), localisation hit
   rate (the largest disagreement component overlaps the truly changed voxels, ``labels`` vs
   ``labels_clean``, in the label's grid), minutes per stage.

Then ``OUT/summary.md``: one table per set (each cell ``seed 0 / seed 1 / ...``) and the candidate
combinations of :func:`hypersort_ray.analysis.scores.combine_scores` evaluated on every cell (how the
default was chosen: the best worst case over the whole matrix, never one set).

Usage::

    python benchmarks/detection.py --out /tmp/detection --sets paper subtle mixed brain --seeds 0 1 \\
        --cases 60 --size 32 --epochs 40 [--stages data train baselines crossfit analyze] [--threads 2]

Smoke (minutes on 2 cores): ``--sets paper --seeds 0 --cases 16 --size 24 --epochs 3``. Progress on
stderr; the summary on stdout and in ``OUT/summary.md``; every cell's numbers in ``OUT/<cell>/result.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SETS = ("paper", "subtle", "mixed", "brain")
STAGES = ("data", "train", "baselines", "crossfit", "analyze")
# Score columns shown first in the tables (others follow in suspicion.csv's order).
ORDER = (
    "suspicion",
    "latent_norm",
    "mean_distance",
    "outlier_score",
    "train_loss",
    "main_style_disagreement",
    "own_vs_main_disagreement",
    "trajectory_mean_norm",
    "trajectory_path_length",
    "trajectory_exit",
    "crossfit_latent_norm",
    "crossfit_loss_drop",
    "crossfit_main_disagreement",
    "test_dice",
    "cleanlab",
)

log = logging.getLogger("detection")


def _log(message: str) -> None:
    log.info(message)


# --------------------------------------------------------------------------------------------- cell
class Cell:
    """One (set, seed) of the matrix and its work folder."""

    def __init__(self, out: Path, name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self.folder = out / f"{name}_s{seed}"
        self.data = self.folder / "data"
        self.run = self.folder / "run"
        self.timings_json = self.folder / "timings.json"
        self.result_json = self.folder / "result.json"

    @property
    def key(self) -> str:
        return self.folder.name

    def timings(self) -> dict[str, float]:
        return json.loads(self.timings_json.read_text()) if self.timings_json.is_file() else {}

    def record(self, stage: str, seconds: float) -> None:
        times = self.timings() | {stage: round(seconds, 1)}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.timings_json.write_text(json.dumps(times, indent=1))


def _stage_data(cell: Cell, args: argparse.Namespace) -> None:
    from hypersort_ray.data.synthetic import generate_dataset

    if (cell.data / "truth.csv").is_file():
        return
    t = time.perf_counter()
    brain = cell.name == "brain"
    generate_dataset(
        cell.data,
        cases=args.cases,
        size=args.size,
        seed=cell.seed,
        perturbations="paper" if brain else cell.name,
        spacing=None if brain else args.spacing,
        dataset="brain" if brain else "phantoms",
    )
    cell.record("data", time.perf_counter() - t)


def _data_spacing(cell: Cell) -> float:
    """The synthetic set's voxel spacing (the model trains at it: no resampling, as the phantoms)."""
    return float(json.loads((cell.data / "synth.json").read_text())["spacing"])


def _config(cell: Cell, args: argparse.Namespace):
    from hypersort_ray.config import load_config

    base = load_config(args.config, args.set)
    factor = 2**base.model.unet.n_down if base.model.unet.kind == "hypersort_unet" else 16
    roi = int(math.ceil(args.size / factor) * factor)  # the volume is padded up to a valid ROI
    spacing = _data_spacing(cell)
    overrides = [
        f"preprocessing.roi_size=[{roi},{roi},{roi}]",
        f"preprocessing.spacing=[{spacing},{spacing},{spacing}]",
        f"training.epochs={args.epochs}",
        f"training.seed={cell.seed}",
        f"data.datalist={cell.data / 'datalist.tsv'}",
        f"output_dir={cell.run}",
        "tracking.enabled=false",
        "analysis.run_after_training=false",
        f"training.scaling.num_workers={args.workers}",
        *(args.set or []),  # the user's overrides win
    ]
    return load_config(args.config, overrides)


def _stage_train(cell: Cell, args: argparse.Namespace) -> None:
    from hypersort_ray.runs import RunDir
    from hypersort_ray.train.trainer import run_training

    if RunDir(cell.run).has_checkpoint():
        return
    for attempt in (1, 2):  # a shared machine can take Ray down under a run: one more try
        if cell.run.exists():  # an unfinished run of this benchmark's own folder: start it again
            shutil.rmtree(cell.run)
        t = time.perf_counter()
        try:
            run_training(_config(cell, args), progress=False)
        except Exception:
            if attempt == 2:
                raise
            log.exception("%s: training failed, trying once more", cell.key)
            continue
        cell.record("train", time.perf_counter() - t)
        return


def _stage_baselines(cell: Cell, args: argparse.Namespace) -> None:
    from hypersort_ray.analysis.baselines import run_baselines
    from hypersort_ray.runs import RunDir

    run = RunDir(cell.run)
    if run.read_baselines() is not None:
        return
    t = time.perf_counter()
    run.begin_analysis()
    run_baselines(run, folds=args.folds, seed=cell.seed, device=args.device)
    cell.record("baselines", time.perf_counter() - t)


def _stage_crossfit(cell: Cell, args: argparse.Namespace) -> None:
    from hypersort_ray.crossfit import run_crossfit
    from hypersort_ray.runs import RunDir

    run = RunDir(cell.run)
    if run.read_crossfit() is not None:
        return
    t = time.perf_counter()
    run.begin_analysis()
    run_crossfit(run, folds=args.crossfit_folds, seed=cell.seed, device=args.device)
    cell.record("crossfit", time.perf_counter() - t)


def _stage_analyze(cell: Cell, args: argparse.Namespace) -> None:
    from hypersort_ray import pipeline

    t = time.perf_counter()
    pipeline.analyze(cell.run, truth=cell.data / "truth.csv", maps=True, device=args.device)
    cell.record("analyze", time.perf_counter() - t)


STAGE_FUNCTIONS = {
    "data": _stage_data,
    "train": _stage_train,
    "baselines": _stage_baselines,
    "crossfit": _stage_crossfit,
    "analyze": _stage_analyze,
}


# ---------------------------------------------------------------------------------------- evaluate
def score_columns(table) -> list[str]:
    """The suspicion table's score columns (numeric, not the index or a location)."""
    import pandas as pd

    from hypersort_ray.analysis.scores import NON_SCORE_COLUMNS

    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    cols = [c for c in numeric if c not in NON_SCORE_COLUMNS]
    return [c for c in ORDER if c in cols] + [c for c in cols if c not in ORDER]


def detection_metrics(score, positive, kinds) -> dict[str, Any]:
    """AUROC / AP (perturbed vs clean) and AUROC per kind (that kind vs the clean cases)."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.asarray(score, dtype=np.float64)
    ok = np.isfinite(s)
    out: dict[str, Any] = {"auroc": None, "average_precision": None, "auroc_by_kind": {}, "n": int(ok.sum())}
    y = positive[ok]
    if not 0 < y.sum() < len(y):
        return out
    out["auroc"] = float(roc_auc_score(y, s[ok]))
    out["average_precision"] = float(average_precision_score(y, s[ok]))
    for kind in sorted(set(kinds[positive].tolist())):
        sel = ok & ((kinds == kind) | ~positive)
        if 0 < (kinds[sel] == kind).sum() < sel.sum():
            out["auroc_by_kind"][kind] = float(roc_auc_score(kinds[sel] == kind, s[sel]))
    return out


def localisation_hits(cell: Cell, truth) -> dict[str, Any]:
    """Per perturbed case: does the largest disagreement component (``analyze --maps``) overlap the
    voxels the perturbation changed (``labels`` vs ``labels_clean``)?"""
    import nibabel as nib
    import numpy as np

    from hypersort_ray.analysis.localisation import largest_component
    from hypersort_ray.runs import RunDir

    files = RunDir(cell.run).analysis
    hits: dict[str, bool] = {}
    for row in truth.itertuples(index=False):
        if row.voxels_changed <= 0:
            continue
        name = f"{row.case_id}.nii.gz"
        given = np.asarray(nib.load(cell.data / "labels" / name).dataobj)
        clean = np.asarray(nib.load(cell.data / "labels_clean" / name).dataobj)
        path = files.disagreement_map(row.case_id)
        if not path.is_file():
            hits[row.case_id] = False
            continue
        component = largest_component(np.asarray(nib.load(path).dataobj) > 0)
        hits[row.case_id] = bool(component is not None and np.any(component & (given != clean)))
    kinds = dict(zip(truth["case_id"], truth["perturbation"], strict=True))
    by_kind: dict[str, list[bool]] = {}
    for case, hit in hits.items():
        by_kind.setdefault(kinds[case], []).append(hit)
    return {
        "hit_rate": float(np.mean(list(hits.values()))) if hits else None,
        "hits": int(sum(hits.values())),
        "n": len(hits),
        "by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "missed": sorted(c for c, h in hits.items() if not h),
    }


def style_agreement(cell: Cell, table, truth) -> dict[str, Any]:
    """ARI of the styles vs the kind: all cases, and (brain) the reference + protocols only."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from hypersort_ray.data.anatomy import PROTOCOLS

    styles = table.set_index("index").loc[truth["index"], "style"].astype(str).to_numpy()
    kinds = truth["perturbation"].astype(str).to_numpy()
    out = {"n_styles": len(set(styles) - {"outlier"}), "ari": float(adjusted_rand_score(kinds, styles))}
    if cell.name == "brain":
        keep = np.isin(kinds, ("none", *PROTOCOLS))
        out["ari_protocols"] = float(adjusted_rand_score(kinds[keep], styles[keep]))
        clustered = keep & (styles != "outlier")
        out["ari_protocols_without_outliers"] = float(adjusted_rand_score(kinds[clustered], styles[clustered]))
    crosstab: dict[str, dict[str, int]] = {}
    for k, s in zip(kinds, styles, strict=True):
        crosstab.setdefault(k, {}).setdefault(s, 0)
        crosstab[k][s] += 1
    out["crosstab"] = crosstab
    return out


def evaluate(cell: Cell) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from hypersort_ray.runs import RunDir

    run = RunDir(cell.run)
    run.check_analysis()
    table = pd.read_csv(run.analysis.suspicion_csv)
    # Baselines or cross-fitted scores saved after the analysis ran: their columns join by index.
    for saved in (run.read_baselines(), run.read_crossfit()):
        if saved is not None:
            new = [c for c in saved.columns if c not in table.columns and c != "case_id"]
            table = table.merge(saved[["index", *new]], on="index", how="left")
    truth = pd.read_csv(cell.data / "truth.csv").sort_values("index").reset_index(drop=True)
    aligned = table.set_index("index").loc[truth["index"]].reset_index()
    positive = truth["voxels_changed"].to_numpy() > 0
    kinds = truth["perturbation"].astype(str).to_numpy()
    scores = {c: detection_metrics(aligned[c], positive, kinds) for c in score_columns(aligned)}
    result = {
        "cell": cell.key,
        "set": cell.name,
        "seed": cell.seed,
        "n_cases": len(truth),
        "counts": {k: int(v) for k, v in pd.Series(kinds).value_counts().sort_index().items()},
        "n_perturbed": int(positive.sum()),
        "scores": scores,
        "styles": style_agreement(cell, aligned, truth),
        "localisation": localisation_hits(cell, truth),
        "timings_s": cell.timings(),
        "top_k_perturbed": int(positive[np.argsort(-aligned["suspicion"].to_numpy())][: positive.sum()].sum())
        if "suspicion" in aligned
        else None,
    }
    cell.result_json.write_text(json.dumps(result, indent=1))
    return result


def candidate_table(cells: list[Cell]) -> list[dict[str, Any]]:
    """Every candidate combination of :func:`~hypersort_ray.analysis.scores.combine_scores` on every cell."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from hypersort_ray.analysis.scores import CANDIDATES, combine_scores

    rows = []
    for name, spec in CANDIDATES.items():
        row: dict[str, Any] = {"candidate": name}
        for cell in cells:
            from hypersort_ray.runs import RunDir

            path = RunDir(cell.run).analysis.suspicion_csv
            if not path.is_file():
                continue
            table = pd.read_csv(path)
            for saved in (RunDir(cell.run).read_baselines(), RunDir(cell.run).read_crossfit()):
                if saved is not None:
                    new = [c for c in saved.columns if c not in table.columns and c != "case_id"]
                    table = table.merge(saved[["index", *new]], on="index", how="left")
            truth = pd.read_csv(cell.data / "truth.csv").set_index("index").loc[table["index"]]
            positive = truth["voxels_changed"].to_numpy() > 0
            if any(c not in table for c in spec["columns"]):
                continue
            score = combine_scores(table, **spec)
            row[cell.key] = float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else None
        values = [v for k, v in row.items() if k != "candidate" and v is not None]
        row["min"] = float(np.min(values)) if values else None
        row["mean"] = float(np.mean(values)) if values else None
        rows.append(row)
    return sorted(rows, key=lambda r: -(r["min"] or 0))


# ----------------------------------------------------------------------------------------- summary
def _f(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _joined(values: list[Any]) -> str:
    return " / ".join(_f(v) for v in values)


def set_table(name: str, results: list[dict[str, Any]]) -> str:
    """One markdown table for a set: every score's AUROC / AP (and per kind) per seed."""
    seeds = ", ".join(str(r["seed"]) for r in results)
    kinds = sorted({k for r in results for s in r["scores"].values() for k in s["auroc_by_kind"]})
    scores = [s for s in ORDER if any(s in r["scores"] for r in results)]
    scores += sorted({s for r in results for s in r["scores"]} - set(scores))
    head = ["score", "AUROC", "AP", *(f"AUROC {k}" for k in kinds)]
    lines = [
        f"**{name}** (seeds {seeds}; each cell: seed by seed)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for score in scores:
        got = [r["scores"].get(score, {}) for r in results]
        cells = [
            f"`{score}`",
            _joined([g.get("auroc") for g in got]),
            _joined([g.get("average_precision") for g in got]),
            *(_joined([g.get("auroc_by_kind", {}).get(k) for g in got]) for k in kinds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    styles = [r["styles"] for r in results]
    loc = [r["localisation"] for r in results]
    minutes = [sum(r["timings_s"].get(s, 0) for s in ("train", "analyze")) / 60 for r in results]
    facts = [
        f"styles ARI (all kinds): {_joined([s['ari'] for s in styles])}",
        "localisation hit rate: "
        + " / ".join(f"{lo['hits']}/{lo['n']}" for lo in loc)
        + f" ({_joined([lo['hit_rate'] for lo in loc])})",
        "minutes (HyperSORT train + analyze): " + " / ".join(f"{m:.1f}" for m in minutes),
        "minutes (baselines / crossfit): "
        + " / ".join(
            f"{r['timings_s'].get('baselines', 0) / 60:.1f}, {r['timings_s'].get('crossfit', 0) / 60:.1f}"
            for r in results
        ),
    ]
    if "ari_protocols" in styles[0]:
        facts.insert(1, f"styles ARI (reference + protocols): {_joined([s['ari_protocols'] for s in styles])}")
    if results[0].get("top_k_perturbed") is not None:
        facts.append(
            "perturbed cases in the top k of `suspicion`: "
            + " / ".join(f"{r['top_k_perturbed']} of {r['n_perturbed']}" for r in results)
        )
    return "\n".join(lines) + "\n\n" + "; ".join(facts) + "\n"


def summary_markdown(results: list[dict[str, Any]], candidates: list[dict[str, Any]], args) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    command = "python benchmarks/detection.py " + " ".join(sys.argv[1:])
    parts = [f"`{command}` ({machine}, {stamp})", ""]
    for name in SETS:
        chosen = [r for r in results if r["set"] == name]
        if chosen:
            parts.append(set_table(name, sorted(chosen, key=lambda r: r["seed"])))
    if candidates:
        keys = [k for k in candidates[0] if k not in ("candidate", "min", "mean")]
        parts.append("**Candidate combinations** (AUROC per cell; sorted by the worst cell)\n")
        parts.append("| candidate | min | mean | " + " | ".join(keys) + " |")
        parts.append("|" + "---|" * (len(keys) + 3))
        for row in candidates:
            parts.append(
                f"| `{row['candidate']}` | {_f(row['min'])} | {_f(row['mean'])} | "
                + " | ".join(_f(row.get(k)) for k in keys)
                + " |"
            )
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (cells are kept and resumed)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    parser.add_argument("--spacing", type=float, default=2.0, help="phantom voxel spacing (mm)")
    parser.add_argument("--epochs", type=int, default=40, help="HyperSORT epochs")
    parser.add_argument("--config", type=Path, default=None, help="experiment config (default: embedded)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--folds", type=int, default=3, help="baseline cross-validation folds")
    parser.add_argument("--crossfit-folds", type=int, default=3, help="cross-fitting folds")
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cells = [Cell(args.out, name, seed) for name in args.sets for seed in args.seeds]
    # Stage by stage over the cells: the cheap and the long stages of every cell are done first.
    for stage in STAGES:
        if stage not in args.stages:
            continue
        for cell in cells:
            _log(f"{cell.key}: {stage}")
            try:
                STAGE_FUNCTIONS[stage](cell, args)
            except Exception:  # noqa: BLE001 - one failing cell must not stop the matrix
                log.exception("%s: stage %s failed", cell.key, stage)
    results = []
    for cell in cells:
        try:
            results.append(evaluate(cell))
        except Exception as exc:  # noqa: BLE001 - report what can be reported
            log.warning("%s: not evaluated (%s)", cell.key, exc)
    candidates = candidate_table(cells) if results else []
    text = summary_markdown(results, candidates, args)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
