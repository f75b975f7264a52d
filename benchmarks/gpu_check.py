"""Every GPU code path in one run: a table of checks and timings; exit status 1 when any check fails.

Run it whenever a GPU machine is available (record the table in docs/benchmarks.md)::

    python benchmarks/gpu_check.py --json gpu_check.json            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick             # the same code paths on CPU (a smoke test)

Checks (each in its own ``try``: one failure does not hide the others):

1. ``environment`` — torch, CUDA, the device, bf16 support.
2. ``step <precision> <size>³`` — the batched training step (grouped convolutions, per-sample generated
   weights) at B = 4, fp32 / bf16 autocast / fp16 with a gradient scaler, timed beside the reference way
   (one sample per step, one optimiser per latent) and a plain fixed-weight UNet step
   (``benchmarks/train_step.py`` in fresh processes); targets: ≥ 5× the reference, ≥ 0.9 of the plain UNet.
3. ``memory budget`` — the paper network at the largest size with ``training.memory_budget_gb`` set:
   the automatic micro-batch / activation checkpointing keeps the peak under the budget.
4. ``ray train (nccl)`` — two epochs of Ray Train on the GPU (nccl backend, bf16) on a tiny synthetic set.
5. ``sliding window`` — a large volume segmented on the GPU while the volume and the stitched output stay
   in host memory (GPU memory peak well below the volume's logits).
6. ``serve replica`` — the Ray Serve endpoint with ``num_gpus=1``: one request, same mask as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Checks:
    """Runs named checks, catching every failure, and prints the table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 - the table must show every failure
            detail, ok = f"{type(exc).__name__}: {exc}"[:300], False
            traceback.print_exc(file=sys.stderr)
        self.rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({self.rows[-1]['seconds']} s): {detail}", file=sys.stderr, flush=True)

    def table(self) -> str:
        width = max(len(r["check"]) for r in self.rows)
        lines = [f"{'check':<{width}}  result  seconds  detail"]
        for r in self.rows:
            lines.append(f"{r['check']:<{width}}  {'ok' if r['ok'] else 'FAIL':<6}  {r['seconds']:>7}  {r['detail']}")
        return "\n".join(lines)


