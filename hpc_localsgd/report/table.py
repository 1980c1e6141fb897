"""Runs grouped by (task, method, H, workers), seeds aggregated, written as CSV and Markdown.

"Final" means a run's last evaluation: the end of training for finished runs, the latest
evaluation so far for runs still going (the ``complete`` column says how many are finished).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..algorithms.accounting import human_bytes
from .collect import Run, method_rank


@dataclass(frozen=True)
class GroupKey:
    """What separates groups; everything else (the seed) is aggregated over."""

    task: str
    method: str
    sync_period: int
    workers: int

    def sort_key(self) -> tuple:
        return (self.task, self.workers, method_rank(self.method), self.sync_period)


@dataclass
class ResultRow:
    """One line of the results table: the mean over seeds of each run's final value."""

    key: GroupKey
    seeds: int  # runs aggregated
    finished: int  # of which have reached their last step
    accuracy_mean: float  # fraction in [0, 1]
    accuracy_std: float | None  # sample std (ddof=1); None with a single seed
    sync_rounds_mean: float
    bytes_sent_mean: float  # per worker
    wall_seconds_mean: float
    global_sync_rounds_mean: float  # between workers, over the slowest network
    global_bytes_sent_mean: float

    @property
    def hierarchical(self) -> bool:
        """Whether some traffic stayed inside workers or groups (it is not all global)."""
        return self.global_bytes_sent_mean != self.bytes_sent_mean

    @property
    def complete(self) -> str:
        return f"{self.finished}/{self.seeds}"


def group_runs(runs: Sequence[Run]) -> dict[GroupKey, list[Run]]:
    """Runs by group, groups in table order, runs within a group by seed."""
    groups: dict[GroupKey, list[Run]] = {}
    for run in runs:
        groups.setdefault(GroupKey(run.task, run.method, run.sync_period, run.workers), []).append(run)
    return {
        key: sorted(groups[key], key=lambda r: (r.seed, str(r.path))) for key in sorted(groups, key=GroupKey.sort_key)
    }


def summarise(runs: Sequence[Run]) -> list[ResultRow]:
    rows = []
    for key, members in group_runs(runs).items():
        accuracy = [float(r.evals.test_accuracy[-1]) for r in members]
        rows.append(
            ResultRow(
                key=key,
                seeds=len(members),
                finished=sum(r.finished for r in members),
                accuracy_mean=statistics.fmean(accuracy),
                accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                sync_rounds_mean=statistics.fmean(float(r.evals.sync_rounds[-1]) for r in members),
                bytes_sent_mean=statistics.fmean(float(r.evals.bytes_sent[-1]) for r in members),
                wall_seconds_mean=statistics.fmean(float(r.evals.wall_seconds[-1]) for r in members),
                global_sync_rounds_mean=statistics.fmean(float(r.evals.global_sync_rounds[-1]) for r in members),
                global_bytes_sent_mean=statistics.fmean(float(r.evals.global_bytes_sent[-1]) for r in members),
            )
        )
    return rows


CSV_COLUMNS = (
    "task",
    "method",
    "H",
    "workers",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "sync_rounds_mean",
    "bytes_sent_per_worker_mean",
    "wall_seconds_mean",
    "complete",
    "global_sync_rounds_mean",
    "global_bytes_sent_per_worker_mean",
)


def write_table_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A header and one line per row: the report's CSV files."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def number_cell(value: float | None) -> str:
    """A CSV cell at full precision (repr); empty for a value that does not exist."""
    return "" if value is None else repr(value)


def write_csv(rows: Sequence[ResultRow], path: Path) -> None:
    """Raw numbers (accuracy as a fraction) at full precision, for further analysis."""
    write_table_csv(
        path,
        CSV_COLUMNS,
        (
            [row.key.task, row.key.method, row.key.sync_period, row.key.workers, row.seeds]
            + [number_cell(v) for v in (row.accuracy_mean, row.accuracy_std, row.sync_rounds_mean)]
            + [number_cell(v) for v in (row.bytes_sent_mean, row.wall_seconds_mean)]
            + [row.complete, number_cell(row.global_sync_rounds_mean), number_cell(row.global_bytes_sent_mean)]
            for row in rows
        ),
    )


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _rounds(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def format_accuracy(row: ResultRow) -> str:
    std = "–" if row.accuracy_std is None else f"{100 * row.accuracy_std:.2f}"
    return f"{100 * row.accuracy_mean:.2f} ± {std}"


def markdown(rows: Sequence[ResultRow]) -> str:
    """One section per task; within it the table order of :func:`group_runs`. Runs whose ranks form
    workers (or groups) get the global rounds and bytes too: what crosses the slowest network."""
    hierarchical = any(row.hierarchical for row in rows)
    header = (
        "method",
        "H",
        "workers",
        "seeds",
        "test accuracy (%)",
        "sync rounds",
        "bytes sent / worker",
        "wall time",
        "complete",
    ) + (("global rounds", "global bytes / worker") if hierarchical else ())
    lines = [
        "# Results",
        "",
        "Final test accuracy: mean ± sample standard deviation over seeds. Sync rounds, bytes sent per worker "
        "and wall time: mean over seeds at each run's last evaluation (the latest so far for runs still "
        "going; `complete` counts finished runs). H does not apply to all-reduce (1).",
    ]
    for task in dict.fromkeys(row.key.task for row in rows):
        lines += [
            "",
            f"## {task}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i < 1 else "---:" for i in range(len(header))) + "|",
        ]
        for row in rows:
            if row.key.task != task:
                continue
            cells = (
                row.key.method,
                str(row.key.sync_period),
                str(row.key.workers),
                str(row.seeds),
                format_accuracy(row),
                _rounds(row.sync_rounds_mean),
                human_bytes(row.bytes_sent_mean),
                human_seconds(row.wall_seconds_mean),
                row.complete,
            ) + (
                (_rounds(row.global_sync_rounds_mean), human_bytes(row.global_bytes_sent_mean)) if hierarchical else ()
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[ResultRow], path: Path) -> None:
    path.write_text(markdown(rows))
