"""``hypersort sweep``: Ray Tune over Ray Train trials, tracked in MLflow (parent run + child runs).

Layout of a sweep folder (``base.output_dir`` / ``--out``)::

    sweep.yaml            the resolved sweep config
    sweep_state.json      MLflow parent run id + tracking URI (used by --resume)
    tune/<name>/          Tune's experiment state (Tuner.restore reads it)
    trials/<trial_id>/    one ordinary run folder per trial (see hypersort_ray.tune.trial)
    results.csv           one row per trial, objective first, sorted best first
    objective.png         objective vs the sampled latent_dim and l1_weight

MLflow runs go to the store of :func:`hypersort_ray.mlflow_store.resolve_tracking_uri` (the workspace
store unless ``tracking.tracking_uri`` / ``MLFLOW_TRACKING_URI`` say otherwise).

Resources: every trial is a Tune function (the trial *driver*) that holds no CPU but one unit of the
custom resource ``trial_slot``; its Train workers hold ``workers_per_trial × cpus_per_worker`` CPUs.
A local Ray is started with as many slots as trials fit in the CPUs (and at most
``max_concurrent_trials``), so concurrent trials can never take the CPUs their own workers need. On a
cluster (``--address``), give the head node ``trial_slot`` resources (``deployments/rayjob-sweep.yaml``);
without them the sweep falls back to CPU-free trial drivers limited by ``max_concurrent_trials``.

Example:
    >>> summary = run_sweep(load_sweep_config("configs/sweep.yaml"), address=None, resume=False)  # doctest: +SKIP
    >>> summary["best"]["trial_id"], summary["results_csv"]                                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from hypersort_ray.atomic import atomic_write_json, atomic_write_text
from hypersort_ray.config import SweepConfig, config_to_yaml, flatten, load_sweep_config
from hypersort_ray.data.datalist import load_datalist
from hypersort_ray.errors import ConfigError
from hypersort_ray.mlflow_store import artifact_location, resolve_tracking_uri
from hypersort_ray.ray_cluster import RayHandle, connect
from hypersort_ray.tracking.mlflow_logger import RunLogger
from hypersort_ray.tracking.registry import register_run
from hypersort_ray.train.trainer import LatentMapHook
from hypersort_ray.tune.results import plot_objective, print_table, results_frame, write_results
from hypersort_ray.tune.space import build_param_space, grid_size, split_validation
from hypersort_ray.tune.trial import MLFLOW_ID_FILE, AfterTraining, run_trial, trial_context, truth_path

log = logging.getLogger(__name__)

__all__ = ["SLOT_RESOURCE", "collect_rows", "effective_sweep", "leaked_train_actors", "run_sweep", "saved_trial_states"]

SLOT_RESOURCE = "trial_slot"
HEAD_RESOURCE = "node:__internal_head__"  # ray._common.constants.HEAD_NODE_RESOURCE_NAME
STATE_FILE = "sweep_state.json"
PLOT_KEYS = ("model.hypernet.latent_dim", "training.l1_weight")


# ------------------------------------------------------------------------------------ preparation
def effective_sweep(cfg: SweepConfig) -> SweepConfig:
    """The sweep as it will run: absolute paths and, for ``val_dice`` under ASHA, a checkpoint cadence
    that divides ``grace_period`` (the held-out Dice is computed on checkpoint epochs, so every ASHA
    rung — ``grace_period · reduction_factor^k`` — lands on an evaluated epoch)."""
    base = cfg.base
    out = Path(base.output_dir).expanduser().resolve()
    data = base.data
    if data.datalist is not None:
        data = data.model_copy(update={"datalist": Path(data.datalist).expanduser().resolve()})
    if data.truth is not None:
        data = data.model_copy(update={"truth": Path(data.truth).expanduser().resolve()})
    training = base.training
    if cfg.metric == "val_dice" and cfg.scheduler == "asha":
        every = math.gcd(training.checkpoint_every, cfg.grace_period)
        if every != training.checkpoint_every:
            log.warning(
                "sweep: training.checkpoint_every %s -> %s so that ASHA's rungs (grace_period %s) fall on "
                "validated epochs", training.checkpoint_every, every, cfg.grace_period,
            )
            training = training.model_copy(update={"checkpoint_every": every})
    base = base.model_copy(update={"output_dir": out, "data": data, "training": training})
    return cfg.model_copy(update={"base": base})


def _check_data(cfg: SweepConfig) -> dict[str, Any]:
    """Fail before Ray starts: datalist readable, split usable, objective computable."""
    base = cfg.base
    if base.data.datalist is None:
        raise ConfigError("base.data.datalist is not set: pass --datalist or set it in the sweep config")
    cases = load_datalist(base.data.datalist)
    train_idx, val_idx = split_validation(len(cases), base.data.validation_fraction)
    workers = cfg.workers_per_trial
    if "training.scaling.num_workers" not in cfg.space and workers > len(train_idx):
        raise ConfigError(
            f"workers_per_trial = {workers} exceeds the {len(train_idx)} training cases left after the validation split"
        )
    if cfg.metric == "val_dice" and not val_idx:
        raise ConfigError(
            "metric: val_dice needs held-out cases: set base.data.validation_fraction > 0 (e.g. 0.2)"
        )
    truth = truth_path(base)
    if cfg.metric in ("auroc_latent_norm", "spearman_latent_norm"):
        if truth is None:
            raise ConfigError(
                f"metric: {cfg.metric} needs a truth table (base.data.truth, or truth.csv beside the datalist)"
            )
    return {"n_cases": len(cases), "n_train": len(train_idx), "n_validation": len(val_idx),
            "truth": str(truth) if truth else None}


# ------------------------------------------------------------------------------------------- Ray
def _per_trial_cpus(cfg: SweepConfig) -> float:
    return cfg.workers_per_trial * cfg.cpus_per_worker


def _init_ray(address: str | None, cfg: SweepConfig) -> tuple[RayHandle, int | None]:
    """Start a private Ray for the sweep, or join a cluster. Returns (handle, trial slots or None).

    A private instance gets as many ``trial_slot`` resources as trials fit in the CPUs (a trial driver
    holds a slot, never a CPU its own workers need).
    """
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        handle = connect(address)
    else:
        cpus = os.cpu_count() or 1
        fits = max(1, int(cpus // max(_per_trial_cpus(cfg), 1e-9))) if cfg.gpus_per_worker == 0 else 1
        slots = max(1, min(cfg.max_concurrent_trials, fits))
        if cfg.max_concurrent_trials > fits:
            log.warning("sweep: %s concurrent trials of %g CPUs do not fit in %s CPUs; running %s at a time",
                        cfg.max_concurrent_trials, _per_trial_cpus(cfg), cpus, slots)
        handle = connect(None, num_cpus=cpus, resources={SLOT_RESOURCE: slots})
    slots = ray.cluster_resources().get(SLOT_RESOURCE)
    return handle, (int(slots) if slots else None)


def leaked_train_actors(wait_s: float = 30.0) -> list[str]:
    """Ray Train workers/controllers, or placement groups, still alive once every trial ended.

    Should be empty. Waits up to ``wait_s`` for Train's placement-group cleaner (and, right after
    ``ray.init``, for the dashboard). Needs the State API; returns ``["unknown (...)"]`` without it.
    """
    import ray
    from ray.util.state import list_actors, list_placement_groups

    job = ray.get_runtime_context().get_job_id()  # only this sweep's actors: a cluster may run others
    deadline = time.time() + wait_s
    while True:
        try:
            alive = list_actors(filters=[("state", "=", "ALIVE"), ("job_id", "=", job)], limit=1000,
                                raise_on_missing_output=False)
            groups = list_placement_groups(filters=[("state", "=", "CREATED"), ("creator_job_id", "=", job)],
                                           limit=1000, raise_on_missing_output=False)
        except Exception as exc:  # noqa: BLE001 - no dashboard, or it is still starting
            if time.time() > deadline:
                return [f"unknown (state API unavailable: {type(exc).__name__})"]
            time.sleep(2.0)
            continue
        names = [a.class_name for a in alive if a.class_name and ("RayTrainWorker" in a.class_name or "TrainController" in a.class_name)]
        pgs = [f"placement_group:{pg.placement_group_id[:12]}" for pg in groups]
        if not (names or pgs) or time.time() > deadline:
            return names + pgs
        time.sleep(1.0)


# --------------------------------------------------------------------------------------- results
def _error_text(err: BaseException | None) -> str:
    if err is None:
        return ""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # A RayTaskError's text is a traceback; its last line names the real exception.
    text = lines[-1] if lines else type(err).__name__
    return text[:300]


def _last_valid(df, column: str) -> float:
    if df is None or column not in getattr(df, "columns", []):
        return math.nan
    values = df[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def saved_trial_states(exp_path: Path) -> dict[str, str]:
    """Trial id → status as Tune saved it in the experiment state (what ``--resume`` will see).

    After an interrupt Tune stops the running trials in memory (TERMINATED, like an ASHA stop) but
    its saved state keeps them RUNNING: that is how an interrupted trial is told from a stopped one.
    """
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: str(t.status) for t in ExperimentAnalysis(str(exp_path)).trials}
    except Exception as exc:  # noqa: BLE001 - statuses then come from the results alone
        log.warning("sweep: could not read Tune's saved state (%s)", exc)
        return {}


def collect_rows(grid, cfg: SweepConfig, sweep_dir: Path, states: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per trial from a Tune ``ResultGrid``: status finished / stopped / failed / interrupted.

    Args:
        grid: the ``ResultGrid``.
        cfg: the sweep config.
        sweep_dir: the sweep folder (trial run folders are ``trials/<trial_id>``).
        states: :func:`saved_trial_states` (distinguishes interrupted from stopped trials).
    """
    rows = []
    metric = cfg.metric
    states = states or {}
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        state = states.get(str(trial_id))
        if result.error is not None or state == "ERROR":
            status = "failed"
        elif metrics.get("trial_done"):
            status = "finished"
        elif state in ("RUNNING", "PENDING", "PAUSED"):
            status = "interrupted"
        else:
            status = "stopped"
        history = result.metrics_dataframe
        row: dict[str, Any] = {k: (result.config or {}).get(k) for k in cfg.space}
        for key in ("auroc_latent_norm", "spearman_latent_norm", "val_dice", "val_dice_style", "val_dice_unperturbed",
                    "seg_loss", "dice", "loss", "latent_norm_mean", "epoch", "seconds"):
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(float(value)):
                row[key] = value
            elif key in (metric, "val_dice"):
                row[key] = _last_valid(history, key)
        row[metric] = metrics.get(metric) if status == "finished" else _last_valid(history, metric)
        run_dir = sweep_dir / "trials" / str(trial_id)
        id_file = run_dir / MLFLOW_ID_FILE
        row.update({
            "status": status,
            "trial_id": trial_id,
            "run_dir": str(run_dir),
            "mlflow_run_id": id_file.read_text().strip() if id_file.is_file() else "",
            "error": _error_text(result.error),
        })
        rows.append(row)
    return rows


