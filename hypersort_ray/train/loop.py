"""The per-worker training loop: an ordinary function that knows nothing about Ray.

World size 1 runs it in a plain Python process; the Ray Train layer (``train/trainer.py``) runs it once
per worker with a :class:`WorkerContext` carrying the rank, a DDP wrapper and the report callback.

Sharding (why it is written this way):
- Sample identity is the datalist index. Worker ``r`` of ``W`` owns ``{i : i mod W == r}``, holds only
  those latent rows (and their Adam state) and loads only those cases.
- Every worker runs the same number of steps per epoch, ``ceil(ceil(N/W) / B)``, so DDP's all-reduce
  can never wait on a worker that has run out of data. A worker whose shard is shorter pads its last
  batches with its own samples at weight 0: they contribute nothing to H's gradient and their λ is not
  stepped.
- Per-sample weights are ``W / (valid samples in this global step)``, so DDP's average over workers
  equals the mean over the global batch, whatever the shard sizes: one worker with batch 4 and two
  workers with batch 2 take the same step.

Data loading: the worker's batches of an epoch are fixed in advance, so a ``DataLoader`` with
``data.loader_workers`` processes prepares them ahead of the step (a GPU never waits on CPU transforms).
Random transforms are reseeded per (seed, epoch, rank, step), so a run gives the same batches whatever
the number of loader processes.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hypersort_ray.config import ExperimentConfig
from hypersort_ray.data.transforms import build_dataset
from hypersort_ray.data.truth import perturbed_flags, read_truth_csv, resolve_truth_path, truth_columns
from hypersort_ray.errors import ConfigError, RunError
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.step import TrainStep, scheduled_lr
from hypersort_ray.model.unet import build_primary
from hypersort_ray.runs.checkpoint import Checkpoint, load_checkpoint, write_checkpoint_part

_SUMMED = ("loss", "seg_loss", "dice_loss", "ce_loss", "l1", "dice")
ReportFn = Callable[[dict[str, Any], Path | None], None]


def _identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def _single_gather(obj: Any) -> list[Any]:
    return [obj]


@dataclass
class WorkerContext:
    """What the loop needs from its environment (Ray Train or a plain process).

    Args:
        rank: this worker's rank.
        world_size: number of workers.
        device: torch device for the model and batches.
        wrap_hyper: wraps H for gradient all-reduce (DDP); identity when None.
        all_reduce_sum: sums a tensor across workers (in place or returned).
        all_gather_object: gathers a picklable object from every worker (list indexed by rank).
        report: called once per epoch on every worker with the epoch metrics and, on checkpoint
            epochs, the folder holding this worker's part of the checkpoint.
        resume_from: a complete (merged) checkpoint folder to continue from.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_hyper: Callable[[nn.Module], nn.Module] | None = None
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity_reduce
    all_gather_object: Callable[[Any], list[Any]] = _single_gather
    report: ReportFn | None = None
    resume_from: Path | None = None
    fault: dict[str, int] | None = None


# ------------------------------------------------------------------------------------ scheduling
def shard_indices(num_samples: int, world_size: int, rank: int) -> list[int]:
    """The sample indices worker ``rank`` of ``world_size`` owns (``i mod W == rank``)."""
    if world_size > num_samples:
        raise ConfigError(
            f"training.scaling.num_workers = {world_size} exceeds the number of training cases "
            f"({num_samples}): every worker must own at least one sample"
        )
    return list(range(rank, num_samples, world_size))


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def epoch_batches(owned: Sequence[int], batch_size: int, n_steps: int, *, seed: int, epoch: int, rank: int) -> list[list[int]]:
    """This worker's batches for one epoch: a seeded shuffle of its own indices, chopped into
    ``n_steps`` batches of ``batch_size``; the tail batches may be short or empty."""
    rng = np.random.default_rng([seed, epoch, rank])
    order = [owned[i] for i in rng.permutation(len(owned))]
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(n_steps)]


def global_valid_counts(num_samples: int, world_size: int, batch_size: int, n_steps: int) -> list[int]:
    """Number of real (non-padding) samples across all workers at each step of an epoch."""
    sizes = [len(range(r, num_samples, world_size)) for r in range(world_size)]
    return [sum(min(max(sz - s * batch_size, 0), batch_size) for sz in sizes) for s in range(n_steps)]


