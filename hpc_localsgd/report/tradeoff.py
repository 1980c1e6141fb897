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

Language models (runs with the ``language`` attribute) are judged by their final validation loss (nats
per token), lower being better: the figure's y axis is that loss, the Pareto front keeps the configurations
no other is as fast and as low as, and the target is a loss. ``target`` keeps its meaning, how close to
all-reduce SGD's final result a run must come, on the side that is worse: a validation loss of at most
(2 − ``target``) × all-reduce's final loss (mean over its seeds), i.e. at most 1 − ``target`` above it.
Without a ``target`` given, language models take :data:`DEFAULT_LOSS_TARGET` = 0.98 (within 2 % of
all-reduce's loss), not the classifiers' 0.9: near the end of training a few per cent of loss is a large
gap (10 % above all-reduce's loss is reached long before its end), where 90 % of its accuracy is not.

Measured beside projected (``--measured``): runs whose ranks ran on an emulated slow network
(``hpc-localsgd sweep --run-here --emulated-link RATE``, launcher/slownet.py) carry the link's rate
and rank 0's step times. Each is drawn twice in a panel of its own beside the projected ones: at its
measured time to train (the step times summed: compute and the time blocked in communication;
evaluations and checkpoints excluded) and at the projection of the same run on the same link, whose
compute is the run's own measured compute. Compute cancels, so the gap between the two points is
the α–β model's error on that link: latency, the network stack, the communication thread.
"""

from __future__ import annotations

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

from ..algorithms.network import INTERCONNECTS, Interconnect, emulated_link, ring_allreduce_seconds
from ..errors import UserError
from .collect import Run
from .plots import BASELINE, _save, final_axis_label, method_color
from .table import (
    LOSS_HEADER,
    GroupKey,
    format_mean_std,
    group_runs,
    human_bytes,
    human_seconds,
    number_cell,
    write_table_csv,
)

# Assumed when no bench JSON is given: of the order of a small CNN's step on one CPU core, so that
# the latency of a sync weighs against it as it does for a large model on a GPU.
DEFAULT_COMPUTE_SECONDS = 0.01
DEFAULT_TARGET = 0.9  # classifiers: reach 90 % of all-reduce's final accuracy
DEFAULT_LOSS_TARGET = 0.98  # language models: reach all-reduce's final validation loss + 2 %
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
class Configuration:
    """What both trade-off tables say of a configuration (a group of seeds): means over seeds."""

    key: GroupKey
    seeds: int
    accuracy_mean: float
    accuracy_std: float | None
    steps: float
    global_sync_rounds: float
    global_bytes_sent: float
    loss_mean: float  # final test loss; a language model's validation loss in nats per token
    loss_std: float | None
    is_language: bool  # judged by its loss (lower is better), not by its accuracy

    @property
    def score(self) -> float:
        """Higher is better: accuracy, or a language model's loss negated (the Pareto front compares it)."""
        return -self.loss_mean if self.is_language else self.accuracy_mean

    @property
    def quality(self) -> tuple[float, float]:
        """(mean, std) as the figure's y axis shows it: loss in nats per token, or accuracy in percent."""
        if self.is_language:
            return self.loss_mean, self.loss_std or 0.0
        return 100 * self.accuracy_mean, 100 * (self.accuracy_std or 0.0)

    def quality_cell(self) -> str:
        """The table's cell of the same: loss ± std, or accuracy (%) ± std."""
        if self.is_language:
            return format_mean_std(self.loss_mean, self.loss_std)
        std = "–" if self.accuracy_std is None else f"{100 * self.accuracy_std:.2f}"
        return f"{100 * self.accuracy_mean:.2f} ± {std}"

    @staticmethod
    def of(key: GroupKey, runs: Sequence[Run]) -> dict[str, Any]:
        """The fields, from the runs' last evaluations, for a subclass to be built with."""
        accuracy = [float(run.evals.test_accuracy[-1]) for run in runs]
        loss = [float(run.evals.test_loss[-1]) for run in runs]
        return dict(
            key=key,
            seeds=len(runs),
            accuracy_mean=statistics.fmean(accuracy),
            accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else None,
            loss_mean=statistics.fmean(loss),
            loss_std=statistics.stdev(loss) if len(loss) > 1 else None,
            is_language=runs[0].language is not None,
            steps=statistics.fmean(float(run.evals.step[-1]) for run in runs),
            global_sync_rounds=statistics.fmean(float(run.evals.global_sync_rounds[-1]) for run in runs),
            global_bytes_sent=statistics.fmean(float(run.evals.global_bytes_sent[-1]) for run in runs),
        )


@dataclass
class TradeoffRow(Configuration):
    """One configuration on one interconnect; times in seconds, means over seeds."""

    interconnect: str
    seconds: float
    comm_seconds: float
    target_accuracy: float | None  # absolute; None without an all-reduce run of the same task and workers
    target_loss: float | None  # a language model's target instead (nats per token), the same way
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

    language = runs[0].language is not None
    hits: list[tuple[Run, int]] = []  # each run that reaches the target, with its first evaluation there
    for run in runs:
        if target is None:
            continue
        reached = np.flatnonzero(run.evals.test_loss <= target if language else run.evals.test_accuracy >= target)
        if len(reached):
            hits.append((run, int(reached[0])))
    return TradeoffRow(
        **Configuration.of(key, runs),
        interconnect=link.name,
        seconds=statistics.fmean(project(run, -1) for run in runs),
        comm_seconds=statistics.fmean(project(run, -1) - compute * float(run.evals.step[-1]) for run in runs),
        target_accuracy=None if language else target,
        target_loss=target if language else None,
        reached=len(hits),
        steps_to_target=_mean([float(run.evals.step[i]) for run, i in hits]),
        bytes_to_target=_mean([float(run.evals.global_bytes_sent[i]) for run, i in hits]),
        seconds_to_target=_mean([project(run, i) for run, i in hits]),
    )


@dataclass
class MeasuredRow(Configuration):
    """One configuration run on an emulated link; times in seconds, means over seeds."""

    link: Interconnect
    compute_seconds_per_step: float  # measured
    measured_seconds: float  # the step times summed
    measured_comm_seconds: float  # of which blocked in communication
    projected_seconds: float  # steps · the measured compute per step + the α–β model of the link
    projected_comm_seconds: float

    @property
    def ratio(self) -> float:
        """Measured over projected time to train."""
        return self.measured_seconds / self.projected_seconds


# The columns both trade-off tables start with after the task and the network: what the configuration
# is, what it reached and what it counted (means over seeds).
_CONFIGURATION_COLUMNS = (
    "method",
    "H",
    "workers",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "steps",
    "global_sync_rounds",
    "global_bytes_sent_per_worker",
)


def _configuration_cells(r: Configuration) -> list[object]:
    return [r.key.method, r.key.sync_period, r.key.workers, r.seeds] + [
        number_cell(v) for v in (r.accuracy_mean, r.accuracy_std, r.steps, r.global_sync_rounds, r.global_bytes_sent)
    ]


# Appended to both trade-off CSVs when a language model is in them (empty for classifiers, whose
# test_accuracy columns hold a language model's next-token accuracy).
_LANGUAGE_COLUMNS = ("val_loss_nats_per_token_mean", "val_loss_nats_per_token_std")


def _language_cells(r: Configuration, any_language: bool) -> list[object]:
    if not any_language:
        return []
    return [number_cell(r.loss_mean), number_cell(r.loss_std)] if r.is_language else ["", ""]


def _quality_header(rows: Sequence[Configuration]) -> str:
    """What a task's rows are judged by, as a table column: a language model's loss or an accuracy."""
    return LOSS_HEADER if all(r.is_language for r in rows) else "test accuracy (%)"


def measured_rows(runs: Sequence[Run]) -> list[MeasuredRow]:
    """A row per configuration and emulated link, in table order. Raises :class:`UserError` for a run
    that did not run on an emulated link, or whose step table does not hold every step it trained."""
    by_link: dict[tuple[GroupKey, str], list[Run]] = {}
    for key, members in group_runs(runs).items():
        for run in members:
            if run.emulated_link is None:
                raise UserError(
                    f"--measured: '{run.path}' did not run on an emulated link (run it with "
                    "`hpc-localsgd sweep --run-here --emulated-link RATE`)"
                )
            if not np.isfinite(run.evals.train_seconds[-1]):
                raise UserError(
                    f"--measured: '{run.path}' has no step time for every step up to its last evaluation "
                    "(a metrics file restarted after damage, or one still being written)"
                )
            by_link.setdefault((key, run.emulated_link), []).append(run)
    rows = []
    for (key, rate), members in by_link.items():
        try:
            link = emulated_link(rate)
        except ValueError as exc:
            raise UserError(f"--measured: '{members[0].path}': emulated link {exc}") from None
        projected, projected_comm = [], []
        for run in members:
            e = run.evals
            steps = float(e.step[-1])
            compute = float(e.compute_seconds[-1])
            total = projected_seconds(
                steps,
                float(e.global_sync_rounds[-1]),
                float(e.global_bytes_sent[-1]),
                run.workers,
                link,
                compute / steps,
            )
            projected.append(total)
            projected_comm.append(total - compute)
        rows.append(
            MeasuredRow(
                **Configuration.of(key, members),
                link=link,
                compute_seconds_per_step=statistics.fmean(
                    float(run.evals.compute_seconds[-1] / run.evals.step[-1]) for run in members
                ),
                measured_seconds=statistics.fmean(float(run.evals.train_seconds[-1]) for run in members),
                measured_comm_seconds=statistics.fmean(
                    float(run.evals.train_seconds[-1] - run.evals.compute_seconds[-1]) for run in members
                ),
                projected_seconds=statistics.fmean(projected),
                projected_comm_seconds=statistics.fmean(projected_comm),
            )
        )
    return rows


MEASURED_CSV_COLUMNS = (
    "task",
    "link",
    *_CONFIGURATION_COLUMNS,
    "compute_seconds_per_step",
    "measured_seconds",
    "measured_comm_seconds",
    "projected_seconds",
    "projected_comm_seconds",
    "measured_over_projected",
)


def write_measured_csv(rows: Sequence[MeasuredRow], path: Path) -> None:
    language = any(r.is_language for r in rows)
    write_table_csv(
        path,
        MEASURED_CSV_COLUMNS + (_LANGUAGE_COLUMNS if language else ()),
        (
            [r.key.task, r.link.name, *_configuration_cells(r)]
            + [number_cell(v) for v in (r.compute_seconds_per_step, r.measured_seconds, r.measured_comm_seconds)]
            + [number_cell(v) for v in (r.projected_seconds, r.projected_comm_seconds, r.ratio)]
            + _language_cells(r, language)
            for r in rows
        ),
    )


def measured_markdown(rows: Sequence[MeasuredRow]) -> str:
    header = (
        "method",
        "H",
        "workers",
        "test accuracy (%)",  # a language model's task: its loss (_quality_header)
        "compute / step",
        "measured time",
        "of which comm",
        "projected time",
        "of which comm",
        "measured / projected",
    )
    lines = [
        "# Measured on an emulated link, beside the projection",
        "",
        "Each run's ranks ran one per network namespace, joined by links rate-limited with HTB "
        "(`hpc-localsgd sweep --run-here --emulated-link RATE`). Measured: rank 0's step times summed "
        "(compute and the time blocked in communication; evaluations and checkpoints excluded). Projected: "
        "the same run's steps × its own measured compute per step + its global sync rounds and bytes through "
        "the α–β ring model of the link (no overlap), as on the trade-off figure. Compute cancels: the ratio "
        "is the network model's error on this machine. Means over seeds.",
    ]
    for task in dict.fromkeys(r.key.task for r in rows):
        for link in dict.fromkeys(r.link for r in rows):
            mine = [r for r in rows if r.key.task == task and r.link == link]
            if not mine:
                continue
            lines += [
                "",
                f"## {task} — {link.name} (α = {link.alpha_seconds * 1e6:g} µs, "
                f"β = {link.beta_bytes_per_second / 1e6:g} MB/s)",
                "",
                "| " + " | ".join(header[:3] + (_quality_header(mine),) + header[4:]) + " |",
            ]
            lines.append("|---|" + "---:|" * (len(header) - 1))
            for r in mine:
                cells = (
                    r.key.method,
                    str(r.key.sync_period),
                    str(r.key.workers),
                    r.quality_cell(),
                    f"{1e3 * r.compute_seconds_per_step:.1f} ms",
                    human_seconds(r.measured_seconds),
                    human_seconds(r.measured_comm_seconds),
                    human_seconds(r.projected_seconds),
                    human_seconds(r.projected_comm_seconds),
                    f"{r.ratio:.2f}",
                )
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_measured_markdown(rows: Sequence[MeasuredRow], path: Path) -> None:
    path.write_text(measured_markdown(rows))


def mark_pareto(rows: Sequence[TradeoffRow]) -> None:
    """Flag the rows no other row beats: none is as fast and as good (as accurate; for language models as
    low a loss), and strictly better in one."""
    for row in rows:
        row.pareto = not any(
            other.seconds <= row.seconds
            and other.score >= row.score
            and (other.seconds < row.seconds or other.score > row.score)
            for other in rows
        )


def absolute_target(reference: float, target: float | None, language: bool) -> float:
    """The accuracy (``target`` × all-reduce's, default 0.9) or, for a language model, the validation loss
    ((2 − ``target``) × all-reduce's, default 0.98: + 2 %) a run must reach: see the module docstring."""
    if language:
        return (2.0 - (DEFAULT_LOSS_TARGET if target is None else target)) * reference
    return (DEFAULT_TARGET if target is None else target) * reference


def is_baseline(method: str) -> bool:
    """Whether a group's label is all-reduce's, plain or with the settings that tell its variants apart."""
    return method == BASELINE or method.startswith(f"{BASELINE} (")


def _final(run: Run) -> float:
    return float(run.evals.test_loss[-1] if run.language is not None else run.evals.test_accuracy[-1])


def baseline_result(key: GroupKey, members: Sequence[Run], groups: dict[GroupKey, list[Run]]) -> float | None:
    """All-reduce's final result (mean over its seeds) that ``key``'s group is measured against: the
    all-reduce group of the same task and workers; where several all-reduce variants ran (AdamW and Muon
    inside, say), the one whose runs agree with this group's on every setting that tells those variants
    apart (None when no one or several do)."""
    candidates = [
        runs
        for other, runs in groups.items()
        if is_baseline(other.method) and (other.task, other.workers) == (key.task, key.workers)
    ]
    if len(candidates) > 1:
        distinguishing = {
            name
            for runs in candidates
            for name in runs[0].settings
            if len({repr(other[0].settings.get(name)) for other in candidates}) > 1
        }
        mine = members[0].settings
        candidates = [
            runs for runs in candidates if all(runs[0].settings.get(name) == mine.get(name) for name in distinguishing)
        ]
    if len(candidates) != 1:
        return None
    return statistics.fmean(_final(run) for run in candidates[0])


def tradeoff_rows(runs: Sequence[Run], timing: Timing, target: float | None = None) -> list[TradeoffRow]:
    """A row per configuration and interconnect, in table order; the Pareto front per task and interconnect.
    ``target``: None takes the default of each kind of task (:func:`absolute_target`)."""
    groups = group_runs(runs)
    rows: list[TradeoffRow] = []
    for link in timing.interconnects:
        mine = []
        for key, members in groups.items():
            reference = baseline_result(key, members, groups)
            language = members[0].language is not None
            absolute = None if reference is None else absolute_target(reference, target, language)
            mine.append(_row(key, members, link, timing.compute_seconds, absolute))
        for task in dict.fromkeys(row.key.task for row in mine):
            mark_pareto([row for row in mine if row.key.task == task])
        rows += mine
    return rows


CSV_COLUMNS = (
    "task",
    "interconnect",
    *_CONFIGURATION_COLUMNS,
    "projected_seconds",
    "projected_comm_seconds",
    "pareto",
    "target_accuracy",
    "seeds_reaching_target",
    "steps_to_target",
    "global_bytes_to_target",
    "projected_seconds_to_target",
)


def write_tradeoff_csv(rows: Sequence[TradeoffRow], path: Path) -> None:
    """The table's numbers at full precision; with a language model, its loss and target loss appended."""
    language = any(r.is_language for r in rows)
    write_table_csv(
        path,
        CSV_COLUMNS + ((*_LANGUAGE_COLUMNS, "target_val_loss_nats_per_token") if language else ()),
        (
            [r.key.task, r.interconnect, *_configuration_cells(r)]
            + [number_cell(r.seconds), number_cell(r.comm_seconds), int(r.pareto), number_cell(r.target_accuracy)]
            + [r.reached]
            + [number_cell(v) for v in (r.steps_to_target, r.bytes_to_target, r.seconds_to_target)]
            + _language_cells(r, language)
            + ([number_cell(r.target_loss)] if language else [])
            for r in rows
        ),
    )


def _target_text(rows: Sequence[TradeoffRow], target: float | None) -> str:
    """What the target is, for the kinds of task in ``rows`` (a classifier's as it always was)."""
    text = ""
    if not all(r.is_language for r in rows):
        fraction = DEFAULT_TARGET if target is None else target
        text = f" Target: {100 * fraction:g} % of all-reduce SGD's final accuracy at the same task and worker count."
    if any(r.is_language for r in rows):
        factor = 2.0 - (DEFAULT_LOSS_TARGET if target is None else target)
        text += (
            " Language models are judged by validation loss (nats/token, lower is better): a configuration is on "
            "the Pareto front when no other is as fast with as low a loss; target loss "
            f"{factor:g} × all-reduce SGD's final validation loss at the same task and worker count "
            f"({100 * (factor - 1):+.3g} %)."
        )
    return text


def tradeoff_markdown(rows: Sequence[TradeoffRow], timing: Timing, target: float | None = None) -> str:
    """``target``: as :func:`tradeoff_rows` took it (None: each kind of task's default), for the text."""
    header = (
        "method",
        "H",
        "workers",
        "test accuracy (%)",  # a language model's task: its loss (_quality_header)
        "projected time",
        "of which comm",
        "Pareto",
        "reached target",
        "steps to target",
        "bytes to target",
        "time to target",
    )
    lines = [
        f"# Speed–{'loss' if rows and all(r.is_language for r in rows) else 'accuracy'} trade-off (projected)",
        "",
        f"{timing.describe()}.",
        "",
        "Time = steps × compute + global sync rounds × 2(P−1)·α + 2(P−1)/P × global bytes per rank / β (ring "
        f"allreduce over the run's P ranks, no overlap).{_target_text(rows, target)} Means over seeds.",
    ]
    for task in dict.fromkeys(r.key.task for r in rows):
        quality = _quality_header([r for r in rows if r.key.task == task])
        for link in dict.fromkeys(r.interconnect for r in rows):
            lines += ["", f"## {task} — {link}", "", "| " + " | ".join(header[:3] + (quality,) + header[4:]) + " |"]
            lines.append("|---|" + "---:|" * (len(header) - 1))
            for r in rows:
                if r.key.task != task or r.interconnect != link:
                    continue
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
                    r.quality_cell(),
                    human_seconds(r.seconds),
                    human_seconds(r.comm_seconds),
                    "yes" if r.pareto else "",
                    "–" if r.target_accuracy is None and r.target_loss is None else f"{r.reached}/{r.seeds}",
                ) + to_target
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tradeoff_markdown(rows: Sequence[TradeoffRow], timing: Timing, target: float | None, path: Path) -> None:
    path.write_text(tradeoff_markdown(rows, timing, target))


def _log_time_axis(ax: Any, times: Sequence[float]) -> None:
    if max(times) >= 10 * min(times) > 0:  # all-reduce can be many times slower on a slow network
        ax.set_xscale("log")
        # 1-2-5 ticks in plain numbers: over a decade or two the default labels the minor ticks
        # in scientific notation, and they run into each other.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_measured(ax: Any, rows: Sequence[MeasuredRow], color: Any, marker: Any) -> None:
    """Each configuration at its projected time (filled) and its measured time (open), joined."""
    for r in rows:
        y = r.quality[0]
        ax.plot([r.projected_seconds, r.measured_seconds], [y, y], color=color(r), linewidth=0.8, alpha=0.6)
        ax.plot(r.projected_seconds, y, linestyle="none", marker=marker(r), color=color(r), markersize=6)
        ax.plot(
            r.measured_seconds,
            y,
            linestyle="none",
            marker=marker(r),
            markersize=7,
            markeredgewidth=1.5,
            markerfacecolor="none",
            markeredgecolor=color(r),
        )
        if r.key.method != BASELINE:
            ax.annotate(
                f"H={r.key.sync_period}", (r.measured_seconds, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    _log_time_axis(ax, [t for r in rows for t in (r.projected_seconds, r.measured_seconds)])
    link = rows[0].link
    ax.set_title(f"{link.name}: measured (open) and projected (filled)", fontsize="medium")
    ax.set_xlabel("time to train (s); projected with each run's measured compute")
    ax.set_ylabel(final_axis_label(all(r.is_language for r in rows)))
    ax.grid(True, alpha=0.3)


def plot_tradeoff(
    rows: Sequence[TradeoffRow],
    files: Sequence[Path],
    title: str,
    timing: Timing,
    measured: Sequence[MeasuredRow] = (),
) -> Figure:
    """A panel per interconnect: each configuration at (projected time, final accuracy ± std; a language
    model's validation loss, lower being better), color per method, marker per worker count, labelled with
    H; the Pareto front as a step line. Beside them, a panel per emulated link of the ``measured`` runs:
    measured and projected time of each. Returns the figure saved."""
    links = list(dict.fromkeys(r.interconnect for r in rows))
    emulated = list(dict.fromkeys(r.link for r in measured))
    methods = list(dict.fromkeys([r.key.method for r in rows] + [r.key.method for r in measured]))
    workers = sorted({r.key.workers for r in rows} | {r.key.workers for r in measured})
    markers = dict(zip(workers, "osD^vP*X", strict=False))
    panels = len(links) + len(emulated)
    figure = Figure(figsize=(2.5 + 5.0 * panels, 5.0), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for ax in axes[1 : len(links)]:  # the projected panels share one accuracy axis; a measured one has its own
        ax.sharey(axes[0])
        ax.tick_params(labelleft=False)
    for ax, link_of_measured in zip(axes[len(links) :], emulated, strict=True):
        _plot_measured(
            ax,
            [r for r in measured if r.link == link_of_measured],
            lambda r: method_color(r.key.method, methods),
            lambda r: markers.get(r.key.workers, "o"),
        )
    for ax, link in zip(axes, links, strict=False):
        _plot_projected(ax, link, [r for r in rows if r.interconnect == link], methods, markers)
    axes[0].set_ylabel(final_axis_label(all(r.is_language for r in [*rows, *measured])))
    handles = _legend_handles(axes, [m.key.method for m in measured], methods, workers, markers)
    figure.legend(list(handles.values()), list(handles), loc="outside right center", frameon=False)
    figure.suptitle(f"{title}\n" + textwrap.fill(timing.describe(), 160), fontsize="small")
    _save(figure, files)
    return figure


def _plot_projected(
    ax: Any, link: str, panel: Sequence[TradeoffRow], methods: list[str], markers: dict[int, str]
) -> None:
    """One interconnect's panel: each configuration at (projected time, accuracy ± std), its Pareto front."""
    for r in panel:
        ax.errorbar(
            r.seconds,
            r.quality[0],
            yerr=r.quality[1],
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
                (r.seconds, r.quality[0]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    front = sorted((r for r in panel if r.pareto), key=lambda r: r.seconds)
    if front:
        ax.step(
            [r.seconds for r in front],
            [r.quality[0] for r in front],
            where="post",
            color="0.4",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
    _log_time_axis(ax, [r.seconds for r in panel])
    ax.set_title(f"{link} ({LABEL})", fontsize="medium")
    ax.set_xlabel("projected time to train (s)")
    ax.grid(True, alpha=0.3)


def _legend_handles(
    axes: Sequence[Any], measured_methods: list[str], methods: list[str], workers: list[int], markers: dict[int, str]
) -> dict[str, Any]:
    """One legend entry per label of any panel, per method only measured, and per worker count's marker."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    for method in dict.fromkeys(measured_methods):  # one only measured needs its color too
        seen.setdefault(
            method, axes[0].plot([], [], linestyle="none", marker="o", color=method_color(method, methods))[0]
        )
    for count in workers:
        marker = markers.get(count, "o")
        seen[f"{count} workers"] = axes[0].plot([], [], linestyle="none", marker=marker, color="0.3")[0]
    return seen
