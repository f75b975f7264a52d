"""``hypersort train``: the Ray Train layer around :func:`hypersort_ray.train.loop.train_worker`.

What runs where:
- **workers** (``num_workers``, CPU or GPU): the loop, H wrapped in DDP (gloo/nccl), each holding only
  the λ rows of the samples it owns. They never talk to MLflow.
- **controller** (Ray Train's, pinned to the driver's node): :class:`RunFolderCallback` receives every
  report, rewrites ``history.csv``, logs rank 0's metrics to MLflow and, on checkpoint epochs, writes
  the latents and (through a hook) the latent map from the persisted (merged) checkpoint. So λ is only
  read back from checkpoints, never gathered over the network during training.
- **driver**: validates data, creates the MLflow run, shows progress, and after ``fit()`` installs the
  final checkpoint in the run folder, where the core loads it without Ray.

A run folder is never overwritten: a new run refuses a folder that holds one, and ``--resume`` continues
a finished or interrupted run from its newest checkpoint (final, or one Ray Train persisted), in the
same MLflow run. Analysis and registration after training are composed by :mod:`hypersort_ray.pipeline`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from hypersort_ray.config import ExperimentConfig, load_config
from hypersort_ray.data.datalist import Case, dataset_hash, load_datalist, validate_cases
from hypersort_ray.errors import ConfigError, HypersortError, RunError
from hypersort_ray.mlflow_store import artifact_location, resolve_tracking_uri
from hypersort_ray.ray_cluster import check_placeable, connect
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.checkpoint import load_checkpoint
from hypersort_ray.tracking.mlflow_logger import RunLogger, config_params
from hypersort_ray.train.loop import WorkerContext, shard_indices, train_worker

__all__ = [
    "FAULT_ENV",
    "LatentMapHook",
    "build_trainer",
    "finalize_run",
    "make_run_folder_callback",
    "prepare_run_folder",
    "resume_config",
    "run_training",
]

log = logging.getLogger(__name__)

FAULT_ENV = "HYPERSORT_TEST_FAULT"  # test-only: "epoch=E,step=S,rank=R" raises once in that worker
#: Draws the latent map of a checkpoint epoch into the run folder; returns the file (or None).
LatentMapHook = Callable[[RunDir, int], Path | None]


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

    resume, restored_copy = None, None
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restart after a worker failure: continue from the last checkpoint
        # to_directory() copies the checkpoint into a fresh /tmp/checkpoint_tmp_* folder: ours to remove.
        resume = restored_copy = Path(restored.to_directory())
    elif cfg.training.resume_from is not None:
        resume = Path(cfg.training.resume_from)
    cases = [Case(c["index"], c["case_id"], Path(c["image"]), Path(c["label"])) for c in loop_config["cases"]]
    ctx = WorkerContext(
        rank=rank, world_size=world, device=device, wrap_hyper=wrap, all_reduce_sum=all_reduce_sum,
        all_gather_object=all_gather_object, report=report, resume_from=resume, fault=loop_config.get("fault"),
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
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------- controller side
def make_run_folder_callback(
    run: RunDir,
    cfg: ExperimentConfig,
    logger: RunLogger,
    case_ids: Sequence[str],
    *,
    history: Sequence[dict[str, Any]] = (),
    latent_map: LatentMapHook | None = None,
):
    """The Train controller callback that keeps the run folder and the MLflow run current.

    Args:
        run: the run folder.
        cfg: the run's config.
        logger: the MLflow run.
        case_ids: every case id, index order.
        history: epochs already trained (a resumed run), kept in front of the new ones.
        latent_map: draws the latent map of a checkpoint epoch (None: no maps).
    """
    from ray.train import UserCallback

    class RunFolderCallback(UserCallback):
        """Runs on the Train controller (driver node): run folder + MLflow, fail-soft."""

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = list(history)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = dict(metrics[0]) if metrics else {}
            if not m:
                return
            epoch = int(m.get("epoch", 0))
            # A restart replays epochs after the last checkpoint: keep the newest row per epoch.
            self.history = [h for h in self.history if h.get("epoch", 0) < epoch] + [m]
            run.write_history(self.history)
            logger.log_metrics(m, step=epoch)
            if checkpoint is not None:
                try:
                    self._from_checkpoint(checkpoint, epoch)
                except Exception as exc:  # noqa: BLE001 - artefacts must not stop training
                    log.warning("could not write the latent artefacts of epoch %d: %s", epoch, exc)

        def _from_checkpoint(self, checkpoint, epoch: int) -> None:
            with checkpoint.as_directory() as d:
                latents = load_checkpoint(Path(d)).latents
            idx = latents["indices"].tolist()
            run.write_latents(idx, [case_ids[i] for i in idx], latents["values"].numpy())
            if epoch % cfg.training.log_every == 0 or epoch == cfg.training.epochs:
                logger.log_artifact(run.latents_csv, f"latents/epoch_{epoch:04d}")
                png = latent_map(run, epoch) if latent_map is not None else None
                if png is not None:
                    logger.log_artifact(png, "latent_maps")

    return RunFolderCallback()


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


class _Progress:
    """Driver-side progress: tails history.csv (written by the controller) into a tqdm bar on stderr."""

    def __init__(self, run: RunDir, epochs: int, start_epoch: int) -> None:
        self.run, self.epochs, self.start = run, epochs, start_epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
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
        try:
            df = self.run.read_history()
        except Exception:  # noqa: BLE001 - being replaced right now
            return seen
        if df is None or not len(df) or int(df["epoch"].iloc[-1]) <= seen:
            return seen
        row = df.iloc[-1]
        bar.update(int(row["epoch"]) - seen)
        post = {"loss": f"{row['loss']:.3f}", "dice": f"{row['dice']:.3f}", "smp/s": f"{row['samples_per_s']:.1f}"}
        if "auroc_latent_norm" in row and row["auroc_latent_norm"] == row["auroc_latent_norm"]:
            post["auroc|λ|"] = f"{row['auroc_latent_norm']:.3f}"
        bar.set_postfix(post)
        return int(row["epoch"])


def prepare_run_folder(
    cfg: ExperimentConfig, *, if_exists: Literal["refuse", "resume", "reuse"] = "refuse"
) -> tuple[ExperimentConfig, list[Case]]:
    """Validate the data and write the resolved config into the run folder.

    Args:
        cfg: the config (``output_dir`` is the run folder).
        if_exists: a folder that already holds a run is refused (a new run), continued (``--resume``:
            the caller has set ``training.resume_from``), or reused as is (a retried Tune trial, which
            Ray Train continues from its own storage).

    Raises:
        RunExistsError: ``if_exists="refuse"`` and the folder holds a run (nothing is touched).
        ConfigError / DataError: no datalist, unreadable cases, more workers than cases.
    """
    if cfg.data.datalist is None:
        raise ConfigError("data.datalist is not set: pass --datalist or set it in the config")
    run = RunDir(Path(cfg.output_dir).expanduser().resolve())
    if if_exists == "refuse":
        run.refuse_existing()
    cases = load_datalist(cfg.data.datalist)
    validate_cases(cases)
    shard_indices(len(cases), cfg.training.scaling.num_workers, 0)  # W > N -> clear error
    data = cfg.data.model_copy(update={"datalist": Path(cfg.data.datalist).expanduser().resolve()})
    cfg = cfg.model_copy(update={"output_dir": run.path, "data": data})
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    return cfg, cases


def build_trainer(cfg: ExperimentConfig, cases: list[Case], callbacks: list[Any], *, name: str, storage_path: Path | None = None):
    """A ``TorchTrainer`` for a prepared run folder (``prepare_run_folder``); Tune trials reuse it."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = RunDir(cfg.output_dir)
    scaling = cfg.training.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    return TorchTrainer(
        _train_fn,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "cases": [{"index": c.index, "case_id": c.case_id, "image": str(c.image), "label": str(c.label)} for c in cases],
            "fault": parse_fault(os.environ.get(FAULT_ENV), run.path / ".fault_injected"),
        },
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path or run.ray_results_dir),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=os.environ.get("HYPERSORT_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )


def _logger(cfg: ExperimentConfig, run: RunDir, cases: Sequence[Case]) -> RunLogger:
    """The run's MLflow run: the one a resumed run already has in this store, else a new one."""
    previous = run.read_summary() if cfg.training.resume_from is not None else {}
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if previous.get("mlflow_run_id") and previous.get("tracking_uri") == uri:
        logger = RunLogger(uri, run_id=previous["mlflow_run_id"], enabled=cfg.tracking.enabled)
        logger.set_status("RUNNING")
        return logger
    logger = RunLogger(uri, enabled=cfg.tracking.enabled)
    tags = {"git_commit": _git_commit(), "dataset_hash": dataset_hash(cases),
            "world_size": str(cfg.training.scaling.num_workers), "hypersort.run_dir": str(run.path)}
    logger.start(cfg.tracking.experiment, cfg.name, artifact_location=artifact_location(uri), tags=tags)
    logger.log_params(config_params(cfg))
    return logger


def run_training(
    cfg: ExperimentConfig,
    address: str | None = None,
    *,
    progress: bool = True,
    extra_callbacks: list | None = None,
    latent_map: LatentMapHook | None = None,
) -> dict[str, Any]:
    """Train with Ray Train and leave a complete run folder. Returns the training summary.

    A new run (``training.resume_from`` unset) refuses a folder that already holds one; a resumed run
    continues from ``training.resume_from`` in the same folder and MLflow run.

    Args:
        cfg: the experiment config (``output_dir`` is the run folder).
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None: ``RAY_ADDRESS``, else a
            private local instance (:mod:`hypersort_ray.ray_cluster`).
        progress: a progress bar on stderr.
        extra_callbacks: more Ray Train callbacks.
        latent_map: draws the latent map of checkpoint epochs (see :data:`LatentMapHook`).
    """
    resuming = cfg.training.resume_from is not None
    cfg, cases = prepare_run_folder(cfg, if_exists="resume" if resuming else "refuse")
    run = RunDir(cfg.output_dir)
    start = load_checkpoint(cfg.training.resume_from) if resuming else None
    scaling = cfg.training.scaling
    ray_handle = connect(address, num_cpus=scaling.num_workers * scaling.cpus_per_worker)
    logger = None
    try:
        check_placeable(scaling.num_workers, scaling.cpus_per_worker,
                        (scaling.gpus_per_worker or 1.0) if scaling.use_gpu else 0.0, "training")
        logger = _logger(cfg, run, cases)
        run.write_summary({"status": "running", "mlflow_run_id": logger.run_id, "tracking_uri": logger.tracking_uri})
        history = list((start.extra or {}).get("history", [])) if start else []
        callbacks = [make_run_folder_callback(run, cfg, logger, [c.case_id for c in cases], history=history,
                                              latent_map=latent_map), *(extra_callbacks or [])]
        trainer = build_trainer(cfg, cases, callbacks, name=f"train-{time.strftime('%Y%m%d-%H%M%S')}")
        t0 = time.time()
        with _Progress(run, cfg.training.epochs, start.epoch if start else 0) if progress else nullcontext():
            result = trainer.fit()
        if result.checkpoint is None:
            raise HypersortError(f"training finished without a checkpoint (see {run.ray_results_dir})")
        summary = finalize_run(run, result.checkpoint, cases, logger, seconds=time.time() - t0)
    except BaseException:
        if logger is not None:
            logger.end("FAILED")
            run.write_summary({"status": "failed", "mlflow_run_id": logger.run_id, "tracking_uri": logger.tracking_uri})
        raise
    finally:
        if ray_handle.started:
            ray_handle.close()
    logger.end("FINISHED")
    return summary


def finalize_run(run: RunDir, checkpoint, cases: Sequence[Case], logger: RunLogger, *, seconds: float) -> dict[str, Any]:
    """Install the final checkpoint in the run folder; write latents, history, sample losses, the latent
    trajectory and the summary."""
    with checkpoint.as_directory() as d:
        ck = run.install_checkpoint(Path(d))
    idx = ck.latents["indices"].tolist()
    run.write_latents(idx, [cases[i].case_id for i in idx], ck.latents["values"].numpy())
    history = list((ck.extra or {}).get("history", []))
    if history:
        run.write_history(history)
    losses = (ck.extra or {}).get("sample_losses")
    if losses is not None:
        run.write_sample_losses(losses, [c.case_id for c in cases])
    trajectory = (ck.extra or {}).get("latent_trajectory")
    if trajectory is not None and len(trajectory["epochs"]):
        ids = [c.case_id for c in cases]
        run.write_latent_trajectory(trajectory["epochs"].tolist(), ids, trajectory["values"].numpy())
    last = history[-1] if history else {}
    summary = {
        "status": "finished",
        "run_dir": str(run.path),
        "checkpoint": str(run.checkpoint_dir),
        "latents_csv": str(run.latents_csv),
        "epochs": ck.epoch,
        "num_samples": len(idx),
        "seconds": round(seconds, 1),
        "mlflow_run_id": logger.run_id,
        "tracking_uri": logger.tracking_uri,
        **{k: last[k] for k in ("loss", "dice", "auroc_latent_norm", "spearman_latent_norm", "samples_per_s") if k in last},
    }
    tables = (run.latents_csv, run.history_csv, run.sample_losses_csv, run.latent_trajectory_csv)
    for path in (*tables, run.config_path):
        if path.exists():
            logger.log_artifact(path)
    logger.log_artifact(run.checkpoint_dir, "checkpoint")
    run.write_summary(summary)
    return summary


def resume_config(run_dir: str | os.PathLike[str], *, epochs: int | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config that continues ``run_dir``: its own config, more epochs, from its newest checkpoint.

    Args:
        run_dir: a run folder (finished, or interrupted after at least one checkpoint).
        epochs: the new total number of epochs (default: the run's own, for an interrupted run).
        overrides: ``key=value`` settings that may change on a resume (training speed, workers,
            learning rates); the model and the datalist may not (checked by the workers).

    Raises:
        RunError: not a run folder, or nothing to resume from (no checkpoint yet).
    """
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise RunError(f"--resume {run.path}: not a run folder (no config); start a run with --out instead")
    latest = run.latest_checkpoint()
    if latest is None:
        raise RunError(
            f"--resume {run.path}: the run has no checkpoint yet (it was interrupted before its first "
            "checkpoint epoch); start it again with another --out"
        )
    values = {"training.resume_from": latest, "training.epochs": epochs}
    cfg = load_config(run.config_path, list(overrides), values)
    log.info("resuming %s from %s (epoch %s)", run.path, latest, load_checkpoint(latest).epoch)
    return cfg
