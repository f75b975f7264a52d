"""The ``hypersort`` command (contract: shared/CLI.md). It only parses flags and delegates.

Every command exits 0 on success; on a user error it prints one line ``error: ...`` naming the file or
field and exits 2. Progress goes to stderr, machine-readable results to stdout (``--json``).
Heavy modules (torch, ray, mlflow) are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hypersort_ray.errors import HypersortError

app = typer.Typer(
    name="hypersort",
    help="HyperSORT on Ray: learn a distribution of segmentation UNets and map label errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _emit(result: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    elif isinstance(result, dict):
        for key, value in result.items():
            typer.echo(f"{key}: {value}")
    elif result is not None:
        typer.echo(str(result))


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SetFlag = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")
]
ModelRef = Annotated[str, typer.Option("--model", help="Run folder or MLflow URI (models:/NAME@ALIAS, runs:/ID/model).")]


# ------------------------------------------------------------------------------------------- data
@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 200,
    size: Annotated[int, typer.Option(help="Volume edge in voxels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    perturbations: Annotated[str, typer.Option(help="paper | subtle | mixed")] = "paper",
    spacing: Annotated[float, typer.Option(help="Voxel spacing in mm.")] = 2.0,
    as_json: JsonFlag = False,
) -> None:
    """Write a synthetic CT-like benchmark with known label perturbations (paper §4.1 protocol)."""
    from hypersort_ray.data.synthetic import generate_dataset

    summary = generate_dataset(
        out, cases=cases, size=size, seed=seed, perturbations=perturbations, spacing=spacing, progress=True
    )
    _emit(summary, as_json)


@app.command("validate-data")
def validate_data(
    datalist: Annotated[Path, typer.Argument(help="TSV, MSD JSON or folder with imagesTr/ labelsTr/.")],
    as_json: JsonFlag = False,
) -> None:
    """Check every case (files, readability, shapes, affines) before any training."""
    from hypersort_ray.data.datalist import load_datalist, validate_cases

    cases = load_datalist(datalist)
    report = validate_cases(cases, progress=True)
    _emit(report, as_json)


# ------------------------------------------------------------------------------------------ train
@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML (default: embedded demo config).")] = None,
    datalist: Annotated[Path | None, typer.Option(help="Datalist; overrides data.datalist.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder; overrides output_dir.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Overrides training.epochs.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers; overrides training.scaling.num_workers.")] = None,
    overrides: SetFlag = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (auto, ray://...); default local.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train the hyper-network and per-sample latents with Ray Train."""
    from hypersort_ray.config import load_config
    from hypersort_ray.train.trainer import run_training

    extra = list(overrides or [])
    if datalist is not None:
        extra.append(f"data.datalist={datalist}")
    if out is not None:
        extra.append(f"output_dir={out}")
    if epochs is not None:
        extra.append(f"training.epochs={epochs}")
    if workers is not None:
        extra.append(f"training.scaling.num_workers={workers}")
    cfg = load_config(config, extra)
    _emit(run_training(cfg, address=address), as_json)


