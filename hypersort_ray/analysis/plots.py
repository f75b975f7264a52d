"""Figures of the analysis: latent map (PNG and interactive HTML), loss curves, slice montages.

Everything renders offline: matplotlib through its Agg canvas (no global backend switch, no display),
plotly with its JavaScript bundled into the page, images as base64 ``data:`` URIs.

Latent maps show the first two latent dimensions when d = 2 (the paper's choice) and the first two
principal components otherwise; axis labels say which, with the variance each component explains.

Example:
    >>> import numpy as np
    >>> png = slice_montage_png(np.random.rand(8, 8, 4), np.ones((8, 8, 4)))
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "Embedding",
    "data_uri",
    "embed_2d",
    "latent_map_html",
    "latent_map_png",
    "loss_curves_png",
    "mid_slice_index",
    "orthogonal_montage_png",
    "slice_montage_png",
    "style_colors",
    "style_label",
]

_OUTLIER_COLOR = "#222222"
_MAIN_COLOR = "#4c72b0"
_PALETTE = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*", "<", ">")
_PLOTLY_SYMBOLS = ("circle", "triangle-up", "square", "diamond", "triangle-down", "cross", "x", "star")


# -------------------------------------------------------------------------------------- helpers
def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig: Figure, dpi: int = 110, tight: bool = False) -> bytes:
    """Render through the Agg canvas; ``tight`` trims margins at the cost of an extra layout pass."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def style_label(key: str) -> str:
    """Legend text of a style key: ``main``, ``style 2``, ``outliers``."""
    return {"main": "main", "outlier": "outliers"}.get(key, f"style {key}")


def style_colors(keys: Sequence[str]) -> dict[str, str]:
    """A stable colour per style key: main blue, outliers near-black, others from a palette."""
    colors = {"main": _MAIN_COLOR, "outlier": _OUTLIER_COLOR}
    others = sorted({k for k in keys if k not in colors}, key=lambda k: (len(k), k))
    for i, key in enumerate(others):
        colors[key] = _PALETTE[i % len(_PALETTE)]
    return colors


@dataclass(frozen=True)
class Embedding:
    """2-D coordinates for a latent map.

    Attributes:
        xy: (N, 2) coordinates.
        origin: (2,) where λ = 0 lands.
        xlabel, ylabel: axis labels (which dimensions or components).
        how: ``latent`` (d <= 2) or ``pca``.
    """

    xy: np.ndarray
    origin: np.ndarray
    xlabel: str
    ylabel: str
    how: str


def embed_2d(latents: np.ndarray) -> Embedding:
    """The first two latent dims (d <= 2; d = 1 is drawn on a line) or the first two PCs.

    Args:
        latents: (N, d) latents.
    """
    z = np.asarray(latents, dtype=np.float64)
    n, d = z.shape
    if d == 1:
        return Embedding(np.column_stack([z[:, 0], np.zeros(n)]), np.zeros(2), "z0", "(d = 1)", "latent")
    if d == 2:
        return Embedding(z.copy(), np.zeros(2), "z0", "z1", "latent")
    mean = z.mean(axis=0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    var = s**2 / max(float(np.sum(s**2)), 1e-300)
    comps = vt[:2]
    xy = (z - mean) @ comps.T
    origin = (-mean) @ comps.T
    return Embedding(xy, origin, f"PC1 ({100 * var[0]:.0f}% var.)", f"PC2 ({100 * var[1]:.0f}% var.)", "pca")


# ------------------------------------------------------------------------------------- latent map
def latent_map_png(
    latents: np.ndarray,
    styles: Sequence[str],
    case_ids: Sequence[str],
    highlight: Sequence[int] = (),
    kinds: Sequence[str] | None = None,
    title: str = "Latent map",
) -> bytes:
    """Latent map coloured by style; λ = 0 marked; highlighted cases annotated with their ids.

    Args:
        latents: (N, d) latents.
        styles: style key per row.
        case_ids: case id per row.
        highlight: rows to annotate (the top-k suspicious cases).
        kinds: truth kind per row (marker shape); None for one shape. Rows without truth: ``"?"``.
        title: figure title (the embedding used is appended).

    Returns:
        PNG bytes.
    """
    emb = embed_2d(latents)
    styles = np.asarray([str(s) for s in styles])
    colors = style_colors(styles.tolist())
    fig = Figure(figsize=(8.4, 6.0))
    ax = fig.add_subplot(111)
    kind_arr = np.asarray([str(k) for k in kinds]) if kinds is not None else None
    kind_marker = {}
    if kind_arr is not None:
        for i, kind in enumerate(
            sorted(set(kind_arr.tolist()), key=lambda k: (k not in ("none", "clean"), k))
        ):
            kind_marker[kind] = _MARKERS[i % len(_MARKERS)]
    for key in sorted(set(styles.tolist()), key=lambda k: (k != "main", k == "outlier", len(k), k)):
        sel = styles == key
        label = f"{style_label(key)} ({int(sel.sum())})"
        if kind_arr is None:
            ax.scatter(
                *emb.xy[sel].T,
                s=22,
                c=colors[key],
                marker="x" if key == "outlier" else "o",
                label=label,
                alpha=0.85,
                linewidths=1.0,
            )
            continue
        first = True
        for kind, marker in kind_marker.items():
            both = sel & (kind_arr == kind)
            if both.any():
                ax.scatter(
                    *emb.xy[both].T,
                    s=26,
                    c=colors[key],
                    marker=marker,
                    alpha=0.85,
                    label=label if first else None,
                    edgecolors="none",
                )
                first = False
    if kind_arr is not None:
        for kind, marker in kind_marker.items():
            ax.scatter([], [], marker=marker, c="#999999", label=f"truth: {kind}")
    ax.scatter(*emb.origin, marker="+", s=220, c="black", linewidths=2.0, zorder=5, label="λ = 0")
    for row in highlight:
        ax.annotate(str(case_ids[row]), emb.xy[row], xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.scatter(*emb.xy[row], s=70, facecolors="none", edgecolors="#c44e52", linewidths=1.2, zorder=4)
    ax.set_xlabel(emb.xlabel)
    ax.set_ylabel(emb.ylabel)
    ax.set_title(f"{title} ({'latent dims' if emb.how == 'latent' else 'PCA of the latents'})")
    if emb.how == "latent":
        ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.25)
    # Outside the axes: inside, the legend hides cases (outliers sit in the corners it picks).
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, framealpha=0.8)
    return _png(fig, tight=True)


