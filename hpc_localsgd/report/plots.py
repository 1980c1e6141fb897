"""The study's figures: final accuracy against H, and training curves against four costs.

On the curves, every change of a run's workers (a worker lost, one joined: metrics.h5's ``membership``
table) is a thin vertical line in its line's color through each panel, with a marker at the top saying
which (:func:`membership_marks`); the legend names each kind once. Runs whose workers never changed
draw as they always did.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot, so no
display and no global backend switch is needed (the report runs on login nodes and in batch jobs).
Each figure is saved as PNG (for slides) and SVG (for papers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

from .collect import METHOD_ORDER, Membership, Run
from .table import GroupKey, ResultRow

BASELINE = "all-reduce"
_PALETTE = [
    "#4d4d4d",
    "#1f77b4",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
]
# The x axes of the curves figure: each is a cost that local SGD trades against accuracy.
CURVE_AXES = (
    ("step", "step"),
    ("wall_seconds", "wall-clock time (s)"),
    ("bytes_sent", "bytes sent per worker"),
    ("sync_rounds", "sync rounds"),
)
# A language model's: tokens trained join them (what its compute is counted in).
LANGUAGE_CURVE_AXES = (CURVE_AXES[0], ("tokens", "tokens trained"), *CURVE_AXES[1:])
# The loss of a model that learned how often each token occurs and nothing else: where training leaves
# the trivial solution behind. Byte-level text's tokens are bytes.
UNIGRAM_LABEL = "unigram entropy (learned byte frequencies only)"
UNIGRAM_TOKEN_LABEL = "unigram entropy (learned token frequencies only)"


def method_color(method: str, others: Sequence[str] = ()) -> str:
    """The same color for a method in every figure; methods outside METHOD_ORDER take the next free ones."""
    if method in METHOD_ORDER:
        return _PALETTE[METHOD_ORDER.index(method)]
    extra = sorted(m for m in set(others) if m not in METHOD_ORDER)
    index = len(METHOD_ORDER) + (extra.index(method) if method in extra else 0)
    return _PALETTE[index % len(_PALETTE)]


def _shade(color: str, position: int, count: int) -> tuple[float, float, float]:
    """Lighter for small H, the method's full color for its largest H: the eye reads H as depth."""
    if count <= 1:
        return to_rgb(color)
    mix = 0.6 * (1 - position / (count - 1))
    return tuple(c + (1 - c) * mix for c in to_rgb(color))  # type: ignore[return-value]


def _save(figure: Figure, files: Sequence[Path]) -> None:
    """Each file in the format its suffix names (.png, .svg)."""
    for file in files:
        if file.suffix == ".svg":
            # A fixed hash salt and no date keep the SVG identical from one report to the next (diffable in git).
            with matplotlib.rc_context({"svg.hashsalt": "hpc-localsgd-report"}):
                figure.savefig(file, format="svg", metadata={"Date": None})
        else:
            figure.savefig(file, format=file.suffix.lstrip(".") or "png", dpi=150)


