"""A complete, tiny run folder without training: for inference, serving, registry and analysis tests.

:func:`make_tiny_run` writes what ``hypersort train`` + ``hypersort analyze`` leave behind, with a
random-but-seeded hyper-network for a tiny UNet (4 channels, one down-sampling stage, 16³ ROI) instead of
trained weights. Predictions are meaningless but deterministic, and different styles give different
networks. Builds in well under 2 s (mostly imports).

It is built through the run-folder layer (:class:`hypersort_ray.runs.RunDir`): config, checkpoint,
latents, history, training summary (no MLflow run) and, with ``with_styles``, styles (main style id 0 +
styles 1 and 2, with the checkpoint's provenance); the synthetic data (``generate_dataset`` with 16³
volumes) lives in ``RUN_DIR/data/``.

Example:
    >>> from tests.helpers_model import make_tiny_run, tiny_image   # doctest: +SKIP
    >>> run = make_tiny_run(tmp_path)                                 # doctest: +SKIP
    >>> load_model(run).predict_file(tiny_image(run), tmp_path / "m.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The tiny trainable network of the training tests (Ray Train integration and the in-process loop).
TINY_NETWORK = [
    "preprocessing.roi_size=[16,16,16]",
    "model.unet.channels=4",
    "model.unet.n_down=1",
    "model.unet.n_fix=1",
    "model.hypernet.hidden=[8,8]",
]

TINY_OVERRIDES = [
    "name=tiny",
    "preprocessing.roi_size=[16,16,16]",
    "preprocessing.spacing=[2.0,2.0,2.0]",
    "model.unet.channels=4",
    "model.unet.n_down=1",
    "model.unet.n_fix=1",
    "model.hypernet.hidden=[16]",
    "training.epochs=1",
    "training.batch_size=2",
    "training.scaling.num_workers=1",
    "tracking.enabled=false",
    "analysis.run_after_training=false",
]

# Style centroids used by the fixture (first two latent coordinates; the rest are 0).
STYLE_CENTROIDS = {"1": (1.5, -1.0), "2": (-1.5, 1.0)}


def make_tiny_run(
    tmp_path: Path,
    latent_dim: int = 2,
    with_styles: bool = True,
    *,
    n_cases: int = 6,
    seed: int = 0,
    name: str = "run",
) -> Path:
    """Write a complete tiny run folder under ``tmp_path / name`` and return its path.

    Args:
        tmp_path: parent folder (pytest's ``tmp_path``).
        latent_dim: d.
        with_styles: write ``analysis/styles.json`` (main = cluster 0, plus styles 1 and 2).
        n_cases: synthetic cases (16³ volumes, 2 mm).
        seed: seeds H's initialisation, the latents and the images.
        name: sub-folder name.
    """
    import torch

    from hypersort_ray.config import load_config
    from hypersort_ray.data.datalist import load_datalist
    from hypersort_ray.data.synthetic import generate_dataset
    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.unet import build_primary
    from hypersort_ray.runs import RunDir
    from hypersort_ray.runs.checkpoint import save_checkpoint

    run = RunDir(Path(tmp_path) / name)
    run.path.mkdir(parents=True, exist_ok=False)
    data = run.path / "data"
    summary = generate_dataset(data, cases=n_cases, size=16, seed=seed)
    datalist = Path(summary["datalist"])
    case_ids = [c.case_id for c in load_datalist(datalist)]

    cfg = load_config(
        None,
        [*TINY_OVERRIDES, f"model.hypernet.latent_dim={latent_dim}", f"training.seed={seed}"],
        {"output_dir": run.path, "data.datalist": datalist},
    )
    run.write_config(cfg)

    # Seeded, local generator state: the caller's global RNG is left as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hn = cfg.model.hypernet
        hyper = HyperNetwork(build_primary(cfg.model.unet), hn.latent_dim, hn.hidden, hn.bound)
    table = LatentTable(range(n_cases), latent_dim, init_std=0.8, seed=seed)
    values = table.values().numpy()
    save_checkpoint(
        run.checkpoint_dir,
        latent_state=table,
        hyper_state=hyper.state_dict(),
        config=cfg,
        epoch=1,
        global_step=1,
        case_ids=case_ids,
        extra={"history": [{"epoch": 1, "loss": 0.9, "dice": 0.4}]},
    )
    run.write_latents(list(range(n_cases)), case_ids, values)
    run.write_history([{"epoch": 1, "global_step": 1, "loss": 0.9, "dice": 0.4, "latent_norm_mean": 0.5}])
    run.write_summary(
        {"epochs": 1, "num_samples": n_cases, "seconds": 0.0, "mlflow_run_id": None, "tracking_uri": None,
         "loss": 0.9, "dice": 0.4}
    )
    if with_styles:
        run.write_styles(styles_document(case_ids, values, latent_dim))
    return run.path


def styles_document(case_ids: list[str], values: np.ndarray, latent_dim: int) -> dict:
    """A styles document in the ``hypersort analyze`` format: main cluster 0 + styles 1 and 2."""
    n = len(case_ids)
    groups = {"0": list(range(0, max(n - 2, 1))), "1": [n - 2] if n >= 3 else [], "2": [n - 1] if n >= 2 else []}
    styles = []
    for sid, members in groups.items():
        if sid == "0":
            centroid = values[members].mean(axis=0) if members else np.zeros(latent_dim)
        else:
            centroid = np.zeros(latent_dim)
            head = STYLE_CENTROIDS[sid][:latent_dim]
            centroid[: len(head)] = head
        norms = np.linalg.norm(values[members], axis=1) if members else np.zeros(0)
        medoid = members[0] if members else None
        styles.append(
            {
                "id": int(sid),
                "name": {"0": "main", "1": "eroded-like", "2": "dilated-like"}[sid],
                "size": len(members),
                "centroid": [float(v) for v in centroid],
                "medoid_index": medoid,
                "medoid_case_id": case_ids[medoid] if medoid is not None else None,
                "members": [case_ids[i] for i in members],
                "mean_norm": float(norms.mean()) if len(norms) else 0.0,
            }
        )
    return {"method": "fixture", "params": {}, "main_style": 0, "styles": styles, "n_outliers": 0}


def tiny_image(run_dir: Path, index: int = 0) -> Path:
    """Path of the ``index``-th synthetic image of a :func:`make_tiny_run` folder."""
    images = sorted((Path(run_dir) / "data" / "images").glob("*.nii.gz"))
    return images[index]