def _close_child_runs(rows: list[dict[str, Any]], tracking_uri: str, enabled: bool) -> None:
    """Stopped trials' actors were ended mid-run: close their child runs and tag every status."""
    for row in rows:
        if not row.get("mlflow_run_id"):
            continue
        child = RunLogger(tracking_uri, run_id=row["mlflow_run_id"], enabled=enabled)
        if row["status"] == "interrupted":
            continue  # --resume continues this run
        child.set_tags({"hypersort.trial_status": row["status"]})
        if row["status"] == "stopped":
            child.end("KILLED")
        elif row["status"] == "failed":
            child.end("FAILED")


def _register_best(cfg: SweepConfig, best: dict[str, Any] | None, tracking_uri: str) -> dict[str, Any] | None:
    if not cfg.register_best_as or best is None:
        return None
    try:
        out = register_run(Path(best["run_dir"]), cfg.register_best_as, cfg.best_alias, tracking_uri)
    except Exception as exc:  # noqa: BLE001 - the sweep's results stand without the registry entry
        warnings.warn(f"registering the best trial failed: {exc}", RuntimeWarning, stacklevel=2)
        return {"error": str(exc)}
    return out if isinstance(out, dict) else {"result": str(out)}


def _sweep_params(cfg: SweepConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    space = data.pop("space")
    base = data.pop("base")
    params = {f"sweep.{k}": v for k, v in data.items()}
    params.update({f"space.{k}": json.dumps(v, default=str) for k, v in space.items()})
    params.update({f"base.{k}": v for k, v in flatten(base).items()})
    return params


# ------------------------------------------------------------------------------------------ sweep
def _tuner(cfg: SweepConfig, sweep_dir: Path, ctx: dict[str, Any], slots: int | None, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    resources: dict[str, float] = {"cpu": 0}
    if slots:
        resources[SLOT_RESOURCE] = 1
    else:
        # Tune refuses an all-zero request; a sliver of the head node's marker resource costs no CPU and
        # keeps the trial drivers beside the sweep driver, as trial_slot on the head would.
        resources[HEAD_RESOURCE] = 0.001
        log.warning(
            "sweep: the cluster has no '%s' resource; trial drivers hold no CPU and at most %s trials run at "
            "once (see deployments/README.md, Sweeps)", SLOT_RESOURCE, cfg.max_concurrent_trials,
        )
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    exp_path = sweep_dir / "tune" / cfg.name
    if resume:
        return tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)

    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            # The final report (held-out evaluation) repeats the last epoch: max_t must lie beyond it,
            # else ASHA stops a trial at its last training epoch, before that evaluation.
            max_t=cfg.base.training.epochs + 1,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            brackets=1,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if cfg.search == "optuna":  # pragma: no cover - optuna is not installed by default
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    concurrent = min(cfg.max_concurrent_trials, slots) if slots else cfg.max_concurrent_trials
    return tune.Tuner(
        trainable,
        param_space=build_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.resolved_mode,
            num_samples=cfg.num_samples,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=concurrent,
            reuse_actors=False,  # a reused actor would keep a stopped trial's fit() thread running
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(sweep_dir / "tune"),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures_per_trial),
            verbose=1,
        ),
    )