_HOVER_JS = """
var plot = document.getElementById('{plot_id}');
var box = document.getElementById('hs-thumb');
plot.on('plotly_hover', function (ev) {
  var p = ev.points[0];
  var src = p.customdata && p.customdata[0];
  if (box && src) { box.src = src; box.style.display = 'block'; }
});
plot.on('plotly_unhover', function () { if (box) { box.style.display = 'none'; } });
"""


def latent_map_html(
    latents: np.ndarray,
    table: pd.DataFrame,
    thumbnails: Mapping[int, str] | None = None,
    kinds: Sequence[str] | None = None,
    title: str = "HyperSORT latent map",
    download_name: str = "latent-map",
) -> str:
    """A self-contained interactive latent map (plotly.js embedded, no network access needed).

    Hovering a case shows its id, index, style and every score column of ``table``; with
    ``thumbnails`` the case's slice image appears beside the map.

    Args:
        latents: (N, d) latents, row-aligned with ``table`` by its ``index`` column order given below.
        table: suspicion table with ``index``, ``case_id``, ``style`` and score columns, **in the
            same row order as ``latents``**.
        thumbnails: sample index -> PNG data URI.
        kinds: truth kind per row (marker symbol), or None.
        title: page title.
        download_name: file name (without extension) of the toolbar's PNG download.

    Returns:
        The HTML page as text.
    """
    import plotly.graph_objects as go

    emb = embed_2d(latents)
    styles = table["style"].astype(str).to_numpy()
    colors = style_colors(styles.tolist())
    score_cols = [c for c in table.columns if c not in ("index", "case_id", "style")]
    kind_arr = np.asarray([str(k) for k in kinds]) if kinds is not None else None
    symbols = {}
    if kind_arr is not None:
        for i, k in enumerate(sorted(set(kind_arr.tolist()))):
            symbols[k] = _PLOTLY_SYMBOLS[i % len(_PLOTLY_SYMBOLS)]
    fig = go.Figure()
    for key in sorted(set(styles.tolist()), key=lambda k: (k != "main", k == "outlier", len(k), k)):
        sel = np.flatnonzero(styles == key)
        hover = []
        for row in sel:
            rec = table.iloc[row]
            lines = [
                f"<b>{html.escape(str(rec['case_id']))}</b> (index {int(rec['index'])})",
                f"style: {key}",
            ]
            if kind_arr is not None:
                lines.append(f"truth: {html.escape(kind_arr[row])}")
            for col in score_cols:
                val = rec[col]
                lines.append(
                    f"{col}: {val:.4g}" if isinstance(val, int | float | np.floating) else f"{col}: {val}"
                )
            hover.append("<br>".join(lines))
        custom = [[(thumbnails or {}).get(int(table.iloc[row]["index"]), "")] for row in sel]
        fig.add_trace(
            go.Scatter(
                x=emb.xy[sel, 0],
                y=emb.xy[sel, 1],
                mode="markers",
                name=f"{style_label(key)} ({sel.size})",
                marker={
                    "color": colors[key],
                    "size": 8,
                    "symbol": [symbols[kind_arr[r]] for r in sel] if kind_arr is not None else "circle",
                    "line": {"width": 0.5, "color": "white"},
                },
                text=hover,
                customdata=custom,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[emb.origin[0]],
            y=[emb.origin[1]],
            mode="markers",
            name="λ = 0",
            marker={"symbol": "cross-thin", "size": 16, "line": {"width": 2, "color": "black"}},
            hoverinfo="name",
        )
    )
    fig.update_layout(
        title=f"{title} ({'latent dims' if emb.how == 'latent' else 'PCA of the latents'})",
        xaxis_title=emb.xlabel,
        yaxis_title=emb.ylabel,
        template="plotly_white",
        width=820,
        height=680,
        legend={"itemsizing": "constant"},
    )
    if emb.how == "latent":
        fig.update_yaxes(scaleanchor="x", scaleratio=1)
    body = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        post_script=_HOVER_JS,
        div_id="latent-map",
        config={"displaylogo": False, "toImageButtonOptions": {"filename": download_name}},
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:16px} .wrap{display:flex;gap:16px;align-items:flex-start}"
        " #hs-thumb{display:none;max-width:420px;border:1px solid #ccc}</style></head><body>"
        f"<div class='wrap'><div>{body}</div><img id='hs-thumb' alt='case thumbnail'></div>"
        "</body></html>\n"
    )


