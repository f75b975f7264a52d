"""``hypersort import-reference``: a model trained with the public HyperSORT code, as a run folder.

The reference saves plain state dicts (``model_w.pt``) and a dict of index → ``[1, d]`` tensors
(``latent_dict.pt``); both load with ``torch.load(weights_only=True)``, nothing is unpickled. The result
is an ordinary run folder (config, checkpoint, latents) that every command accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hypersort_ray.config import load_config
from hypersort_ray.errors import ModelError
from hypersort_ray.model.hypernet import HyperNetwork
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.model.reference_weights import convert_reference_latents, convert_reference_state_dict
from hypersort_ray.model.unet import build_primary
from hypersort_ray.runs.checkpoint import save_checkpoint
from hypersort_ray.runs.layout import RunDir

__all__ = ["import_reference_run"]


def _load_safely(path: Path, what: str) -> Any:
    if not Path(path).is_file():
        raise ModelError(f"{path}: reference {what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file or a pickle we refuse to run
        raise ModelError(f"{path}: cannot read reference {what} safely ({str(exc).splitlines()[0]})") from exc


def _case_ids(cfg: Any, n: int, latents: Path) -> list[str]:
    """The datalist's case ids when its files are here (it must have one case per latent)."""
    if cfg.data.datalist is None or not Path(cfg.data.datalist).exists():
        return [f"case_{i:04d}" for i in range(n)]
    from hypersort_ray.data.datalist import load_datalist

    cases = load_datalist(cfg.data.datalist)
    if len(cases) != n:
        raise ModelError(f"{latents}: {n} latents but the datalist {cfg.data.datalist} has {len(cases)} cases")
    return [c.case_id for c in cases]


def import_reference_run(
    weights: Path, latents: Path, config: Path, out: Path, *, datalist: Path | None = None
) -> dict[str, Any]:
    """Convert reference weights + latents + YAML config into a new run folder ``out``.

    Raises:
        RunExistsError: ``out`` already holds a run.
        ModelError: unreadable or mismatching files (the message names the file).
    """
    run = RunDir(Path(out).resolve())
    run.refuse_existing()
    values = {"output_dir": run.path, "data.datalist": Path(datalist).resolve() if datalist else None}
    cfg = load_config(config, values=values)
    hn = cfg.model.hypernet
    primary = build_primary(cfg.model.unet)
    hyper_state = convert_reference_state_dict(_load_safely(weights, "weights"), primary, hn.latent_dim, hn.hidden)
    HyperNetwork(primary, hn.latent_dim, hn.hidden, hn.bound).load_state_dict(hyper_state)  # shape check
    indices, values_t = convert_reference_latents(_load_safely(latents, "latents"))
    if values_t.shape[1] != hn.latent_dim:
        raise ModelError(f"{latents}: latents have {values_t.shape[1]} dims, the config's latent_dim is {hn.latent_dim}")
    n = len(indices)
    if indices.tolist() != list(range(n)):
        raise ModelError(f"{latents}: sample indices must be 0..N-1 without gaps (got {n} indices up to {int(indices.max())})")
    case_ids = _case_ids(cfg, n, latents)
    state = LatentTable(list(range(n)), hn.latent_dim).state_dict()
    state["values"] = values_t.to(state["values"].dtype)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    save_checkpoint(run.checkpoint_dir, latent_state=state, hyper_state=hyper_state, config=cfg, epoch=0,
                    global_step=0, case_ids=case_ids, meta={"imported_from": str(Path(weights).resolve())})
    run.write_latents(list(range(n)), case_ids, values_t.numpy())
    return {"run_dir": str(run.path), "num_samples": n, "latent_dim": hn.latent_dim, "checkpoint": str(run.checkpoint_dir)}
