"""``hypersort demo``: synth → train (Ray Train, 2 workers) → analyze → register, then a summary.

Re-running into the same folder reuses the synthetic dataset and the preprocessed-volume cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from hypersort_ray.config import load_config

DEMO_MODEL_NAME = "hypersort-demo"


def _phase(console: Console, n: int, title: str) -> float:
    console.rule(f"[bold]{n}/4 {title}")
    return time.time()


def _reuse_or_synth(data: Path, cases: int, size: int, console: Console) -> None:
    from hypersort_ray.data.synthetic import generate_dataset

    marker = data / "synth.json"
    if marker.is_file():
        try:
            args = json.loads(marker.read_text())
        except json.JSONDecodeError:
            args = {}
        if args.get("cases") == cases and args.get("size") == size and (data / "datalist.tsv").is_file():
            console.print(f"reusing the synthetic dataset in {data}")
            return
    generate_dataset(data, cases=cases, size=size, seed=0, perturbations="paper", progress=True)


def run_demo(
    out: Path,
    *,
    cases: int = 60,
    size: int = 32,
    epochs: int | None = None,
    workers: int = 2,
    print_summary: bool = True,
) -> dict[str, Any]:
    """Run the main job end to end on the embedded defaults and return its summary.

    ``print_summary=False`` leaves the summary lines to the caller (the CLI prints them on stdout).
    """
    from hypersort_ray.analysis.model_scores import analyze_with_model
    from hypersort_ray.tracking.registry import register_run
    from hypersort_ray.train.trainer import run_training

    console = Console(stderr=True)
    out = Path(out).resolve()
    data, run_dir = out / "data", out / "run"
    t_start = time.time()

    t = _phase(console, 1, f"synthetic benchmark: {cases} phantoms of {size}^3 (paper §4.1 perturbations)")
    _reuse_or_synth(data, cases, size, console)
    console.print(f"done in {time.time() - t:.0f} s")

    t = _phase(console, 2, f"training with Ray Train on {workers} workers")
    overrides = [
        f"data.datalist={data / 'datalist.tsv'}",
        f"output_dir={run_dir}",
        f"training.scaling.num_workers={workers}",
        "data.cache=disk",
        f"data.cache_dir={out / 'cache'}",
        f"name={DEMO_MODEL_NAME}",
        "analysis.run_after_training=false",  # phase 3 runs it with progress
    ]
    base = load_config(None)
    if size != base.preprocessing.roi_size[0]:
        factor = 2**base.model.unet.n_down
        edge = max(factor, (size // factor) * factor)
        overrides.append(f"preprocessing.roi_size=[{edge},{edge},{edge}]")
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    cfg = load_config(None, overrides)
    train = run_training(cfg)
    console.print(f"done in {time.time() - t:.0f} s")

    t = _phase(console, 3, "analysis: styles, suspicion ranking, report")
    analysis = analyze_with_model(run_dir, truth=data / "truth.csv", progress=True)
    console.print(f"done in {time.time() - t:.0f} s")

    t = _phase(console, 4, "registering the model in the embedded MLflow registry")
    reg = register_run(run_dir, name=DEMO_MODEL_NAME, alias="champion", tracking_uri=train.get("tracking_uri"))
    console.print(f"done in {time.time() - t:.0f} s")

    metrics = analysis.get("metrics", {}) if isinstance(analysis, dict) else {}
    summary = {
        "report": str(run_dir / "analysis" / "report.html"),
        "run_dir": str(run_dir),
        "styles": _styles_line(analysis),
        "auroc_latent_norm": _round(metrics.get("auroc_latent_norm", train.get("auroc_latent_norm"))),
        "spearman_latent_norm": _round(metrics.get("spearman_latent_norm", train.get("spearman_latent_norm"))),
        "model_uri": reg.get("model_uri"),
        "mlflow_ui": f"mlflow ui --backend-store-uri {train.get('tracking_uri')}",
        "serve": f"hypersort serve --model {run_dir}",
        "seconds": round(time.time() - t_start, 1),
    }
    console.rule("[bold]summary")
    if print_summary:
        for key, value in summary.items():
            console.print(f"[bold]{key}[/bold]: {value}")
    return summary


def _round(value: Any) -> Any:
    return round(float(value), 3) if isinstance(value, int | float) else value


def _styles_line(analysis: Any) -> str | None:
    """``"4: main 48, 1 5, 2 4, 3 3; 2 outliers"`` from the analysis summary."""
    if not isinstance(analysis, dict) or analysis.get("n_styles") is None:
        return None
    sizes = ", ".join(f"{key} {size}" for key, size in (analysis.get("style_sizes") or {}).items())
    line = f"{analysis['n_styles']}: {sizes}" if sizes else str(analysis["n_styles"])
    return f"{line}; {analysis.get('n_outliers', 0)} outliers"
