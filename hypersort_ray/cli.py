"""The ``hypersort`` command (contract: docs/cli.md). It only parses flags and delegates.

Every command exits 0 on success; on a user error it prints one line ``error: ...`` naming the file or
field and exits 2. Messages go through ``logging`` to stderr (``-v`` for more, ``-q`` for warnings only),
progress bars to stderr, machine-readable results to stdout (``--json``). Path flags reach the config as
typed paths, never re-parsed as YAML (``--out "/data/exp #3"`` is that folder). Heavy modules (torch,
ray, mlflow) are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

import hypersort_ray
from hypersort_ray.errors import HypersortError

app = typer.Typer(
    name="hypersort",
    help="HyperSORT on Ray: learn a distribution of segmentation UNets and map label errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Format(logging.Formatter):
    """``message`` for information, ``warning: message`` / ``error: message`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format("%(message)s"))
    root = logging.getLogger("hypersort_ray")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers[:] = [handler]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hypersort-ray {hypersort_ray.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More messages (debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _configure_logging(verbose, quiet)


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
TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)."),
]
Address = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: RAY_ADDRESS, else a "
                 "private local Ray."),
]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (a GPU when there is one).")]


def _device(value: str) -> str:
    from hypersort_ray.inference.devices import resolve_device

    return resolve_device(value)


# ------------------------------------------------------------------------------------------- data
@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 200,
    size: Annotated[int, typer.Option(help="Volume edge in voxels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    perturbations: Annotated[str, typer.Option(help="paper | subtle | mixed (phantoms only)")] = "paper",
    dataset: Annotated[
        str, typer.Option(help="phantoms (CT-like, label errors) | brain (warped MNI152, annotation protocols)")
    ] = "phantoms",
    spacing: Annotated[
        float | None, typer.Option(help="Voxel spacing in mm (default: 2 for phantoms, fitted for brain).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a synthetic benchmark with known label perturbations (images, labels, datalist, truth.csv)."""
    from hypersort_ray.data.synthetic import generate_dataset

    summary = generate_dataset(
        out, cases=cases, size=size, seed=seed, perturbations=perturbations, spacing=spacing, progress=True,
        dataset=dataset,
    )
    _emit(summary, as_json)


@app.command("validate-data")
def validate_data(
    datalist: Annotated[Path, typer.Argument(help="TSV, MSD JSON or folder with imagesTr/ labelsTr/.")],
    as_json: JsonFlag = False,
) -> None:
    """Check every case (files, readability, shapes, affines) before any training."""
    from hypersort_ray.data.datalist import load_datalist, validate_cases

    _emit(validate_cases(load_datalist(datalist), progress=True), as_json)


# ------------------------------------------------------------------------------------------ train
@app.command()
def train(
    config: Annotated[
        str | None, typer.Argument(help="Experiment YAML, or a shipped config by name (demo, paper_amos, ...).")
    ] = None,
    datalist: Annotated[Path | None, typer.Option(help="Datalist; overrides data.datalist.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (a new one); overrides output_dir.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue this run folder from its newest checkpoint.")
    ] = None,
    if_exists: Annotated[
        str, typer.Option("--if-exists", help="With --out: fail (default) or resume when it already holds a run "
                          "(for job retries).")
    ] = "fail",
    epochs: Annotated[int | None, typer.Option(help="Overrides training.epochs (with --resume: the new total).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers; overrides training.scaling.num_workers.")] = None,
    overrides: SetFlag = None,
    address: Address = None,
    tracking_uri: TrackingUri = None,
    as_json: JsonFlag = False,
) -> None:
    """Train the hyper-network and per-sample latents with Ray Train (then analyse and register)."""
    from hypersort_ray import pipeline
    from hypersort_ray.config import load_config, resolve_config_path
    from hypersort_ray.runs import RunDir

    if if_exists not in ("fail", "resume"):
        raise HypersortError(f"--if-exists {if_exists!r}: expected fail or resume")
    extra = list(overrides or [])
    if workers is not None:
        extra.append(f"training.scaling.num_workers={workers}")
    if tracking_uri is not None:
        extra.append(f"tracking.tracking_uri={json.dumps(tracking_uri)}")
    if resume is None and out is not None and if_exists == "resume" and RunDir(out).holds_run():
        resume = out
    if resume is not None:
        if config is not None or datalist is not None:
            raise HypersortError("--resume continues a run with its own config and datalist: drop CONFIG/--datalist")
        _emit(pipeline.resume(resume, epochs=epochs, overrides=extra, address=address), as_json)
        return
    values = {"data.datalist": datalist, "output_dir": out, "training.epochs": epochs}
    cfg = load_config(resolve_config_path(config), extra, values)
    _emit(pipeline.train(cfg, address=address), as_json)


@app.command()
def sweep(
    config: Annotated[str | None, typer.Argument(help="Sweep YAML, or a shipped config by name (sweep).")] = None,
    datalist: Annotated[Path | None, typer.Option(help="Datalist; overrides base.data.datalist.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep folder.")] = None,
    samples: Annotated[int | None, typer.Option(help="Number of trials.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per trial.")] = None,
    overrides: SetFlag = None,
    address: Address = None,
    tracking_uri: TrackingUri = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume an interrupted sweep in --out.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Sweep latent dimension, L1 weight and more with Ray Tune over Ray Train trials."""
    from hypersort_ray import pipeline
    from hypersort_ray.config import load_sweep_config, resolve_config_path

    values = {"base.data.datalist": datalist, "base.output_dir": out, "num_samples": samples,
              "base.training.epochs": epochs, "base.tracking.tracking_uri": tracking_uri}
    cfg = load_sweep_config(resolve_config_path(config), list(overrides or []), values)
    _emit(pipeline.sweep(cfg, address=address, resume=resume), as_json)


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
    maps: Annotated[
        bool, typer.Option("--maps", help="Write each case's disagreement with the main style as NIfTI "
                           "(analysis/maps/, in the label's geometry).")
    ] = False,
    crossfit: Annotated[
        int | None, typer.Option("--crossfit", min=2, metavar="K", help="Also train K HyperSORT folds in "
                                 "parallel and fit each case's λ out of fold (about the baselines' cost).")
    ] = None,
    device: Device = "cpu",
    address: Address = None,
    as_json: JsonFlag = False,
) -> None:
    """Styles (HDBSCAN), suspicion ranking, metrics vs truth, latent maps and the curation report."""
    from hypersort_ray import pipeline

    if address and not crossfit:
        raise HypersortError("--address is where --crossfit trains its folds: give --crossfit K with it")
    summary = pipeline.analyze(run_dir, truth=truth, overrides=overrides, baselines=baselines,
                               latent_only=latent_only, progress=True, device=_device(device), maps=maps,
                               crossfit=crossfit, address=address)
    _emit(summary, as_json)


@app.command()
def correct(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    cases: Annotated[str, typer.Option(help="top:K (most suspicious) or a comma list of case ids.")],
    style: Annotated[str, typer.Option(help="main or a style id.")] = "main",
    out: Annotated[Path, typer.Option("--out", help="Folder for corrected labels.")] = Path("corrected"),
    device: Device = "cpu",
    as_json: JsonFlag = False,
) -> None:
    """Re-segment training cases with a chosen style's UNet; write corrected labels + corrections.csv."""
    from hypersort_ray import pipeline

    _emit(pipeline.correct(run_dir, cases=cases, style=style, out=out, device=_device(device)), as_json)


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
    device: Device = "cpu",
    tracking_uri: TrackingUri = None,
    as_json: JsonFlag = False,
) -> None:
    """Segment a NIfTI with the UNet of a chosen style or latent."""
    from hypersort_ray.inference import predict_cli

    summary = predict_cli(model, image=image, out=out, style=style, latent=latent, all_styles=all_styles,
                          probabilities=probabilities, device=_device(device), tracking_uri=tracking_uri)
    _emit(summary, as_json)


@app.command()
def register(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to set, e.g. champion.")] = None,
    tracking_uri: TrackingUri = None,
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
    fmt: Annotated[str, typer.Option("--format", help="torchscript | state_dict | torch_export | onnx")] = "torchscript",
    device: Device = "cpu",
    tracking_uri: TrackingUri = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a plain fixed-style UNet (no hyper-network)."""
    from hypersort_ray.inference import export_cli

    _emit(export_cli(model, style=style, out=out, fmt=fmt, device=_device(device), tracking_uri=tracking_uri), as_json)


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
    from hypersort_ray.runs.reference_import import import_reference_run

    _emit(import_reference_run(weights, latents, config, out, datalist=datalist), as_json)


@app.command()
def serve(
    model: ModelRef,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    config: Annotated[Path | None, typer.Option(help="Serve settings YAML (configs/serve.yaml).")] = None,
    overrides: SetFlag = None,
    address: Address = None,
    device: Device = "cpu",
    tracking_uri: TrackingUri = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback bind without a token (not advised).")
    ] = False,
    pin_version: Annotated[
        bool, typer.Option("--pin-version", help="models:/NAME@ALIAS: serve the version the alias names now; do "
                           "not follow later moves.")
    ] = False,
) -> None:
    """Run the latent-conditioned segmentation endpoint on Ray Serve (Ctrl-C stops it)."""
    from hypersort_ray.config import load_serve_settings
    from hypersort_ray.serve.app import run_server

    values: dict[str, Any] = {"model": model, "host": host, "port": port, "tracking_uri": tracking_uri,
                              "insecure_no_auth": insecure_no_auth or None, "pin_version": pin_version or None}
    if device != "cpu":
        values["num_gpus"] = 1 if _device(device).startswith("cuda") else None
    run_server(load_serve_settings(config, list(overrides or []), values), address=address)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Demo folder.")] = Path("hypersort-demo"),
    cases: Annotated[int, typer.Option(help="Synthetic cases.")] = 60,
    size: Annotated[int, typer.Option(help="Volume edge.")] = 32,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: demo config).")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 2,
    tracking_uri: TrackingUri = None,
    as_json: JsonFlag = False,
) -> None:
    """synth -> train -> analyze -> register, then a summary."""
    from hypersort_ray.demo import run_demo

    summary = run_demo(out, cases=cases, size=size, epochs=epochs, workers=workers, tracking_uri=tracking_uri,
                       print_summary=False)
    _emit(summary, as_json)


def main() -> None:
    try:
        app()
    except (HypersortError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