def _sync_period_axis(ax: Axes, largest: int) -> None:
    ax.set_xscale("log", base=2)
    top = max(32, 2 ** math.ceil(math.log2(max(largest, 1))))
    ticks = [2**k for k in range(int(math.log2(top)) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(0.8, top * 1.25)


# Language models are judged by their loss, which falls as they get better: every loss axis says so.
LOSS_AXIS_LABEL = "validation loss (nats/token) — lower is better"
FINAL_LOSS_AXIS_LABEL = f"final {LOSS_AXIS_LABEL}"
FINAL_ACCURACY_AXIS_LABEL = "final test accuracy (%)"


def final_axis_label(language: bool) -> str:
    """The y label of a figure of final results: a language model's loss, a classifier's accuracy."""
    return FINAL_LOSS_AXIS_LABEL if language else FINAL_ACCURACY_AXIS_LABEL


def row_quality(row: ResultRow) -> tuple[float, float]:
    """(mean, std) of what a final-results axis shows: a language model's validation loss in nats per token,
    a classifier's test accuracy in percent."""
    if row.is_language:
        return row.loss_mean, row.loss_std or 0.0
    return 100 * row.accuracy_mean, 100 * (row.accuracy_std or 0.0)


def _going_handle() -> Line2D:
    """The legend's open marker: a point whose seeds are still running."""
    return Line2D(
        [],
        [],
        linestyle="none",
        marker="o",
        markersize=7,
        markerfacecolor="white",
        markeredgecolor="0.3",
        markeredgewidth=1.5,
    )


def _plot_method_over_h(ax: Axes, points: Sequence[ResultRow], method: str, color: str) -> bool:
    """One method's final results over H (all-reduce: a horizontal line shaded ±std); open markers where
    seeds are still going. Whether any are."""
    mean = np.array([row_quality(p)[0] for p in points])
    std = np.array([row_quality(p)[1] for p in points])
    if method == BASELINE:
        ax.axhline(mean[0], color=color, linewidth=1.6, label=method)
        ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.15, linewidth=0)
    else:
        ax.errorbar(
            [p.key.sync_period for p in points],
            mean,
            yerr=std,
            color=color,
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.6,
            label=method,
        )
    going = [i for i, p in enumerate(points) if p.finished < p.seeds]
    if going:
        # A run still going reports its result so far: mark the point so nobody reads it as final.
        ax.plot(
            [points[i].key.sync_period for i in going],
            mean[going],
            linestyle="none",
            marker="o",
            markersize=7,
            markerfacecolor="white",
            markeredgecolor=color,
            markeredgewidth=1.5,
            zorder=5,
        )
    return bool(going)


def plot_accuracy_vs_sync_period(rows: Sequence[ResultRow], files: Sequence[Path], title: str) -> Figure:
    """One panel per worker count; a curve per method over H with std error bars. All-reduce has
    no H: it is the horizontal reference line, shaded ±std. For a language model (its rows say so) the
    final validation loss instead of accuracy, its axis saying lower is better. Returns the figure saved."""
    workers = sorted({row.key.workers for row in rows})
    methods = list(dict.fromkeys(row.key.method for row in rows))
    language = all(row.is_language for row in rows)
    figure = Figure(figsize=(1.5 + 4.2 * len(workers), 4.2), layout="constrained")
    axes = figure.subplots(1, len(workers), sharey=True, squeeze=False)[0]
    largest = max(row.key.sync_period for row in rows)
    any_going = False
    for ax, count in zip(axes, workers, strict=True):
        panel = [row for row in rows if row.key.workers == count]
        for method in methods:
            points = sorted((row for row in panel if row.key.method == method), key=lambda r: r.key.sync_period)
            if points:
                any_going |= _plot_method_over_h(ax, points, method, method_color(method, methods))
        _sync_period_axis(ax, largest)
        ax.set_title(f"{count} worker{'s' if count != 1 else ''}")
        ax.set_xlabel("sync period H (local steps between averages)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(final_axis_label(language))
    handles, labels = _unique_legend(axes)
    if any_going:
        handles.append(_going_handle())
        labels.append(f"seeds still running\n({'loss' if language else 'accuracy'} so far)")
    # Room for the legend beside the panels: labels that name a setting are long.
    figure.set_figwidth(figure.get_figwidth() + 0.08 * max((len(label) for label in labels), default=0))
    figure.legend(handles, labels, loc="outside right center", frameon=False)
    figure.suptitle(title)
    _save(figure, files)
    return figure


def _unique_legend(axes: Sequence[Axes]) -> tuple[list, list[str]]:
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


@dataclass
class MeanCurve:
    """A group's evaluation series averaged over seeds, at the union of the seeds' evaluation steps."""

    step: np.ndarray
    values: dict[str, np.ndarray]


def mean_curve(runs: Sequence[Run]) -> MeanCurve:
    """Seeds of one configuration evaluate at the same steps; a seed still going simply stops
    contributing after its last evaluation, so the mean there is over the seeds that got that far."""
    steps = np.unique(np.concatenate([run.evals.step for run in runs]))
    fields = ("test_accuracy", "test_loss", "train_loss", "wall_seconds", "bytes_sent", "sync_rounds")
    values = {}
    for name in fields:
        stack = np.full((len(runs), len(steps)), np.nan)
        for i, run in enumerate(runs):
            stack[i, np.searchsorted(steps, run.evals.step)] = getattr(run.evals, name)
        values[name] = np.nanmean(stack, axis=0)  # every column has at least one run: no all-NaN warning
    values["step"] = steps.astype(float)
    per_step = runs[0].tokens_per_step  # one configuration: one global batch and window
    values["tokens"] = steps * float(per_step) if per_step is not None else np.full(len(steps), np.nan)
    return MeanCurve(step=steps, values=values)


def _spans_decades(arrays: Sequence[np.ndarray]) -> bool:
    positive = np.concatenate([a[a > 0] for a in arrays]) if arrays else np.array([])
    return positive.size > 0 and positive.max() / positive.min() >= 100


def _cost_axes(bottom: Sequence[Axes], curves: Sequence[MeanCurve], costs: Sequence[tuple[str, str]]) -> None:
    """Label the curves figure's x axes (the bottom row), logarithmic where counts span decades."""
    for ax, (x_name, x_label) in zip(bottom, costs, strict=True):
        ax.set_xlabel(x_label)
        if x_name in ("bytes_sent", "sync_rounds") and _spans_decades([c.values[x_name] for c in curves]):
            # All-reduce sends H times what local SGD does: on a linear axis the local runs crowd at zero.
            ax.set_xscale("log")
        if x_name in ("bytes_sent", "tokens"):
            ax.xaxis.set_major_formatter(EngFormatter(unit="B" if x_name == "bytes_sent" else ""))
            if ax.get_xscale() == "linear":
                ax.xaxis.set_major_locator(MaxNLocator(4))  # "250 kB" labels need room


def _curve_styles(groups: dict[GroupKey, list[Run]]) -> dict[GroupKey, tuple[tuple[float, float, float], str]]:
    """(color, legend label) of each group's line: color per method, shade per H."""
    methods = list(dict.fromkeys(key.method for key in groups))
    periods = {m: sorted({key.sync_period for key in groups if key.method == m}) for m in methods}
    return {
        key: (
            _shade(
                method_color(key.method, methods), periods[key.method].index(key.sync_period), len(periods[key.method])
            ),
            key.method if key.method == BASELINE else f"{key.method}, H={key.sync_period}",
        )
        for key in groups
    }


# What a membership change did, the marker at the top of its line and the legend's words for it.
MEMBERSHIP_KINDS = {
    "lost": ("v", "worker lost"),
    "joined": ("^", "worker joined"),
    "replaced": ("D", "worker replaced"),  # as many left as joined at one sync
}
MEMBERSHIP_GID = "membership-change"  # the gid of every artist that marks one (numbered: SVG ids are unique)


@dataclass(frozen=True)
class MembershipMark:
    """One membership change as a curves figure marks it."""

    x: float  # on the column's axis
    kind: str  # a key of MEMBERSHIP_KINDS


def _membership_kind(membership: Membership, index: int) -> str:
    before, after = int(membership.workers_before[index]), int(membership.workers_after[index])
    return "lost" if after < before else "joined" if after > before else "replaced"


def membership_marks(run: Run, x_name: str) -> list[MembershipMark]:
    """Where the run's membership changes fall on the curves' axis ``x_name`` (a name in CURVE_AXES or
    LANGUAGE_CURVE_AXES), in step order. On the step axis at their step; on a cost axis (time, bytes,
    sync rounds) interpolated between the run's evaluations, from zero at step 0 (a change after its last
    evaluation has no place there yet); on tokens trained at step × tokens per step, where known."""
    membership = run.membership
    if membership is None or not len(membership):
        return []
    steps = membership.step.astype(np.float64)
    if x_name == "step":
        x = steps
    elif x_name == "tokens":
        per_step = run.tokens_per_step
        x = steps * per_step if per_step is not None else np.full(len(steps), np.nan)
    else:
        known = np.concatenate([[0.0], run.evals.step.astype(np.float64)])
        cost = np.concatenate([[0.0], np.asarray(getattr(run.evals, x_name), dtype=np.float64)])
        x = np.where(steps <= known[-1], np.interp(steps, known, cost), np.nan)
    return [
        MembershipMark(float(x[i]), _membership_kind(membership, i)) for i in range(len(steps)) if np.isfinite(x[i])
    ]


def _mark_membership(
    axes: np.ndarray,
    groups: dict[GroupKey, list[Run]],
    styles: dict[GroupKey, tuple[tuple[float, float, float], str]],
    costs: Sequence[tuple[str, str]],
) -> dict[str, Line2D]:
    """Draw every run's membership changes in each column of ``axes`` (in its group's color; seeds that
    changed at one place draw one line). Returns the legend entries of the kinds drawn."""
    drawn: set[str] = set()
    number = itertools.count()
    for key, runs in groups.items():
        color = styles[key][0]
        for column, (x_name, _) in enumerate(costs):
            marks = sorted({(mark.x, mark.kind) for run in runs for mark in membership_marks(run, x_name)})
            for x, kind in marks:
                for ax in axes[:, column]:
                    ax.axvline(
                        x, color=color, linewidth=0.8, alpha=0.8, zorder=1.5, gid=f"{MEMBERSHIP_GID}-{next(number)}"
                    )
                    ax.plot(
                        [x],
                        [1.0],
                        transform=ax.get_xaxis_transform(),  # x in data, y at the top of the panel
                        linestyle="none",
                        marker=MEMBERSHIP_KINDS[kind][0],
                        markersize=5,
                        color=color,
                        clip_on=False,
                        gid=f"{MEMBERSHIP_GID}-{next(number)}",
                    )
                drawn.add(kind)
    return {
        label: Line2D([], [], color="0.3", linewidth=0.8, marker=marker, markersize=5)
        for kind, (marker, label) in MEMBERSHIP_KINDS.items()
        if kind in drawn
    }


def plot_curves(groups: dict[GroupKey, list[Run]], files: Sequence[Path], title: str) -> Figure:
    """Rows: test accuracy; test loss (solid) and train loss (dashed). Columns: the costs in CURVE_AXES.
    One line per (method, H): color per method, shade per H. Language models get
    :func:`plot_language_curves`. Returns the figure saved."""
    if all(run.language is not None for runs in groups.values() for run in runs):
        return plot_language_curves(groups, files, title)
    curves = {key: mean_curve(runs) for key, runs in groups.items()}
    styles = _curve_styles(groups)
    figure = Figure(figsize=(17, 7.5), layout="constrained")
    axes = figure.subplots(2, len(CURVE_AXES), sharex="col", sharey="row")
    for key, curve in curves.items():
        color, label = styles[key]
        for column, (x_name, _) in enumerate(CURVE_AXES):
            x = curve.values[x_name]
            axes[0, column].plot(x, 100 * curve.values["test_accuracy"], color=color, linewidth=1.5, label=label)
            axes[1, column].plot(x, curve.values["test_loss"], color=color, linewidth=1.5)
            axes[1, column].plot(x, curve.values["train_loss"], color=color, linewidth=1.2, linestyle="--")
    changes = _mark_membership(axes, groups, styles, CURVE_AXES)
    _cost_axes(axes[1], list(curves.values()), CURVE_AXES)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("loss")
    axes[1, 0].legend(
        handles=[
            Line2D([], [], color="0.3", label="test loss"),
            Line2D([], [], color="0.3", linestyle="--", label="train loss"),
        ],
        loc="upper right",
        fontsize="small",
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles, labels = handles + list(changes.values()), labels + list(changes)
    figure.legend(handles, labels, loc="outside right upper", frameon=False)
    figure.suptitle(title)
    _save(figure, files)
    return figure


def unigram_entropy(runs: Sequence[Run]) -> tuple[float, str] | None:
    """The corpus's unigram entropy (nats per token) as the first run that states it gives it, and the label
    of its reference line (bytes or tokens, as the run's tokens are)."""
    for run in runs:
        language = run.language
        if language is not None and language.corpus is not None and language.corpus.unigram_entropy is not None:
            label = UNIGRAM_LABEL if language.bytes_per_token == 1 else UNIGRAM_TOKEN_LABEL
            return language.corpus.unigram_entropy, label
    return None


def plot_language_curves(groups: dict[GroupKey, list[Run]], files: Sequence[Path], title: str) -> Figure:
    """A language model's curves. Rows: validation loss (solid) and train loss (dotted), in nats per token,
    with the corpus's unigram entropy dashed where it is known; next-token accuracy. Columns: the costs in
    LANGUAGE_CURVE_AXES (tokens trained beside steps). Returns the figure saved."""
    curves = {key: mean_curve(runs) for key, runs in groups.items()}
    styles = _curve_styles(groups)
    figure = Figure(figsize=(20, 7.5), layout="constrained")
    axes = figure.subplots(2, len(LANGUAGE_CURVE_AXES), sharex="col", sharey="row")
    for key, curve in curves.items():
        color, label = styles[key]
        for column, (x_name, _) in enumerate(LANGUAGE_CURVE_AXES):
            x = curve.values[x_name]
            axes[0, column].plot(x, curve.values["test_loss"], color=color, linewidth=1.5, label=label)
            axes[0, column].plot(x, curve.values["train_loss"], color=color, linewidth=1.2, linestyle=":")
            axes[1, column].plot(x, 100 * curve.values["test_accuracy"], color=color, linewidth=1.5)
    changes = _mark_membership(axes, groups, styles, LANGUAGE_CURVE_AXES)
    reference = unigram_entropy([run for runs in groups.values() for run in runs])
    if reference is not None:
        for ax in axes[0]:
            ax.axhline(reference[0], color="0.5", linestyle="--", linewidth=1.0, label=reference[1])
    _cost_axes(axes[1], list(curves.values()), LANGUAGE_CURVE_AXES)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel(LOSS_AXIS_LABEL)
    axes[1, 0].set_ylabel("next-token accuracy (%)")
    # One legend beside the panels: the methods, then what each kind of line is.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    legend = dict(zip(labels, handles, strict=True))
    unigram = legend.pop(reference[1]) if reference is not None else None
    legend["validation loss"] = Line2D([], [], color="0.3")
    legend["train loss"] = Line2D([], [], color="0.3", linestyle=":")
    if reference is not None:
        legend[reference[1]] = unigram
    legend.update(changes)
    figure.legend(list(legend.values()), list(legend), loc="outside right upper", frameon=False)
    figure.suptitle(title)
    _save(figure, files)
    return figure
