"""Runs grouped by (task, method, H, workers), seeds aggregated, written as CSV and Markdown.

"Final" means a run's last evaluation: the end of training for finished runs, the latest
evaluation so far for runs still going (the ``complete`` column says how many are finished).

Language models are judged by their final validation loss (nats per token, lower is better), not by
accuracy: beside it bits per byte (loss / ln 2 / bytes per token), comparable across tokenizers, where the
corpus fixes bytes per token, else perplexity (exp of the mean loss over seeds). Their next-token accuracy
stays in the table. Classifier tables are as they were (the language columns join the CSV only when a
language-model run is reported).

Runs whose workers changed (a worker lost or joined, ``comm.on_worker_loss: continue``) are counted in a
``notes`` column of the Markdown and a ``membership_changes`` column of the CSV, both there only when
some reported run had such a change.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..algorithms.accounting import human_bytes
from .collect import Language, Run, method_rank


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
    loss_mean: float = math.nan  # final test (validation) loss; nats per token for a language model
    loss_std: float | None = None
    language: Language | None = None  # of the group's first run: one task has one corpus
    tokens_per_step: int | None = None
    membership_changes: int = 0  # over all seeds: how many times their workers changed
    seeds_with_membership_changes: int = 0

    @property
    def notes(self) -> str:
        """What a reader must know beside the numbers: "1 membership change", "3 membership changes (2 of 3
        seeds)"; empty when there is nothing to say."""
        count = self.membership_changes
        if not count:
            return ""
        seeds = f" ({self.seeds_with_membership_changes} of {self.seeds} seeds)" if self.seeds > 1 else ""
        return f"{count} membership change{'s' if count != 1 else ''}{seeds}"

    @property
    def is_language(self) -> bool:
        return self.language is not None

    @property
    def bits_per_byte(self) -> tuple[float, float | None] | None:
        """(mean, std) of loss / ln 2 / bytes per token, for a language model whose bytes per token are known."""
        per_token = None if self.language is None else self.language.bytes_per_token
        if not per_token:
            return None
        std = None if self.loss_std is None else self.loss_std / math.log(2) / per_token
        return self.loss_mean / math.log(2) / per_token, std

    @property
    def perplexity(self) -> float | None:
        """exp(mean loss), the seeds' geometric mean perplexity, for a language model without bits per byte."""
        if self.language is None or self.bits_per_byte is not None:
            return None
        return math.exp(self.loss_mean)

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
        loss = [float(r.evals.test_loss[-1]) for r in members]
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
                loss_mean=statistics.fmean(loss),
                loss_std=statistics.stdev(loss) if len(loss) > 1 else None,
                language=members[0].language,
                tokens_per_step=members[0].tokens_per_step,
                membership_changes=sum(r.membership_changes for r in members),
                seeds_with_membership_changes=sum(r.membership_changes > 0 for r in members),
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
# Appended when a language model is reported: its loss and what follows from it (empty for classifiers,
# whose test_accuracy columns hold a language model's next-token accuracy).
LANGUAGE_CSV_COLUMNS = (
    "val_loss_nats_per_token_mean",
    "val_loss_nats_per_token_std",
    "bits_per_byte_mean",
    "bits_per_byte_std",
    "perplexity",
    "tokens_per_step",
)
MEMBERSHIP_CSV_COLUMN = "membership_changes"  # appended when some reported run's workers changed


def write_table_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A header and one line per row: the report's CSV files."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def number_cell(value: float | None) -> str:
    """A CSV cell at full precision (repr); empty for a value that does not exist."""
    return "" if value is None else repr(value)


def _language_cells(row: ResultRow) -> list[object]:
    if not row.is_language:
        return [""] * len(LANGUAGE_CSV_COLUMNS)
    bits = row.bits_per_byte or (None, None)
    return [number_cell(v) for v in (row.loss_mean, row.loss_std, *bits, row.perplexity)] + [
        "" if row.tokens_per_step is None else row.tokens_per_step
    ]


