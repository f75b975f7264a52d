"""The curation report: one self-contained HTML page per analysed run (``RunDir.analysis.report_html``).

Plain HTML and CSS, every figure embedded as a base64 PNG; it opens offline and can be mailed as one
file. The interactive map is a separate page beside it (linked relatively, also self-contained).

Sections: dataset summary, latent map, styles, the top-k suspicious cases (which evidence flagged each,
where its largest disagreement with the main style is, and slices through it: given label, main-style
and own-style predictions, when a predictor was available), what each score means (one sentence each),
metrics vs the truth (every score side by side), training curves, and the settings used.

Example:
    >>> page = build_report(inputs)       # doctest: +SKIP
    >>> run.analysis.report_html.write_text(page)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from hypersort_ray.analysis.localisation import LOCATION_COLUMNS, location_text
from hypersort_ray.analysis.plots import data_uri, style_label
from hypersort_ray.analysis.scores import FLAGGED_BY, SCORE_MEANINGS, score_columns
from hypersort_ray.analysis.styles import StyleModel

__all__ = ["CaseThumbnail", "ReportInputs", "build_report"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums} .best{font-weight:bold;background:#eef6ee}
.muted{color:#777} .note{background:#fff8e1;border-left:3px solid #f0b400;padding:6px 10px;margin:6px 0;font-size:0.9em}
.kv td:first-child{font-weight:600;white-space:nowrap} img.fig{max-width:100%;border:1px solid #eee}
img.thumb{height:110px} img.loc{height:220px} code{background:#f4f4f4;padding:0 3px} .scroll{overflow-x:auto;max-width:100%}
"""


@dataclass(frozen=True)
class CaseThumbnail:
    """Slice montage of one case.

    Attributes:
        png: PNG bytes (mid slices image | given label | prediction, or orthogonal slices through the
            largest disagreement: given label, main-style and own-style predictions).
        dice: Dice of the (main-style) prediction against the given label (None without prediction).
    """

    png: bytes
    dice: float | None = None


@dataclass
class ReportInputs:
    """Everything the report shows.

    Attributes:
        run_dir: the run folder (shown, not read).
        run_name: experiment name.
        datalist: datalist path as configured (None if unknown).
        truth: truth CSV used (None without truth).
        styles: the fitted styles.
        table: the ranked suspicion table.
        top_k: how many suspicious cases to list.
        rank_by: the column the table is ranked by.
        latent_map_png: the static map.
        latent_map_html: relative link to the interactive map (None: not written).
        loss_curves_png: training curves (None: no history).
        ranking_csv: file name of the full ranking, shown under the top-k table (None: not mentioned).
        history_csv: file name of the training history, named when it gave no curves (None: generic).
        metrics: the metrics document (:func:`~.metrics.compute_metrics`) (None without truth).
        thumbnails: sample index -> thumbnail of the top-k cases.
        style_thumbnails: style key -> montage of the style's medoid case (image, given label and the
            style's prediction).
        settings: the analysis settings, shown verbatim.
        notes: things the reader should know (skipped parts and why).
    """

    run_dir: str
    run_name: str
    datalist: str | None
    truth: str | None
    styles: StyleModel
    table: pd.DataFrame
    top_k: int
    rank_by: str
    latent_map_png: bytes
    latent_map_html: str | None = None
    loss_curves_png: bytes | None = None
    ranking_csv: str | None = None
    history_csv: str | None = None
    metrics: Mapping[str, Any] | None = None
    thumbnails: Mapping[int, CaseThumbnail] = field(default_factory=dict)
    style_thumbnails: Mapping[str, CaseThumbnail] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()


def _e(value: Any) -> str:
    return html.escape(str(value))


def _header(name: str) -> str:
    """A column header that may wrap after underscores (long score names would widen the table)."""
    return _e(name).replace("_", "_<wbr>")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<span class='muted'>n/a</span>"
    if isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return _e(value)


def _vector(values: Sequence[float], max_items: int = 4) -> str:
    shown = ", ".join(f"{v:.3f}" for v in list(values)[:max_items])
    return f"[{shown}{', …' if len(values) > max_items else ''}]"


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


