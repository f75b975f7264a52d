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
"""

from __future__ import annotations

import json
import math
import os
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
from hypersort_ray.errors import ConfigError

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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _collate(items: list[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.stack([torch.as_tensor(it["image"]) for it in items]).float().to(device)
    label = torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)
    index = torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long, device=device)
    return image, label, index


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
    from hypersort_ray.data.transforms import build_dataset
    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.step import TrainStep
    from hypersort_ray.model.unet import build_primary
    from hypersort_ray.train.checkpoint import load_checkpoint

    ctx = ctx or WorkerContext()
    tcfg = cfg.training
    n = len(cases)
    owned = shard_indices(n, ctx.world_size, ctx.rank)
    n_steps = steps_per_epoch(n, ctx.world_size, tcfg.batch_size)
    valid_counts = global_valid_counts(n, ctx.world_size, tcfg.batch_size, n_steps)

    # Same seed on every rank: identical H initialisation (DDP also broadcasts rank 0's weights).
    _seed_everything(tcfg.seed)
    primary = build_primary(cfg.model.unet)
    hyper = HyperNetwork(
        primary, cfg.model.hypernet.latent_dim, cfg.model.hypernet.hidden, cfg.model.hypernet.bound
    ).to(ctx.device)
    latents = LatentTable(
        owned,
        cfg.model.hypernet.latent_dim,
        init_std=tcfg.latent.init_std,
        lr=tcfg.latent.lr,
        betas=tuple(tcfg.latent.betas),
        eps=tcfg.latent.eps,
        seed=tcfg.seed,
    ).to(ctx.device)

    start_epoch, global_step, history = 0, 0, []
    sample_losses = SampleLosses(n)
    l1_weight = tcfg.l1_weight
    resume_state = None
    if ctx.resume_from is not None:
        ckpt = load_checkpoint(ctx.resume_from)
        _check_resume_compatible(cfg, ckpt.config, n)
        hyper.load_state_dict(ckpt.hyper_state)
        # The config's latent optimiser settings win over the saved ones (a resume may change lr).
        latents = LatentTable.merge(
            [ckpt.latents], lr=tcfg.latent.lr, betas=tuple(tcfg.latent.betas), eps=tcfg.latent.eps
        ).shard(owned).to(ctx.device)
        start_epoch, global_step = ckpt.epoch, ckpt.global_step
        history = list((ckpt.extra or {}).get("history", []))
        l1_weight = float(ckpt.meta.get("l1_weight_effective", l1_weight))
        resume_state = ckpt.optim_state
        sample_losses = SampleLosses(n, (ckpt.extra or {}).get("sample_losses"))

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
    )
    if resume_state is not None:
        step.load_state_dict(resume_state)

    dataset = build_dataset(
        list(cases),
        cfg.preprocessing,
        cfg.preprocessing.label.num_classes,
        cache=cfg.data.cache,
        cache_dir=cfg.data.cache_dir or (cfg.output_dir / "cache"),
        indices=owned,
    )
    position = {idx: pos for pos, idx in enumerate(owned)}
    case_ids = [c.case_id for c in cases]

    if tcfg.l1_calibrate and start_epoch == 0:
        l1_weight = _calibrate_l1(step, dataset, position, owned, tcfg.batch_size, ctx)
        step.l1_weight = l1_weight

    truth = _load_truth(cfg, n) if ctx.rank == 0 else None
    for epoch in range(start_epoch, tcfg.epochs):
        _reseed_transforms(dataset, hash((tcfg.seed, epoch, ctx.rank)))
        batches = epoch_batches(owned, tcfg.batch_size, n_steps, seed=tcfg.seed, epoch=epoch, rank=ctx.rank)
        sums = torch.zeros(8, dtype=torch.float64)
        epoch_loss: dict[int, float] = {}
        t0 = time.perf_counter()
        for s, batch in enumerate(batches):
            _maybe_fault(ctx.fault, epoch=epoch, step=s, rank=ctx.rank)
            real = len(batch)
            # Pad with this worker's own samples at weight 0 so every worker runs the same step count.
            padded = batch + [owned[k % len(owned)] for k in range(tcfg.batch_size - real)]
            weight = torch.zeros(tcfg.batch_size, dtype=torch.float32)
            weight[:real] = ctx.world_size / max(valid_counts[s], 1)
            image, label, index = _collate([dataset[position[i]] for i in padded], ctx.device)
            out = step.step(image, label, index, weight=weight.to(ctx.device))
            global_step += 1
            if real:
                if step.last_seg_loss is not None:
                    epoch_loss.update(zip(batch, step.last_seg_loss[:real].tolist(), strict=True))
                sums[0] += real
                sums[1:7] += real * torch.tensor([out[k] for k in _SUMMED], dtype=torch.float64)
        elapsed = time.perf_counter() - t0
        sums[7] = elapsed
        sums = ctx.all_reduce_sum(sums)
        count = max(float(sums[0]), 1.0)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "loss": float(sums[1]) / count,
            "seg_loss": float(sums[2]) / count,
            "dice_loss": float(sums[3]) / count,
            "ce_loss": float(sums[4]) / count,
            "l1": float(sums[5]) / count,
            "dice": float(sums[6]) / count,
            "samples_per_s": float(sums[0]) / max(float(sums[7]) / ctx.world_size, 1e-9),
            "l1_weight": float(l1_weight),
        }
        # Latent norms are per-sample scalars: gathering them for metrics is cheap and leaves λ itself
        # on its worker.
        norms = latents.values().norm(dim=1).cpu().numpy()
        gathered = ctx.all_gather_object((list(latents.indices), norms.tolist(), epoch_loss))
        all_idx = np.concatenate([np.asarray(g[0], dtype=int) for g in gathered])
        all_norm = np.concatenate([np.asarray(g[1], dtype=float) for g in gathered])
        for _, _, losses in gathered:
            sample_losses.add_epoch(np.fromiter(losses, int, len(losses)), np.fromiter(losses.values(), float, len(losses)))
        metrics["latent_norm_mean"] = float(all_norm.mean())
        metrics["latent_norm_max"] = float(all_norm.max())
        if truth is not None:
            metrics.update(latent_truth_metrics(all_idx, all_norm, truth))
        history.append(dict(metrics))

        is_last = epoch + 1 == tcfg.epochs
        part_dir = None
        if ctx.report is not None and (is_last or (epoch + 1) % tcfg.checkpoint_every == 0):
            part_dir = _write_part(
                cfg, ctx, hyper, step, latents, epoch + 1, global_step, n, case_ids, history, l1_weight,
                sample_losses,
            )
        if ctx.report is not None:
            ctx.report(metrics, part_dir)

    return LoopResult(
        epochs_run=tcfg.epochs - start_epoch,
        history=history,
        latent_state=latents.state_dict(),
        hyper_state={k: v.detach().cpu() for k, v in hyper.state_dict().items()},
        sample_losses=sample_losses.state_dict(),
    )


def _write_part(
    cfg, ctx, hyper, step, latents, epoch, global_step, n, case_ids, history, l1_weight, sample_losses
) -> Path:
    from hypersort_ray.train.checkpoint import write_checkpoint_part

    # mkdtemp, not a TemporaryDirectory: Ray may delete the folder after uploading it.
    part = Path(tempfile.mkdtemp(prefix=f"hypersort-ckpt-e{epoch}-r{ctx.rank}-"))
    shared = ctx.rank == 0
    write_checkpoint_part(
        part,
        rank=ctx.rank,
        latent_state={k: v.detach().cpu() for k, v in latents.state_dict().items()},
        hyper_state={k: v.detach().cpu() for k, v in hyper.state_dict().items()} if shared else None,
        optim_state=step.state_dict() if shared else None,
        config=cfg if shared else None,
        meta={
            "epoch": epoch,
            "global_step": global_step,
            "latent_dim": cfg.model.hypernet.latent_dim,
            "num_samples": n,
            "world_size": ctx.world_size,
            "case_ids": case_ids,
            "l1_weight_effective": float(l1_weight),
        }
        if shared
        else {"epoch": epoch, "global_step": global_step},
        extra={"history": history, "sample_losses": sample_losses.state_dict()} if shared else None,
    )
    return part


def _check_resume_compatible(cfg: ExperimentConfig, old: ExperimentConfig, n: int) -> None:
    """A checkpoint can continue with other workers/epochs/learning rates, not another model."""
    if old.model != cfg.model:
        raise ConfigError(
            "resume: the checkpoint's model section differs from this config's "
            f"(checkpoint {old.model.model_dump()} vs config {cfg.model.model_dump()})"
        )


def _calibrate_l1(step, dataset, position, owned, batch_size, ctx: WorkerContext) -> float:
    """Scale l1_weight by the mean norm of the segmentation gradient on λ at initialisation, averaged
    over workers, so the L1 pull has the same relative strength whatever the UNet size."""
    batch = owned[:batch_size]
    image, label, index = _collate([dataset[position[i]] for i in batch], ctx.device)
    g = torch.tensor([float(step.calibrate_l1(image, label, index)), 1.0], dtype=torch.float64)
    g = ctx.all_reduce_sum(g)
    scale = float(g[0] / g[1])
    return float(step.l1_weight * scale)


# ------------------------------------------------------------------------------------ truth metrics
def _load_truth(cfg: ExperimentConfig, n: int):
    """The truth table for per-epoch AUROC/Spearman, or None when the dataset has none."""
    path = cfg.data.truth
    if path is None and cfg.data.datalist is not None:
        candidate = Path(cfg.data.datalist)
        candidate = (candidate if candidate.is_dir() else candidate.parent) / "truth.csv"
        path = candidate if candidate.is_file() else None
    if path is None or not Path(path).is_file():
        return None
    import pandas as pd

    df = pd.read_csv(path)
    if "index" not in df.columns:
        return None
    return df[df["index"] < n]


def latent_truth_metrics(indices: np.ndarray, norms: np.ndarray, truth) -> dict[str, float]:
    """AUROC of ‖λ‖ for perturbed-vs-clean and its Spearman correlation with voxels changed."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    norm_by_index = dict(zip(indices.tolist(), norms.tolist(), strict=True))
    rows = truth[truth["index"].isin(norm_by_index)]
    if rows.empty:
        return {}
    score = rows["index"].map(norm_by_index).to_numpy(dtype=float)
    out: dict[str, float] = {}
    if "voxels_changed" in rows:
        changed = rows["voxels_changed"].to_numpy(dtype=float)
        positive = changed > 0
        if 0 < positive.sum() < len(positive):
            out["auroc_latent_norm"] = float(roc_auc_score(positive, score))
            rho = spearmanr(score, changed).statistic
            out["spearman_latent_norm"] = float(rho) if np.isfinite(rho) else 0.0
    elif "perturbation" in rows:
        positive = rows["perturbation"].astype(str).to_numpy() != "none"
        if 0 < positive.sum() < len(positive):
            out["auroc_latent_norm"] = float(roc_auc_score(positive, score))
    return out


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Per-epoch metrics as CSV (union of keys, epoch first), written atomically."""
    import pandas as pd

    df = pd.DataFrame(history)
    if "epoch" in df:
        df = df[["epoch"] + [c for c in df.columns if c != "epoch"]]
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def dump_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
