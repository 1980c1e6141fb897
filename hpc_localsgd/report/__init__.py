"""``hpc-localsgd report RUN_DIR...``: the study's figures and results table from metrics files.

collect (find and read runs) → table (group by task, method, H, workers; aggregate seeds) →
plots (accuracy against H; curves against steps, time, bytes and sync rounds); on request,
tradeoff (every configuration at projected time to train and final accuracy, the Pareto front,
time to a target accuracy), and beside it runs measured on an emulated slow network.

Language-model runs (metrics files with the ``language`` attribute) are judged by validation loss
instead of accuracy, lower being better, in every table and figure; see :mod:`.table`, :mod:`.plots`
and :mod:`.tradeoff`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .collect import Run, collect_runs
from .drift import drift_figures
from .plots import plot_accuracy_vs_sync_period, plot_curves
from .table import GroupKey, ResultRow, group_runs, summarise, write_csv, write_markdown
from .tradeoff import (
    MeasuredRow,
    Timing,
    load_timing,
    measured_rows,
    plot_tradeoff,
    tradeoff_rows,
    write_measured_csv,
    write_measured_markdown,
    write_tradeoff_csv,
    write_tradeoff_markdown,
)

__all__ = ["write_report", "plan_outputs", "Output", "Run", "GroupKey", "ResultRow"]


@dataclass
class Output:
    """Files written together by one call (a table; a figure as PNG and SVG)."""

    files: list[Path]
    write: Callable[[], object]  # a plotting function returns its figure: of no use here


def _task_suffix(task: str) -> str:
    return "-" + re.sub(r"[^A-Za-z0-9_-]+", "-", task).strip("-")


def _figure(out: Path, name: str) -> list[Path]:
    return [out / f"{name}.png", out / f"{name}.svg"]


def plan_outputs(
    runs: Sequence[Run],
    out: Path,
    timing: Timing | None = None,
    target: float | None = None,
    measured: Sequence[MeasuredRow] = (),
) -> list[Output]:
    """Every file the report will write, with what writes it.

    Known before anything is written, so that a refusal to overwrite leaves no half-written report.
    When the runs span several tasks (dataset/model; for a language model also its corpus), each task
    gets figures of its own, named with the task; the tables hold every task (a task column in CSV, a
    section per task in Markdown). A language model's final results against H are ``loss_vs_H``.
    With ``timing``, the trade-off table (tradeoff.csv, tradeoff.md) and a trade-off figure per task;
    with ``measured`` rows too, their table (tradeoff-measured.csv, .md) and a panel per emulated link
    in the trade-off figure of their task.
    """
    rows = summarise(runs)
    groups = group_runs(runs)
    tasks = list(dict.fromkeys(key.task for key in groups))
    plan = [
        Output([out / "results.csv"], lambda: write_csv(rows, out / "results.csv")),
        Output([out / "results.md"], lambda: write_markdown(rows, out / "results.md")),
    ]
    for task in tasks:
        suffix = _task_suffix(task) if len(tasks) > 1 else ""
        task_rows = [row for row in rows if row.key.task == task]
        language = all(row.is_language for row in task_rows)
        files = _figure(out, f"{'loss' if language else 'accuracy'}_vs_H{suffix}")
        title = f"Final {'validation loss' if language else 'test accuracy'} against sync period H — {task}"
        # partial binds this iteration's values (a bare closure would see the last task's).
        plan.append(Output(files, functools.partial(plot_accuracy_vs_sync_period, task_rows, files, title)))
        for workers in sorted({key.workers for key in groups if key.task == task}):
            subset = {key: members for key, members in groups.items() if key.task == task and key.workers == workers}
            files = _figure(out, f"curves{suffix}-W{workers}")
            title = f"Training curves — {task}, {workers} workers (mean over seeds)"
            plan.append(Output(files, functools.partial(plot_curves, subset, files, title)))
    many = len(tasks) > 1  # drift figures (report/drift.py): named like the curves, per task and worker count
    plan += [Output(f, write) for f, write in drift_figures(runs, out, lambda t: _task_suffix(t) if many else "")]
    if timing is not None:
        plan += _tradeoff_outputs(runs, out, timing, target, tasks, measured)
    return plan


def _tradeoff_outputs(
    runs: Sequence[Run],
    out: Path,
    timing: Timing,
    target: float | None,
    tasks: list[str],
    measured: Sequence[MeasuredRow],
) -> list[Output]:
    rows = tradeoff_rows(runs, timing, target)
    plan = [
        Output([out / "tradeoff.csv"], lambda: write_tradeoff_csv(rows, out / "tradeoff.csv")),
        Output([out / "tradeoff.md"], lambda: write_tradeoff_markdown(rows, timing, target, out / "tradeoff.md")),
    ]
    if measured:
        plan += [
            Output(
                [out / "tradeoff-measured.csv"], lambda: write_measured_csv(measured, out / "tradeoff-measured.csv")
            ),
            Output(
                [out / "tradeoff-measured.md"], lambda: write_measured_markdown(measured, out / "tradeoff-measured.md")
            ),
        ]
    every_task = list(dict.fromkeys(tasks + [row.key.task for row in measured]))
    for task in every_task:
        files = _figure(out, "tradeoff" + (_task_suffix(task) if len(every_task) > 1 else ""))
        task_rows = [row for row in rows if row.key.task == task]
        task_measured = [row for row in measured if row.key.task == task]
        language = all(row.is_language for row in [*task_rows, *task_measured])
        title = f"Projected time to train against final {'validation loss' if language else 'test accuracy'} — {task}"
        if task_measured:
            title += "; beside it, runs measured on an emulated link"
        plan.append(Output(files, functools.partial(plot_tradeoff, task_rows, files, title, timing, task_measured)))
    return plan


def write_report(
    paths: Sequence[str | Path],
    out: str | Path = "report",
    overwrite: bool = False,
    say: Callable[[str], None] | None = print,
    tradeoff: bool = False,
    timing: str | Path | None = None,
    target: float | None = None,
    measured: Sequence[str | Path] = (),
) -> list[Path]:
    """Read every run below ``paths`` (run directories, sweep folders or metrics files) and write the
    results table (CSV, Markdown) and the figures (PNG, SVG) into ``out``.

    ``tradeoff`` (implied by ``timing``, a ``bench`` JSON, and by ``measured``) adds the speed–accuracy
    trade-off (:mod:`.tradeoff`); ``target``: time to reach this fraction of all-reduce SGD's final
    accuracy, or for a language model a validation loss of (2 − ``target``) × all-reduce's (None: 0.9 for
    classifiers, 0.98, i.e. + 2 %, for language models; :func:`.tradeoff.absolute_target`). ``measured``:
    paths of runs trained on an emulated slow network, drawn at their measured and projected time in a
    panel of their own beside the projected ones (not in the other outputs).

    Returns the files written, in order. Raises :class:`UserError` for bad input, and for an
    existing output file unless ``overwrite``. ``say`` receives one line per file and a summary.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if target is not None and not target > 0:
        raise UserError(f"--target: must be a fraction > 0 of all-reduce's final accuracy, got {target}")
    chosen = load_timing(timing) if tradeoff or timing is not None or measured else None
    runs = collect_runs(paths)
    measured_runs = measured_rows(collect_runs(measured)) if measured else []
    plan = plan_outputs(runs, out, chosen, target, measured_runs)
    if not overwrite:
        for output in plan:
            for file in output.files:
                if file.exists():
                    raise UserError(f"'{file}' exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for output in plan:
        output.write()
        written += output.files
        for file in output.files:
            if say:
                say(f"wrote {file}")
    if say:
        going = sum(run.status == "unfinished" for run in runs)
        diverged = sum(run.status == "diverged" for run in runs)
        changed = sum(run.membership_changes > 0 for run in runs)
        also = f", {diverged} diverged" if diverged else ""
        also += f", {changed} whose workers changed" if changed else ""
        say(
            f"report: {len(runs)} run(s) ({going} still going{also}) in {len(group_runs(runs))} group(s), "
            f"{len(set(run.task for run in runs))} task(s); {len(written)} files in {out}"
        )
    return written