def write_csv(rows: Sequence[ResultRow], path: Path) -> None:
    """Raw numbers (accuracy as a fraction) at full precision, for further analysis."""
    language = any(row.is_language for row in rows)
    changed = any(row.membership_changes for row in rows)
    write_table_csv(
        path,
        CSV_COLUMNS + (LANGUAGE_CSV_COLUMNS if language else ()) + ((MEMBERSHIP_CSV_COLUMN,) if changed else ()),
        (
            [row.key.task, row.key.method, row.key.sync_period, row.key.workers, row.seeds]
            + [number_cell(v) for v in (row.accuracy_mean, row.accuracy_std, row.sync_rounds_mean)]
            + [number_cell(v) for v in (row.bytes_sent_mean, row.wall_seconds_mean)]
            + [row.complete, number_cell(row.global_sync_rounds_mean), number_cell(row.global_bytes_sent_mean)]
            + (_language_cells(row) if language else [])
            + ([row.membership_changes] if changed else [])
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


LOSS_HEADER = "val loss (nats/token, lower is better)"
BITS_HEADER = "bits per byte (lower is better)"
PERPLEXITY_HEADER = "perplexity (lower is better)"


def format_mean_std(mean: float, std: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {'–' if std is None else f'{std:.{digits}f}'}"


def quality_columns(rows: Sequence[ResultRow]) -> tuple[str, ...]:
    """The headers of what a task's rows reached: test accuracy for a classifier; for a language model its
    loss, bits per byte or perplexity (whichever its rows have) and next-token accuracy."""
    if not any(row.is_language for row in rows):
        return ("test accuracy (%)",)
    bits = (BITS_HEADER,) if any(row.bits_per_byte for row in rows) else ()
    perplexity = (PERPLEXITY_HEADER,) if any(row.perplexity is not None for row in rows) else ()
    return (LOSS_HEADER, *bits, *perplexity, "next-token accuracy (%)")


def quality_cells(row: ResultRow, columns: Sequence[str]) -> tuple[str, ...]:
    """The cells of :func:`quality_columns`; "–" where a row has no such value."""
    if not row.is_language:
        return (format_accuracy(row),)
    bits, perplexity = row.bits_per_byte, row.perplexity
    cells = {
        LOSS_HEADER: format_mean_std(row.loss_mean, row.loss_std),
        BITS_HEADER: "–" if bits is None else format_mean_std(*bits),
        PERPLEXITY_HEADER: "–" if perplexity is None else f"{perplexity:.2f}",
    }
    return tuple(cells.get(column, format_accuracy(row)) for column in columns)


def corpus_line(language: Language) -> str:
    """What a language task learned from, in one line of Markdown (only what its runs state)."""
    corpus = language.corpus
    parts = []
    if corpus is not None:
        parts.append(f"Corpus: {corpus.source}")
        if corpus.files is not None and corpus.bytes is not None:
            parts.append(f"{corpus.files} file(s), {human_bytes(corpus.bytes)}")
        if corpus.train_tokens is not None and corpus.val_tokens is not None:
            parts.append(f"{corpus.train_tokens:,} training and {corpus.val_tokens:,} validation tokens")
        if corpus.digest:
            parts.append(f"digest `{corpus.digest}`")
    if language.tokens_per_sample is not None:
        parts.append(f"{language.tokens_per_sample} tokens per sequence")
    if language.bytes_per_token is not None:
        parts.append(f"{language.bytes_per_token:g} byte(s) per token")
    if corpus is not None and corpus.unigram_entropy is not None:
        parts.append(f"unigram entropy {corpus.unigram_entropy:.3f} nats/token (token frequencies only)")
    return "; ".join(parts or ["Corpus: not stated"]) + "."


LANGUAGE_NOTE = (
    "Language models: final validation loss in nats per token, mean ± sample standard deviation over seeds "
    "(lower is better); bits per byte = loss / ln 2 / bytes per token where the corpus fixes bytes per token, "
    "else perplexity = exp(mean loss); next-token (top-1) accuracy in percent."
)


MEMBERSHIP_NOTE = (
    "Notes: membership changes count, over all seeds, the syncs at which the workers taking part changed (a "
    "worker lost or joined, `comm.on_worker_loss: continue`); the training curves mark each one."
)


def markdown(rows: Sequence[ResultRow]) -> str:
    """One section per task; within it the table order of :func:`group_runs`. Runs whose ranks form
    workers (or groups) get the global rounds and bytes too: what crosses the slowest network."""
    hierarchical = any(row.hierarchical for row in rows)
    changed = any(row.membership_changes for row in rows)
    lines = [
        "# Results",
        "",
        "Final test accuracy: mean ± sample standard deviation over seeds. Sync rounds, bytes sent per worker "
        "and wall time: mean over seeds at each run's last evaluation (the latest so far for runs still "
        "going; `complete` counts finished runs). H does not apply to all-reduce (1).",
    ]
    if any(row.is_language for row in rows):
        lines += ["", LANGUAGE_NOTE]
    if changed:
        lines += ["", MEMBERSHIP_NOTE]
    for task in dict.fromkeys(row.key.task for row in rows):
        mine = [row for row in rows if row.key.task == task]
        quality = quality_columns(mine)
        header = ("method", "H", "workers", "seeds", *quality, "sync rounds", "bytes sent / worker", "wall time")
        header += ("complete",) + (("global rounds", "global bytes / worker") if hierarchical else ())
        header += ("notes",) if changed else ()
        language = mine[0].language
        lines += ["", f"## {task}", ""] + ([corpus_line(language), ""] if language is not None else [])
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i < 1 or name == "notes" else "---:" for i, name in enumerate(header)) + "|",
        ]
        for row in mine:
            cells = (
                row.key.method,
                str(row.key.sync_period),
                str(row.key.workers),
                str(row.seeds),
                *quality_cells(row, quality),
                _rounds(row.sync_rounds_mean),
                human_bytes(row.bytes_sent_mean),
                human_seconds(row.wall_seconds_mean),
                row.complete,
            ) + (
                (_rounds(row.global_sync_rounds_mean), human_bytes(row.global_bytes_sent_mean)) if hierarchical else ()
            )
            cells += (row.notes or "–",) if changed else ()
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[ResultRow], path: Path) -> None:
    path.write_text(markdown(rows))
