"""Styles as a model uses them: named latents parsed from a ``styles.json`` document.

``hypersort analyze`` writes ``styles.json`` (every cluster with its members, medoid and centroid); a
model folder keeps a normalised copy (ids, names, sizes, centroids; no case ids). Both carry the
``checkpoint_sha256`` of the checkpoint whose latents they were fitted on: :class:`~.layout.RunDir` and
:mod:`.model_dir` refuse a pair that does not match.

``main`` is λ = 0 (the L1 pull puts the main annotation mode at the origin); every other style segments
with its centroid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypersort_ray.errors import HypersortError, ModelError

__all__ = ["MAIN", "PROVENANCE_KEY", "Style", "normalised_styles_doc", "parse_styles_doc"]

MAIN = "main"
#: The key under which derived documents record the checkpoint they were made from.
PROVENANCE_KEY = "checkpoint_sha256"


@dataclass(frozen=True)
class Style:
    """An annotation style: a named latent (λ = 0 for ``main``, a cluster centroid otherwise).

    Attributes:
        id: ``"main"`` or the cluster id from ``styles.json`` (as a string).
        latent: the latent vector.
        size: training samples in the cluster (0 when unknown).
        name: a human-readable label.
    """

    id: str
    latent: tuple[float, ...]
    size: int = 0
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "latent": list(self.latent)}


def _main(dim: int, size: int = 0) -> Style:
    return Style(MAIN, (0.0,) * dim, size, "main style (λ = 0)")


def parse_styles_doc(
    doc: Mapping[str, Any] | None, dim: int, source: str
) -> tuple[list[Style], dict[str, str]]:
    """Styles (``main`` first) and aliases (the main cluster's own id → ``main``) from a styles document.

    Args:
        doc: the parsed ``styles.json`` (None: the model knows only ``main``).
        dim: the model's latent dimension.
        source: the file, for messages.

    Raises:
        ModelError: wrong centroid length, NaN/inf, duplicated ids, or not a styles document.
    """
    styles = [_main(dim)]
    aliases: dict[str, str] = {}
    if doc is None:
        return styles, aliases
    try:
        main_id = "" if doc.get("main_style") is None else str(doc["main_style"])
        entries = doc.get("styles", [])
        if not isinstance(entries, list):
            raise TypeError("'styles' must be a list")
        for entry in entries:
            sid = str(entry["id"])
            size = int(entry.get("size", 0) or 0)
            if sid in (MAIN, main_id):
                styles[0] = _main(dim, size)
                if sid != MAIN:
                    aliases[sid] = MAIN
                continue
            styles.append(_parse_style(entry, sid, size, dim, source, styles))
    except HypersortError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{source}: not a valid styles file ({type(exc).__name__}: {exc})") from exc
    return styles, aliases


def _parse_style(entry: Mapping[str, Any], sid: str, size: int, dim: int, source: str, seen: list[Style]) -> Style:
    centroid = tuple(float(v) for v in entry["centroid"])
    if len(centroid) != dim:
        raise ModelError(f"{source}: style {sid} centroid has {len(centroid)} values, but latent_dim is {dim}")
    if not all(math.isfinite(v) for v in centroid):
        raise ModelError(f"{source}: style {sid} centroid contains NaN or inf")
    if any(s.id == sid for s in seen):
        raise ModelError(f"{source}: style id {sid!r} appears twice")
    return Style(sid, centroid, size, str(entry.get("name") or f"style {sid}"))


def normalised_styles_doc(styles: Sequence[Style], checkpoint_sha256: str | None) -> dict[str, Any]:
    """The ``styles.json`` of a model folder: ids, names, sizes, centroids (no case ids) + provenance."""
    return {
        "main_style": MAIN,
        PROVENANCE_KEY: checkpoint_sha256,
        "styles": [{"id": s.id, "name": s.name, "size": s.size, "centroid": list(s.latent)} for s in styles],
    }
