"""``hypersort train``: the Ray Train layer around :func:`hypersort_ray.train.loop.train_worker`.

What runs where:
- **workers** (``num_workers``, CPU or GPU): the loop, H wrapped in DDP (gloo/nccl), each holding only
  the λ rows of the samples it owns. They never talk to MLflow.
- **controller** (Ray Train's, pinned to the driver's node): :class:`RunFolderCallback` receives every
  report, appends ``history.csv``, logs rank 0's metrics to MLflow and, on checkpoint epochs, writes
  ``latents.csv`` and the latent map from the persisted (merged) checkpoint. So λ is only read back
  from checkpoints, never gathered over the network during training.
- **driver**: validates data, creates the MLflow run, shows progress, and after ``fit()`` copies the
  final checkpoint into the run folder, where the core loads it without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hypersort_ray.config import ExperimentConfig, config_to_yaml
from hypersort_ray.errors import ConfigError, HypersortError
from hypersort_ray.train.loop import WorkerContext, dump_json, shard_indices, train_worker, write_history_csv

FAULT_ENV = "HYPERSORT_TEST_FAULT"  # test-only: "epoch=E,step=S,rank=R" raises once in that worker


# ------------------------------------------------------------------------------------- worker side
def _train_fn(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    _quiet_report_log()
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    scaling = cfg.training.scaling
    torch.set_num_threads(max(1, scaling.threads_per_worker or int(scaling.cpus_per_worker)))

    if scaling.use_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cpu")

    def wrap(module):
        if world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def all_reduce_sum(t):
        if world > 1:
            moved = t.to(device) if dist.get_backend() == "nccl" else t
            dist.all_reduce(moved)
            return moved.cpu()
        return t

    def all_gather_object(obj):
        if world == 1:
            return [obj]
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def report(metrics: dict[str, Any], part: Path | None) -> None:
        ckpt = Checkpoint.from_directory(str(part)) if part is not None else None
        try:
            ray.train.report(metrics, checkpoint=ckpt)
        finally:  # also when report raises (a stopped trial, a failing peer): no part left in /tmp
            if part is not None:
                shutil.rmtree(part, ignore_errors=True)

    resume = None
    restored_copy = None
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restart after a worker failure: continue from the last checkpoint
        # to_directory() copies the checkpoint into a fresh /tmp/checkpoint_tmp_* folder: ours to remove.
        resume = restored_copy = Path(restored.to_directory())
    elif cfg.training.resume_from is not None:
        resume = Path(cfg.training.resume_from)

    from hypersort_ray.data.datalist import Case

    cases = [Case(c["index"], c["case_id"], Path(c["image"]), Path(c["label"])) for c in loop_config["cases"]]
    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=device,
        wrap_hyper=wrap,
        all_reduce_sum=all_reduce_sum,
        all_gather_object=all_gather_object,
        report=report,
        resume_from=resume,
        fault=loop_config.get("fault"),
    )
    try:
        train_worker(cfg, cases, ctx)
    finally:
        if restored_copy is not None:
            shutil.rmtree(restored_copy, ignore_errors=True)


def _quiet_report_log() -> None:
    """Keep Ray Train's per-report INFO line ("Reporting training result N: TrainingReport(...)") off the
    console: it repeats every metric of every epoch for every worker. Ray 2.60 logs it on a logger named
    after the module's *file*, so ``RunConfig.logging_config`` (which filters ``ray.train.*``) cannot.
    The progress bar and history.csv carry the same numbers; warnings and errors still pass."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------- controller side
def _make_run_folder_callback(run_dir: Path, cfg: ExperimentConfig, logger, case_ids: list[str]):
    from ray.train import UserCallback

    class RunFolderCallback(UserCallback):
        """Runs on the Train controller (driver node): run folder + MLflow, fail-soft."""

        def __init__(self) -> None:
            self.run_dir = run_dir
            self.log_every = cfg.training.log_every
            self.logger = logger
            self.case_ids = case_ids
            self.history: list[dict[str, Any]] = []

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = dict(metrics[0]) if metrics else {}
            if not m:
                return
            # A restart replays epochs after the last checkpoint: keep the newest row per epoch.
            self.history = [h for h in self.history if h.get("epoch", 0) < m.get("epoch", 0)] + [m]
            write_history_csv(self.run_dir / "history.csv", self.history)
            self.logger.log_metrics(m, step=int(m.get("epoch", 0)))
            if checkpoint is not None:
                try:
                    self._from_checkpoint(checkpoint, int(m.get("epoch", 0)))
                except Exception as exc:  # noqa: BLE001 - artefacts must not stop training
                    print(f"warning: could not write latent artefacts: {exc}", file=sys.stderr)

        def _from_checkpoint(self, checkpoint, epoch: int) -> None:
            from hypersort_ray.train.checkpoint import load_checkpoint
            from hypersort_ray.train.latents_io import write_latents_csv

            with checkpoint.as_directory() as d:
                ck = load_checkpoint(Path(d))
            state = ck.latents
            idx = state["indices"].tolist()
            write_latents_csv(self.run_dir / "latents.csv", idx, [self.case_ids[i] for i in idx], state["values"].numpy())
            if epoch % self.log_every == 0 or epoch == cfg.training.epochs:
                self.logger.log_artifact(self.run_dir / "latents.csv", f"latents/epoch_{epoch:04d}")
                png = _latent_map_png(self.run_dir, epoch)
                if png is not None:
                    self.logger.log_artifact(png, "latent_maps")

    return RunFolderCallback()


