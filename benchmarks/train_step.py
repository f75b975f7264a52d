"""Training-step throughput and peak memory: our batched HyperSORT step vs the reference way vs a plain UNet.

Three variants, each in a fresh subprocess (so peak RSS is per variant), warm-up steps excluded:

* ``ours`` — :class:`hypersort_ray.model.step.TrainStep`: fused hyper-network output layer, B samples
  per step via grouped convolutions (weight gradients of large maps by a forward convolution), one
  fused-Adam step of H per batch, row-sparse latent Adam; ``--micro-batch`` sets how many samples the
  primary network runs at a time (default ``auto``: TrainStep's default).
* ``naive`` — what the reference code does, written here from its description: one sample per step,
  one ``torch.optim.Adam`` per latent, a hyper-network with one head per primary parameter, and the
  primary network's Parameters deleted and replaced by generated tensors through attribute assignment
  (Python loop), default ``torch.optim.Adam`` for H.
* ``plain_unet`` — the floor: the same UNet as an ordinary ``nn.Module`` with fixed weights + Adam on a
  batch of B (no hyper-network, no latents).

Usage::

    python benchmarks/train_step.py --size 32 --batch 4 --network paper --json out.json [--steps 3]
    python benchmarks/train_step.py --size 168 --batch 2 --variants ours --set training.memory_budget_gb=6
    python benchmarks/train_step.py --memory-table --sizes 64,96 --batches 1,2,4 --modes off,blocks,nested

``--set key=value`` (repeatable) is applied to an experiment config (validated like ``hypersort train
--set``): ``ours`` takes ``training.micro_batch``, ``training.activation_checkpointing``,
``training.memory_budget_gb``, ``training.precision`` and ``training.channels_last`` from it, and
``model.unet.channels/n_down/n_fix`` override ``--network``. ``--micro-batch`` (if given) wins over
``training.micro_batch``.

``--memory-table`` runs ``ours`` alone, one fresh subprocess per (ROI, batch, checkpointing) with the whole
batch in one micro-batch, and prints peak memory (resident-set high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), seconds per sample and the estimate of
:mod:`hypersort_ray.model.memory` for the same setting; per ROI and mode, the per-sample footprint is
the peak's slope over the batch sizes measured, and the largest batch that fits 24, 40 and 80 GB follows
from it. ``--max-gb`` skips settings whose estimate exceeds it (to keep a shared machine safe).

Prints a table and writes ``{"ours": {"samples_per_s", "peak_rss_mb", ...}, "naive": {...},
"plain_unet": {...}, "config": {...}}``. On a shared machine use ``--repeat R``: the variants run
interleaved R times and the best run of each is reported (``*_runs`` keep every run); the table also
shows CPU time per sample, which other processes disturb less than wall time (but not at all reliably
when the machine is oversubscribed: the load average at start and end is recorded in ``config``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NETWORKS = {
    # The paper's primary network (§4) and hyper-network: C=16, 3 down stages, 3 convs per stage;
    # H = [d, 50, 50, 50] with d = 2.
    "paper": dict(channels=16, n_down=3, n_fix=3),
    "small": dict(channels=8, n_down=2, n_fix=2),
}
LATENT_DIM, HIDDEN = 2, (50, 50, 50)
VARIANTS = ("ours", "naive", "plain_unet")


# ------------------------------------------------------------------------------------------ variants
def _data(args: argparse.Namespace, n: int, device: Any):
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (n, 1, args.size, args.size, args.size)
    x = torch.randn(shape, generator=g)
    y = (x + 0.5 * torch.randn(shape, generator=g) > 0.5).long()
    return x.to(device), y.to(device)


def _unet(args: argparse.Namespace):
    from hypersort_ray.model.unet import UNet

    return UNet(in_channels=1, out_channels=2, spatial_dims=3, **NETWORKS[args.network])


def experiment_config(args: argparse.Namespace):
    """The experiment config for ``--set``: ``--network`` and ``--size`` first, the user's keys last."""
    from hypersort_ray.config import load_config

    net = NETWORKS[args.network]
    base = [f"model.unet.{k}={v}" for k, v in net.items()]
    base.append(f"preprocessing.roi_size=[{args.size},{args.size},{args.size}]")
    return load_config(None, overrides=base + list(args.set or []))


def _micro_batch(args: argparse.Namespace, cfg) -> Any:
    value = args.micro_batch
    if value is None:
        return cfg.training.micro_batch
    if value in ("auto", "none"):
        return {"auto": "auto", "none": None}[value]
    return int(value)


_STEP: Any = None  # the TrainStep of the ``ours`` child, read back for its plan


