"""The run folder layer: layout, file formats, atomic writes, checksums and provenance.

* :mod:`.layout`: :class:`RunDir`, the one owner of the run folder's names and typed readers/writers.
* :mod:`.checkpoint`: the checkpoint format (per-rank parts, checksums), loadable without Ray.
* :mod:`.tables`: the CSV formats (latents, per-sample losses, history).
* :mod:`.styles`: styles as named latents, with provenance.
* :mod:`.model_dir`: what inference reads from a run, a checkpoint or a self-contained model folder.
* :mod:`.reference_import`: a model trained with the reference code, as a run folder.
* :mod:`.files`: checksums and verified reads.

Layers: this package sits above ``config``, ``data`` and ``model`` and below ``train``, ``analysis``,
``tracking``, ``inference`` and ``serve`` (docs/architecture.md).
"""

from hypersort_ray.runs.layout import AnalysisFiles, RunDir

__all__ = ["AnalysisFiles", "RunDir"]