# ------------------------------------------------------------------------------------ loss curves
_LOSS_COLUMNS = ("loss", "seg_loss", "dice_loss", "ce_loss", "l1")
_QUALITY_COLUMNS = ("dice", "val_dice")
_LATENT_COLUMNS = ("latent_norm_mean", "latent_norm_max")


def loss_curves_png(history: pd.DataFrame) -> bytes:
    """Training curves from the run's history: losses, Dice, latent norms and any ``auroc_*`` columns.

    Args:
        history: one row per epoch with an ``epoch`` column (else the row number is used).

    Returns:
        PNG bytes.

    Raises:
        ValueError: no known metric column to plot.
    """
    epoch = history["epoch"].to_numpy() if "epoch" in history.columns else np.arange(1, len(history) + 1)
    panels = [
        ("losses", [c for c in _LOSS_COLUMNS if c in history.columns]),
        ("segmentation quality", [c for c in _QUALITY_COLUMNS if c in history.columns]),
        ("latent norms", [c for c in _LATENT_COLUMNS if c in history.columns]),
        ("detection (vs truth)", [c for c in history.columns if c.startswith(("auroc", "spearman"))]),
    ]
    panels = [(t, cols) for t, cols in panels if cols]
    if not panels:
        raise ValueError(f"no metric column to plot; columns: {', '.join(history.columns)}")
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for i, (title, cols) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for col in cols:
            values = pd.to_numeric(history[col], errors="coerce").to_numpy(dtype=np.float64)
            ax.plot(epoch, values, marker="o" if len(epoch) < 30 else None, ms=3, label=col)
        if title == "losses":
            vals = pd.to_numeric(history[cols].stack(), errors="coerce")
            if len(vals) and (vals > 0).all():
                ax.set_yscale("log")  # the L1 term and the seg loss differ by orders of magnitude
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------- slice montage
def mid_slice_index(label: np.ndarray, axis: int = -1) -> int:
    """The slice through the label's centre of mass along ``axis`` (the middle slice if empty).

    Args:
        label: label volume (any dims >= 2).
        axis: slicing axis.
    """
    label = np.asarray(label)
    axis = axis % label.ndim
    fg = label > 0
    if not fg.any():
        return label.shape[axis] // 2
    other = tuple(a for a in range(label.ndim) if a != axis)
    profile = fg.sum(axis=other).astype(np.float64)
    return int(round(float(np.sum(np.arange(profile.size) * profile) / profile.sum())))