def _ours(args: argparse.Namespace, device: Any):
    import torch

    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.step import TrainStep
    from hypersort_ray.model.unet import UNet

    global _STEP
    cfg = experiment_config(args)
    tcfg, ucfg = cfg.training, cfg.model.unet
    B = args.batch
    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=2, spatial_dims=3, channels=ucfg.channels, n_down=ucfg.n_down,
                n_fix=ucfg.n_fix)
    hyper = HyperNetwork(unet, latent_dim=LATENT_DIM, hidden=HIDDEN).to(device)
    table = LatentTable(range(B), dim=LATENT_DIM, device=device)
    step = TrainStep(
        hyper,
        table,
        lr=1e-4,
        l1_weight=1.0,
        micro_batch=_micro_batch(args, cfg),
        activation_checkpointing=tcfg.activation_checkpointing,
        memory_budget_gb=tcfg.memory_budget_gb,
        precision=tcfg.precision,
        channels_last=tcfg.channels_last,
    )
    _STEP = step
    x, y = _data(args, B, device)
    index = torch.arange(B, device=device)

    def run() -> None:
        step.step(x, y, index)

    return run, B


class _NaiveHyperModel:
    """The reference's hyper-model, from its description: per-parameter heads, attribute assignment."""

    def __init__(self, primary, latent_dim: int, hidden: tuple[int, ...]) -> None:
        import torch
        from torch import nn

        widths = (latent_dim, *hidden)
        self.hypernetwork = nn.Sequential(
            *[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.model = primary
        self.shapes = {}
        self.heads = nn.ModuleDict()
        for name, value in list(primary.state_dict().items()):
            self.shapes[name] = value.shape
            head = nn.Linear(widths[-1], value.numel())
            head.bias.data = value.detach().reshape(-1).clone()
            self.heads[name.replace(".", ";")] = head
            owner, _, attr = name.rpartition(".")
            delattr(primary.get_submodule(owner), attr)  # the module no longer owns a Parameter
        self.torch = torch

    def parameters(self):
        yield from self.hypernetwork.parameters()
        yield from self.heads.parameters()

    def to(self, device):
        self.hypernetwork.to(device)
        self.heads.to(device)
        self.model.to(device)
        return self

    def __call__(self, x, latent):
        outs = []
        for i in range(latent.shape[0]):
            h = self.hypernetwork(latent[i : i + 1])
            for key, head in self.heads.items():
                name = key.replace(";", ".")
                owner, _, attr = name.rpartition(".")
                value = self.torch.tanh(head(h)) * 5
                setattr(self.model.get_submodule(owner), attr, value.reshape(self.shapes[name]))
            outs.append(self.model(x[i : i + 1]))
        return self.torch.cat(outs)


def _naive(args: argparse.Namespace, device: Any):
    import torch
    from monai.losses import DiceCELoss

    B = args.batch
    model = _NaiveHyperModel(_unet(args), LATENT_DIM, HIDDEN).to(device)
    opt_h = torch.optim.Adam(model.parameters(), lr=1e-4)  # the reference's default Adam
    latents, opts = {}, {}
    for i in range(B):
        lam = (torch.randn(1, LATENT_DIM, device=device) * 0.05).requires_grad_(True)
        latents[i] = lam
        opts[i] = torch.optim.Adam([lam], lr=1e-3, betas=(0.7, 0.9))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x, y = _data(args, B, device)

    def run() -> None:  # one "batch" = B single-sample steps, as the reference processes them
        for i in range(B):
            opts[i].zero_grad()
            opt_h.zero_grad()
            pred = model(x[i : i + 1], latents[i])
            loss = loss_fn(pred, y[i : i + 1]) + latents[i].abs().sum()
            loss.backward()
            opts[i].step()
            opt_h.step()

    return run, B


def _plain(args: argparse.Namespace, device: Any):
    import torch
    from monai.losses import DiceCELoss

    net = _unet(args).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x, y = _data(args, args.batch, device)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return run, args.batch


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process and return its measurements."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    build = {"ours": _ours, "naive": _naive, "plain_unet": _plain}[args.child]
    run, samples_per_call = build(args, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        run()
    sync()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    samples = args.steps * samples_per_call
    out = {
        "samples_per_s": samples / wall,
        "wall_s_per_sample": wall / samples,
        "cpu_s_per_sample": cpu / samples,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if _STEP is not None:
        out.update(_plan_info(args, _STEP, device))
    return out


def _plan_info(args: argparse.Namespace, step: Any, device: Any) -> dict[str, Any]:
    """The micro-batch and checkpointing ``ours`` ran with, and the memory model's estimate of its peak."""
    import torch

    from hypersort_ray.model.memory import UNetShape, estimate_step_memory, hyper_sizes

    image = torch.empty(args.batch, 1, args.size, args.size, args.size, device="meta")
    micro, mode = step.plan(image)
    params, generated = hyper_sizes(step.hyper)
    est = estimate_step_memory(
        UNetShape.of(step.hyper.primary),
        (args.size,) * 3,
        micro_batch=micro,
        batch=args.batch,
        checkpoint=mode,
        hyper_params=params,
        generated=generated,
        device_type=device.type,
    )
    return {
        "micro_batch_used": micro,
        "checkpoint_used": mode,
        "estimate_mb": est.peak_bytes / 2**20,
        "budget_gb": None if step.last_plan is None else step.last_plan.budget_bytes / 2**30,
    }


# ------------------------------------------------------------------------------------------ driver
def _spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--network",
        args.network,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
    ]
    if args.micro_batch is not None:
        cmd += ["--micro-batch", str(args.micro_batch)]
    for item in args.set or []:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict[str, Any]], config: dict[str, Any]) -> str:
    unit = "peak_cuda_mb" if config["device"] == "cuda" else "peak_rss_mb"
    lines = [
        f"network={config['network']} size={config['size']}^3 batch={config['batch']} steps={config['steps']} "
        f"repeat={config['repeat']} device={config['device']} threads={results['ours'].get('threads')} "
        f"load avg {config['load_avg_start']:.1f} -> {config['load_avg_end']:.1f}",
        f"{'variant':<11} {'samples/s':>10} {'s/sample':>9} {'cpu s/sample':>13} {unit:>12}",
    ]
    for name in VARIANTS:
        r = results[name]
        lines.append(
            f"{name:<11} {r['samples_per_s']:>10.3f} {r['wall_s_per_sample']:>9.3f} "
            f"{r['cpu_s_per_sample']:>13.3f} {r[unit]:>12.0f}"
        )
    ours, naive, plain = (results[k] for k in VARIANTS)
    lines.append(
        f"ours vs naive: {ours['samples_per_s'] / naive['samples_per_s']:.2f}x samples/s "
        f"({naive['cpu_s_per_sample'] / ours['cpu_s_per_sample']:.2f}x by CPU time); "
        f"ours per-sample time / plain UNet: {ours['wall_s_per_sample'] / plain['wall_s_per_sample']:.2f} "
        f"(CPU {ours['cpu_s_per_sample'] / plain['cpu_s_per_sample']:.2f}); "
        f"peak memory ours/naive: {ours[unit] / naive[unit]:.2f}"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ memory table
FIT_GB = (24, 40, 80)


def _estimate_only(args: argparse.Namespace, size: int, batch: int, mode: str) -> float:
    """The memory model's peak (GiB) for ``ours`` with the whole batch in one micro-batch."""
    from hypersort_ray.model.memory import UNetShape, estimate_step_memory

    cfg = experiment_config(argparse.Namespace(**{**vars(args), "size": size}))
    u = cfg.model.unet
    shape = UNetShape(1, 2, u.channels, u.n_down, u.n_fix)
    params, generated = _hyper_counts(shape)
    return estimate_step_memory(
        shape, (size,) * 3, micro_batch=batch, batch=batch, checkpoint=mode, hyper_params=params,
        generated=generated, device_type=args.device,
    ).peak_gb


def _hyper_counts(shape: Any) -> tuple[int, int]:
    """``(parameters of H, generated values)`` for the benchmark's H over a UNet of ``shape``."""
    import torch

    from hypersort_ray.model.unet import UNet

    with torch.device("meta"):
        unet = UNet(1, 2, channels=shape.channels, n_down=shape.n_down, n_fix=shape.n_fix)
    generated = sum(p.numel() for p in unet.parameters())
    mlp = sum(a * b + b for a, b in zip((LATENT_DIM, *HIDDEN[:-1]), HIDDEN, strict=True))
    return mlp + HIDDEN[-1] * generated + generated, generated


def memory_table(args: argparse.Namespace) -> None:
    """Peak memory and seconds per sample of ``ours`` per ROI, batch and checkpointing mode."""
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    modes = args.modes.split(",")
    only = None
    if args.only:
        only = {tuple(t.split(":")) for t in args.only.split(",")}
    unit = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    rows: list[dict[str, Any]] = []
    print(f"{'ROI':>5} {'B':>2} {'ckpt':>7} {'peak GB':>8} {'est GB':>7} {'s/sample':>9} {'cpu s/sample':>12}")
    for size in sizes:
        for mode in modes:
            for batch in batches:
                if only is not None and (str(size), str(batch), mode) not in only:
                    continue
                est = _estimate_only(args, size, batch, mode)
                row: dict[str, Any] = {"size": size, "batch": batch, "mode": mode, "estimate_gb": est}
                if args.max_gb is not None and est > args.max_gb:
                    row["skipped"] = f"estimate {est:.1f} GB > --max-gb {args.max_gb}"
                    print(f"{size:>5} {batch:>2} {mode:>7} skipped: {row['skipped']}", flush=True)
                    rows.append(row)
                    continue
                sub = argparse.Namespace(**{**vars(args), "size": size, "batch": batch, "micro_batch": "none"})
                sub.set = [*(args.set or []), f"training.activation_checkpointing={_mode_value(mode)}"]
                t0 = time.perf_counter()
                r = _spawn(sub, "ours")
                row.update(r, peak_gb=r[unit] / 1024, wall_s=time.perf_counter() - t0)
                rows.append(row)
                print(
                    f"{size:>5} {batch:>2} {mode:>7} {row['peak_gb']:>8.2f} {est:>7.2f} "
                    f"{r['wall_s_per_sample']:>9.2f} {r['cpu_s_per_sample']:>12.2f}",
                    flush=True,
                )
    fits = _fits(rows)
    if fits:
        print("\nper-sample footprint (slope of the measured peaks over B) and the largest batch that fits:")
        print(f"{'ROI':>5} {'ckpt':>7} {'GB/sample':>10} {'fixed GB':>9} " + " ".join(f"{g:>5}GB" for g in FIT_GB))
        for f in fits:
            print(
                f"{f['size']:>5} {f['mode']:>7} {f['per_sample_gb']:>10.2f} {f['fixed_gb']:>9.2f} "
                + " ".join(f"{f['fits'][str(g)]:>7}" for g in FIT_GB)
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "fits": fits, "argv": sys.argv[1:]}, indent=1))