# ------------------------------------------------------------------------------------------ sections
def _summary(inp: ReportInputs) -> str:
    model = inp.styles
    main = model.main
    n = len(inp.table)
    d = model.params.get("latent_dim", "?")
    top = ", ".join(_e(c) for c in inp.table["case_id"].head(5))
    rows = [
        ("run folder", f"<code>{_e(inp.run_dir)}</code>"),
        ("cases (N)", n),
        ("latent dimension (d)", d),
        (
            "datalist",
            f"<code>{_e(inp.datalist)}</code>" if inp.datalist else "<span class='muted'>unknown</span>",
        ),
        ("truth", f"<code>{_e(inp.truth)}</code>" if inp.truth else "<span class='muted'>none given</span>"),
        (
            "styles",
            f"{len(model.styles)} (main style: {main.size} cases, {100 * main.size / max(n, 1):.0f} %)",
        ),
        ("outliers", model.n_outliers),
        ("ranked by", f"<code>{_e(inp.rank_by)}</code> (higher = more suspicious)"),
        ("top 5 suspicious", top),
    ]
    return "<h2>Dataset summary</h2>" + _kv_table(rows)


def _latent_map(inp: ReportInputs) -> str:
    link = (
        f" The interactive version (hover for ids, scores and thumbnails) is "
        f"<a href='{_e(inp.latent_map_html)}'>{_e(inp.latent_map_html)}</a>."
        if inp.latent_map_html
        else ""
    )
    return (
        "<h2>Latent map</h2>"
        "<p>Each point is a training case's latent λ; colours are styles, <b>+</b> is λ = 0 (the main "
        f"annotation mode under the L1 prior), circled cases are the top {inp.top_k} suspicious.{link}</p>"
        f"<img class='fig' alt='latent map' src='{data_uri(inp.latent_map_png)}'>"
    )


def _styles(inp: ReportInputs) -> str:
    model = inp.styles
    crosstab = (inp.metrics or {}).get("styles", {}).get("crosstab", {}) if inp.metrics else {}
    head = "<tr><th>id</th><th>name</th><th>size</th><th>mean ‖λ‖</th><th>medoid case</th><th>centroid</th>"
    head += "<th>latent used to segment</th>"
    head += "<th>truth composition</th>" if crosstab else ""
    thumbs = inp.style_thumbnails
    have_pred = any(t.dice is not None for t in thumbs.values())
    head += "<th>members</th>"
    if thumbs:
        head += "<th>medoid case: image | given label" + (" | style's prediction (Dice)" if have_pred else "")
        head += "</th>"
    head += "</tr>"
    rows = []
    for s in model.styles:
        comp = ""
        if crosstab:
            parts = [f"{_e(k)}: {v[s.key]}" for k, v in sorted(crosstab.items()) if v.get(s.key)]
            comp = f"<td>{', '.join(parts)}</td>"
        members = ", ".join(_e(m) for m in s.members[:8]) + (f" … (+{s.size - 8})" if s.size > 8 else "")
        rows.append(
            f"<tr><td><code>{_e(s.key)}</code></td><td>{_e(s.name)}</td><td class='num'>{s.size}</td>"
            f"<td class='num'>{_num(s.mean_norm)}</td><td>{_e(s.medoid_case_id)} (#{s.medoid_index})</td>"
            f"<td><code>{_vector(s.centroid)}</code></td><td><code>{_vector(s.latent)}</code></td>{comp}"
            f"<td>{members}</td>{_style_thumb(thumbs, s.key) if thumbs else ''}</tr>"
        )
    outliers = model.n_outliers
    extra = (
        f"<p>{outliers} case(s) belong to no style (outliers: isolated latents outside the main mode; see "
        "their <code>outlier_score</code>).</p>"
        if outliers
        else ""
    )
    method = (
        f"<p class='muted'>Method <code>{_e(model.method)}</code>: HDBSCAN in a whitened, radially compressed "
        "space around a robust main mode (details under Settings).</p>"
    )
    return f"<h2>Styles</h2>{method}<div class='scroll'><table>{head}{''.join(rows)}</table></div>{extra}"


def _style_thumb(thumbs: Mapping[str, CaseThumbnail], key: str) -> str:
    thumb = thumbs.get(key)
    if thumb is None:
        return "<td></td>"
    dice = f"<br>Dice {_num(thumb.dice)}" if thumb.dice is not None else ""
    return f"<td><img class='thumb' alt='medoid slices' src='{data_uri(thumb.png)}'>{dice}</td>"


