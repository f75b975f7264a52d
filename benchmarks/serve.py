"""Serving latency and throughput of the HyperSORT endpoint (one replica, real HTTP on 127.0.0.1).

For each volume size (default 64³ and 128³ at the model's training spacing, so the network sees that
many voxels) and each ``style_cache_size`` (default 32 = cache on, 0 = every request regenerates its
UNet from the hyper-network), it deploys one app per cache setting (one replica each), warms them up,
sends a bounded number of requests cycling through every style -- interleaved between the apps in
rounds, so both see the same background load -- and reports client-side p50/p95/p99 latency,
requests/s and the server's own ``X-Inference-Ms``. It also times the generation of one UNet from H,
which is what a cache hit saves. ``--probe-batching`` also measures, in-process, what ``@serve.batch`` could gain:
UNet forward time per window at several batch sizes, and k same-style volumes segmented one by one vs.
in one batched sliding-window pass.

Usage::

    python benchmarks/serve.py                                   # demo-size random model
    python benchmarks/serve.py --model runs/demo --json out.json --probe-batching
    python benchmarks/serve.py --sizes 64 --requests 10 --cache-sizes 32 0
    # same run, current vs the package of an older commit (benchmarks/make_baseline.py exports it):
    python benchmarks/make_baseline.py 182d31f /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/serve.py --sizes 64 --cache-sizes 32 --baseline old_wrap:build_application
    # same run, requests traced to MLflow (a local store) vs not traced:
    python benchmarks/serve.py --sizes 64 --cache-sizes 32 --tracing
    # the endpoint beside its floor (bare sliding-window forward, 1 thread) and under 1/4/8 clients:
    python benchmarks/serve.py --sizes 64 128 --cache-sizes 32 --concurrency 1 4 8 --floor --probe-threads

Numbers depend on what else runs on the machine: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ------------------------------------------------------------------------------------------ model
def make_random_model(root: Path, latent_dim: int = 2) -> Path:
    """A run folder with a randomly initialised demo-size model (the default config) and 3 styles."""
    import torch

    from hypersort_ray.config import load_config
    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.unet import build_primary
    from hypersort_ray.runs import RunDir
    from hypersort_ray.runs.checkpoint import save_checkpoint

    cfg = load_config(None, [f"model.hypernet.latent_dim={latent_dim}"])
    run = RunDir(root)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    torch.manual_seed(0)
    hn = cfg.model.hypernet
    hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)
    case_ids = [f"case_{i:03d}" for i in range(4)]
    save_checkpoint(
        run.checkpoint_dir, latent_state=LatentTable(range(4), latent_dim, seed=0), hyper_state=hyper.state_dict(),
        config=cfg, epoch=1, global_step=1, case_ids=case_ids,
    )
    styles = [
        {"id": 0, "centroid": [0.0] * latent_dim, "size": 50},
        {"id": 1, "centroid": ([1.5, -1.0] + [0.0] * latent_dim)[:latent_dim], "size": 6, "name": "eroded-like"},
        {"id": 2, "centroid": ([-1.5, 1.0] + [0.0] * latent_dim)[:latent_dim], "size": 6, "name": "dilated-like"},
    ]
    run.write_styles({"main_style": 0, "styles": styles})
    return run.path


def volume_bytes(size: int, spacing: list[float] | None, seed: int = 0) -> bytes:
    """A CT-like int16 volume (ball + noise) as .nii.gz at the model's training spacing."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    grid = np.indices(shape, dtype=np.float32)
    ball = sum((g - size / 2) ** 2 for g in grid) < (size / 3) ** 2
    data = (40 + 60 * ball + rng.normal(0, 8, shape)).astype(np.int16)
    data[0] = -1000
    affine = np.diag([*(spacing or [1.0, 1.0, 1.0]), 1.0])
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1)


