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


def _ours(args: argparse.Namespace, device: Any):
    import torch

    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.step import TrainStep

    B = args.batch
    hyper = HyperNetwork(_unet(args), latent_dim=LATENT_DIM, hidden=HIDDEN).to(device)
    table = LatentTable(range(B), dim=LATENT_DIM, device=device)
    micro = (
        {"auto": "auto", "none": None}[args.micro_batch]
        if args.micro_batch in ("auto", "none")
        else int(args.micro_batch)
    )
    step = TrainStep(hyper, table, lr=1e-4, l1_weight=1.0, micro_batch=micro)
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
    return out


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
        "--micro-batch",
        args.micro_batch,
    ]
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
        default="auto",
        help="ours: TrainStep(micro_batch=...): auto (default), none (whole batch) or a number",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
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
