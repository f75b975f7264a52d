"""The sweep's results table (``OUT/results.csv``), its console rendering and ``OUT/objective.png``.

One row per trial, **objective first**, then the sampled parameters, the latent-vs-truth metrics
(AUROC / Spearman of ‖λ‖ against the known perturbations), the other final metrics, the status and the
trial's run folder. Rows are sorted best first by the objective (``mode``); trials without an objective
value (failed before their first evaluation) go last.

Statuses:
    ``finished``: trained all epochs and was evaluated; ``stopped``: stopped early by the scheduler
    (ASHA), objective = its last reported value; ``failed``: raised after its retries;
    ``interrupted``: the sweep was interrupted while it ran (``--resume`` continues it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypersort_ray.atomic import atomic_write_text, atomic_write_via

__all__ = ["TRUTH_COLUMNS", "plot_objective", "print_table", "results_frame", "write_results"]

TRUTH_COLUMNS = ("auroc_latent_norm", "spearman_latent_norm")
# Final metrics shown after the truth columns (when a trial reported them).
EXTRA_COLUMNS = (
    "val_dice",
    "val_dice_style",
    "val_dice_unperturbed",
    "seg_loss",
    "dice",
    "loss",
    "latent_norm_mean",
    "epoch",
    "seconds",
)
TAIL_COLUMNS = ("status", "trial_id", "run_dir", "mlflow_run_id", "error")


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def results_frame(rows: Sequence[Mapping[str, Any]], *, metric: str, mode: str, params: Sequence[str]):
    """A DataFrame of trial rows: objective first, sampled params, truth metrics, extras, status.

    Args:
        rows: one mapping per trial holding ``metric``, the sampled params (dotted keys), metrics,
            ``status``, ``trial_id``, ``run_dir``.
        metric: the objective's metric name (becomes the first column, ``objective:<metric>`` is not
            used: the column keeps the metric's own name).
        mode: ``min`` or ``max``.
        params: the sampled keys, in space order.
    """
    import pandas as pd

    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}")
    order = [metric, *params]
    order += [c for c in TRUTH_COLUMNS if c not in order]
    order += [c for c in EXTRA_COLUMNS if c not in order]
    order += [c for c in TAIL_COLUMNS if c not in order]
    records = []
    for row in rows:
        rec = {c: row.get(c) for c in order}
        rec[metric] = _number(row.get(metric))
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=order)
    # Keep only columns some trial filled (the objective, params and status always stay).
    keep = [c for c in order if c in (metric, *params, "status", "trial_id", "run_dir") or df[c].notna().any()]
    df = df[keep]
    if len(df):
        df = df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return df.reset_index(drop=True)


def write_results(df, path: Path) -> Path:
    """``results.csv``, written atomically."""
    return atomic_write_text(Path(path), df.to_csv(index=False))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _short_names(columns: Sequence[str]) -> dict[str, str]:
    """Dotted keys shown by their last part when that is unambiguous (``training.l1_weight`` → ``l1_weight``)."""
    last = [c.rsplit(".", 1)[-1] for c in columns]
    return {c: (s if last.count(s) == 1 else c) for c, s in zip(columns, last, strict=True)}


DISPLAY_SKIP = ("run_dir", "mlflow_run_id", "error", "dice", "loss", "latent_norm_mean")


def print_table(df, *, metric: str, mode: str, title: str = "sweep results", file=None) -> None:
    """Render the table with rich (stderr by default, so ``--json`` stdout stays machine-readable)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, width=240)
    table = Table(title=f"{title} (sorted by {metric}, {mode})")
    shown = [c for c in df.columns if c not in DISPLAY_SKIP]
    names = _short_names(shown)
    for col in shown:
        table.add_column(names[col], justify="left" if col in ("status", "trial_id") else "right", no_wrap=True)
    for _, row in df.iterrows():
        table.add_row(*(_fmt(row[c]) for c in shown))
    console.print(table)
    failed = df[df["status"] == "failed"] if "status" in df else df.iloc[0:0]
    for _, row in failed.iterrows():
        if isinstance(row.get("error"), str) and row.get("error"):
            console.print(f"[red]trial {row['trial_id']} failed:[/red] {row['error']}")


def plot_objective(df, path: Path, *, metric: str, x_keys: Sequence[str]) -> Path | None:
    """Objective vs each of ``x_keys`` (those present), one panel each; log x for ranges spanning >10×."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in x_keys if k in df.columns]
    if not keys or not len(df):
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    colours = {"finished": "tab:blue", "stopped": "tab:orange", "failed": "tab:red", "interrupted": "tab:gray"}
    for ax, key in zip(axes[0], keys, strict=True):
        for status, part in df.groupby("status") if "status" in df else [("finished", df)]:
            x = part[key].map(_number)
            y = part[metric].map(_number)
            ok = x.notna() & y.notna()
            ax.scatter(x[ok], y[ok], label=str(status), color=colours.get(str(status), "tab:gray"), alpha=0.8)
        xs = df[key].map(_number).dropna()
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{metric} per trial")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