def _suspicious(inp: ReportInputs) -> str:
    table = inp.table.head(inp.top_k)
    score_cols = score_columns(table)
    have_flags = FLAGGED_BY in table.columns
    have_location = set(LOCATION_COLUMNS) <= set(table.columns)
    have_thumbs = bool(inp.thumbnails)
    have_dice = any(t.dice is not None for t in inp.thumbnails.values())
    headers = ["rank", "case", "index", "style"]
    headers += ["flagged by"] if have_flags else []
    headers += score_cols
    headers += ["largest disagreement with the main style: centre, volume"] if have_location else []
    if have_dice:
        headers.append("Dice (main style vs given)")
    if have_thumbs:
        headers.append(
            "slices through the largest disagreement (rows: given label | main-style | own-style prediction)"
            if have_dice
            else "slice: image | given label"
        )
    head = "<tr>" + "".join(f"<th>{_header(h)}</th>" for h in headers) + "</tr>"
    rows = []
    for rank, rec in enumerate(table.itertuples(index=False), start=1):
        data = rec._asdict()
        thumb = inp.thumbnails.get(int(data["index"]))
        cells = [
            f"<td class='num'>{rank}</td><td>{_e(data['case_id'])}</td><td class='num'>{int(data['index'])}</td>",
            f"<td>{_e(style_label(str(data['style'])))}</td>",
        ]
        if have_flags:
            flags = data[FLAGGED_BY] if isinstance(data[FLAGGED_BY], str) else ""
            cells.append(f"<td>{_e(flags.replace('; ', ' + ')) or '<span class=muted>neither</span>'}</td>")
        cells += [f"<td class='num'>{_num(data[c])}</td>" for c in score_cols]
        if have_location:
            cells.append(f"<td>{_e(location_text(data))}</td>")
        if have_dice:
            cells.append(f"<td class='num'>{_num(thumb.dice if thumb else None)}</td>")
        if have_thumbs:
            cls = "loc" if have_dice else "thumb"
            img = f"<img class='{cls}' alt='slices' src='{data_uri(thumb.png)}'>" if thumb else ""
            cells.append(f"<td>{img}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    full = f" Full ranking: <code>{_e(inp.ranking_csv)}</code>." if inp.ranking_csv else ""
    flags = (
        " <i>Flagged by</i> names the evidence behind a case: <i>own style far from λ = 0</i> (its λ "
        "left the main style) and/or <i>main-style prediction disagrees</i> (robust z ≥ 3.5)."
        if have_flags
        else ""
    )
    return (
        f"<h2>Top {len(table)} suspicious cases</h2>"
        f"<p>Ranked by <code>{_e(inp.rank_by)}</code>.{full}{flags}</p>"
        f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>"
    )


def _meanings(inp: ReportInputs) -> str:
    """One sentence per score column of the table (higher = more suspicious for all)."""
    items = []
    for column in score_columns(inp.table):
        text = SCORE_MEANINGS.get(column, "a score column computed elsewhere (higher = more suspicious).")
        items.append(f"<li><code>{_e(column)}</code>: {_e(text)}</li>")
    return (
        "<h2>What the scores mean</h2><p>For every score, higher = more suspicious.</p>"
        f"<ul>{''.join(items)}</ul>"
    )


def _best(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return max(finite) if finite else None


def _metrics(inp: ReportInputs) -> str:
    m = inp.metrics
    if not m:
        return "<h2>Metrics vs truth</h2><p class='muted'>No truth CSV given (use <code>--truth</code>).</p>"
    truth = m.get("truth", {})
    scores: Mapping[str, Any] = m.get("scores", {})
    kinds = sorted({k for s in scores.values() for k in (s.get("auroc_by_kind") or {})})
    numeric = truth.get("numeric_column")
    cols = [("AUROC", "auroc"), ("average precision", "average_precision")]
    if numeric:
        cols.append((f"Spearman ρ vs {numeric}", "spearman"))
    header = "<tr><th>score</th>" + "".join(f"<th>{_e(c)}</th>" for c, _ in cols)
    header += "".join(f"<th>AUROC {_e(k)}</th>" for k in kinds) + "</tr>"
    best = {key: _best([s.get(key) for s in scores.values()]) for _, key in cols}
    best_kind = {k: _best([(s.get("auroc_by_kind") or {}).get(k) for s in scores.values()]) for k in kinds}
    rows = []
    for name, s in scores.items():
        cells = [f"<td><code>{_e(name)}</code></td>"]
        for _, key in cols:
            v = s.get(key)
            cls = "num best" if v is not None and v == best[key] else "num"
            cells.append(f"<td class='{cls}'>{_num(v)}</td>")
        for k in kinds:
            v = (s.get("auroc_by_kind") or {}).get(k)
            cls = "num best" if v is not None and v == best_kind[k] else "num"
            cells.append(f"<td class='{cls}'>{_num(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    st = m.get("styles", {})
    direc = (m.get("directions") or {}).get("opposite_sides")
    facts = [
        (
            "evaluated cases",
            f"{truth.get('n_evaluated')} (joined on <code>{_e(truth.get('joined_on'))}</code>)",
        ),
        ("perturbed / clean", f"{m.get('n_perturbed', 'n/a')} / {m.get('n_clean', 'n/a')}"),
        ("counts", ", ".join(f"{_e(k)}: {v}" for k, v in (m.get("counts") or {}).items())),
        (f"adjusted Rand index (styles vs {_e(st.get('target', 'kind'))})", _num(st.get("ari"))),
        ("ARI without outliers", _num(st.get("ari_without_outliers"))),
        (
            "majority style per kind",
            ", ".join(f"{_e(k)} → {_e(v)}" for k, v in (st.get("majority_style") or {}).items()),
        ),
    ]
    if "eroded_dilated_separated" in st:
        facts.append(
            (
                "eroded and dilated mostly outside the main style, in different groups",
                "yes" if st["eroded_dilated_separated"] else "no",
            )
        )
    if direc:
        facts.append(
            (
                f"{_e(direc['kinds'][0])} vs {_e(direc['kinds'][1])} directions (from the main centroid)",
                f"cosine {_num(direc['cosine'])}: {'opposite sides' if direc['opposite'] else 'same side'}",
            )
        )
    if truth.get("n_missing_truth"):
        facts.append(("cases without truth (left out)", truth["n_missing_truth"]))
    notes = "".join(f"<div class='note'>{_e(n)}</div>" for n in m.get("notes", []))
    return (
        "<h2>Metrics vs truth</h2>"
        f"<p>Truth: <code>{_e(truth.get('source'))}</code>. Higher scores should mean more suspicious; best per "
        "column in bold. The paper reports Spearman 0.2166 for ‖λ‖ and 0.1723 for the mean distance on "
        "TotalSegmentator V1→V2.</p>"
        f"<table>{header}{''.join(rows)}</table>{_kv_table(facts)}{notes}"
    )


def _curves(inp: ReportInputs) -> str:
    if inp.loss_curves_png is None:
        what = _e(inp.history_csv) if inp.history_csv else "training history"
        return f"<h2>Training curves</h2><p class='muted'>No usable {what} in the run folder.</p>"
    return (
        f"<h2>Training curves</h2><img class='fig' alt='loss curves' src='{data_uri(inp.loss_curves_png)}'>"
    )


def _settings(inp: ReportInputs) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, Mapping):
            return "<br>".join(f"{_e(k)}: {fmt(v)}" for k, v in value.items())
        if isinstance(value, list | tuple) and value and isinstance(value[0], float):
            return f"<code>{_vector(value, 8)}</code>"
        return _e(value)

    rows = [(k, fmt(v)) for k, v in inp.settings.items()]
    return "<h2>Settings used</h2>" + _kv_table(rows)


def build_report(inp: ReportInputs) -> str:
    """Render the report page.

    Args:
        inp: the report's content.

    Returns:
        A complete HTML document (no external references).
    """
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = "".join(f"<div class='note'>{_e(n)}</div>" for n in inp.notes)
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>HyperSORT curation report: {_e(inp.run_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>HyperSORT curation report: {_e(inp.run_name)}</h1>",
        f"<p class='muted'>Generated {stamp} by <code>hypersort analyze</code>.</p>",
        notes,
        _summary(inp),
        _latent_map(inp),
        _styles(inp),
        _suspicious(inp),
        _meanings(inp),
        _metrics(inp),
        _curves(inp),
        _settings(inp),
        "</body></html>\n",
    ]
    return "\n".join(parts)