# ------------------------------------------------------------------------------------ the loop
@dataclass
class LoopResult:
    epochs_run: int
    history: list[dict[str, Any]]
    latent_state: dict[str, torch.Tensor]
    hyper_state: dict[str, torch.Tensor]
    #: per-sample training-loss record of every sample (:class:`SampleLosses` as a dict of lists)
    sample_losses: dict[str, list[float]] | None = None
    #: every sample's λ after each epoch (:class:`LatentTrajectory`'s state; rank 0 only)
    latent_trajectory: dict[str, torch.Tensor] | None = None


class SampleLosses:
    """Each sample's own segmentation loss during training: sum and count over epochs, and the last value.

    The loss is the one the sample's step computed (Dice + CE under its own λ, before the update), so it
    costs nothing extra. Its mean over epochs is a training-dynamics score: a label that disagrees with
    what the images share is fitted later and stays costlier for longer, even when the network ends up
    memorising it. Per-sample scalars are gathered across workers like the latent norms; λ itself
    stays on its worker. Saved in the checkpoint's ``extra`` (rank 0), restored on resume.
    """

    def __init__(self, n: int, state: Mapping[str, Any] | None = None) -> None:
        self.sum = np.zeros(n)
        self.count = np.zeros(n)
        self.last = np.full(n, np.nan)
        if state is not None and all(len(state.get(k, ())) == n for k in ("sum", "count", "last")):
            self.sum = np.asarray(state["sum"], dtype=np.float64)
            self.count = np.asarray(state["count"], dtype=np.float64)
            self.last = np.asarray(state["last"], dtype=np.float64)

    def add_epoch(self, indices: np.ndarray, values: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=int)
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        self.sum[indices[ok]] += values[ok]
        self.count[indices[ok]] += 1
        self.last[indices] = values

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)

    def state_dict(self) -> dict[str, list[float]]:
        return {"sum": self.sum.tolist(), "count": self.count.tolist(), "last": self.last.tolist()}


class LatentTrajectory:
    """Every sample's λ at the end of each epoch (rank 0), for the λ-trajectory scores of the analysis.

    In-sample λ ends where H let it rest; how a case *got* there (how early it left the main cloud, how
    far it travelled) is free evidence, since the latents are gathered anyway for the per-epoch norms.
    ``N·d`` floats per epoch; saved in the checkpoint's ``extra`` (rank 0), restored on resume.
    """

    def __init__(self, n: int, dim: int, state: Mapping[str, Any] | None = None) -> None:
        self.n, self.dim = n, dim
        self.rows: dict[int, np.ndarray] = {}
        if state is not None and "epochs" in state and "values" in state:
            values = np.asarray(state["values"], dtype=np.float32)
            if values.ndim == 3 and values.shape[1:] == (n, dim):  # else: another model/dataset, drop it
                epochs = np.asarray(state["epochs"]).tolist()
                self.rows = {int(e): v for e, v in zip(epochs, values, strict=True)}

    def add_epoch(self, epoch: int, indices: np.ndarray, values: np.ndarray) -> None:
        row = np.full((self.n, self.dim), np.nan, dtype=np.float32)
        row[np.asarray(indices, dtype=int)] = np.asarray(values, dtype=np.float32).reshape(-1, self.dim)
        self.rows[int(epoch)] = row  # a restart replaying an epoch overwrites it

    def state_dict(self) -> dict[str, torch.Tensor]:
        epochs = sorted(self.rows)
        empty = np.zeros((0, self.n, self.dim), np.float32)
        values = np.stack([self.rows[e] for e in epochs]) if epochs else empty
        return {"epochs": torch.tensor(epochs, dtype=torch.int64), "values": torch.from_numpy(values)}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _maybe_fault(fault: dict[str, int] | None, *, epoch: int, step: int, rank: int) -> None:
    """Test-only fault injection: raise once at (epoch, step, rank); a marker file makes it one-shot."""
    if not fault:
        return
    if (epoch, step, rank) != (fault.get("epoch"), fault.get("step"), fault.get("rank")):
        return
    marker = Path(str(fault.get("marker", "")))
    if marker and marker.exists():
        return
    if marker:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fault injected at epoch {epoch} step {step} rank {rank}\n")
    raise RuntimeError(f"injected test fault at epoch {epoch}, step {step}, rank {rank}")


