"""End-to-end epoch throughput: data loading and caching included, with 0 and N loader processes.

The training step benchmark (``train_step.py``) times the step alone; here the loop trains for real on
NIfTI files (``train_worker``, the code each Ray Train worker runs), and ``samples_per_s`` of each epoch is
its number of samples over its wall time, batch preparation included. Two settings show a slow loader:

* ``--cache none``: every epoch reads, reorients, resamples and normalises every volume (large files at a
  fine spacing make this cost something: ``--size 192 --spacing 1`` resampled to 2 mm is a 96³ ROI);
* ``--cache memory``: volumes are prepared once (MONAI ``CacheDataset``) and the epochs only crop.

Rows: loader workers 0 (batches made in the training process) vs ``--workers`` DataLoader processes.

Usage::

    python benchmarks/loader.py --size 192 --spacing 1 --roi 96 --cases 8 --epochs 3 --workers 0 2

Prints a table (steady epochs: the first is left out) and, with ``--json``, the numbers.
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


def _measure(datalist: Path, out: Path, args: argparse.Namespace, workers: int, cache: str) -> dict:
    import torch

    from hypersort_ray.config import load_config
    from hypersort_ray.data.datalist import load_datalist
    from hypersort_ray.train.loop import train_worker

    torch.set_num_threads(args.threads)
    cfg = load_config(
        None,
        [
            f"preprocessing.roi_size=[{args.roi},{args.roi},{args.roi}]",
            f"training.epochs={args.epochs}",
            f"training.batch_size={args.batch}",
            f"data.loader_workers={workers}",
            f"data.cache={cache}",
            "tracking.enabled=false",
            *args.overrides,
        ],
        {"data.datalist": datalist, "output_dir": out},
    )
    t0 = time.perf_counter()
    result = train_worker(cfg, load_datalist(datalist))
    wall = time.perf_counter() - t0
    rates = [h["samples_per_s"] for h in result.history]
    steady = rates[1:] if len(rates) > 1 else rates
    return {"loader_workers": workers, "cache": cache, "samples_per_s": statistics.median(steady),
            "first_epoch_samples_per_s": rates[0], "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=192, help="edge of the synthetic NIfTI volumes (voxels)")
    parser.add_argument("--spacing", type=float, default=1.0, help="their spacing in mm (training resamples to 2 mm)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes to compare")
    parser.add_argument("--cache", nargs="+", default=["none", "memory"], choices=["none", "memory", "disk"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from hypersort_ray.data.synthetic import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="hypersort-loader-"))
    t0 = time.perf_counter()
    data = generate_dataset(work / "data", cases=args.cases, size=args.size, seed=0, spacing=args.spacing)
    print(f"data: {args.cases} volumes of {args.size}^3 at {args.spacing} mm in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    rows = []
    for cache in args.cache:
        for workers in args.workers:
            row = _measure(Path(data["datalist"]), work / f"run-{cache}-{workers}", args, workers, cache)
            rows.append(row)
            print(f"  cache={cache} loader_workers={workers}: {row['samples_per_s']:.3f} samples/s", file=sys.stderr)
    print(f"{'cache':>7} {'loaders':>7} {'samples/s':>10} {'vs 0':>6} {'epoch 1':>8} {'wall s':>7}")
    for row in rows:
        base = next(r for r in rows if r["cache"] == row["cache"] and r["loader_workers"] == args.workers[0])
        print(f"{row['cache']:>7} {row['loader_workers']:>7} {row['samples_per_s']:>10.3f} "
              f"{row['samples_per_s'] / base['samples_per_s']:>6.2f} {row['first_epoch_samples_per_s']:>8.3f} "
              f"{row['wall_s']:>7}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                         "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