def run_sweep(
    cfg: SweepConfig,
    address: str | None = None,
    resume: bool = False,
    *,
    after_training: AfterTraining | None = None,
    latent_map: LatentMapHook | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep and leave results.csv, objective.png and MLflow runs.

    Args:
        cfg: the sweep config (``base.output_dir`` is the sweep folder).
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None: ``RAY_ADDRESS``, else
            a private local instance.
        resume: continue the interrupted sweep in the sweep folder (unfinished trials restart and
            continue from their last Train checkpoint; finished and failed trials are kept).
        after_training: run in each trial after training (the pipeline's analysis step).
        latent_map: draws each trial's latent maps on checkpoint epochs.

    Returns:
        A summary: folders and files, trial counts, the best trial, MLflow ids, leak check.

    Raises:
        ConfigError: bad space, missing data, nothing to resume, or a folder that already holds a sweep.
    """
    t0 = time.time()
    cfg = effective_sweep(cfg)
    sweep_dir = Path(cfg.base.output_dir)
    build_param_space(cfg)  # validates the space (every value, both ends of every range)
    data_info = _check_data(cfg)
    cfg, state = _open_sweep_folder(cfg, sweep_dir, resume)
    parent = _parent_run(cfg, sweep_dir, state)
    hooks = {"after_training": after_training, "latent_map": latent_map}
    try:
        grid, leaked = _fit(cfg, sweep_dir, parent, address, resume, data_info, hooks)
    except BaseException:
        parent.end("FAILED")
        raise
    return _finish(cfg, sweep_dir, grid, leaked, parent, resume, t0)


def _open_sweep_folder(cfg: SweepConfig, sweep_dir: Path, resume: bool) -> tuple[SweepConfig, dict[str, Any]]:
    """A new sweep folder (refusing one that holds this sweep), or the saved state of one to resume."""
    from ray import tune

    exp_path = sweep_dir / "tune" / cfg.name
    state: dict[str, Any] = {}
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise ConfigError(f"--resume: no sweep to resume in {exp_path}")
        if (sweep_dir / STATE_FILE).is_file():
            state = json.loads((sweep_dir / STATE_FILE).read_text())
        return _saved_config(cfg, sweep_dir), state
    if exp_path.exists():
        raise ConfigError(f"{sweep_dir} already holds sweep '{cfg.name}': pass --resume, or choose another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.yaml", config_to_yaml(cfg))
    return cfg, state


def _parent_run(cfg: SweepConfig, sweep_dir: Path, state: dict[str, Any]) -> RunLogger:
    """The sweep's MLflow parent run (the saved one on --resume); its id is kept in the sweep state."""
    uri = state.get("tracking_uri") or resolve_tracking_uri(cfg.base.tracking.tracking_uri)
    parent = RunLogger(uri, run_id=state.get("parent_run_id"), enabled=cfg.base.tracking.enabled)
    if parent.run_id is None:
        parent.start(cfg.base.tracking.experiment, cfg.name, artifact_location=artifact_location(uri),
                     tags={"hypersort.sweep": cfg.name, "hypersort.sweep_dir": str(sweep_dir), "hypersort.kind": "sweep"})
        parent.log_params(_sweep_params(cfg))
    state.update({"parent_run_id": parent.run_id, "tracking_uri": uri, "name": cfg.name})
    atomic_write_json(sweep_dir / STATE_FILE, state)
    return parent


def _fit(cfg: SweepConfig, sweep_dir: Path, parent: RunLogger, address: str | None, resume: bool,
         data_info: dict[str, Any], hooks: dict[str, Any]):
    """Run the Tuner on a private or joined Ray; returns (result grid, leaked Train actors)."""
    handle = None
    try:
        handle, slots = _init_ray(address, cfg)
        ctx = trial_context(cfg, sweep_dir, parent.tracking_uri, parent.run_id, **hooks)
        tuner = _tuner(cfg, sweep_dir, ctx, slots, resume)
        log.info(
            "sweep: %s sample(s) × %s grid point(s), %s on %s (%s), %s training / %s held-out cases, trial "
            "slots %s, folder %s", cfg.num_samples, grid_size(cfg), cfg.scheduler, cfg.metric, cfg.resolved_mode,
            data_info["n_train"], data_info["n_validation"], slots or "none", sweep_dir,
        )
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables must not pollute --json stdout
            grid = tuner.fit()
        return grid, leaked_train_actors()
    finally:
        if handle is not None and handle.started:
            handle.close()


def _best(df, cfg: SweepConfig) -> dict[str, Any] | None:
    finished = df[(df["status"] == "finished") & df[cfg.metric].notna()] if len(df) else df
    if not len(finished):
        return None
    top = finished.iloc[0]
    return {"trial_id": top["trial_id"], cfg.metric: float(top[cfg.metric]),
            "params": {k: _plain(top[k]) for k in cfg.space if k in top}, "run_dir": top["run_dir"],
            "mlflow_run_id": top.get("mlflow_run_id", "")}


def _finish(cfg: SweepConfig, sweep_dir: Path, grid, leaked: list[str], parent: RunLogger, resume: bool,
            t0: float) -> dict[str, Any]:
    """Results table, plot, best-trial registration, MLflow parent run closed; the sweep's summary."""
    rows = collect_rows(grid, cfg, sweep_dir, saved_trial_states(sweep_dir / "tune" / cfg.name))
    _close_child_runs(rows, parent.tracking_uri, cfg.base.tracking.enabled)
    df = results_frame(rows, metric=cfg.metric, mode=cfg.resolved_mode, params=list(cfg.space))
    results_csv = write_results(df, sweep_dir / "results.csv")
    print_table(df, metric=cfg.metric, mode=cfg.resolved_mode, title=f"sweep {cfg.name}")
    plot = plot_objective(df, sweep_dir / "objective.png", metric=cfg.metric, x_keys=PLOT_KEYS)
    counts = {s: int((df["status"] == s).sum()) for s in ("finished", "stopped", "failed", "interrupted")} if len(df) else {}
    interrupted = counts.get("interrupted", 0) > 0
    best = _best(df, cfg)
    registered = None if interrupted else _register_best(cfg, best, parent.tracking_uri)
    parent.log_metrics({"n_trials": len(df), **{f"n_{k}": v for k, v in counts.items()},
                        **({f"best_{cfg.metric}": best[cfg.metric]} if best else {})}, step=0)
    if best:
        parent.set_tags({"hypersort.best_trial": best["trial_id"], "hypersort.best_run_id": best["mlflow_run_id"]})
    for path in (results_csv, plot, sweep_dir / "sweep.yaml"):
        if path is not None and Path(path).is_file():
            parent.log_artifact(Path(path))
    parent.end("KILLED" if interrupted else "FINISHED")
    if interrupted:
        log.warning("sweep: interrupted with %s unfinished trial(s); continue with --resume (same --out %s)",
                    counts["interrupted"], sweep_dir)
    if leaked:
        warnings.warn(f"Ray Train actors still alive after the sweep: {leaked}", RuntimeWarning, stacklevel=2)
    return {
        "sweep_dir": str(sweep_dir), "results_csv": str(results_csv), "plot": str(plot) if plot else None,
        "metric": cfg.metric, "mode": cfg.resolved_mode, "n_trials": len(df), **{f"n_{k}": v for k, v in counts.items()},
        "best": best, "registered": registered, "parent_run_id": parent.run_id, "tracking_uri": parent.tracking_uri,
        "leaked_train_actors": leaked, "resumed": resume, "interrupted": interrupted,
        "seconds": round(time.time() - t0, 1),
    }


def _saved_config(cfg: SweepConfig, sweep_dir: Path) -> SweepConfig:
    """On --resume the sweep continues with the config it started with (``sweep.yaml``)."""
    path = sweep_dir / "sweep.yaml"
    if not path.is_file():
        return cfg
    saved = load_sweep_config(path)
    if saved != cfg:
        old, new = flatten(saved.model_dump(mode="json")), flatten(cfg.model_dump(mode="json"))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        log.warning("sweep: --resume continues with %s; ignoring the given config's changes to %s", path, changed[:8])
    return saved


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