def _mode_value(mode: str) -> str:
    return {"off": "false"}.get(mode, mode)


def _fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (ROI, mode) with two or more measured batches: the per-sample footprint (slope of the peak
    between the two largest batches measured: below them H's gradient, not the activations, may set the
    peak) and ``floor((budget - intercept) / slope)`` for each of :data:`FIT_GB`."""
    out = []
    keys = sorted({(r["size"], r["mode"]) for r in rows if "peak_gb" in r})
    for size, mode in keys:
        pts = sorted(
            (r["batch"], r["peak_gb"]) for r in rows if (r["size"], r["mode"]) == (size, mode) and "peak_gb" in r
        )
        if len({b for b, _ in pts}) < 2:
            continue
        (b0, p0), (b1, p1) = pts[-2], pts[-1]
        slope = (p1 - p0) / (b1 - b0)
        fixed = p1 - slope * b1
        fit = {str(g): max(0, int((g - fixed) // slope)) if slope > 0 else None for g in FIT_GB}
        out.append({"size": size, "mode": mode, "per_sample_gb": slope, "fixed_gb": fixed, "fits": fit, "points": pts})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="cubic patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="paper")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (batches) per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs per variant; best reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--micro-batch",
        default=None,
        help="ours: TrainStep(micro_batch=...): auto, none (whole batch) or a number "
        "(default: training.micro_batch of the config, auto)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="experiment-config override (repeatable), e.g. training.memory_budget_gb=6",
    )
    parser.add_argument("--memory-table", action="store_true", help="the memory/checkpointing table (ours)")
    parser.add_argument("--sizes", default="64,96,128,168", help="--memory-table: ROI edges")
    parser.add_argument("--batches", default="1,2,4", help="--memory-table: batch sizes")
    parser.add_argument("--modes", default="off,blocks,nested", help="--memory-table: checkpointing modes")
    parser.add_argument("--max-gb", type=float, help="--memory-table: skip settings estimated above this")
    parser.add_argument(
        "--only",
        default=None,
        help="--memory-table: run only these SIZE:BATCH:MODE triples (comma-separated), e.g. 168:1:nested",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return
    if args.memory_table:
        memory_table(args)
        return

    config = {
        "network": args.network,
        **NETWORKS[args.network],
        "latent_dim": LATENT_DIM,
        "hidden": list(HIDDEN),
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "micro_batch": args.micro_batch,
        "device": args.device,
        "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_start": os.getloadavg()[0],
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeat):
        for variant in runs:
            runs[variant].append(_spawn(args, variant))
    results: dict[str, Any] = {}
    for variant, rs in runs.items():
        best = max(rs, key=lambda r: r["samples_per_s"])
        results[variant] = {
            **best,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "samples_per_s_runs": [r["samples_per_s"] for r in rs],
            "cpu_s_per_sample_runs": [r["cpu_s_per_sample"] for r in rs],
        }
    config["load_avg_end"] = os.getloadavg()[0]
    results["config"] = config
    if all(v in results for v in VARIANTS):
        print(_table(results, config))
    else:
        print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