def _latent_map_png(run_dir: Path, epoch: int) -> Path | None:
    from hypersort_ray.analysis.plots import latent_map_png
    from hypersort_ray.train.latents_io import read_latents_csv

    _, ids, values = read_latents_csv(run_dir / "latents.csv")
    out = run_dir / "latent_maps" / f"latent_map_epoch_{epoch:04d}.png"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(latent_map_png(values, ["all"] * len(ids), ids, title=f"Latents, epoch {epoch}"))
    return out


# ------------------------------------------------------------------------------------- driver side
def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def parse_fault(spec: str | None, marker: Path) -> dict[str, Any] | None:
    if not spec:
        return None
    try:
        fault: dict[str, Any] = {k: int(v) for k, v in (p.split("=") for p in spec.split(","))}
    except ValueError as exc:
        raise ConfigError(f"{FAULT_ENV}={spec!r}: expected epoch=E,step=S,rank=R") from exc
    fault["marker"] = str(marker)
    return fault


def init_ray(address: str | None, num_cpus_hint: float | None = None) -> None:
    """Join a cluster (``address`` / ``RAY_ADDRESS``) or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, int(num_cpus_hint or 0))
        # The dashboard hosts the State API that Ray Train's placement-group cleaner polls; without it
        # finished worker groups are not reclaimed (STACK_NOTES). Bind it to loopback only.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


class _Progress:
    """Driver-side progress: tails history.csv (written by the controller) into a tqdm bar on stderr."""

    def __init__(self, history: Path, epochs: int, start_epoch: int) -> None:
        self.history, self.epochs, self.start = history, epochs, start_epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.epochs, initial=self.start, desc="train", unit="epoch", file=sys.stderr, dynamic_ncols=True)
        seen = self.start
        while True:
            stopping = self._stop.wait(1.0)
            seen = self._update(bar, seen)
            if stopping:
                break
        bar.close()

    def _update(self, bar: Any, seen: int) -> int:
        import pandas as pd

        try:
            df = pd.read_csv(self.history)
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            return seen
        if not len(df) or int(df["epoch"].iloc[-1]) <= seen:
            return seen
        row = df.iloc[-1]
        bar.update(int(row["epoch"]) - seen)
        post = {"loss": f"{row['loss']:.3f}", "dice": f"{row['dice']:.3f}", "smp/s": f"{row['samples_per_s']:.1f}"}
        if "auroc_latent_norm" in row and row["auroc_latent_norm"] == row["auroc_latent_norm"]:
            post["auroc|λ|"] = f"{row['auroc_latent_norm']:.3f}"
        bar.set_postfix(post)
        return int(row["epoch"])


def prepare_run_folder(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[Any]]:
    """Validate the data and write the resolved config into the run folder."""
    from hypersort_ray.data.datalist import load_datalist, validate_cases

    if cfg.data.datalist is None:
        raise ConfigError("data.datalist is not set: pass --datalist or set it in the config")
    cases = load_datalist(cfg.data.datalist)
    validate_cases(cases)
    shard_indices(len(cases), cfg.training.scaling.num_workers, 0)  # W > N -> clear error
    run_dir = Path(cfg.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = cfg.data.model_copy(update={"datalist": Path(cfg.data.datalist).resolve()})
    cfg = cfg.model_copy(update={"output_dir": run_dir, "data": data})
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return cfg, cases


def build_trainer(cfg: ExperimentConfig, cases: list[Any], callbacks: list[Any], *, name: str, storage_path: Path | None = None):
    """A ``TorchTrainer`` for a prepared run folder (``prepare_run_folder``); Tune trials reuse it."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(cfg.output_dir)
    scaling = cfg.training.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    return TorchTrainer(
        _train_fn,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "cases": [{"index": c.index, "case_id": c.case_id, "image": str(c.image), "label": str(c.label)} for c in cases],
            "fault": parse_fault(os.environ.get(FAULT_ENV), run_dir / ".fault_injected"),
        },
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path or run_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=os.environ.get("HYPERSORT_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )


def run_training(cfg: ExperimentConfig, address: str | None = None, *, progress: bool = True, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train with Ray Train and leave a complete run folder. Returns a summary dict."""
    from hypersort_ray.data.datalist import dataset_hash
    from hypersort_ray.tracking.mlflow_logger import (
        RunLogger,
        artifact_location,
        config_params,
        resolve_tracking_uri,
    )

    cfg, cases = prepare_run_folder(cfg)
    run_dir = cfg.output_dir
    scaling = cfg.training.scaling
    for stale in ("history.csv", "latents.csv"):
        if cfg.training.resume_from is None:
            (run_dir / stale).unlink(missing_ok=True)

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, run_dir)
    logger = RunLogger(uri, enabled=cfg.tracking.enabled)
    tags = {"git_commit": _git_commit(), "dataset_hash": dataset_hash(cases), "world_size": str(scaling.num_workers),
            "hypersort.run_dir": str(run_dir)}
    logger.start(cfg.tracking.experiment, cfg.name, artifact_location=artifact_location(uri, run_dir), tags=tags)
    logger.log_params(config_params(cfg))

    init_ray(address, scaling.num_workers * scaling.cpus_per_worker)
    callbacks = [_make_run_folder_callback(run_dir, cfg, logger, [c.case_id for c in cases]), *(extra_callbacks or [])]
    trainer = build_trainer(cfg, cases, callbacks, name=f"train-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    start_epoch = 0
    if cfg.training.resume_from is not None:
        from hypersort_ray.train.checkpoint import load_checkpoint

        start_epoch = load_checkpoint(cfg.training.resume_from).epoch
    try:
        with _Progress(run_dir / "history.csv", cfg.training.epochs, start_epoch) if progress else nullcontext():
            result = trainer.fit()
    except Exception:
        logger.end("FAILED")
        raise
    if result.checkpoint is None:
        logger.end("FAILED")
        raise HypersortError(f"training finished without a checkpoint (see {run_dir / 'ray_results'})")
    summary = finalize_run(run_dir, result.checkpoint, cases, logger, seconds=time.time() - t0)
    logger.end("FINISHED")
    summary.update(_after_training(cfg, run_dir, logger))
    return summary


def _after_training(cfg: ExperimentConfig, run_dir: Path, logger) -> dict[str, Any]:
    """Analysis and registration at the end of training; failures warn, never lose the run."""
    import warnings

    out: dict[str, Any] = {}
    if cfg.analysis.run_after_training:
        try:
            from hypersort_ray.analysis.model_scores import analyze_with_model

            analysis = analyze_with_model(run_dir, progress=False)
            out["report"] = str(run_dir / "analysis" / "report.html")
            out["n_styles"] = analysis.get("n_styles")
            logger.log_artifact(run_dir / "analysis", "analysis")
        except Exception as exc:  # noqa: BLE001 - the trained model is already safe on disk
            warnings.warn(f"analysis after training failed ({exc}); run `hypersort analyze {run_dir}`", RuntimeWarning, stacklevel=2)
    if cfg.tracking.register_as:
        from hypersort_ray.tracking.registry import auto_register

        reg = auto_register(cfg, run_dir)
        if reg:
            out["model_uri"] = reg.get("model_uri")
    return out


def finalize_run(run_dir: Path, checkpoint, cases, logger, *, seconds: float) -> dict[str, Any]:
    """Copy the final checkpoint into the run folder and write latents.csv / history.csv / summary."""
    from hypersort_ray.train.checkpoint import load_checkpoint
    from hypersort_ray.train.latents_io import SAMPLE_LOSSES_CSV, write_latents_csv, write_sample_losses_csv

    final = run_dir / "checkpoint"
    tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(d, tmp)
    load_checkpoint(tmp)  # verify before replacing the previous final checkpoint
    old = run_dir / f".checkpoint.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)

    ck = load_checkpoint(final)
    idx = ck.latents["indices"].tolist()
    ids = [cases[i].case_id for i in idx]
    write_latents_csv(run_dir / "latents.csv", idx, ids, ck.latents["values"].numpy())
    history = list((ck.extra or {}).get("history", []))
    if history:
        write_history_csv(run_dir / "history.csv", history)
    losses = (ck.extra or {}).get("sample_losses")
    if losses is not None:
        write_sample_losses_csv(run_dir / SAMPLE_LOSSES_CSV, losses, [c.case_id for c in cases])
    last = history[-1] if history else {}
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(final),
        "latents_csv": str(run_dir / "latents.csv"),
        "epochs": ck.epoch,
        "num_samples": len(idx),
        "seconds": round(seconds, 1),
        "mlflow_run_id": logger.run_id,
        "tracking_uri": logger.tracking_uri,
        **{k: last[k] for k in ("loss", "dice", "auroc_latent_norm", "spearman_latent_norm", "samples_per_s") if k in last},
    }
    for name in ("latents.csv", "history.csv", SAMPLE_LOSSES_CSV, "config.yaml"):
        if (run_dir / name).exists():
            logger.log_artifact(run_dir / name)
    logger.log_artifact(final, "checkpoint")
    dump_json(run_dir / "train_summary.json", summary)
    return summary


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "train_summary.json").read_text())