@app.command()
def sweep(
    config: Annotated[Path | None, typer.Argument(help="Sweep YAML (default: embedded sweep config).")] = None,
    datalist: Annotated[Path | None, typer.Option(help="Datalist; overrides base.data.datalist.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep folder.")] = None,
    samples: Annotated[int | None, typer.Option(help="Number of trials.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per trial.")] = None,
    overrides: SetFlag = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume an interrupted sweep in --out.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Sweep latent dimension, L1 weight and more with Ray Tune over Ray Train trials."""
    from hypersort_ray.config import load_sweep_config
    from hypersort_ray.tune.sweep import run_sweep

    extra = list(overrides or [])
    if datalist is not None:
        extra.append(f"base.data.datalist={datalist}")
    if out is not None:
        extra.append(f"base.output_dir={out}")
    if samples is not None:
        extra.append(f"num_samples={samples}")
    if epochs is not None:
        extra.append(f"base.training.epochs={epochs}")
    cfg = load_sweep_config(config, extra)
    _emit(run_sweep(cfg, address=address, resume=resume), as_json)


# --------------------------------------------------------------------------------------- analysis
@app.command()
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `hypersort train`.")],
    truth: Annotated[Path | None, typer.Option(help="Truth CSV (index/case_id + columns).")] = None,
    overrides: SetFlag = None,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Also train k-fold plain UNets: Test-Dice and cleanlab scores.")
    ] = False,
    latent_only: Annotated[
        bool, typer.Option("--latent-only", help="Skip the model-based scores and thumbnails (fast).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Styles (HDBSCAN), suspicion ranking, metrics vs truth, latent maps and the curation report."""
    if latent_only:
        from hypersort_ray.analysis.run import analyze_run

        _emit(analyze_run(run_dir, truth=truth, overrides=overrides, progress=True), as_json)
        return
    from hypersort_ray.analysis.model_scores import analyze_with_model

    _emit(analyze_with_model(run_dir, truth=truth, overrides=overrides, progress=True, baselines=baselines), as_json)


@app.command()
def correct(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    cases: Annotated[str, typer.Option(help="top:K (most suspicious) or a comma list of case ids.")],
    style: Annotated[str, typer.Option(help="main or a style id.")] = "main",
    out: Annotated[Path, typer.Option("--out", help="Folder for corrected labels.")] = Path("corrected"),
    as_json: JsonFlag = False,
) -> None:
    """Re-segment training cases with a chosen style's UNet; write corrected labels + corrections.csv."""
    from hypersort_ray.analysis.correct import correct_cases

    _emit(correct_cases(run_dir, cases=cases, style=style, out_dir=out, progress=True), as_json)


# ---------------------------------------------------------------------------------------- models
@app.command()
def predict(
    model: ModelRef,
    image: Annotated[Path, typer.Option("--image", help="Input NIfTI.")],
    out: Annotated[Path, typer.Option("--out", help="Output mask NIfTI (a folder with --all-styles).")],
    style: Annotated[str | None, typer.Option(help="main or a style id.")] = None,
    latent: Annotated[str | None, typer.Option(help='Explicit latent, e.g. "0.1,-0.3".')] = None,
    all_styles: Annotated[bool, typer.Option("--all-styles", help="One mask per style.")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write class probabilities.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Segment a NIfTI with the UNet of a chosen style or latent."""
    from hypersort_ray.inference import predict_cli

    _emit(
        predict_cli(
            model, image=image, out=out, style=style, latent=latent, all_styles=all_styles,
            probabilities=probabilities,
        ),
        as_json,
    )


@app.command()
def register(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to set, e.g. champion.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default MLFLOW_TRACKING_URI).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Register the run's model in the MLflow model registry."""
    from hypersort_ray.tracking.registry import register_run

    _emit(register_run(run_dir, name=name, alias=alias, tracking_uri=tracking_uri), as_json)


@app.command()
def export(
    model: ModelRef,
    style: Annotated[str, typer.Option(help="main, a style id, or a latent like 0.1,-0.3.")],
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript | state_dict")] = "torchscript",
    as_json: JsonFlag = False,
) -> None:
    """Write a plain fixed-style UNet (no hyper-network)."""
    from hypersort_ray.inference import export_cli

    _emit(export_cli(model, style=style, out=out, fmt=fmt), as_json)


@app.command("import-reference")
def import_reference(
    weights: Annotated[Path, typer.Option(help="Reference model_w.pt.")],
    latents: Annotated[Path, typer.Option(help="Reference latent_dict.pt.")],
    config: Annotated[Path, typer.Option(help="Reference YAML config.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to create.")],
    datalist: Annotated[Path | None, typer.Option(help="Datalist (default: the config's DataFile).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Convert a model trained with the public HyperSORT code into a run folder."""
    from hypersort_ray.reference import import_reference_run

    _emit(import_reference_run(weights, latents, config, out, datalist=datalist), as_json)


@app.command()
def serve(
    model: ModelRef,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    config: Annotated[Path | None, typer.Option(help="Serve settings YAML (configs/serve.yaml).")] = None,
    overrides: SetFlag = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
) -> None:
    """Run the latent-conditioned segmentation endpoint on Ray Serve (Ctrl-C stops it)."""
    from hypersort_ray.config import load_serve_settings
    from hypersort_ray.serve.app import run_server

    extra = list(overrides or []) + [f"model={model}", f"host={host}", f"port={port}"]
    run_server(load_serve_settings(config, extra), address=address)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Demo folder.")] = Path("hypersort-demo"),
    cases: Annotated[int, typer.Option(help="Synthetic cases.")] = 60,
    size: Annotated[int, typer.Option(help="Volume edge.")] = 32,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: demo config).")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    as_json: JsonFlag = False,
) -> None:
    """synth -> train -> analyze -> register, then a summary."""
    from hypersort_ray.demo import run_demo

    _emit(run_demo(out, cases=cases, size=size, epochs=epochs, workers=workers, print_summary=False), as_json)


def main() -> None:
    try:
        app()
    except HypersortError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