# ------------------------------------------------------------------------------------------ serve
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def send_requests(url: str, payload: bytes, styles: list[str], requests: int, concurrency: int, start: int = 0):
    """Send ``requests`` uploads (styles cycling from ``start``), ``concurrency`` at a time.

    Returns (client latencies ms, server X-Inference-Ms, non-200 count, wall seconds).
    """
    import httpx

    def one(i: int) -> tuple[float, float, int]:
        with httpx.Client(timeout=600.0) as c:
            t0 = time.perf_counter()
            r = c.post(
                f"{url}/v1/segment",
                files={"file": ("bench.nii.gz", payload, "application/octet-stream")},
                data={"style": styles[i % len(styles)]},
            )
            return (time.perf_counter() - t0) * 1000.0, float(r.headers.get("x-inference-ms", "nan")), r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(start, start + requests)))
    wall = time.perf_counter() - t0
    return [r[0] for r in results], [r[1] for r in results], sum(r[2] != 200 for r in results), wall


def bench_serving(args: argparse.Namespace, model_ref: str) -> list[dict[str, Any]]:
    """One app per cache setting (one replica each), requests interleaved between them in rounds so that
    both see the same background load; only one app is busy at a time. With ``--baseline``, one more app per
    cache setting built by that callable (e.g. an older copy of the serve package) joins the rounds."""
    import ray
    from ray import serve

    from hypersort_ray.config import ServeSettings
    from hypersort_ray.inference import load_model
    from hypersort_ray.serve.app import build_application, http_options, proxy_environment

    model = load_model(model_ref, cache_size=0)
    spacing = model.config.preprocessing.spacing
    styles = [s.id for s in model.styles]
    payloads = {size: volume_bytes(size, spacing, seed=size) for size in args.sizes}
    port = _free_port()
    # No token on a loopback benchmark; the proxy guard is on, as `hypersort serve` installs it.
    base = ServeSettings(model=model_ref, host="127.0.0.1", port=port, num_cpus=args.num_cpus,
                         request_timeout_s=600, max_ongoing_requests=8, auth_token_env=None,
                         insecure_no_auth=True)
    builders = {"current": build_application}
    if args.baseline:
        builders["baseline"] = _import_callable(args.baseline)
    if args.tracing:
        # The same model, every request traced (the serving run gets its metrics either way).
        builders["traced"] = build_application
        base = base.model_copy(update={"trace_sample_rate": 0.0})
    apps = {(label, cache): f"/{label}-cache{cache}" for label in builders for cache in args.cache_sizes}
    rows = []
    for key, value in proxy_environment(base).items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=int(args.num_cpus) * len(apps) + 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options=http_options(base))
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        for (label, cache), prefix in apps.items():
            settings = base.model_copy(update={"style_cache_size": cache})
            if label == "traced":
                settings = settings.model_copy(update={"trace_sample_rate": 1.0})
            serve.run(builders[label](settings), name=f"bench-{label}-cache{cache}", route_prefix=prefix,
                      blocking=False)
        print(f"{len(apps)} apps ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for size, concurrency in [(size, c) for size in args.sizes for c in args.concurrency]:
            n = max(args.requests if size <= 64 else max(4, args.requests // 3), concurrency * 3)
            acc = {key: ([], [], 0, 0.0) for key in apps}
            for prefix in apps.values():  # warm-up: one request per style
                send_requests(url + prefix, payloads[size], styles, len(styles), 1)
            done = 0
            while done < n:
                step = min(concurrency, n - done)
                for key, prefix in apps.items():
                    lat, srv, err, wall = send_requests(url + prefix, payloads[size], styles, step, step, start=done)
                    a = acc[key]
                    acc[key] = (a[0] + lat, a[1] + srv, a[2] + err, a[3] + wall)
                done += step
            for (label, cache), (lat, srv, err, wall) in acc.items():
                row = {
                    "app": label, "size": size, "style_cache_size": cache, "concurrency": concurrency,
                    "requests": n,
                    "errors": err, "p50_ms": _percentile(lat, 50), "p95_ms": _percentile(lat, 95),
                    "p99_ms": _percentile(lat, 99), "mean_ms": statistics.fmean(lat), "requests_per_s": n / wall,
                    "server_inference_p50_ms": _percentile(srv, 50), "wall_s": wall,
                }
                rows.append(row)
                print(f"[{label} cache {cache}] {size}^3: p50 {row['p50_ms']:.0f} ms, "
                      f"{row['requests_per_s']:.2f} req/s", file=sys.stderr)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return rows


def floor_ms(model_ref: str, size: int, repeats: int = 5, threads: int = 1, sw_batch_size: int | None = None) -> dict[str, float]:
    """The floor of one request, in-process with the replica's thread count: the bare sliding-window
    forward of the same generated UNet on the same volume (already preprocessed), and the whole
    ``HyperSortModel.predict`` (preprocessing, windows, inverse geometry) — median of ``repeats``."""
    import torch

    from hypersort_ray.inference import load_model

    torch.set_num_threads(threads)
    model = load_model(model_ref)
    if sw_batch_size is not None:
        model.sw_batch_size = sw_batch_size
    model.calibrate_single_window()
    spacing = model.config.preprocessing.spacing
    volume = np.random.default_rng(size).random((size,) * 3, dtype=np.float32)
    affine = np.diag([*(spacing or [1.0] * 3), 1.0])
    latent = model.resolve("main")[0]
    prepared = model.prepare(volume, affine)
    model.predict_processed(prepared.prepared.image, latent)
    bare, whole = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict_processed(prepared.prepared.image, latent)
        bare.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        model.predict(volume, affine=affine, latent=list(latent))
        whole.append((time.perf_counter() - t0) * 1000)
    return {"bare_forward_ms": statistics.median(bare), "predict_ms": statistics.median(whole)}


def probe_threads(model_ref: str, size: int, threads: list[int], sw_sizes: list[int]) -> list[dict[str, Any]]:
    """Bare forward time per setting of torch threads × ``sw_batch_size`` (what the replica's defaults
    should be, measured rather than assumed)."""
    rows = []
    for t in threads:
        for sw in sw_sizes:
            rows.append({"threads": t, "sw_batch_size": sw, **floor_ms(model_ref, size, repeats=3, threads=t,
                                                                        sw_batch_size=sw)})
            print(f"  threads {t}, sw_batch_size {sw}: {rows[-1]['bare_forward_ms']:.0f} ms", file=sys.stderr)
    return rows


def unet_generation_ms(model_ref: str, repeats: int = 10) -> float:
    """What the style cache saves per request: generating one UNet from H (in-process, 1 thread)."""
    import torch

    from hypersort_ray.inference import load_model

    torch.set_num_threads(1)
    model = load_model(model_ref, cache_size=0)
    latent = model.styles[-1].latent
    model.unet_for(latent)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.unet_for(latent)
    return (time.perf_counter() - t0) * 1000 / repeats


# ------------------------------------------------------------------------------------ batching
def probe_batching(model_ref: str, size: int, k: int, repeats: int) -> dict[str, Any]:
    """What @serve.batch could save: per-window forward cost vs batch size, and k volumes one by one
    vs. in one batched sliding-window pass (same style, same shape: batching's best case)."""
    import torch
    from monai.inferers import sliding_window_inference

    from hypersort_ray.inference import load_model

    torch.set_num_threads(1)
    model = load_model(model_ref)
    net = model.unet_for(model.styles[0].latent)
    roi = tuple(int(r) for r in model.config.preprocessing.roi_size)
    c_in = model.config.model.unet.in_channels
    out: dict[str, Any] = {"torch_threads": 1, "roi": list(roi), "forward_ms_per_window": {}}
    with torch.no_grad():
        for b in (1, 2, 4, 8, 16):
            x = torch.randn(b, c_in, *roi)
            net(x)
            t0 = time.perf_counter()
            for _ in range(repeats):
                net(x)
            out["forward_ms_per_window"][b] = (time.perf_counter() - t0) * 1000 / (repeats * b)

        vols = torch.rand(k, c_in, size, size, size)
        sw = model.sw_batch_size

        def one_by_one():
            for i in range(k):
                sliding_window_inference(vols[i : i + 1], roi, sw, net, overlap=model.overlap, mode="gaussian")

        def batched():
            sliding_window_inference(vols, roi, sw * k, net, overlap=model.overlap, mode="gaussian")

        for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
            fn()
            t0 = time.perf_counter()
            for _ in range(max(1, repeats // 4)):
                fn()
            out[f"{name}_ms_per_volume"] = (time.perf_counter() - t0) * 1000 / (max(1, repeats // 4) * k)
    out["size"], out["k"] = size, k
    out["batched_speedup"] = out["one_by_one_ms_per_volume"] / out["batched_ms_per_volume"]
    return out


# ------------------------------------------------------------------------------------------ main
def _import_callable(path: str) -> Any:
    """``package.module:function`` → the function (``--baseline``)."""
    import importlib

    module, _, name = path.partition(":")
    if not name:
        raise SystemExit(f"--baseline {path!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def baseline_ratios(rows: list[dict[str, Any]], over: str = "current", under: str = "baseline") -> list[dict[str, Any]]:
    """p50 of the ``over`` app over the ``under`` app's, per volume size and cache setting (1.0 = no change)."""
    by_key = {(r["app"], r["size"], r["style_cache_size"]): r for r in rows}
    out = []
    for (app, size, cache), row in by_key.items():
        base = by_key.get((under, size, cache))
        if app == over and base:
            out.append({"size": size, "style_cache_size": cache, "p50_ratio": row["p50_ms"] / base["p50_ms"],
                        "mean_ratio": row["mean_ms"] / base["mean_ms"], "of": f"{over}/{under}"})
    return out


def give_tracking_home(run_dir: Path, root: Path) -> str:
    """Put a random model's run folder in a local MLflow store (a finished training run), so the endpoint
    traces its requests there (``--tracing``)."""
    from hypersort_ray.mlflow_store import artifact_location
    from hypersort_ray.runs import RunDir
    from hypersort_ray.tracking.mlflow_logger import RunLogger

    uri = f"sqlite:///{root / 'mlflow.db'}"
    logger = RunLogger(uri)
    logger.start("hypersort-bench", "random-model", artifact_location=artifact_location(uri))
    logger.end("FINISHED")
    run = RunDir(run_dir)
    run.write_summary({**run.read_summary(), "mlflow_run_id": logger.run_id, "tracking_uri": uri})
    return uri


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'app':>9} {'volume':>8} {'cache':>6} {'conc':>5} {'n':>4} {'err':>4} {'p50 ms':>9} {'p95 ms':>9} "
            f"{'p99 ms':>9} {'p99/p50':>8} {'req/s':>7} {'server p50':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['app']:>9} {str(r['size']) + '^3':>8} {r['style_cache_size']:>6} {r['concurrency']:>5} "
            f"{r['requests']:>4} {r['errors']:>4} {r['p50_ms']:>9.0f} {r['p95_ms']:>9.0f} {r['p99_ms']:>9.0f} "
            f"{r['p99_ms'] / r['p50_ms']:>8.2f} {r['requests_per_s']:>7.2f} {r['server_inference_p50_ms']:>11.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Run folder or MLflow URI (default: a random demo-size model in a temp dir).")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="Volume edges (voxels).")
    p.add_argument("--cache-sizes", type=int, nargs="+", default=[32, 0], help="style_cache_size values.")
    p.add_argument("--requests", type=int, default=16, help="Requests per 64³ run (a third of it for larger).")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1], help="Requests in flight from the client "
                   "(several values: one row each, e.g. 1 4 8).")
    p.add_argument("--floor", action="store_true", help="Also time the bare sliding-window forward and the "
                   "whole in-process predict of each size (the request's floor) and report HTTP p50 / floor.")
    p.add_argument("--probe-threads", action="store_true", help="Bare forward time for threads 1, 2 × "
                   "sw_batch_size 1, 2, 4, 8 at the largest size.")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the one replica.")
    p.add_argument("--probe-batching", action="store_true", help="Also measure what @serve.batch could gain.")
    p.add_argument("--baseline", metavar="MODULE:FUNCTION",
                   help="Also serve apps built by this callable (settings -> Serve app; e.g. an older copy of "
                   "hypersort_ray.serve.app:build_application on PYTHONPATH) and report current/baseline p50.")
    p.add_argument("--tracing", action="store_true",
                   help="Also serve an app whose every request is traced to a local MLflow store; report traced/"
                   "untraced p50 (the model gets a training run in that store).")
    p.add_argument("--no-serve", action="store_true", help="Skip the HTTP benchmark (probe only).")
    p.add_argument("--json", type=Path, help="Write the results here.")
    args = p.parse_args(argv)
    if args.requests < 1 or args.requests > 1000:
        p.error("--requests must be within 1..1000")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    with tempfile.TemporaryDirectory(prefix="hypersort-bench-") as tmp:
        model_ref = args.model or str(make_random_model(Path(tmp) / "run"))
        if args.tracing:
            give_tracking_home(Path(model_ref), Path(tmp))
        result: dict[str, Any] = {
            "model": args.model or "random demo-size model (default config)",
            "cpu_count": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
        }
        if not args.no_serve:
            result["serving"] = bench_serving(args, model_ref)
            print_table(result["serving"])
            result["baseline_ratios"] = baseline_ratios(result["serving"])
            if args.tracing:
                result["tracing_ratios"] = baseline_ratios(result["serving"], "traced", "current")
                for ratio in result["tracing_ratios"]:
                    print(f"traced / untraced at {ratio['size']}^3, cache {ratio['style_cache_size']}: "
                          f"p50 {ratio['p50_ratio']:.3f}, mean {ratio['mean_ratio']:.3f}")
            for ratio in result["baseline_ratios"]:
                print(f"current / baseline at {ratio['size']}^3, cache {ratio['style_cache_size']}: "
                      f"p50 {ratio['p50_ratio']:.3f}, mean {ratio['mean_ratio']:.3f}")
        if args.floor:
            # the replica runs one single-threaded inference per CPU: the floor is single-threaded too
            result["floor"] = {size: floor_ms(model_ref, size, threads=1)
                               for size in args.sizes}
            for size, floor in result["floor"].items():
                p50 = [r["p50_ms"] for r in result.get("serving", []) if r["size"] == size and r["app"] == "current"
                       and r["concurrency"] == 1]
                ratio = f", HTTP p50 / bare forward {p50[0] / floor['bare_forward_ms']:.2f}" if p50 else ""
                print(f"{size}^3 floor: bare forward {floor['bare_forward_ms']:.0f} ms, in-process predict "
                      f"{floor['predict_ms']:.0f} ms{ratio}")
        if args.probe_threads:
            result["threads_probe"] = probe_threads(model_ref, max(args.sizes), [1, 2], [1, 2, 4, 8])
        result["unet_generation_ms"] = unet_generation_ms(model_ref)
        print(f"\ngenerating one UNet from H (what a cache hit saves): {result['unet_generation_ms']:.1f} ms")
        if args.probe_batching:
            probe = probe_batching(model_ref, size=min(args.sizes), k=4, repeats=8)
            result["batching_probe"] = probe
            windows = ", ".join(f"B={b}: {ms:.1f}" for b, ms in probe["forward_ms_per_window"].items())
            print(f"\nUNet forward ms/window ({windows})")
            print(
                f"{probe['k']} x {probe['size']}^3 same style: one by one {probe['one_by_one_ms_per_volume']:.0f} "
                f"ms/volume, batched {probe['batched_ms_per_volume']:.0f} ms/volume "
                f"(speed-up {probe['batched_speedup']:.2f}x)"
            )
        result["loadavg_after"] = os.getloadavg()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str))
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
