"""The checkpoint format: a folder any process can load, with or without Ray.

Layout (``version`` 1)::

    meta.json                      written last by rank 0: {"format": "hypersort-checkpoint", "version": 1,
                                   "epoch", "global_step", "latent_dim", "num_samples", "world_size",
                                   "case_ids": [...] (index order), "created": ISO time,
                                   "files": {name: sha256}} + any extra keys the trainer adds
    config.yaml                    the ExperimentConfig
    hypernet.safetensors           the hyper-network's state_dict
    hyper_optim.pt                 the hyper-network optimizer's state (torch.save, weights_only-safe)
    extra.pt                       optional small tensors, e.g. RNG states (weights_only-safe)
    latents_rank{r}.safetensors    rank r's LatentTable.state_dict()
    part_rank{r}.json              written last by rank r: {"format": "hypersort-checkpoint-part",
                                   "version": 1, "rank", "files": {name: sha256}, "num_rows",
                                   "latent_dim", "epoch"?, "global_step"?}

Ray Train merges the folders every worker reports into one checkpoint, so each rank writes only files
whose names carry its rank (rank 0 also writes the shared ones), and each rank's own ``part_rank{r}.json``
carries the checksums of its files: rank 0 cannot know them. ``meta.json`` says how many ranks to expect.

Safety rules: every file is written to a temporary name, flushed to disk and renamed into place, and the
file that marks a part complete (``part_rank{r}.json``, then ``meta.json``) is written last; loading
checks every checksum before parsing and never unpickles arbitrary objects (safetensors, or
``torch.load(weights_only=True)``). :func:`save_checkpoint` replaces a whole folder only once the new one
is complete.

This module does not import Ray: the Ray layer calls :func:`write_checkpoint_part` on each worker and
reports the folder.

Example:
    >>> import tempfile, torch
    >>> from hypersort_ray.config import ExperimentConfig
    >>> from hypersort_ray.model.latents import LatentTable
    >>> cfg = ExperimentConfig()
    >>> table = LatentTable(range(3), dim=cfg.model.hypernet.latent_dim)
    >>> path = save_checkpoint(tempfile.mkdtemp() + "/ckpt", latent_state=table,
    ...                        hyper_state={"w": torch.ones(2)}, config=cfg, epoch=1, global_step=3,
    ...                        case_ids=["a", "b", "c"])
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.epoch, ckpt.latents["indices"].tolist()
    (1, [0, 1, 2])
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from hypersort_ray.atomic import atomic_write_bytes, staged_dir
from hypersort_ray.config import ExperimentConfig, config_to_yaml, load_config
from hypersort_ray.errors import ConfigError, HypersortError, ModelError, RunError
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.runs.files import VerifiedFiles, read_json_object, sha256_bytes

__all__ = [
    "FORMAT",
    "VERSION",
    "META_FILE",
    "CONFIG_FILE",
    "HYPERNET_FILE",
    "HYPER_OPTIM_FILE",
    "EXTRA_FILE",
    "Checkpoint",
    "latents_file",
    "part_file",
    "checkpoint_files_for_rank",
    "write_checkpoint_part",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "checkpoint_id",
]

FORMAT = "hypersort-checkpoint"
PART_FORMAT = "hypersort-checkpoint-part"
VERSION = 1
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
HYPERNET_FILE = "hypernet.safetensors"
HYPER_OPTIM_FILE = "hyper_optim.pt"
EXTRA_FILE = "extra.pt"

# Keys of meta.json that the writer owns; values a caller passes for them are replaced.
_RESERVED_META = ("format", "version", "created", "files", "latent_dim", "num_samples")
_REQUIRED_META = ("epoch", "global_step", "world_size", "case_ids")
_OWN_NAME = re.compile(
    r"^(meta\.json|config\.yaml|hypernet\.safetensors|hyper_optim\.pt|extra\.pt|"
    r"latents_rank\d+\.safetensors|part_rank\d+\.json|\..*\.tmp-.*)$"
)


def latents_file(rank: int) -> str:
    """File name of rank ``rank``'s latent shard.

    Example:
        >>> latents_file(3)
        'latents_rank3.safetensors'
    """
    return f"latents_rank{int(rank)}.safetensors"


def part_file(rank: int) -> str:
    """File name of rank ``rank``'s completion marker (checksums of its files).

    Example:
        >>> part_file(0)
        'part_rank0.json'
    """
    return f"part_rank{int(rank)}.json"


def checkpoint_files_for_rank(rank: int) -> list[str]:
    """The names rank ``rank`` may write, in write order (its completion marker last).

    Rank 0 also writes the shared files and ``meta.json``; ``hyper_optim.pt`` and ``extra.pt`` are
    optional. Names differ between ranks, so Ray Train can merge the ranks' folders.

    Example:
        >>> checkpoint_files_for_rank(1)
        ['latents_rank1.safetensors', 'part_rank1.json']
        >>> checkpoint_files_for_rank(0)[-1]
        'meta.json'
    """
    if int(rank) < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    own = [latents_file(rank), part_file(rank)]
    if int(rank) == 0:
        return [CONFIG_FILE, HYPERNET_FILE, HYPER_OPTIM_FILE, EXTRA_FILE, *own, META_FILE]
    return own


@dataclass
class Checkpoint:
    """A loaded checkpoint (CPU tensors unless ``map_location`` said otherwise).

    Attributes:
        config: the run's configuration.
        hyper_state: the hyper-network's ``state_dict``.
        optim_state: the hyper-network optimizer's ``state_dict`` (None if not saved).
        latents: the merged :meth:`LatentTable.state_dict` of every rank: all ``num_samples`` rows.
        epoch: epochs completed when the checkpoint was written.
        global_step: optimizer steps completed.
        meta: the parsed ``meta.json``.
        extra: the optional ``extra.pt`` content.
        path: the folder it was read from.
    """

    config: ExperimentConfig
    hyper_state: dict[str, Tensor]
    optim_state: dict[str, Any] | None
    latents: dict[str, Tensor]
    epoch: int
    global_step: int
    meta: dict[str, Any]
    extra: dict[str, Any] | None
    path: Path

    @property
    def case_ids(self) -> list[str]:
        return list(self.meta["case_ids"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    def latent_table(
        self, indices: Sequence[int] | None = None, *, device: torch.device | str | None = None
    ) -> LatentTable:
        """The latents as a :class:`LatentTable`: all samples, or the shard ``indices`` (any world size).

        Example:
            >>> # table = ckpt.latent_table([i for i in range(ckpt.num_samples) if i % W == w])
        """
        table = LatentTable.from_state_dict(self.latents, device=device)
        return table if indices is None else table.shard(indices)


# ---------------------------------------------------------------------------------------- writing
def _atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` atomically (a reader sees the old file or the complete new one); return its sha256."""
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _safetensors_bytes(state: Mapping[str, Any], what: str) -> bytes:
    """Serialise a flat dict of tensors; shared or non-contiguous storage is copied first."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{what}: entry {key!r} is a {type(value).__name__}, safetensors stores only tensors"
            )
        t = value.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied weights): give later sharers their own copy.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[str(key)] = t
    return safetensors.torch.save(out)


def _torch_bytes(obj: Any, what: str) -> bytes:
    """``torch.save`` to bytes, refusing content that ``torch.load(weights_only=True)`` cannot read.

    Checking at write time means a resume never discovers, too late, a checkpoint it may not unpickle.
    """
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises several types for a forbidden global
        raise ValueError(
            f"{what}: holds objects that torch.load(weights_only=True) refuses; store only tensors, "
            f"numbers, strings and containers of them ({_unpickler_reason(exc)})"
        ) from exc
    return data


def _unpickler_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only error (e.g. 'Unsupported global: ...')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.split(" Please use")[0]
    return lines[0] if lines else type(exc).__name__


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _latent_state(latent_state: LatentTable | Mapping[str, Any]) -> dict[str, Tensor]:
    """A validated, CPU, index-sorted latent state dict."""
    if isinstance(latent_state, LatentTable):
        state = latent_state.state_dict()
    else:
        state = LatentTable.from_state_dict(latent_state).state_dict()
    return {k: v.cpu() for k, v in state.items()}


def write_checkpoint_part(
    dirpath: str | os.PathLike[str],
    *,
    rank: int,
    latent_state: LatentTable | Mapping[str, Any],
    hyper_state: Mapping[str, Tensor] | None = None,
    optim_state: Mapping[str, Any] | None = None,
    config: ExperimentConfig | None = None,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write the files rank ``rank`` owns into ``dirpath`` (created if needed).

    Every file is written atomically and the rank's completion marker last (``part_rank{r}.json``; for
    rank 0 then ``meta.json``). Rank 0 removes an existing ``meta.json`` before writing anything, so a
    folder being rewritten in place reads as incomplete until it is complete again. Prefer a fresh folder
    per checkpoint (``tempfile.mkdtemp()``), as Ray Train does.

    Args:
        dirpath: the folder (the same for all ranks on one machine, or one per rank that Ray merges).
        rank: this worker's rank.
        latent_state: this rank's :class:`LatentTable` or its ``state_dict()``.
        hyper_state: rank 0: the hyper-network ``state_dict`` (required).
        optim_state: rank 0: the hyper-network optimizer ``state_dict`` (optional).
        config: rank 0: the :class:`ExperimentConfig` (required).
        meta: rank 0 (required): ``epoch``, ``global_step``, ``world_size``, ``case_ids`` (one per sample,
            index order), optionally ``num_samples`` (must equal ``len(case_ids)``) and JSON-serialisable
            keys of your own. Other ranks may pass ``epoch``/``global_step`` so the loader can check that
            every part belongs to the same step.
        extra: rank 0: small weights_only-safe objects (e.g. RNG states as uint8 tensors).

    Returns:
        ``{file name: sha256}`` of the files written.

    Example:
        >>> import tempfile
        >>> from hypersort_ray.model.latents import LatentTable
        >>> d = tempfile.mkdtemp()
        >>> sorted(write_checkpoint_part(d, rank=1, latent_state=LatentTable([1], dim=2)))
        ['latents_rank1.safetensors', 'part_rank1.json']
    """
    rank = int(rank)
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    state = _latent_state(latent_state)
    latent_dim = int(state["dim"])
    # Serialise (and check) everything before touching the folder: a bad argument must not leave a
    # half-rewritten checkpoint behind.
    meta_doc = None
    blobs: list[tuple[str, bytes]] = []
    if rank == 0:
        if hyper_state is None or config is None or not meta:
            raise ValueError("rank 0 writes the shared files: hyper_state, config and meta are required")
        meta_doc = _meta_document(meta, config, state)
        blobs = _shared_blobs(config, hyper_state, optim_state, extra)
        # A folder being rewritten in place reads as incomplete until meta.json is back.
        (dirpath / META_FILE).unlink(missing_ok=True)
    elif "world_size" in meta and not rank < int(meta["world_size"]):
        raise ValueError(f"rank {rank} is outside world_size {meta['world_size']}")

    (dirpath / part_file(rank)).unlink(missing_ok=True)
    blobs.append((latents_file(rank), _safetensors_bytes(state, latents_file(rank))))
    files = {name: _atomic_write_bytes(dirpath / name, data) for name, data in blobs}
    part_doc = _part_document(rank, files, state, meta, latent_dim)
    files[part_file(rank)] = _atomic_write_bytes(dirpath / part_file(rank), _json_bytes(part_doc))
    if meta_doc is not None:
        meta_doc["files"] = dict(files)
        _atomic_write_bytes(dirpath / META_FILE, _json_bytes(meta_doc))
    return files