def _reseed_transforms(dataset: Any, seed: int) -> None:
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % 2**32)


class _EpochBatches(torch.utils.data.Dataset):
    """The worker's padded batches of one epoch as a map-style dataset: item ``s`` is step ``s``'s
    ``(image, label, index)``, so a ``DataLoader`` can prepare the next steps while this one trains."""

    def __init__(self, dataset: Any, position: Mapping[int, int], batches: Sequence[Sequence[int]], key: tuple) -> None:
        self.dataset, self.position, self.batches, self.key = dataset, position, list(batches), key

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Per-step seeds: the same batches whether one process or several prepare them.
        _reseed_transforms(self.dataset, hash((*self.key, s)))
        items = [self.dataset[self.position[i]] for i in self.batches[s]]
        image = torch.stack([torch.as_tensor(it["image"]).float() for it in items])
        label = torch.stack([torch.as_tensor(it["label"]) for it in items])
        index = torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long)
        return image, label, index


@dataclass
class _WorkerState:
    """Everything one worker trains and carries from epoch to epoch."""

    hyper: HyperNetwork
    latents: LatentTable
    step: TrainStep
    dataset: Any
    owned: list[int]
    case_ids: list[str]
    n_steps: int
    valid_counts: list[int]
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sample_losses: SampleLosses | None = None
    latent_trajectory: LatentTrajectory | None = None
    #: this worker's samples' own losses in the current epoch
    epoch_loss: dict[int, float] = field(default_factory=dict)

    @property
    def position(self) -> dict[int, int]:
        return {idx: pos for pos, idx in enumerate(self.owned)}

    def result(self, epochs: int) -> LoopResult:
        return LoopResult(
            epochs_run=epochs - self.start_epoch,
            history=self.history,
            latent_state=self.latents.state_dict(),
            hyper_state={k: v.detach().cpu() for k, v in self.hyper.state_dict().items()},
            sample_losses=self.sample_losses.state_dict() if self.sample_losses else None,
            latent_trajectory=self.latent_trajectory.state_dict() if self.latent_trajectory else None,
        )


def train_worker(cfg: ExperimentConfig, cases: Sequence[Any], ctx: WorkerContext | None = None) -> LoopResult:
    """Run the HyperSORT training loop for one worker.

    Args:
        cfg: the experiment configuration.
        cases: every case of the datalist (``Case`` objects, index order); the worker loads only its own.
        ctx: rank, world size, DDP wrapper, collectives and report callback; defaults to one
            process with no reporting.

    Example:
        >>> result = train_worker(cfg, load_datalist("data/datalist.tsv"))  # doctest: +SKIP
    """
    ctx = ctx or WorkerContext()
    state = _build_worker(cfg, cases, ctx)
    truth = _load_truth(cfg, len(cases)) if ctx.rank == 0 else None
    for epoch in range(state.start_epoch, cfg.training.epochs):
        metrics = _train_epoch(state, cfg, ctx, epoch)
        metrics.update(_latent_metrics(state, ctx, truth, epoch=epoch + 1))
        state.history.append(dict(metrics))
        _report(state, cfg, ctx, metrics, epoch + 1)
    return state.result(cfg.training.epochs)