def _environment(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (a CPU build of torch, or no driver)")
        props = torch.cuda.get_device_properties(0)
        return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, "
                f"{props.total_memory / 2**30:.0f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return f"torch {torch.__version__} on CPU (smoke run: no GPU path is really exercised)"


def _train_step(device: str, size: int, precision: str, batch: int, steps: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [sys.executable, str(HERE / "train_step.py"), "--device", device, "--size", str(size), "--batch",
               str(batch), "--network", "paper", "--steps", str(steps), "--warmup", "1", "--json", str(out),
               "--set", f"training.precision={precision}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        res = json.loads(out.read_text())
    ours, naive, plain = (res.get(k, {}).get("samples_per_s") for k in ("ours", "naive", "plain_unet"))
    vs_ref = ours / naive if ours and naive else float("nan")
    vs_plain = ours / plain if ours and plain else float("nan")
    detail = f"{ours:.2f} samples/s; {vs_ref:.1f}x the reference (target >= 5), {vs_plain:.2f} of a plain UNet (>= 0.9)"
    if device == "cuda" and (vs_ref < 5 or vs_plain < 0.9):
        raise RuntimeError(f"below target: {detail}")
    return detail


def _memory_budget(device: str, size: int, budget_gb: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "budget.json"
        cmd = [sys.executable, str(HERE / "train_step.py"), "--device", device, "--size", str(size), "--batch", "2",
               "--network", "paper", "--steps", "1", "--variants", "ours", "--json", str(out),
               "--set", f"training.memory_budget_gb={budget_gb}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        ours = json.loads(out.read_text())["ours"]
    peak_gb = (ours.get("peak_cuda_mb") or ours.get("peak_rss_mb") or 0) / 1024
    if peak_gb > budget_gb:
        raise RuntimeError(f"peak {peak_gb:.2f} GB above the {budget_gb} GB budget")
    return f"{size}^3 B=2 with a {budget_gb} GB budget: peak {peak_gb:.2f} GB, {ours.get('plan', '')}"


def _ray_train(device: str, work: Path) -> str:
    from hypersort_ray.config import load_config
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.train.trainer import run_training

    data = generate_dataset(work / "data", cases=4, size=32, seed=0)
    gpu = device == "cuda"
    cfg = load_config(
        None,
        ["training.epochs=2", "training.batch_size=2", "training.scaling.num_workers=1", "tracking.enabled=false",
         f"training.scaling.use_gpu={str(gpu).lower()}", f"training.precision={'bf16' if gpu else 'fp32'}",
         "analysis.run_after_training=false"],
        {"data.datalist": Path(data["datalist"]), "output_dir": work / "run"},
    )
    summary = run_training(cfg, progress=False)
    return f"{summary['epochs']} epochs, loss {summary.get('loss', float('nan')):.3f}, {summary.get('samples_per_s', 0):.1f} samples/s"


def _tiny_model(work: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_model import make_tiny_run

    return make_tiny_run(work, name="model")


def _sliding_window(device: str, work: Path, edge: int) -> str:
    import numpy as np
    import torch

    from hypersort_ray.inference import load_model

    run = _tiny_model(work)
    volume = np.random.default_rng(0).random((edge, edge, edge), dtype=np.float32)
    model = load_model(run, device=device)
    model.gpu_stitch_limit_bytes = 0  # force the host-memory stitch, the path for large volumes
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    mask = model.predict(volume, style="main")["mask"]
    seconds = time.perf_counter() - t0
    reference = load_model(run, device="cpu").predict(volume, style="main")["mask"]
    agree = float((mask == reference).mean())
    if agree < 0.999:
        raise RuntimeError(f"GPU and CPU masks agree on {agree:.4%} of the voxels")
    detail = f"{edge}^3 in {seconds:.1f} s, masks agree on {agree:.4%}"
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        logits = 2 * volume.size * 4 / 2**20
        detail += f", GPU peak {peak:.0f} MB vs {logits:.0f} MB of logits"
        if peak > logits:
            raise RuntimeError(f"the stitched output went to the GPU: {detail}")
    return detail


def _serve_replica(device: str, work: Path) -> str:
    import gzip
    import socket
    import urllib.request

    import nibabel as nib
    import numpy as np

    from hypersort_ray.config import ServeSettings
    from hypersort_ray.inference import load_model
    from hypersort_ray.serve.app import run_server, stop_server

    run = _tiny_model(work / "serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(model=str(run), port=port, num_gpus=1 if device == "cuda" else 0)
    image = next(iter(sorted((Path(run) / "data" / "images").glob("*.nii.gz"))))
    url = run_server(settings, block=False)
    try:
        body, boundary = _multipart(image.read_bytes(), image.name)
        request = urllib.request.Request(f"{url}/v1/segment", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=300) as response:
            payload = response.read()
    finally:
        stop_server()
    mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(payload)).dataobj)
    expected = load_model(run).predict(image, style="main")["mask"]
    if not np.array_equal(mask, expected):
        raise RuntimeError("the replica's mask differs from the CPU model's")
    return f"/v1/segment answered on a {'GPU' if device == 'cuda' else 'CPU'} replica; mask equal to the CPU model's"


def _multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = "hypersortgpucheck"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/gzip\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sizes", default="64,96,128,168", help="ROI edges of the step timings")
    parser.add_argument("--budget-gb", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="one small size, fewer steps (smoke run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = [32] if args.quick else [int(s) for s in args.sizes.split(",")]
    precisions = ["fp32", "bf16", "fp16"] if args.device == "cuda" else ["fp32", "bf16"]
    checks = Checks()
    checks.run("environment", lambda: _environment(args.device))
    for size in sizes:
        for precision in precisions:
            checks.run(f"step {precision} {size}^3 B=4",
                       lambda s=size, p=precision: _train_step(args.device, s, p, 4, 1 if args.quick else 3))
    checks.run("memory budget", lambda: _memory_budget(args.device, sizes[-1], args.budget_gb))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checks.run("ray train (nccl)" if args.device == "cuda" else "ray train (gloo)",
                   lambda: _ray_train(args.device, work / "train"))
        checks.run("sliding window", lambda: _sliding_window(args.device, work / "sw", 96 if args.quick else 320))
        checks.run("serve replica", lambda: _serve_replica(args.device, work))
    print(checks.table())
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "rows": checks.rows}, indent=2))
    return 0 if all(r["ok"] for r in checks.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
