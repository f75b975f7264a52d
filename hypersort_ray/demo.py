"""``hypersort demo``: synth → train (Ray Train, 2 workers) → analyze → register, then a summary.

Re-running into the same folder reuses the synthetic dataset and the preprocessed-volume cache, and
trains a new run beside the earlier ones (``run``, ``run-2``, ...): a run is never overwritten. The model
is registered in the workspace MLflow store (``./mlflow.db`` unless ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` say otherwise), so the printed commands work as printed from the same folder.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from hypersort_ray import pipeline
from hypersort_ray.config import load_config
from hypersort_ray.data.synthetic import generate_dataset
from hypersort_ray.mlflow_store import resolve_tracking_uri
from hypersort_ray.runs import RunDir
from hypersort_ray.tracking.registry import register_run

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "hypersort-demo"


def _phase(console: Console, n: int, title: str) -> float:
    console.rule(f"[bold]{n}/4 {title}")
    return time.time()


def _reuse_or_synth(data: Path, cases: int, size: int) -> Path:
    marker = data / "synth.json"
    datalist = data / "datalist.tsv"
    if marker.is_file() and datalist.is_file():
        try:
            args = json.loads(marker.read_text())
        except json.JSONDecodeError:
            args = {}
        if args.get("cases") == cases and args.get("size") == size:
            log.info("reusing the synthetic dataset in %s", data)
            return datalist
    return Path(generate_dataset(data, cases=cases, size=size, seed=0, perturbations="paper", progress=True)["datalist"])


def _new_run_folder(out: Path) -> RunDir:
    """``out/run``, or the first ``out/run-N`` that holds no run yet."""
    run, n = RunDir(out / "run"), 1
    while run.holds_run():
        n += 1
        run = RunDir(out / f"run-{n}")
    return run


def run_demo(
    out: Path,
    *,
    cases: int = 60,
    size: int = 32,
    epochs: int | None = None,
    workers: int = 2,
    tracking_uri: str | None = None,
    print_summary: bool = True,
) -> dict[str, Any]:
    """Run the main job end to end on the embedded defaults and return its summary.

    ``print_summary=False`` leaves the summary lines to the caller (the CLI prints them on stdout).
    """
    console = Console(stderr=True)
    out = Path(out).resolve()
    t_start = time.time()
    uri = resolve_tracking_uri(tracking_uri)

    t = _phase(console, 1, f"synthetic benchmark: {cases} phantoms of {size}^3 (paper §4.1 perturbations)")
    datalist = _reuse_or_synth(out / "data", cases, size)
    console.print(f"done in {time.time() - t:.0f} s")

    run = _new_run_folder(out)
    t = _phase(console, 2, f"training with Ray Train on {workers} workers into {run.path}")
    overrides = [
        f"training.scaling.num_workers={workers}",
        "data.cache=disk",
        f"name={DEMO_MODEL_NAME}",
        "analysis.run_after_training=false",  # phase 3 runs it with the truth and progress
    ]
    base = load_config(None)
    if size != base.preprocessing.roi_size[0]:
        factor = 2**base.model.unet.n_down
        edge = max(factor, (size // factor) * factor)
        overrides.append(f"preprocessing.roi_size=[{edge},{edge},{edge}]")
    values = {"data.datalist": datalist, "output_dir": run.path, "data.cache_dir": out / "cache",
              "training.epochs": epochs, "tracking.tracking_uri": uri}
    train = pipeline.train(load_config(None, overrides, values))
    console.print(f"done in {time.time() - t:.0f} s")

    t = _phase(console, 3, "analysis: styles, suspicion ranking, report")
    analysis = pipeline.analyze(run.path, truth=datalist.parent / "truth.csv", progress=True)
    console.print(f"done in {time.time() - t:.0f} s")

    t = _phase(console, 4, f"registering the model in the MLflow registry at {uri}")
    reg = register_run(run.path, name=DEMO_MODEL_NAME, alias="champion", tracking_uri=uri)
    console.print(f"done in {time.time() - t:.0f} s")

    summary = _summary(run, analysis, train, reg, uri, datalist, t_start)
    console.rule("[bold]summary")
    if print_summary:
        for key, value in summary.items():
            console.print(f"[bold]{key}[/bold]: {value}")
    return summary


def _summary(run: RunDir, analysis: dict, train: dict, reg: dict, uri: str, datalist: Path, t_start: float) -> dict[str, Any]:
    metrics = analysis.get("metrics", {}) if isinstance(analysis, dict) else {}
    model_uri = reg.get("model_uri")
    image = next(iter(sorted((datalist.parent / "images").glob("*.nii.gz"))), None)
    store = [] if uri == resolve_tracking_uri(None) else ["--tracking-uri", uri]
    predict = ["hypersort", "predict", "--model", str(model_uri), *store,
               "--image", str(image), "--out", "mask.nii.gz", "--style", "main"]
    return {
        "report": str(run.analysis.report_html),
        "run_dir": str(run.path),
        "styles": _styles_line(analysis),
        "auroc_suspicion": _round(metrics.get("auroc_suspicion")),  # the default ranking's
        "auroc_latent_norm": _round(metrics.get("auroc_latent_norm", train.get("auroc_latent_norm"))),
        "spearman_latent_norm": _round(metrics.get("spearman_latent_norm", train.get("spearman_latent_norm"))),
        "model_uri": model_uri,
        "tracking_uri": uri,
        "mlflow_ui": shlex.join(["mlflow", "ui", "--backend-store-uri", uri]),
        "predict": shlex.join(predict),
        "serve": shlex.join(["hypersort", "serve", "--model", str(model_uri), *store]),
        "seconds": round(time.time() - t_start, 1),
    }


def _round(value: Any) -> Any:
    return round(float(value), 3) if isinstance(value, int | float) else value


def _styles_line(analysis: Any) -> str | None:
    """``"4: main 48, 1 5, 2 4, 3 3; 2 outliers"`` from the analysis summary."""
    if not isinstance(analysis, dict) or analysis.get("n_styles") is None:
        return None
    sizes = ", ".join(f"{key} {size}" for key, size in (analysis.get("style_sizes") or {}).items())
    line = f"{analysis['n_styles']}: {sizes}" if sizes else str(analysis["n_styles"])
    return f"{line}; {analysis.get('n_outliers', 0)} outliers"
