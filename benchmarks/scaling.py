"""Ray Train scaling: samples/s with 1 and 2 (or more) workers on the same data, in one run.

    python benchmarks/scaling.py --cases 24 --size 32 --epochs 4 --workers 1 2 --json scaling.json

Each worker count is a full ``hypersort train`` run (Ray Train, DDP over gloo, sharded latents); the
throughput is the median of the per-epoch samples/s after the first epoch (which includes caching).
Scaling efficiency = throughput(W) / (W * throughput(1)). On a 2-core machine expect well under 1:
the workers share two cores that one worker with two threads would use alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from hypersort_ray.config import load_config
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.ray_cluster import connect
    from hypersort_ray.runs import RunDir
    from hypersort_ray.train.trainer import run_training

    work = Path(tempfile.mkdtemp(prefix="hypersort-scaling-"))
    data = generate_dataset(work / "data", cases=args.cases, size=args.size, seed=0)
    cpus = os.cpu_count() or 1
    ray_handle = connect(None, num_cpus=max(args.workers))  # one private Ray for every row
    rows = []
    for w in args.workers:
        threads = max(1, cpus // w) if not args.gpu else 1
        cfg = load_config(
            None,
            [
                f"training.epochs={args.epochs}",
                f"training.batch_size={args.batch}",
                f"training.scaling.num_workers={w}",
                f"training.scaling.cpus_per_worker={max(1, cpus // w) if not args.gpu else 1}",
                f"training.scaling.threads_per_worker={threads}",
                f"training.scaling.use_gpu={str(args.gpu).lower()}",
                f"preprocessing.roi_size=[{args.size},{args.size},{args.size}]",
                "tracking.enabled=false",
                "analysis.run_after_training=false",
                *args.overrides,
            ],
            {"data.datalist": Path(data["datalist"]), "output_dir": work / f"w{w}"},
        )
        t0 = time.time()
        summary = run_training(cfg, progress=False)
        hist = RunDir(summary["run_dir"]).read_history()
        steady = hist["samples_per_s"].iloc[1:] if len(hist) > 1 else hist["samples_per_s"]
        rows.append({"workers": w, "threads_per_worker": threads, "samples_per_s": float(statistics.median(steady)),
                     "wall_s": round(time.time() - t0, 1)})
    base = rows[0]["samples_per_s"] * (1 if rows[0]["workers"] == 1 else 1 / rows[0]["workers"])
    for r in rows:
        r["speedup"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        r["efficiency"] = r["samples_per_s"] / (r["workers"] * base)
    print(f"{'workers':>7} {'threads':>7} {'samples/s':>10} {'speedup':>8} {'efficiency':>10} {'wall s':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['threads_per_worker']:>7} {r['samples_per_s']:>10.2f} {r['speedup']:>8.2f} "
              f"{r['efficiency']:>10.2f} {r['wall_s']:>7}")
    ray_handle.close()
    result = {"rows": rows, "config": vars(args) | {"json": str(args.json)}, "cpus": cpus, "machine": sys.platform}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