def _take_slice(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return volume
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    return np.take(volume, index, axis=axis % volume.ndim)


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range from robust percentiles (CT HU or normalised intensities alike)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def slice_montage_png(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray | None = None,
    axis: int = -1,
    index: int | None = None,
    titles: Sequence[str] | None = None,
    size: float = 2.4,
) -> bytes:
    """One slice of image, image + given label, and image + prediction (when given), side by side.

    Args:
        image: image volume (or a 2-D slice).
        label: label volume in the image's grid.
        prediction: predicted label in the same grid, optional.
        axis: slicing axis (last axis = axial for RAS-oriented volumes).
        index: slice index; default :func:`mid_slice_index` of the label.
        titles: panel titles (default ``image``, ``given label``, ``prediction``).
        size: panel edge in inches.

    Returns:
        PNG bytes.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim > 2 and index is None:
        index = mid_slice_index(_squeeze(label), axis)
    img = _take_slice(image, index or 0, axis).T  # transpose: first axis left-right, as viewers show it
    lab = _take_slice(label, index or 0, axis).T
    panels = [("image", None), ("given label", lab)]
    if prediction is not None:
        panels.append(("prediction", _take_slice(prediction, index or 0, axis).T))
    names = list(titles) if titles else [p[0] for p in panels]
    lo, hi = _window(img)
    fig = Figure(figsize=(size * len(panels), size))
    for i, (_, overlay) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if overlay is not None:
            mask = np.ma.masked_where(np.asarray(overlay) <= 0, np.asarray(overlay, dtype=np.float64))
            ax.imshow(mask, cmap="autumn", alpha=0.45, origin="lower", interpolation="nearest")
            if np.any(overlay > 0) and np.any(overlay <= 0):
                ax.contour(
                    np.asarray(overlay) > 0, levels=[0.5], colors="yellow", linewidths=0.6, origin="lower"
                )
        ax.set_title(names[i] if i < len(names) else "", fontsize=8)
        ax.set_axis_off()
    fig.subplots_adjust(wspace=0.03, left=0.01, right=0.99, bottom=0.01, top=0.9)
    return _png(fig, dpi=80)


#: The three orthogonal views of :func:`orthogonal_montage_png`: (title, slicing axis) in RAS voxel order.
ORTHOGONAL_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def orthogonal_montage_png(
    image: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray | None]],
    centre: Sequence[int] | None = None,
    size: float = 1.5,
) -> bytes:
    """Three orthogonal slices through ``centre`` (axial, coronal, sagittal), one row per overlay.

    Shows where a label error is: each row is the image with one overlay (e.g. the given label, the
    main-style prediction, the case's own-style prediction), each column one plane through the point; a
    cross marks the point.

    Args:
        image: 3-D image volume.
        rows: ``(title, overlay volume in the image's grid or None)`` per row.
        centre: the voxel to slice through (default: the volume's centre).
        size: panel edge in inches.

    Returns:
        PNG bytes.
    """
    image = _squeeze(np.asarray(image, dtype=np.float64))
    if image.ndim != 3:
        raise ValueError(f"orthogonal_montage_png needs a 3-D image, got shape {image.shape}")
    point = [s // 2 for s in image.shape] if centre is None else [int(c) for c in centre]
    point = [min(max(p, 0), s - 1) for p, s in zip(point, image.shape, strict=True)]
    lo, hi = _window(image)
    fig = Figure(figsize=(size * len(ORTHOGONAL_VIEWS), size * len(rows)))
    for r, (title, overlay) in enumerate(rows):
        for c, (view, axis) in enumerate(ORTHOGONAL_VIEWS):
            ax = fig.add_subplot(len(rows), len(ORTHOGONAL_VIEWS), r * len(ORTHOGONAL_VIEWS) + c + 1)
            ax.imshow(_take_slice(image, point[axis], axis).T, cmap="gray", vmin=lo, vmax=hi,
                      origin="lower", interpolation="nearest")
            if overlay is not None:
                sl = np.asarray(_take_slice(_squeeze(overlay), point[axis], axis)).T
                mask = np.ma.masked_where(sl <= 0, sl.astype(np.float64))
                ax.imshow(mask, cmap="autumn", alpha=0.45, origin="lower", interpolation="nearest")
            x, y = [point[a] for a in range(3) if a != axis]
            ax.plot([x], [y], marker="+", color="cyan", markersize=9, markeredgewidth=1.2)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(view, fontsize=7)
            if c == 0:
                ax.text(-0.04, 0.5, title, transform=ax.transAxes, rotation=90, fontsize=7,
                        ha="right", va="center")
    fig.subplots_adjust(wspace=0.03, hspace=0.04, left=0.08, right=0.99, bottom=0.01, top=0.93)
    return _png(fig, dpi=80)


def _squeeze(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    return volume