def _build_worker(cfg: ExperimentConfig, cases: Sequence[Any], ctx: WorkerContext) -> _WorkerState:
    """H, this worker's latent shard, the optimiser step and the data: fresh, or from a checkpoint."""
    tcfg, hn = cfg.training, cfg.model.hypernet
    n = len(cases)
    owned = shard_indices(n, ctx.world_size, ctx.rank)
    # Same seed on every rank: identical H initialisation (DDP also broadcasts rank 0's weights).
    _seed_everything(tcfg.seed)
    hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound).to(ctx.device)
    latent_opt = {"lr": tcfg.latent.lr, "betas": tuple(tcfg.latent.betas), "eps": tcfg.latent.eps}
    latents = LatentTable(owned, hn.latent_dim, init_std=tcfg.latent.init_std, seed=tcfg.seed, **latent_opt)
    ckpt = load_checkpoint(ctx.resume_from) if ctx.resume_from is not None else None
    l1_weight = tcfg.l1_weight
    if ckpt is not None:
        _check_resume_compatible(cfg, ckpt, [c.case_id for c in cases])
        hyper.load_state_dict(ckpt.hyper_state)
        # The config's latent optimiser settings win over the saved ones (a resume may change lr).
        latents = LatentTable.merge([ckpt.latents], **latent_opt).shard(owned)
        l1_weight = float(ckpt.meta.get("l1_weight_effective", l1_weight))
    latents = latents.to(ctx.device)
    hyper_module = ctx.wrap_hyper(hyper) if ctx.wrap_hyper else hyper
    step = TrainStep(
        hyper,
        latents,
        lr=tcfg.lr,
        weight_decay=tcfg.weight_decay,
        l1_weight=l1_weight,
        grad_clip=tcfg.grad_clip,
        precision=tcfg.precision,
        channels_last=tcfg.channels_last,
        hyper_module=hyper_module,
        micro_batch=tcfg.micro_batch,
        activation_checkpointing=tcfg.activation_checkpointing,
        memory_budget_gb=tcfg.memory_budget_gb,
    )
    n_steps = steps_per_epoch(n, ctx.world_size, tcfg.batch_size)
    state = _WorkerState(
        hyper=hyper,
        latents=latents,
        step=step,
        dataset=build_dataset(
            list(cases),
            cfg.preprocessing,
            cfg.preprocessing.label.num_classes,
            cache=cfg.data.cache,
            cache_dir=cfg.data.cache_dir or (Path(cfg.output_dir) / "cache"),
            indices=owned,
        ),
        owned=owned,
        case_ids=[c.case_id for c in cases],
        n_steps=n_steps,
        valid_counts=global_valid_counts(n, ctx.world_size, tcfg.batch_size, n_steps),
        sample_losses=SampleLosses(n, (ckpt.extra or {}).get("sample_losses") if ckpt else None),
    )
    if ctx.rank == 0:
        saved = (ckpt.extra or {}).get("latent_trajectory") if ckpt else None
        state.latent_trajectory = LatentTrajectory(n, hn.latent_dim, saved)
    if ckpt is not None:
        state.start_epoch, state.global_step = ckpt.epoch, ckpt.global_step
        state.history = list((ckpt.extra or {}).get("history", []))
        if ckpt.optim_state is not None:
            step.load_state_dict(ckpt.optim_state)
    elif tcfg.l1_calibrate:
        step.l1_weight = _calibrate_l1(state, tcfg.batch_size, ctx)
    return state


def _epoch_loader(state: _WorkerState, cfg: ExperimentConfig, ctx: WorkerContext, epoch: int):
    """This epoch's batches, padded to the common step count, prepared by ``data.loader_workers``."""
    tcfg = cfg.training
    batches = epoch_batches(state.owned, tcfg.batch_size, state.n_steps, seed=tcfg.seed, epoch=epoch, rank=ctx.rank)
    # Pad with this worker's own samples at weight 0 so every worker runs the same step count.
    padded = [b + [state.owned[k % len(state.owned)] for k in range(tcfg.batch_size - len(b))] for b in batches]
    workers = cfg.data.loader_workers
    loader = torch.utils.data.DataLoader(
        _EpochBatches(state.dataset, state.position, padded, (tcfg.seed, epoch, ctx.rank)),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=ctx.device.type == "cuda",
    )
    return batches, loader