def _meta_document(meta: Mapping[str, Any], config: ExperimentConfig, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Rank 0's ``meta.json`` (without ``files``), checked against the config and its latent shard."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {missing}")
    latent_dim = int(state["dim"])
    case_ids = [str(c) for c in meta["case_ids"]]
    num_samples = int(meta.get("num_samples", len(case_ids)))
    if num_samples != len(case_ids):
        raise ValueError(f"meta: num_samples={num_samples} but {len(case_ids)} case_ids")
    world_size = int(meta["world_size"])
    if world_size < 1:
        raise ValueError(f"rank 0 is outside world_size {world_size}")
    if "latent_dim" in meta and int(meta["latent_dim"]) != latent_dim:
        raise ValueError(f"meta: latent_dim={meta['latent_dim']} but the latent shard has dim {latent_dim}")
    cfg_dim = config.model.hypernet.latent_dim
    if int(cfg_dim) != latent_dim:
        raise ValueError(f"config: model.hypernet.latent_dim={cfg_dim} but the latent shard has dim {latent_dim}")
    bad = [i for i in state["indices"].tolist() if i >= num_samples]
    if bad:
        raise ValueError(f"latent indices {bad[:10]} are >= num_samples {num_samples}")
    doc = {
        **{k: v for k, v in meta.items() if k not in _RESERVED_META},
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(meta["epoch"]),
        "global_step": int(meta["global_step"]),
        "latent_dim": latent_dim,
        "num_samples": num_samples,
        "world_size": world_size,
        "case_ids": case_ids,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    json.dumps(doc)  # fail now, before writing, on a non-JSON value
    return doc


def _shared_blobs(
    config: ExperimentConfig,
    hyper_state: Mapping[str, Tensor],
    optim_state: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
) -> list[tuple[str, bytes]]:
    """The files only rank 0 writes, serialised (and checked) in memory."""
    blobs = [
        (CONFIG_FILE, config_to_yaml(config).encode()),
        (HYPERNET_FILE, _safetensors_bytes(hyper_state, HYPERNET_FILE)),
    ]
    if optim_state is not None:
        blobs.append((HYPER_OPTIM_FILE, _torch_bytes(dict(optim_state), HYPER_OPTIM_FILE)))
    if extra is not None:
        blobs.append((EXTRA_FILE, _torch_bytes(dict(extra), EXTRA_FILE)))
    return blobs


def _part_document(
    rank: int, files: Mapping[str, str], state: Mapping[str, Tensor], meta: Mapping[str, Any], latent_dim: int
) -> dict[str, Any]:
    """``part_rank{r}.json``: the checksums of this rank's files, so rank 0 need not know them."""
    doc: dict[str, Any] = {
        "format": PART_FORMAT,
        "version": VERSION,
        "rank": rank,
        "files": dict(files),
        "num_rows": int(state["indices"].numel()),
        "latent_dim": latent_dim,
    }
    for key in ("epoch", "global_step", "world_size"):
        if key in meta:
            doc[key] = int(meta[key])
    return doc


def save_checkpoint(
    dirpath: str | os.PathLike[str],
    *,
    latent_state: LatentTable | Mapping[str, Any] | Sequence[LatentTable | Mapping[str, Any]],
    hyper_state: Mapping[str, Tensor],
    config: ExperimentConfig,
    epoch: int,
    global_step: int,
    case_ids: Sequence[str],
    optim_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint from one process, atomically.

    Everything goes to a sibling staging folder first and replaces ``dirpath`` only once complete and
    loadable (:func:`hypersort_ray.atomic.staged_dir`), so a crash at any moment leaves a complete
    checkpoint on disk (in the rare crash between the two renames it is ``.<name>.old-XXXX``;
    :func:`load_checkpoint` points to it).

    Args:
        dirpath: the checkpoint folder.
        latent_state: one table / state dict, or one per rank (written as ``latents_rank{r}``).
        hyper_state: the hyper-network ``state_dict``.
        config: the :class:`ExperimentConfig`.
        epoch: epochs completed.
        global_step: optimizer steps completed.
        case_ids: one id per sample, in index order.
        optim_state: the hyper-network optimizer ``state_dict``.
        extra: small weights_only-safe objects.
        meta: extra JSON-serialisable keys for ``meta.json``.

    Returns:
        ``dirpath`` as a Path.

    Example:
        See the module docstring.
    """
    dirpath = Path(dirpath)
    if dirpath.exists():
        _refuse_foreign_folder(dirpath)
    shards = (
        [latent_state] if isinstance(latent_state, LatentTable | Mapping) else list(latent_state)  # type: ignore[arg-type]
    )
    if not shards:
        raise ValueError("latent_state: no shard given")
    shards = [_latent_state(s) for s in shards]
    held = sorted(i for s in shards for i in s["indices"].tolist())
    if held != list(range(len(case_ids))):
        raise ValueError(
            f"latent_state: the shards must hold each sample 0..{len(case_ids) - 1} exactly once "
            f"(one per case id); they hold {len(held)} rows for {len(case_ids)} case ids"
        )
    with staged_dir(dirpath) as tmp:
        for rank in range(len(shards) - 1, -1, -1):  # rank 0 last: its meta.json completes the folder
            part_meta = {**(meta or {}), "epoch": epoch, "global_step": global_step, "world_size": len(shards)}
            if rank == 0:
                part_meta["case_ids"] = list(case_ids)
                write_checkpoint_part(
                    tmp,
                    rank=0,
                    latent_state=shards[0],
                    hyper_state=hyper_state,
                    optim_state=optim_state,
                    config=config,
                    meta=part_meta,
                    extra=extra,
                )
            else:
                write_checkpoint_part(tmp, rank=rank, latent_state=shards[rank], meta=part_meta)
        load_checkpoint(tmp)  # prove the new folder loads before it replaces anything
    return dirpath


def _refuse_foreign_folder(dirpath: Path) -> None:
    """Never delete a folder that holds anything but checkpoint files (e.g. a mistyped --out)."""
    if not dirpath.is_dir():
        raise RunError(f"{dirpath}: exists and is not a folder; refusing to replace it with a checkpoint")
    foreign = sorted(p.name for p in dirpath.iterdir() if not _OWN_NAME.match(p.name))
    if foreign:
        raise RunError(
            f"{dirpath}: holds files that are not part of a checkpoint ({foreign[:5]}); refusing to replace it"
        )


# ---------------------------------------------------------------------------------------- loading
def is_checkpoint(dirpath: str | os.PathLike[str]) -> bool:
    """Whether ``dirpath`` looks like a complete checkpoint (has a meta.json of this format).

    Example:
        >>> is_checkpoint("/nonexistent")
        False
    """
    meta = Path(dirpath) / META_FILE
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, RunError)


def checkpoint_id(dirpath: str | os.PathLike[str]) -> str:
    """The identity of a checkpoint: the sha256 of its ``meta.json``.

    ``meta.json`` records the sha256 of every file of the checkpoint (and its epoch, step and creation
    time), so this one digest changes whenever any of its content does. Derived artefacts (styles,
    analysis, model folders, registered models) record it as their provenance.

    Raises:
        RunError: no complete checkpoint at ``dirpath``.
    """
    path = Path(dirpath) / META_FILE
    try:
        return sha256_bytes(path.read_bytes())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; {dirpath} is not a complete checkpoint") from None
    except OSError as exc:
        raise RunError(f"{path}: cannot be read ({exc})") from exc


def _load_tensors(data: bytes, path: Path, map_location: Any) -> dict[str, Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise RunError(f"{path}: not a readable safetensors file ({exc})") from exc
    return {k: v.to(map_location) for k, v in tensors.items()}


def _load_torch(data: bytes, path: Path, map_location: Any) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # the restricted unpickler raises several types
        raise RunError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({_unpickler_reason(exc)})"
        ) from exc


def _load_config(path: Path) -> ExperimentConfig:
    """Read config.yaml with :func:`hypersort_ray.config.load_config` (its checksum was verified just
    before); a config this release cannot validate is reported against the checkpoint's file."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise RunError(f"{path}: the checkpoint's config is not valid for this release:\n{exc}") from exc


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise RunError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    version = meta.get("version")
    if version != VERSION:
        raise RunError(
            f"{path}: checkpoint format version {version!r} is not supported by this hypersort-ray "
            f"(reads version {VERSION}); use the release that wrote it"
        )
    for key in ("epoch", "global_step", "latent_dim", "num_samples", "world_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise RunError(f"{path}: '{key}' must be a non-negative integer, got {meta.get(key)!r}")
    if meta["world_size"] < 1 or meta["latent_dim"] < 1:
        raise RunError(f"{path}: world_size and latent_dim must be >= 1")
    ids = meta.get("case_ids")
    if not isinstance(ids, list) or len(ids) != meta["num_samples"]:
        raise RunError(
            f"{path}: 'case_ids' must list num_samples={meta['num_samples']} ids, "
            f"got {len(ids) if isinstance(ids, list) else type(ids).__name__}"
        )


def _missing_dir_message(dirpath: Path) -> str:
    leftovers = sorted(dirpath.parent.glob(f".{dirpath.name}.old-*")) if dirpath.parent.is_dir() else []
    complete = [p for p in leftovers if is_checkpoint(p)]
    if complete:
        return (
            f"{dirpath}: checkpoint folder not found; a save was interrupted while swapping folders and "
            f"the previous complete checkpoint is {complete[-1]} (rename it to {dirpath.name})"
        )
    return f"{dirpath}: checkpoint folder not found"


def load_checkpoint(dirpath: str | os.PathLike[str], map_location: Any = "cpu") -> Checkpoint:
    """Load and verify a checkpoint folder written by :func:`save_checkpoint` or by all ranks'
    :func:`write_checkpoint_part`.

    Every file's sha256 is checked before it is parsed; tensors come from safetensors or
    ``torch.load(weights_only=True)``, never from arbitrary unpickling. Every rank's latent shard is
    merged and must cover each sample ``0..num_samples-1`` exactly once.

    Args:
        dirpath: the folder.
        map_location: device for the loaded tensors.

    Raises:
        RunError: missing folder, ``meta.json``, a listed file or a rank's part; checksum mismatch;
            unknown format/version; samples without a latent; parts from different steps.
        ModelError: a shard whose latent dim differs from ``meta.json``, or a sample held by two ranks.

    Example:
        See the module docstring.
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        raise RunError(_missing_dir_message(dirpath))
    meta_path = dirpath / META_FILE
    if not meta_path.is_file():
        raise RunError(
            f"{meta_path}: missing; {dirpath} is not a complete checkpoint (a write was interrupted, or "
            "rank 0's part never arrived)"
        )
    meta = _read_json(meta_path, "checkpoint metadata")
    _check_meta(meta, meta_path)
    files = VerifiedFiles(dirpath)
    files.expect(meta.get("files"), META_FILE)

    files.read(CONFIG_FILE)  # checksum only; load_config reads the file itself
    config = _load_config(dirpath / CONFIG_FILE)
    hyper_state = _load_tensors(files.read(HYPERNET_FILE), dirpath / HYPERNET_FILE, map_location)
    optim_state = None
    if HYPER_OPTIM_FILE in files.expected:
        optim_state = _load_torch(files.read(HYPER_OPTIM_FILE), dirpath / HYPER_OPTIM_FILE, map_location)
    extra = None
    if EXTRA_FILE in files.expected:
        extra = _load_torch(files.read(EXTRA_FILE), dirpath / EXTRA_FILE, map_location)

    latents = _load_latents(dirpath, meta, files)
    if config.model.hypernet.latent_dim != meta["latent_dim"]:
        raise ModelError(
            f"{dirpath / CONFIG_FILE}: model.hypernet.latent_dim={config.model.hypernet.latent_dim} but "
            f"{META_FILE} says latent_dim={meta['latent_dim']}"
        )
    # Resume code moves the table itself; the state dict stays where map_location put the others.
    latents = {k: v.to(map_location) for k, v in latents.items()}
    return Checkpoint(
        config=config,
        hyper_state=hyper_state,
        optim_state=optim_state,
        latents=latents,
        epoch=meta["epoch"],
        global_step=meta["global_step"],
        meta=meta,
        extra=extra,
        path=dirpath,
    )


def _load_latents(dirpath: Path, meta: dict[str, Any], files: VerifiedFiles) -> dict[str, Tensor]:
    """Read every rank's shard, check it against meta.json, merge, and check coverage."""
    world, dim, n = meta["world_size"], meta["latent_dim"], meta["num_samples"]
    shards: list[dict[str, Tensor]] = []
    owner: dict[int, str] = {}
    absent: list[str] = []
    for rank in range(world):
        ppath = dirpath / part_file(rank)
        if not ppath.is_file():
            absent.append(f"{part_file(rank)} (rank {rank} of {world})")
            continue
        if part_file(rank) in files.expected:  # rank 0's part is covered by meta.json's checksums
            files.read(part_file(rank))
        part = _read_json(ppath, f"rank {rank}'s part manifest")
        if part.get("format") != PART_FORMAT or part.get("version") != VERSION or part.get("rank") != rank:
            raise RunError(f"{ppath}: not a version-{VERSION} part manifest of rank {rank}")
        for key in ("epoch", "global_step", "world_size"):
            if key in part and part[key] != meta[key]:
                raise RunError(
                    f"{ppath}: {key}={part[key]} but {META_FILE} has {key}={meta[key]}: the folder mixes "
                    "parts of different checkpoints"
                )
        files.expect(part.get("files"), part_file(rank))
        name = latents_file(rank)
        lpath = dirpath / name
        if not lpath.is_file():
            absent.append(f"{name} (rank {rank} of {world})")
            continue
        state = _load_tensors(files.read(name), lpath, "cpu")
        try:
            parsed = LatentTable.from_state_dict(state).state_dict()
        except HypersortError as exc:
            raise ModelError(f"{lpath}: not a valid latent shard: {exc}") from exc
        if parsed["values"].shape[1] != dim:
            raise ModelError(
                f"{lpath}: latent dim {parsed['values'].shape[1]} but {META_FILE} says latent_dim={dim}"
            )
        idx = parsed["indices"].tolist()
        out_of_range = [i for i in idx if i >= n]
        if out_of_range:
            raise RunError(f"{lpath}: sample indices {out_of_range[:10]} are >= num_samples={n}")
        for i in idx:
            if i in owner:
                # Every sample belongs to exactly one worker; two copies mean the sharding rule broke.
                raise ModelError(
                    f"{lpath}: sample {i} is also in {owner[i]}: duplicated latent rows (two ranks owned "
                    "the same sample)"
                )
            owner[i] = name
        shards.append(parsed)

    missing = sorted(set(range(n)) - owner.keys())
    if absent or missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
        what = f"missing {', '.join(absent)}; " if absent else ""
        raise RunError(
            f"{dirpath}: incomplete checkpoint: {what}{len(missing)} of {n} samples have no latent "
            f"(indices {shown})"
        )
    try:
        return LatentTable.merge(shards).state_dict()
    except ModelError as exc:
        raise ModelError(f"{dirpath}: the ranks' latent shards cannot be merged: {exc}") from exc
