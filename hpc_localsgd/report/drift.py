"""The drift figures: what every global sync measured (metrics.h5's ``syncs`` table) against steps.

Why accuracy falls as H and the number of workers grow: the workers drift apart between syncs
(consensus distance, relative to the model's squared norm), and the outer optimizer's updates
Δ = x_prev − x̄ grow and turn less consistent (the cosine between consecutive Δs falls). One figure
per task and worker count, three panels (consensus distance, ‖Δ‖, cos(Δ, previous Δ)); one line per
method and H (the method's color, lighter for smaller H), averaged over seeds at each sync step.

Runs without the table (written before it existed, or all-reduce SGD, which never averages a model)
are left out; a task and worker count without any such run gets no figure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..io.metrics import read_syncs
from .collect import Run, method_rank
from .plots import _save, _shade, _unique_legend, method_color

# (field of the syncs table, axis label, logarithmic)
DRIFT_PANELS = (
    ("consensus_distance", "consensus distance  mean‖xᵢ − x̄‖² / ‖x̄‖²", True),
    ("outer_update_norm", "outer update ‖Δ‖,  Δ = x_prev − x̄", True),
    ("outer_update_cosine", "cos(Δ, previous Δ)", False),
)


@dataclass
class DriftCurve:
    """One (method, H) at one worker count: the syncs' steps and each panel's mean over seeds."""

    method: str
    sync_period: int
    step: np.ndarray
    values: dict[str, np.ndarray]


def read_drift(run: Run) -> dict[str, np.ndarray] | None:
    """The run's per-sync table, or None when it has none (or no row, or cannot be read right now)."""
    try:
        table = read_syncs(run.path)
    except (OSError, KeyError):
        return None
    return table if table is not None and len(table["step"]) else None


def mean_drift(method: str, sync_period: int, tables: Sequence[dict[str, np.ndarray]]) -> DriftCurve:
    """The seeds' tables averaged at the union of their sync steps (seeds of one configuration sync at
    the same steps; one still going stops contributing after its last sync). NaNs (no outer step)
    are skipped; a step where every seed has NaN stays NaN."""
    steps = np.unique(np.concatenate([t["step"] for t in tables]))
    values = {}
    for name, _, _ in DRIFT_PANELS:
        stack = np.full((len(tables), len(steps)), np.nan)
        for i, table in enumerate(tables):
            stack[i, np.searchsorted(steps, table["step"])] = table[name]
        counts = np.sum(~np.isnan(stack), axis=0)
        sums = np.nansum(stack, axis=0)
        values[name] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return DriftCurve(method, sync_period, steps, values)


def plot_drift(curves: Sequence[DriftCurve], files: Sequence[Path], title: str) -> None:
    """Three panels side by side against steps; one line per (method, H)."""
    methods = list(dict.fromkeys(c.method for c in curves))
    periods = {m: sorted({c.sync_period for c in curves if c.method == m}) for m in methods}
    figure = Figure(figsize=(16, 4.6), layout="constrained")
    axes = figure.subplots(1, len(DRIFT_PANELS), sharex=True)
    for curve in curves:
        position = periods[curve.method].index(curve.sync_period)
        color = _shade(method_color(curve.method, methods), position, len(periods[curve.method]))
        label = f"{curve.method}, H={curve.sync_period}"
        for ax, (name, _, _) in zip(axes, DRIFT_PANELS, strict=True):
            y = curve.values[name]
            shown = ~np.isnan(y)  # an outer step every k-th sync only: join the points that exist
            if shown.any():
                ax.plot(curve.step[shown], y[shown], color=color, linewidth=1.4, marker=".", markersize=3, label=label)
    for ax, (name, y_label, logarithmic) in zip(axes, DRIFT_PANELS, strict=True):
        if not ax.lines:
            ax.text(0.5, 0.5, "no run with an outer optimizer", ha="center", va="center", transform=ax.transAxes)
        elif logarithmic and all(np.nanmin(c.values[name], initial=np.inf) > 0 for c in curves if _has(c, name)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
    axes[2].axhline(0.0, color="0.5", linewidth=0.8)
    handles, labels = _unique_legend(axes)
    figure.legend(handles, labels, loc="outside right upper", frameon=False)
    figure.suptitle(title)
    _save(figure, files)


def _has(curve: DriftCurve, name: str) -> bool:
    return bool(np.any(~np.isnan(curve.values[name])))


def drift_figures(
    runs: Sequence[Run], out: Path, task_suffix: Callable[[str], str]
) -> list[tuple[list[Path], Callable[[], None]]]:
    """The drift figures the report writes, each as (its files, what writes them): one per task and
    worker count that has runs with per-sync measurements, named ``drift<task_suffix(task)>-W<workers>``."""
    tables: dict[tuple[str, int, str, int], list[dict[str, np.ndarray]]] = {}
    for run in runs:
        table = read_drift(run)
        if table is not None:
            tables.setdefault((run.task, run.workers, run.method, run.sync_period), []).append(table)
    planned: list[tuple[list[Path], Callable[[], None]]] = []
    for task, workers in sorted({(key[0], key[1]) for key in tables}):
        keys = sorted((key for key in tables if key[:2] == (task, workers)), key=lambda k: (method_rank(k[2]), k[3]))
        curves = [mean_drift(method, period, tables[(task, workers, method, period)]) for _, _, method, period in keys]
        name = f"drift{task_suffix(task)}-W{workers}"
        files = [out / f"{name}.png", out / f"{name}.svg"]
        title = f"Drift at every sync — {task}, {workers} workers (mean over seeds)"
        planned.append((files, functools.partial(plot_drift, curves, files, title)))
    return planned