def _train_epoch(state: _WorkerState, cfg: ExperimentConfig, ctx: WorkerContext, epoch: int) -> dict[str, Any]:
    """One epoch of steps; returns the epoch's metrics (summed over workers)."""
    tcfg = cfg.training
    batches, loader = _epoch_loader(state, cfg, ctx, epoch)
    sums = torch.zeros(8, dtype=torch.float64)
    epoch_loss: dict[int, float] = {}
    lr = float(state.step.optimizer.param_groups[0]["lr"])
    t0 = time.perf_counter()
    for s, (batch, (image, label, index)) in enumerate(zip(batches, loader, strict=True)):
        _maybe_fault(ctx.fault, epoch=epoch, step=s, rank=ctx.rank)
        real = len(batch)
        weight = torch.zeros(tcfg.batch_size, dtype=torch.float32)
        weight[:real] = ctx.world_size / max(state.valid_counts[s], 1)
        lr = scheduled_lr(
            tcfg.lr, epoch + s / state.n_steps, tcfg.epochs, tcfg.lr_schedule, tcfg.warmup_fraction * tcfg.epochs
        )
        state.step.set_lr(lr)
        out = state.step.step(
            image.to(ctx.device, non_blocking=True),
            label.to(ctx.device, non_blocking=True),
            index.to(ctx.device),
            weight=weight.to(ctx.device),
        )
        state.global_step += 1
        if real:
            if state.step.last_seg_loss is not None:
                epoch_loss.update(zip(batch, state.step.last_seg_loss[:real].tolist(), strict=True))
            sums[0] += real
            sums[1:7] += real * torch.tensor([out[k] for k in _SUMMED], dtype=torch.float64)
    sums[7] = time.perf_counter() - t0
    sums = ctx.all_reduce_sum(sums)
    count = max(float(sums[0]), 1.0)
    state.epoch_loss = epoch_loss
    return {
        "epoch": epoch + 1,
        "global_step": state.global_step,
        **{k: float(sums[i + 1]) / count for i, k in enumerate(("loss", "seg_loss", "dice_loss", "ce_loss", "l1", "dice"))},
        "samples_per_s": float(sums[0]) / max(float(sums[7]) / ctx.world_size, 1e-9),
        "l1_weight": float(state.step.l1_weight),
        "lr": lr,
    }


def _latent_metrics(state: _WorkerState, ctx: WorkerContext, truth: Any, *, epoch: int = 0) -> dict[str, Any]:
    """Latent norms (and, with a truth table, their AUROC/Spearman); records each sample's loss and, on
    rank 0, every λ of this epoch (the trajectory).

    Norms, losses and the d-dimensional λ are small per-sample values: gathering them once per epoch is
    cheap (the λ rows and their Adam state still live and step only on their worker).
    """
    values = state.latents.values().detach().cpu()
    norms = values.norm(dim=1).numpy()
    gathered = ctx.all_gather_object(
        (list(state.latents.indices), norms.tolist(), state.epoch_loss, values.tolist())
    )
    all_idx = np.concatenate([np.asarray(g[0], dtype=int) for g in gathered])
    all_norm = np.concatenate([np.asarray(g[1], dtype=float) for g in gathered])
    if state.latent_trajectory is not None:
        all_values = np.concatenate([np.asarray(g[3], dtype=np.float32) for g in gathered])
        state.latent_trajectory.add_epoch(epoch, all_idx, all_values)
    for _, _, losses, _ in gathered:
        state.sample_losses.add_epoch(
            np.fromiter(losses, int, len(losses)), np.fromiter(losses.values(), float, len(losses))
        )
    out = {"latent_norm_mean": float(all_norm.mean()), "latent_norm_max": float(all_norm.max())}
    if truth is not None:
        out.update(latent_truth_metrics(all_idx, all_norm, truth))
    return out


def _report(state: _WorkerState, cfg: ExperimentConfig, ctx: WorkerContext, metrics: dict[str, Any], epoch: int) -> None:
    """Report the epoch; on checkpoint epochs with this worker's part of the checkpoint."""
    if ctx.report is None:
        return
    tcfg = cfg.training
    part = None
    if epoch == tcfg.epochs or epoch % tcfg.checkpoint_every == 0:
        part = _write_part(state, cfg, ctx, epoch)
    ctx.report(metrics, part)


def _write_part(state: _WorkerState, cfg: ExperimentConfig, ctx: WorkerContext, epoch: int) -> Path:
    """This worker's part of the checkpoint in a fresh folder (rank 0 also writes the shared files)."""
    # mkdtemp, not a TemporaryDirectory: Ray may delete the folder after uploading it.
    part = Path(tempfile.mkdtemp(prefix=f"hypersort-ckpt-e{epoch}-r{ctx.rank}-"))
    shared = ctx.rank == 0
    meta: dict[str, Any] = {"epoch": epoch, "global_step": state.global_step}
    if shared:
        meta.update(
            latent_dim=cfg.model.hypernet.latent_dim,
            num_samples=len(state.case_ids),
            world_size=ctx.world_size,
            case_ids=state.case_ids,
            l1_weight_effective=float(state.step.l1_weight),
        )
    write_checkpoint_part(
        part,
        rank=ctx.rank,
        latent_state={k: v.detach().cpu() for k, v in state.latents.state_dict().items()},
        hyper_state={k: v.detach().cpu() for k, v in state.hyper.state_dict().items()} if shared else None,
        optim_state=state.step.state_dict() if shared else None,
        config=cfg if shared else None,
        meta=meta,
        extra={
            "history": state.history,
            "sample_losses": state.sample_losses.state_dict(),
            "latent_trajectory": state.latent_trajectory.state_dict(),
        } if shared else None,
    )
    return part


