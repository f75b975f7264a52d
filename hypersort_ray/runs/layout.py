"""The run folder: the one owner of its layout, file names, writes and provenance.

A run folder is the contract between training, analysis, the registry, inference and serving::

    RUN_DIR/
      config.yaml            the run's resolved ExperimentConfig
      checkpoint/            the final checkpoint (:mod:`hypersort_ray.runs.checkpoint`), loadable without Ray
      latents.csv            index,case_id,z0..z{d-1}: the latents of the checkpoint, for people and tools
      history.csv            per-epoch training metrics
      sample_losses.csv      each case's own training loss (mean over epochs, last)
      latent_trajectory.csv  every case's λ after each epoch (epoch,index,case_id,z0..z{d-1})
      train_summary.json     what training returned (epochs, MLflow run id, tracking URI, ...)
      latent_maps/           latent map of every logged epoch (PNG)
      ray_results/           Ray Train's storage: intermediate checkpoints (``--resume`` reads them)
      cache/                 preprocessed volumes (``data.cache: disk``)
      analysis/              ``hypersort analyze``: styles.json, suspicion.csv, metrics.json, latent maps,
                             loss_curves.png, report.html, baselines.csv/.json, crossfit.csv/.json,
                             maps/<case_id>.nii.gz (``analyze --maps``), provenance.json
      crossfit/              ``analyze --crossfit K``: datalists/fold_{k}.tsv and one run folder per fold

Only this module spells these names; every other module asks a :class:`RunDir` for a path or, better,
for a typed read or write. Every write is atomic (:mod:`hypersort_ray.atomic`).

Provenance: the checkpoint's identity is the sha256 of its ``meta.json``
(:func:`~hypersort_ray.runs.checkpoint.checkpoint_id`). ``styles.json`` and ``analysis/provenance.json``
record the identity of the checkpoint they were made from, and every reader checks it: styles fitted on
another checkpoint's latents are refused with :class:`~hypersort_ray.errors.ProvenanceError`, never paired
silently with a new hyper-network.

Example:
    >>> run = RunDir("runs/demo")                       # doctest: +SKIP
    >>> cfg = run.read_config(); ckpt = run.load_checkpoint()   # doctest: +SKIP
    >>> run.read_styles()["styles"][0]["id"]            # doctest: +SKIP
    'main'
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypersort_ray.atomic import atomic_write_json, atomic_write_text, replace_dir
from hypersort_ray.config import ExperimentConfig, config_to_yaml, load_config
from hypersort_ray.errors import HypersortError, ProvenanceError, RunError, RunExistsError
from hypersort_ray.runs import checkpoint as ckpt_format
from hypersort_ray.runs.files import read_json_object
from hypersort_ray.runs.styles import PROVENANCE_KEY
from hypersort_ray.runs.tables import (
    read_history_csv,
    read_latents_csv,
    read_sample_losses_csv,
    write_history_csv,
    write_latents_csv,
    write_sample_losses_csv,
)

__all__ = ["AnalysisFiles", "RunDir", "STYLES_FILE"]

CONFIG_FILE = ckpt_format.CONFIG_FILE  # the run's config has the same name inside and beside the checkpoint
STYLES_FILE = "styles.json"


class AnalysisFiles:
    """Paths of ``RUN_DIR/analysis/`` (what ``hypersort analyze`` writes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.styles_json = folder / STYLES_FILE
        self.suspicion_csv = folder / "suspicion.csv"
        self.metrics_json = folder / "metrics.json"
        self.latent_map_png = folder / "latent_map.png"
        self.latent_map_html = folder / "latent_map.html"
        self.loss_curves_png = folder / "loss_curves.png"
        self.report_html = folder / "report.html"
        self.baselines_csv = folder / "baselines.csv"
        self.baselines_json = folder / "baselines.json"
        self.crossfit_csv = folder / "crossfit.csv"
        self.crossfit_json = folder / "crossfit.json"
        self.maps_dir = folder / "maps"
        self.provenance_json = folder / "provenance.json"

    def disagreement_map(self, case_id: str, folder: Path | None = None) -> Path:
        """A case's disagreement map (``analyze --maps``) in ``maps_dir`` (or ``folder``, a staging copy)."""
        return (folder or self.maps_dir) / f"{case_id}.nii.gz"


class RunDir(os.PathLike):
    """A run folder (it need not exist yet): its paths, typed readers and writers, and provenance.

    Accepts a path or another :class:`RunDir`; usable wherever a path is (``os.fspath(run)``).

    Args:
        path: the folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path.path if isinstance(path, RunDir) else path)
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / "checkpoint"
        self.latents_csv = self.path / "latents.csv"
        self.history_csv = self.path / "history.csv"
        self.sample_losses_csv = self.path / "sample_losses.csv"
        self.latent_trajectory_csv = self.path / "latent_trajectory.csv"
        self.summary_json = self.path / "train_summary.json"
        self.latent_maps_dir = self.path / "latent_maps"
        self.ray_results_dir = self.path / "ray_results"
        self.cache_dir = self.path / "cache"
        self.crossfit_dir = self.path / "crossfit"
        self.analysis = AnalysisFiles(self.path / "analysis")

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------ the folder
    def holds_run(self) -> bool:
        """Whether a run trained here: a checkpoint (final or Ray Train's), latents or a history.

        A folder with only a config (a run that failed before its first epoch, e.g. on a missing GPU)
        holds nothing to protect and may be trained into again.
        """
        marks = (self.checkpoint_dir, self.latents_csv, self.history_csv)
        return any(p.exists() for p in marks) or self.latest_checkpoint() is not None

    def refuse_existing(self) -> None:
        """Raise :class:`RunExistsError` when the folder already holds a run (never overwrite one).

        The message names the folder and the two ways on.
        """
        if self.holds_run():
            raise RunExistsError(
                f"{self.path} already holds a training run; nothing was changed. Continue it with "
                f"`hypersort train --resume {self.path}` (more epochs: add --epochs N), or choose another --out"
            )

    def require(self) -> RunDir:
        """``self`` when the folder exists, else :class:`RunError`."""
        if not self.path.is_dir():
            raise RunError(f"run folder {self.path}: not found")
        return self

    # --------------------------------------------------------------------------------------- config
    def write_config(self, cfg: ExperimentConfig) -> Path:
        return atomic_write_text(self.config_path, config_to_yaml(cfg))

    def read_config(self) -> ExperimentConfig:
        """The run's config (``config.yaml``, else the checkpoint's copy).

        Raises:
            RunError: no run folder, no config, or a config this release cannot validate.
        """
        self.require()
        for path in (self.config_path, self.checkpoint_dir / CONFIG_FILE):
            if path.is_file():
                try:
                    return load_config(path)
                except HypersortError as exc:
                    raise RunError(f"{path}: cannot load the run's config: {exc}") from exc
        raise RunError(
            f"{self.config_path}: not found; is {self.path} a run folder written by `hypersort train`?"
        )

    # ----------------------------------------------------------------------------------- checkpoint
    def has_checkpoint(self) -> bool:
        return ckpt_format.is_checkpoint(self.checkpoint_dir)

    def load_checkpoint(self, map_location: Any = "cpu") -> ckpt_format.Checkpoint:
        """The final checkpoint, verified (every checksum) and loaded."""
        self.require()
        if not self.checkpoint_dir.exists():
            raise RunError(
                f"{self.checkpoint_dir}: missing; is {self.path} a finished hypersort run folder? "
                f"(an interrupted run continues with `hypersort train --resume {self.path}`)"
            )
        return ckpt_format.load_checkpoint(self.checkpoint_dir, map_location=map_location)

    def checkpoint_sha256(self) -> str | None:
        """The final checkpoint's identity (sha256 of its meta.json), None when there is none yet."""
        if not (self.checkpoint_dir / ckpt_format.META_FILE).is_file():
            return None
        return ckpt_format.checkpoint_id(self.checkpoint_dir)

    def checkpoint_meta(self) -> dict[str, Any]:
        """The final checkpoint's ``meta.json`` ({} when there is no checkpoint)."""
        path = self.checkpoint_dir / ckpt_format.META_FILE
        return read_json_object(path, "checkpoint metadata") if path.is_file() else {}

    def trained_epochs(self) -> int | None:
        """Epochs the final checkpoint holds (None without a checkpoint)."""
        epoch = self.checkpoint_meta().get("epoch")
        return int(epoch) if isinstance(epoch, int) else None

    def install_checkpoint(self, source: str | os.PathLike[str]) -> ckpt_format.Checkpoint:
        """Copy a complete checkpoint folder (e.g. Ray Train's persisted one) in as the final checkpoint.

        The copy is verified before it replaces the previous final checkpoint, which is replaced whole.
        """
        import shutil
        import tempfile

        self.path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=self.path))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            ckpt_format.load_checkpoint(staging)  # verify before replacing anything
            replace_dir(staging, self.checkpoint_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ckpt_format.load_checkpoint(self.checkpoint_dir)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of the run: the final one or one Ray Train persisted.

        Interrupted runs have no final checkpoint yet but Ray Train's intermediate ones; a finished run
        may have both (the final one is the newest). Newest = most epochs, then most steps.
        """
        candidates = [self.checkpoint_dir]
        if self.ray_results_dir.is_dir():
            candidates += sorted(self.ray_results_dir.glob("*/checkpoint_*"))
        best, best_key = None, (-1, -1)
        for folder in candidates:
            if not ckpt_format.is_checkpoint(folder):
                continue
            try:
                meta = read_json_object(folder / ckpt_format.META_FILE, "checkpoint metadata")
                key = (int(meta["epoch"]), int(meta["global_step"]))
            except (RunError, KeyError, TypeError, ValueError):
                continue
            if key > best_key:
                best, best_key = folder, key
        return best

    # ----------------------------------------------------------------------------------- the tables
    def write_latents(self, indices: Sequence[int] | Any, case_ids: Sequence[str], values: Any) -> Path:
        write_latents_csv(self.latents_csv, indices, case_ids, values)
        return self.latents_csv

    def read_latents(self, latent_dim: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(indices, case_ids, values [N, d])`` sorted by index, checked for size and finiteness.

        Args:
            latent_dim: the expected d (the run's ``model.hypernet.latent_dim``), when known.

        Raises:
            RunError: missing or malformed file, no cases, wrong d, NaN/inf latents.
        """
        if not self.latents_csv.is_file():
            raise RunError(f"{self.latents_csv}: not found; the run has no latents (did training finish?)")
        indices, case_ids, values = read_latents_csv(self.latents_csv)
        if len(indices) == 0:
            raise RunError(f"{self.latents_csv}: no cases")
        if latent_dim is not None and values.shape[1] != latent_dim:
            raise RunError(
                f"{self.latents_csv}: latents have {values.shape[1]} dimensions but the run's config says "
                f"model.hypernet.latent_dim = {latent_dim}"
            )
        if not np.isfinite(values).all():
            bad = [case_ids[i] for i in np.flatnonzero(~np.isfinite(values).all(axis=1))[:10]]
            raise RunError(f"{self.latents_csv}: NaN or infinite latents for {', '.join(bad)}")
        return indices, case_ids, values

    def write_history(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        return write_history_csv(self.history_csv, [dict(r) for r in rows])

    def read_history(self):
        """The per-epoch history (DataFrame), or None when the run has none.

        Raises:
            RunError: the file exists but is unreadable or empty.
        """
        return read_history_csv(self.history_csv) if self.history_csv.is_file() else None

    def write_sample_losses(self, state: Mapping[str, Any], case_ids: Sequence[str]) -> Path:
        return write_sample_losses_csv(self.sample_losses_csv, dict(state), case_ids)

    def read_sample_losses(self) -> dict[int, float] | None:
        """``{index: mean training loss}``, or None when the run has no record (older runs, imports)."""
        return read_sample_losses_csv(self.sample_losses_csv) if self.sample_losses_csv.is_file() else None

    def write_latent_trajectory(
        self, epochs: Sequence[int] | Any, case_ids: Sequence[str], values: Any
    ) -> Path:
        """``latent_trajectory.csv``: ``epoch,index,case_id,z0..z{d-1}``, one row per (epoch, case).

        Args:
            epochs: the ``E`` epochs recorded (1-based).
            case_ids: every case id, index order (``N``).
            values: ``[E, N, d]`` latents after each epoch (NaN where a case was not recorded).
        """
        import io

        values = np.asarray(values, dtype=np.float64)
        epochs = [int(e) for e in epochs]
        if values.ndim != 3 or values.shape[:2] != (len(epochs), len(case_ids)):
            raise RunError(
                f"latent trajectory: values of shape {values.shape} do not match {len(epochs)} epochs x "
                f"{len(case_ids)} cases"
            )
        buf = io.StringIO()
        buf.write(",".join(["epoch", "index", "case_id", *(f"z{j}" for j in range(values.shape[2]))]) + "\n")
        for e, epoch in enumerate(epochs):
            for i, case_id in enumerate(case_ids):
                buf.write(f"{epoch},{i},{case_id}," + ",".join(f"{v:.7g}" for v in values[e, i]) + "\n")
        return atomic_write_text(self.latent_trajectory_csv, buf.getvalue())

    def read_latent_trajectory(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(epochs [E], indices [N], values [E, N, d])`` of ``latent_trajectory.csv``, or None when the
        run has none (older runs, imports).

        Raises:
            RunError: the file exists but is malformed.
        """
        import pandas as pd

        path = self.latent_trajectory_csv
        if not path.is_file():
            return None
        try:
            frame = pd.read_csv(path)
            zcols = [c for c in frame.columns if c.startswith("z")]
            epochs = np.sort(frame["epoch"].unique()).astype(np.int64)
            indices = np.sort(frame["index"].unique()).astype(np.int64)
            if not zcols or len(frame) != len(epochs) * len(indices):
                raise ValueError(f"{len(frame)} rows for {len(epochs)} epochs x {len(indices)} cases")
            frame = frame.sort_values(["epoch", "index"], kind="stable")
            values = frame[zcols].to_numpy(dtype=np.float64).reshape(len(epochs), len(indices), len(zcols))
        except (OSError, KeyError, ValueError, pd.errors.ParserError) as exc:
            raise RunError(f"{path}: malformed latent trajectory ({exc})") from exc
        return epochs, indices, values

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.summary_json, dict(summary))

    def read_summary(self) -> dict[str, Any]:
        """What training returned ({} when the run has no summary, e.g. an imported model)."""
        return read_json_object(self.summary_json, "training summary") if self.summary_json.is_file() else {}

    def latent_map_png(self, epoch: int) -> Path:
        """Where the latent map of ``epoch`` goes during training."""
        return self.latent_maps_dir / f"latent_map_epoch_{int(epoch):04d}.png"

    # ---------------------------------------------------------------------------- styles / analysis
    def write_styles(self, doc: Mapping[str, Any]) -> Path:
        """Write ``analysis/styles.json``, recording the checkpoint it belongs to."""
        return atomic_write_json(self.analysis.styles_json, {**doc, PROVENANCE_KEY: self.checkpoint_sha256()})

    def read_styles(self) -> dict[str, Any] | None:
        """``analysis/styles.json`` (None when the run was not analysed), checked against the checkpoint.

        Raises:
            ProvenanceError: the styles were fitted for another checkpoint (e.g. the run was resumed).
            RunError: unreadable file.
        """
        path = self.analysis.styles_json
        if not path.is_file():
            return None
        doc = read_json_object(path, "styles file")
        self._check_provenance(doc.get(PROVENANCE_KEY), path)
        return doc

    def write_analysis_provenance(self, files: Mapping[str, str]) -> Path:
        """``analysis/provenance.json``: which checkpoint the analysis outputs were made from."""
        import hypersort_ray

        doc = {
            PROVENANCE_KEY: self.checkpoint_sha256(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hypersort_version": hypersort_ray.__version__,
            "files": sorted(Path(p).name for p in files.values()),
        }
        return atomic_write_json(self.analysis.provenance_json, doc)

    def check_analysis(self) -> None:
        """Raise :class:`ProvenanceError` unless ``analysis/`` was made from the current checkpoint."""
        path = self.analysis.provenance_json
        if not path.is_file():
            raise ProvenanceError(
                f"{path}: missing, so {self.analysis.folder} cannot be tied to the run's checkpoint "
                f"(an analysis by an older release, or interrupted); re-run `hypersort analyze {self.path}`"
            )
        self._check_provenance(read_json_object(path, "analysis provenance").get(PROVENANCE_KEY), path)

    def read_suspicion(self) -> list[tuple[int, str]]:
        """``(index, case_id)`` of ``analysis/suspicion.csv``, most suspicious first.

        Raises:
            RunError: no analysis (the message says to run ``hypersort analyze``), or a malformed file.
            ProvenanceError: the ranking belongs to another checkpoint.
        """
        import csv

        path = self.analysis.suspicion_csv
        if not path.is_file():
            raise RunError(f"{path}: not found; run `hypersort analyze {self.path}` first")
        self.check_analysis()
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                fields = reader.fieldnames or []
                if "index" not in fields or "case_id" not in fields:
                    raise RunError(f"{path}: expected columns index,case_id,...; got {','.join(fields) or 'nothing'}")
                return [(int(row["index"]), str(row["case_id"])) for row in reader]
        except (OSError, ValueError, TypeError) as exc:
            raise RunError(f"{path}: cannot be read ({exc}); re-run `hypersort analyze {self.path}`") from exc

    def read_metrics(self) -> dict[str, Any]:
        """``analysis/metrics.json`` ({} when absent), checked against the checkpoint."""
        path = self.analysis.metrics_json
        if not path.is_file():
            return {}
        self.check_analysis()
        return read_json_object(path, "analysis metrics")

    def write_baselines(self, table: Any, settings: Mapping[str, Any]) -> Path:
        """``analysis/baselines.csv`` (+ ``baselines.json``: the settings used)."""
        atomic_write_text(self.analysis.baselines_csv, table.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(
            self.analysis.baselines_json, json.dumps(dict(settings), indent=2, default=str) + "\n"
        )
        return self.analysis.baselines_csv

    def read_baselines(self):
        """The saved baseline scores (DataFrame), or None when ``analyze --baselines`` never ran.

        Baselines are plain UNets trained on the run's data (``baselines.json`` records their settings),
        not derived from the checkpoint, so they stay valid when the run is resumed.
        """
        import pandas as pd

        path = self.analysis.baselines_csv
        return pd.read_csv(path) if path.is_file() else None

    def write_crossfit(self, table: Any, settings: Mapping[str, Any]) -> Path:
        """``analysis/crossfit.csv`` (+ ``crossfit.json``: the settings used), as for the baselines."""
        atomic_write_text(self.analysis.crossfit_csv, table.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(
            self.analysis.crossfit_json, json.dumps(dict(settings), indent=2, default=str) + "\n"
        )
        return self.analysis.crossfit_csv

    def read_crossfit(self):
        """The saved cross-fitted scores (DataFrame), or None when ``analyze --crossfit`` never ran.

        Like the baselines, they come from fold runs trained on the run's data, not from its checkpoint.
        """
        import pandas as pd

        path = self.analysis.crossfit_csv
        return pd.read_csv(path) if path.is_file() else None

    def crossfit_fold(self, fold: int) -> RunDir:
        """The run folder of cross-fitting fold ``fold``."""
        return RunDir(self.crossfit_dir / f"fold_{int(fold)}")

    def crossfit_datalist(self, fold: int) -> Path:
        """The datalist of the cases fold ``fold`` trains on."""
        return self.crossfit_dir / "datalists" / f"fold_{int(fold)}.tsv"

    def begin_analysis(self) -> AnalysisFiles:
        """Invalidate ``analysis/`` before rewriting it: until :meth:`write_analysis_provenance` runs
        again, readers refuse its files (an interrupted analysis never passes for a complete one)."""
        self.analysis.provenance_json.unlink(missing_ok=True)
        self.analysis.folder.mkdir(parents=True, exist_ok=True)
        return self.analysis

    def _check_provenance(self, recorded: Any, path: Path) -> None:
        current = self.checkpoint_sha256()
        if recorded != current:
            made = f"checkpoint {str(recorded)[:12]}" if recorded else "no recorded checkpoint"
            now = f"checkpoint {current[:12]}" if current else "no final checkpoint"
            raise ProvenanceError(
                f"{path}: made from {made}, but the run now holds {now} (the run was retrained, resumed or "
                f"the file copied from another run); re-run `hypersort analyze {self.path}`"
            )
