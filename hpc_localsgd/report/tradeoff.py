"""The speed–accuracy trade-off: every configuration at (projected time to train, final accuracy).

A projection, not a measurement. Each run's own counters at an evaluation (optimizer steps,
global sync rounds and global bytes sent per rank, see :mod:`hpc_localsgd.algorithms.accounting`)
are carried to a named interconnect with the α–β model of a ring allreduce over the run's P ranks
(:mod:`hpc_localsgd.algorithms.network`, the model ``bench``'s projection uses):

    time = steps · t_compute + Σ_rounds t_allreduce(n_round, P)
         = steps · t_compute + rounds · 2(P−1)·α + 2(P−1)/P · bytes / β

(exact when every round is one ring allreduce: the sum of the per-round times only needs the
totals). No overlap of communication with compute, so all-reduce SGD's time is an upper bound;
an all-reduce step's gradient buckets count as one round (one latency term), so a lower bound on
its latency. Traffic inside workers or groups (hierarchy levels below ``global``) is taken as
free: it stays on a node's own fabric.

``t_compute``, α and β come from a ``bench`` JSON (``--timing``: its projection's measured
compute per step and its interconnects) or from stated defaults (:data:`DEFAULT_COMPUTE_SECONDS`,
:data:`~hpc_localsgd.algorithms.network.INTERCONNECTS`), printed on the figure.

Time to target: the first evaluation at which a run's test accuracy reaches ``target`` × the
final accuracy of all-reduce SGD (mean over its seeds) for the same task and worker count; its
steps, bytes and projected time. A relative target because "90 % of what all-reduce reaches" means
the same on every task, where an absolute accuracy does not.
"""

from __future__ import annotations

import csv
import json
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from ..algorithms.network import INTERCONNECTS, Interconnect, ring_allreduce_seconds
from ..errors import UserError
from .collect import Run
from .plots import BASELINE, _save, method_color
from .table import GroupKey, group_runs, human_bytes, human_seconds

# Assumed when no bench JSON is given: of the order of a small CNN's step on one CPU core, so that
# the latency of a sync weighs against it as it does for a large model on a GPU.
DEFAULT_COMPUTE_SECONDS = 0.01
DEFAULT_TARGET = 0.9
LABEL = "projected"


@dataclass(frozen=True)
class Timing:
    """Compute time per step and the interconnects to project onto, and where they come from."""

    compute_seconds: float
    interconnects: tuple[Interconnect, ...]
    source: str  # "defaults (assumed)" or the bench JSON's path and its compute source

    def describe(self) -> str:
        links = "; ".join(
            f"{link.name}: α = {link.alpha_seconds * 1e6:g} µs, β = {link.beta_bytes_per_second / 1e9:g} GB/s"
            for link in self.interconnects
        )
        compute = f"compute {self.compute_seconds * 1e3:g} ms/step"
        return f"{LABEL}: {compute}, ring allreduce over P ranks ({links}); {self.source}"


DEFAULT_TIMING = Timing(DEFAULT_COMPUTE_SECONDS, INTERCONNECTS, "defaults (assumed)")