def _check_resume_compatible(cfg: ExperimentConfig, ckpt: Checkpoint, case_ids: Sequence[str]) -> None:
    """A checkpoint can continue with other workers/epochs/learning rates, not another model or dataset."""
    if ckpt.config.model != cfg.model:
        raise ConfigError(
            "resume: the checkpoint's model section differs from this config's "
            f"(checkpoint {ckpt.config.model.model_dump()} vs config {cfg.model.model_dump()})"
        )
    if list(case_ids) != ckpt.case_ids:
        changed = next((i for i, (a, b) in enumerate(zip(case_ids, ckpt.case_ids, strict=False)) if a != b), None)
        where = f"first difference at index {changed}" if changed is not None else "different number of cases"
        raise RunError(
            f"resume: the datalist holds {len(case_ids)} cases but the checkpoint {ckpt.path} was trained on "
            f"{ckpt.num_samples} ({where}); sample identity is the datalist index, so a run continues only "
            "on its own datalist"
        )
    if ckpt.epoch >= cfg.training.epochs:
        raise ConfigError(
            f"resume: the checkpoint {ckpt.path} has already trained {ckpt.epoch} epochs and "
            f"training.epochs = {cfg.training.epochs}; ask for more (--epochs N)"
        )


def _calibrate_l1(state: _WorkerState, batch_size: int, ctx: WorkerContext) -> float:
    """Scale l1_weight by the mean norm of the segmentation gradient on λ at initialisation, averaged
    over workers, so the L1 pull has the same relative strength whatever the UNet size."""
    batch = state.owned[:batch_size]
    image, label, index = _EpochBatches(state.dataset, state.position, [batch], (0,))[0]
    grad = state.step.calibrate_l1(image.to(ctx.device), label.to(ctx.device), index.to(ctx.device))
    g = ctx.all_reduce_sum(torch.tensor([float(grad), 1.0], dtype=torch.float64))
    return float(state.step.l1_weight * float(g[0] / g[1]))


# ------------------------------------------------------------------------------------ truth metrics
def _load_truth(cfg: ExperimentConfig, n: int):
    """The truth table (rows with an index below ``n``) for per-epoch AUROC/Spearman, or None."""
    path = resolve_truth_path(None, cfg.data.truth, cfg.data.datalist)
    if path is None:
        return None
    frame = read_truth_csv(path)
    if "index" not in frame.columns:
        return None
    return frame[frame["index"] < n].reset_index(drop=True)


def latent_truth_metrics(indices: np.ndarray, norms: np.ndarray, truth) -> dict[str, float]:
    """AUROC of ‖λ‖ for perturbed-vs-clean (the one definition in :mod:`hypersort_ray.data.truth`) and
    its Spearman correlation with the primary numeric truth column (e.g. voxels changed)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    norm_by_index = dict(zip(indices.tolist(), norms.tolist(), strict=True))
    rows = truth[truth["index"].isin(norm_by_index)].reset_index(drop=True)
    if rows.empty:
        return {}
    score = rows["index"].map(norm_by_index).to_numpy(dtype=float)
    kind, numeric = truth_columns(rows)
    perturbed, _ = perturbed_flags(rows, kind, numeric)
    out: dict[str, float] = {}
    if perturbed is not None and 0 < perturbed.sum() < len(perturbed):
        out["auroc_latent_norm"] = float(roc_auc_score(perturbed, score))
    if numeric:
        target = rows[numeric[0]].to_numpy(dtype=float)
        if np.ptp(target) > 0:
            rho = spearmanr(score, target).statistic
            out["spearman_latent_norm"] = float(rho) if np.isfinite(rho) else 0.0
    return out
