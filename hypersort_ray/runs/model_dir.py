"""What inference needs from a trained model, wherever it lives: a run folder, a bare checkpoint, or a
self-contained *model folder* (the payload of the MLflow model).

Model folder layout (``version`` 1)::

    model.json              {"format": "hypersort-model", "version", "hypersort_version", "latent_dim",
                             "spatial_dims", "num_classes", "unet", "preprocessing", "epoch", "num_samples",
                             "source_run", "checkpoint_sha256", "files": {name: sha256}}
    config.yaml             the training config, training-machine paths removed
    hypernet.safetensors    H's weights (tensors only, no pickle)
    styles.json             ids, names, sizes, centroids (no case ids) + checkpoint_sha256

Every reader here checks each file against its manifest (``model.json`` or the checkpoint's
``meta.json``) before parsing, and refuses styles made from another checkpoint
(:class:`~hypersort_ray.errors.ProvenanceError`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypersort_ray.atomic import atomic_write_json, atomic_write_text, staged_dir
from hypersort_ray.config import DataConfig, ExperimentConfig, config_to_yaml, parse_config
from hypersort_ray.errors import HypersortError, ModelError, ProvenanceError
from hypersort_ray.runs import checkpoint as ckpt_format
from hypersort_ray.runs.files import VerifiedFiles, read_json_object, sha256_file
from hypersort_ray.runs.layout import STYLES_FILE, RunDir
from hypersort_ray.runs.styles import PROVENANCE_KEY, normalised_styles_doc, parse_styles_doc

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "ModelFiles", "is_model_dir", "read_model_files", "write_model_dir"]

MODEL_FORMAT = "hypersort-model"
MODEL_VERSION = 1
MODEL_JSON = "model.json"
CONFIG_FILE = ckpt_format.CONFIG_FILE
WEIGHTS_FILE = ckpt_format.HYPERNET_FILE


@dataclass
class ModelFiles:
    """A model's verified content, read into memory.

    Attributes:
        config: the training configuration (network, preprocessing).
        weights: ``hypernet.safetensors`` bytes (checksum verified).
        styles: the styles document (None: only ``main``).
        info: provenance (source, epoch, num_samples, checkpoint_sha256, ...).
        where: the file or folder the weights came from, for messages.
    """

    config: ExperimentConfig
    weights: bytes
    styles: dict[str, Any] | None
    info: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def _config(data: bytes, path: Path) -> ExperimentConfig:
    try:
        return parse_config(data, str(path))
    except HypersortError as exc:
        raise ModelError(f"model config {path}: {exc}") from exc


def _checkpoint_files(folder: Path, ref: str) -> tuple[VerifiedFiles, dict[str, Any]]:
    meta = read_json_object(folder / ckpt_format.META_FILE, "checkpoint metadata", ModelError)
    files = VerifiedFiles(folder, ModelError)
    files.expect(meta.get("files"), ckpt_format.META_FILE)
    return files, meta


def read_model_files(path: str | os.PathLike[str], ref: str | None = None) -> ModelFiles:
    """The model in a run folder, a model folder or a bare checkpoint folder.

    Args:
        path: the folder.
        ref: what the user named (for ``info["source"]`` and messages); default ``path``.

    Raises:
        ModelError: not a model, a file that fails its checksum, an invalid config.
        ProvenanceError: styles made from another checkpoint.
    """
    path = Path(path)
    ref = ref or str(path)
    if is_model_dir(path):
        return _from_model_dir(path, ref)
    run = RunDir(path)
    if (run.checkpoint_dir / WEIGHTS_FILE).is_file() or (run.checkpoint_dir / ckpt_format.META_FILE).is_file():
        return _from_run(run, ref)
    if ckpt_format.is_checkpoint(path):
        return _from_checkpoint(path, ref, styles=None)
    raise ModelError(
        f"model {ref!r}: not a hypersort run folder (no checkpoint/), model folder (no {MODEL_JSON}) "
        "or checkpoint folder"
    )


def _from_checkpoint(folder: Path, ref: str, styles: dict[str, Any] | None) -> ModelFiles:
    files, meta = _checkpoint_files(folder, ref)
    config = _config(files.read(CONFIG_FILE), folder / CONFIG_FILE)
    info = {
        "source": ref,
        "epoch": meta.get("epoch"),
        "num_samples": meta.get("num_samples"),
        PROVENANCE_KEY: ckpt_format.checkpoint_id(folder),
    }
    return ModelFiles(config, files.read(WEIGHTS_FILE), styles, info, str(folder / WEIGHTS_FILE))


def _from_run(run: RunDir, ref: str) -> ModelFiles:
    if not (run.checkpoint_dir / ckpt_format.META_FILE).is_file():
        raise ModelError(
            f"{run.checkpoint_dir / ckpt_format.META_FILE}: missing; is {run.path} a finished hypersort run folder?"
        )
    model = _from_checkpoint(run.checkpoint_dir, ref, styles=run.read_styles())
    model.info["run"] = run.path.name
    return model


def _from_model_dir(folder: Path, ref: str) -> ModelFiles:
    doc = read_json_object(folder / MODEL_JSON, "model description", ModelError)
    if doc.get("format") != MODEL_FORMAT:
        raise ModelError(f"{folder / MODEL_JSON}: format is {doc.get('format')!r}, expected {MODEL_FORMAT!r}")
    if int(doc.get("version", 0)) > MODEL_VERSION:
        raise ModelError(
            f"{folder / MODEL_JSON}: model format version {doc.get('version')} is newer than this "
            f"hypersort-ray understands ({MODEL_VERSION}); upgrade hypersort-ray"
        )
    files = VerifiedFiles(folder, ModelError)
    files.expect(doc.get("files"), MODEL_JSON)
    config = _config(files.read(CONFIG_FILE), folder / CONFIG_FILE)
    styles = None
    if STYLES_FILE in files.expected:
        import json

        styles = json.loads(files.read(STYLES_FILE))
        if styles.get(PROVENANCE_KEY) != doc.get(PROVENANCE_KEY):
            raise ProvenanceError(
                f"{folder / STYLES_FILE}: made from checkpoint {str(styles.get(PROVENANCE_KEY))[:12]}, but the "
                f"model's weights come from checkpoint {str(doc.get(PROVENANCE_KEY))[:12]}"
            )
    keep = ("hypersort_version", "epoch", "num_samples", "source_run", PROVENANCE_KEY)
    info = {"source": ref, **{k: doc[k] for k in keep if k in doc}}
    return ModelFiles(config, files.read(WEIGHTS_FILE), styles, info, str(folder / WEIGHTS_FILE))


def write_model_dir(run_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Gather what inference needs from a run folder into a self-contained model folder (replaced whole).

    Training-machine paths (datalist, output folder) are removed from the config: they mean nothing to a
    consumer of the model. Styles are normalised (no case ids) and keep their provenance.

    Args:
        run_dir: a run folder from ``hypersort train`` (or ``import-reference``).
        out: the model folder to write.

    Raises:
        ModelError / ProvenanceError: see :func:`read_model_files`.
    """
    import hypersort_ray

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ModelError(f"run folder {run.path}: not found")
    model = _from_run(run, str(run.path))
    cfg = model.config
    dim = cfg.model.hypernet.latent_dim
    styles, _ = parse_styles_doc(model.styles, dim, str(run.analysis.styles_json))
    sha = model.info[PROVENANCE_KEY]
    portable = cfg.model_copy(update={"data": DataConfig(), "output_dir": Path(".")})
    with staged_dir(out) as tmp:
        atomic_write_text(tmp / CONFIG_FILE, config_to_yaml(portable))
        shutil.copyfile(run.checkpoint_dir / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        atomic_write_json(tmp / STYLES_FILE, normalised_styles_doc(styles, sha))
        doc = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "hypersort_version": hypersort_ray.__version__,
            "latent_dim": dim,
            "spatial_dims": cfg.model.unet.spatial_dims,
            "num_classes": cfg.model.unet.out_channels,
            "unet": cfg.model.unet.model_dump(mode="json"),
            "preprocessing": cfg.preprocessing.model_dump(mode="json"),
            "epoch": model.info.get("epoch"),
            "num_samples": model.info.get("num_samples"),
            "source_run": run.path.name,
            PROVENANCE_KEY: sha,
            "files": {n: sha256_file(tmp / n) for n in (CONFIG_FILE, WEIGHTS_FILE, STYLES_FILE)},
        }
        # The copied weights must be the ones the checkpoint's manifest vouched for.
        if doc["files"][WEIGHTS_FILE] != run.checkpoint_meta().get("files", {}).get(WEIGHTS_FILE):
            raise ModelError(f"{run.checkpoint_dir / WEIGHTS_FILE}: changed while it was being copied")
        atomic_write_json(tmp / MODEL_JSON, doc)
    return Path(out)