def load_timing(path: str | Path | None) -> Timing:
    """The projection parameters of a ``hpc-localsgd bench --out FILE.json`` file, or the defaults (None)."""
    if path is None:
        return DEFAULT_TIMING
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"--timing: cannot read '{path}' ({exc.strerror or exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--timing: '{path}' is not JSON (line {exc.lineno}: {exc.msg})") from None
    projection = document.get("projection") if isinstance(document, dict) else None
    if not isinstance(projection, dict):
        raise UserError(f"--timing: '{path}' has no projection section (is it the JSON of `hpc-localsgd bench`?)")
    try:
        compute = float(projection["compute_seconds_per_step"])
        links = tuple(
            Interconnect(str(link["name"]), float(link["alpha_seconds"]), float(link["beta_bytes_per_second"]))
            for link in projection["interconnects"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--timing: '{path}': malformed projection section ({exc.__class__.__name__}: {exc})") from None
    if compute <= 0 or not links or any(link.beta_bytes_per_second <= 0 for link in links):
        raise UserError(f"--timing: '{path}': compute time and bandwidths must be positive, with one interconnect")
    source = f"from {path.name} (compute: {projection.get('compute_source', 'bench')})"
    return Timing(compute, links, source)


def projected_seconds(
    steps: float, rounds: float, nbytes: float, workers: int, link: Interconnect, compute_seconds: float
) -> float:
    """steps · t_compute + rounds · t_allreduce(bytes / rounds, P): see the module docstring."""
    if rounds <= 0:
        return steps * compute_seconds
    return steps * compute_seconds + rounds * ring_allreduce_seconds(nbytes / rounds, workers, link)


@dataclass
class TradeoffRow:
    """One configuration (group of seeds) on one interconnect; times in seconds, means over seeds."""

    key: GroupKey
    interconnect: str
    seeds: int
    accuracy_mean: float
    accuracy_std: float | None
    steps: float
    global_sync_rounds: float
    global_bytes_sent: float
    seconds: float
    comm_seconds: float
    target_accuracy: float | None  # absolute; None without an all-reduce run of the same task and workers
    reached: int  # seeds that reached it
    steps_to_target: float | None  # means over the seeds that reached it
    bytes_to_target: float | None
    seconds_to_target: float | None
    pareto: bool = False


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _row(key: GroupKey, runs: Sequence[Run], link: Interconnect, compute: float, target: float | None) -> TradeoffRow:
    def project(run: Run, i: int) -> float:
        e = run.evals
        return projected_seconds(
            float(e.step[i]), float(e.global_sync_rounds[i]), float(e.global_bytes_sent[i]), run.workers, link, compute
        )

    accuracy = [float(run.evals.test_accuracy[-1]) for run in runs]
    hits: list[tuple[Run, int]] = []  # each run that reaches the target, with its first evaluation there
    for run in runs:
        if target is None:
            continue
        reached = np.flatnonzero(run.evals.test_accuracy >= target)
        if len(reached):
            hits.append((run, int(reached[0])))
    return TradeoffRow(
        key=key,
        interconnect=link.name,
        seeds=len(runs),
        accuracy_mean=statistics.fmean(accuracy),
        accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else None,
        steps=statistics.fmean(float(run.evals.step[-1]) for run in runs),
        global_sync_rounds=statistics.fmean(float(run.evals.global_sync_rounds[-1]) for run in runs),
        global_bytes_sent=statistics.fmean(float(run.evals.global_bytes_sent[-1]) for run in runs),
        seconds=statistics.fmean(project(run, -1) for run in runs),
        comm_seconds=statistics.fmean(project(run, -1) - compute * float(run.evals.step[-1]) for run in runs),
        target_accuracy=target,
        reached=len(hits),
        steps_to_target=_mean([float(run.evals.step[i]) for run, i in hits]),
        bytes_to_target=_mean([float(run.evals.global_bytes_sent[i]) for run, i in hits]),
        seconds_to_target=_mean([project(run, i) for run, i in hits]),
    )


def mark_pareto(rows: Sequence[TradeoffRow]) -> None:
    """Flag the rows no other row beats: none is as fast and as accurate, and strictly better in one."""
    for row in rows:
        row.pareto = not any(
            other.seconds <= row.seconds
            and other.accuracy_mean >= row.accuracy_mean
            and (other.seconds < row.seconds or other.accuracy_mean > row.accuracy_mean)
            for other in rows
        )


def tradeoff_rows(runs: Sequence[Run], timing: Timing, target: float = DEFAULT_TARGET) -> list[TradeoffRow]:
    """A row per configuration and interconnect, in table order; the Pareto front per task and interconnect."""
    groups = group_runs(runs)
    baseline = {
        (key.task, key.workers): statistics.fmean(float(r.evals.test_accuracy[-1]) for r in members)
        for key, members in groups.items()
        if key.method == BASELINE
    }
    rows: list[TradeoffRow] = []
    for link in timing.interconnects:
        mine = []
        for key, members in groups.items():
            reference = baseline.get((key.task, key.workers))
            absolute = None if reference is None else target * reference
            mine.append(_row(key, members, link, timing.compute_seconds, absolute))
        for task in dict.fromkeys(row.key.task for row in mine):
            mark_pareto([row for row in mine if row.key.task == task])
        rows += mine
    return rows


CSV_COLUMNS = (
    "task",
    "interconnect",
    "method",
    "H",
    "workers",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "steps",
    "global_sync_rounds",
    "global_bytes_sent_per_worker",
    "projected_seconds",
    "projected_comm_seconds",
    "pareto",
    "target_accuracy",
    "seeds_reaching_target",
    "steps_to_target",
    "global_bytes_to_target",
    "projected_seconds_to_target",
)


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_tradeoff_csv(rows: Sequence[TradeoffRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow(
                [r.key.task, r.interconnect, r.key.method, r.key.sync_period, r.key.workers, r.seeds]
                + [_number(v) for v in (r.accuracy_mean, r.accuracy_std, r.steps, r.global_sync_rounds)]
                + [_number(v) for v in (r.global_bytes_sent, r.seconds, r.comm_seconds)]
                + [int(r.pareto), _number(r.target_accuracy), r.reached]
                + [_number(v) for v in (r.steps_to_target, r.bytes_to_target, r.seconds_to_target)]
            )


def tradeoff_markdown(rows: Sequence[TradeoffRow], timing: Timing, target: float) -> str:
    header = (
        "method",
        "H",
        "workers",
        "test accuracy (%)",
        "projected time",
        "of which comm",
        "Pareto",
        "reached target",
        "steps to target",
        "bytes to target",
        "time to target",
    )
    lines = [
        "# Speed–accuracy trade-off (projected)",
        "",
        f"{timing.describe()}.",
        "",
        "Time = steps × compute + global sync rounds × 2(P−1)·α + 2(P−1)/P × global bytes per rank / β (ring "
        "allreduce over the run's P ranks, no overlap). Target: "
        f"{100 * target:g} % of all-reduce SGD's final accuracy at the same task and worker count. Means over seeds.",
    ]
    for task in dict.fromkeys(r.key.task for r in rows):
        for link in dict.fromkeys(r.interconnect for r in rows):
            lines += ["", f"## {task} — {link}", "", "| " + " | ".join(header) + " |"]
            lines.append("|---|" + "---:|" * (len(header) - 1))
            for r in rows:
                if r.key.task != task or r.interconnect != link:
                    continue
                std = "–" if r.accuracy_std is None else f"{100 * r.accuracy_std:.2f}"
                to_target = (
                    ("–",) * 3
                    if not r.reached
                    else (
                        f"{r.steps_to_target:.0f}",
                        human_bytes(r.bytes_to_target or 0.0),
                        human_seconds(r.seconds_to_target or 0.0),
                    )
                )
                cells = (
                    r.key.method,
                    str(r.key.sync_period),
                    str(r.key.workers),
                    f"{100 * r.accuracy_mean:.2f} ± {std}",
                    human_seconds(r.seconds),
                    human_seconds(r.comm_seconds),
                    "yes" if r.pareto else "",
                    "–" if r.target_accuracy is None else f"{r.reached}/{r.seeds}",
                ) + to_target
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tradeoff_markdown(rows: Sequence[TradeoffRow], timing: Timing, target: float, path: Path) -> None:
    path.write_text(tradeoff_markdown(rows, timing, target))


def plot_tradeoff(rows: Sequence[TradeoffRow], files: Sequence[Path], title: str, timing: Timing) -> None:
    """A panel per interconnect: each configuration at (projected time, final accuracy ± std), color per
    method, marker per worker count, labelled with H; the Pareto front as a step line."""
    links = list(dict.fromkeys(r.interconnect for r in rows))
    methods = list(dict.fromkeys(r.key.method for r in rows))
    workers = sorted({r.key.workers for r in rows})
    markers = dict(zip(workers, "osD^vP*X", strict=False))
    figure = Figure(figsize=(2.5 + 5.0 * len(links), 5.0), layout="constrained")
    axes = figure.subplots(1, len(links), sharey=True, squeeze=False)[0]
    for ax, link in zip(axes, links, strict=True):
        panel = [r for r in rows if r.interconnect == link]
        for r in panel:
            ax.errorbar(
                r.seconds,
                100 * r.accuracy_mean,
                yerr=100 * (r.accuracy_std or 0.0),
                color=method_color(r.key.method, methods),
                marker=markers.get(r.key.workers, "o"),
                markersize=6,
                capsize=2,
                linestyle="none",
                label=f"{r.key.method}",
            )
            if r.key.method != BASELINE:
                ax.annotate(
                    f"H={r.key.sync_period}",
                    (r.seconds, 100 * r.accuracy_mean),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        front = sorted((r for r in panel if r.pareto), key=lambda r: r.seconds)
        if front:
            ax.step(
                [r.seconds for r in front],
                [100 * r.accuracy_mean for r in front],
                where="post",
                color="0.4",
                linestyle="--",
                linewidth=1,
                label="Pareto front",
            )
        times = [r.seconds for r in panel]
        if max(times) >= 10 * min(times) > 0:  # all-reduce can be many times slower on a slow network
            ax.set_xscale("log")
            # 1-2-5 ticks in plain numbers: over a decade or two the default labels the minor ticks
            # in scientific notation, and they run into each other.
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{link} ({LABEL})", fontsize="medium")
        ax.set_xlabel("projected time to train (s)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("final test accuracy (%)")
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    for count in workers:
        seen[f"{count} workers"] = axes[0].plot([], [], linestyle="none", marker=markers.get(count, "o"), color="0.3")[
            0
        ]
    figure.legend(list(seen.values()), list(seen), loc="outside right center", frameon=False)
    figure.suptitle(f"{title}\n" + textwrap.fill(timing.describe(), 160), fontsize="small")
    _save(figure, files)
