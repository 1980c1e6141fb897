"""Find the ``metrics.h5`` files below the paths a user names and read each into a :class:`Run`.

A language-model run (one whose file has the ``language`` attribute) also carries its window length,
bytes per token and corpus (:class:`Language`); its task names the corpus by digest, so that runs on
different text are never averaged as seeds of one configuration. A run whose workers changed
(``comm.on_worker_loss: continue``) carries each change (:class:`Membership`), for the figures to mark.

Runs may still be going: their writer opens the file for append at any moment (no locking, no
SWMR, see :mod:`hpc_localsgd.io.metrics`), so a read that fails is retried a few times and the run
is skipped with a warning if it still fails. A file that is plainly not ours is a user error.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from ..config.schema import OUTER_METHODS
from ..errors import UserError, print_line
from ..io.hdf5 import attr_text, is_hdf5, open_error_reason
from ..io.metrics import (
    DIVERGED,
    EMULATED_LINK_ATTR,
    FINISHED,
    LANGUAGE_ATTR,
    MEMBERSHIP,
    MEMBERSHIP_DESCRIPTION,
    MEMBERSHIP_FIELDS,
    METRICS_FILE,
    METRICS_FORMAT,
    STOPPED_ATTR,
    STOPPED_STEP_ATTR,
    TOTAL_STEPS_ATTR,
    read_metrics,
    run_status,
)

# The report's names of the averaging methods an outer optimizer may act on.
_AVERAGING_LABELS = {"local_sgd": "local SGD", "post_local_sgd": "post-local SGD"}


def method_label(method: str, outer: str) -> str:
    """The name a reader of the paper knows: SlowMo on top of plain local SGD is just "SlowMo"
    (each outer optimizer's spec in ``config.schema.OUTER_METHODS`` says how it is named)."""
    if method == "allreduce":
        return "all-reduce"
    base = _AVERAGING_LABELS.get(method, method)
    spec = OUTER_METHODS.get(outer)
    return spec.label(method, base) if spec is not None else f"{base} + {outer}"


# The order in which methods appear in tables and legends: the baseline first, then the study's
# story (local SGD loses accuracy, post-local SGD and the outer optimizers win it back), each outer
# optimizer in the order of ``OUTER_METHODS``.
METHOD_ORDER = ("all-reduce", *(method_label(m, outer) for outer in OUTER_METHODS for m in _AVERAGING_LABELS))


def method_rank(label: str) -> tuple[int, str]:
    """Sort key: known methods in :data:`METHOD_ORDER`, unknown ones after them by name."""
    return (METHOD_ORDER.index(label), "") if label in METHOD_ORDER else (len(METHOD_ORDER), label)


# The evaluation fields the report reads, a subset of the file's ``EVAL_FIELDS``.
_EVAL_FIELDS = ("step", "test_accuracy", "test_loss", "train_loss", "wall_seconds", "bytes_sent", "sync_rounds")


@dataclass
class Evals:
    """One run's evaluation series, one entry per evaluation; counters are cumulative per rank."""

    step: np.ndarray
    test_accuracy: np.ndarray
    test_loss: np.ndarray
    train_loss: np.ndarray
    wall_seconds: np.ndarray
    bytes_sent: np.ndarray
    sync_rounds: np.ndarray
    # Over the slowest network: all of a flat run's traffic; between workers when ranks form workers.
    global_bytes_sent: np.ndarray
    global_sync_rounds: np.ndarray
    # Rank 0's step times summed up to each evaluation (data, forward, backward, update and the time
    # blocked in communication; evaluations and checkpoints excluded), and the compute part of that;
    # NaN where the step table does not hold every step up to it.
    train_seconds: np.ndarray
    compute_seconds: np.ndarray

    def __len__(self) -> int:
        return int(self.step.shape[0])


@dataclass
class Membership:
    """One run's changes of the workers taking part (metrics.h5's ``membership`` table), one entry per
    change, in step order; workers are counted as workers, not ranks."""

    step: np.ndarray  # completed steps at the global sync where the change took effect
    workers_before: np.ndarray
    workers_after: np.ndarray
    left: np.ndarray
    joined: np.ndarray
    recovery_seconds: np.ndarray
    description: np.ndarray  # str: who and why, as the run printed it

    def __len__(self) -> int:
        return int(self.step.shape[0])


@dataclass(frozen=True)
class Corpus:
    """The text a language model learned from, as its run describes it (None: not stated)."""

    source: str
    files: int | None = None
    bytes: int | None = None
    digest: str | None = None  # tells two corpora apart
    train_tokens: int | None = None
    val_tokens: int | None = None
    unigram_entropy: float | None = None  # nats per token: the loss of a model that learned token frequencies only

    @property
    def short_digest(self) -> str | None:
        """The digest's first 8 characters after any "<algorithm>:" prefix: enough to tell corpora apart."""
        return None if not self.digest else self.digest.rsplit(":", 1)[-1][:8]


@dataclass(frozen=True)
class Language:
    """What makes a run a language-model run: its loss is in nats per token, its samples are windows."""

    tokens_per_sample: int | None  # the window (sequence) length
    bytes_per_token: float | None  # 1 for byte-level text; None when unknown (token files)
    corpus: Corpus | None


@dataclass
class Run:
    """One training run as the report sees it: what it was (its group) and what it measured."""

    path: Path
    task: str  # "<data.name>/<model.name>"
    method: str  # label from :func:`method_label`
    sync_period: int  # H; 1 for all-reduce, where it does not apply
    workers: int
    seed: int
    total_steps: int
    evals: Evals
    # The run's config flattened to dotted keys: what tells apart runs of one method, H and workers.
    settings: dict[str, Any] = field(default_factory=dict)
    # "diverged": training stopped at ``stopped_step`` on a NaN or inf model; "stalled": on a stalled rank (resumable)
    stopped: str | None = None
    stopped_step: int | None = None
    emulated_link: str | None = None  # the rate (tc's notation) of the emulated network it ran on
    language: Language | None = None  # a language-model run's window and corpus; None for a classifier
    global_batch: int | None = None  # samples (sequences for a language model) per step, all workers together
    # Its changes of the workers taking part; None in a file written before they were recorded.
    membership: Membership | None = None

    @property
    def membership_changes(self) -> int:
        """How many times its workers changed (0 when the file does not say)."""
        return 0 if self.membership is None else len(self.membership)

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens every step trains on (global batch × window), for a language-model run that states both."""
        if self.language is None or self.language.tokens_per_sample is None or self.global_batch is None:
            return None
        return self.global_batch * self.language.tokens_per_sample

    @property
    def status(self) -> str:
        """ "finished", "diverged" or "unfinished" (:func:`~hpc_localsgd.io.metrics.run_status`)."""
        return run_status(self.evals.step, self.total_steps, self.stopped)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


def find_metrics_files(paths: Sequence[str | Path]) -> list[Path]:
    """Every ``metrics.h5`` named or found (recursively) below ``paths``, each once, in a stable order.

    A path may be a run directory, a sweep folder holding many of them, or a metrics file itself.
    """
    if not paths:
        raise UserError("name at least one run directory")
    # Keyed by the resolved path, so that overlapping paths (a sweep and one of its runs) count a run once.
    found: dict[Path, Path] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UserError(f"'{path}' does not exist")
        if path.is_file():
            files = [path]
        else:
            files = sorted(p for p in path.rglob(METRICS_FILE) if p.is_file())
            if not files:
                raise UserError(f"'{path}' holds no {METRICS_FILE} (searched every folder below it)")
        for file in files:
            found.setdefault(file.resolve(), file)
    return list(found.values())


def _warn(line: str) -> None:
    print_line(f"hpc-localsgd: warning: {line}", sys.stderr)


def _read_once(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    with h5py.File(path, "r", locking=False) as f:
        kind = attr_text(f.attrs, "format")
        if kind != METRICS_FORMAT:
            raise UserError(f"'{path}' is not an hpc-localsgd metrics file (format attribute {kind!r})")
        attrs = {key: f.attrs[key] for key in f.attrs}
    return attrs, read_metrics(path)


def _run_from(path: Path, attrs: dict[str, Any], series: dict[str, dict[str, np.ndarray]]) -> Run:
    try:
        config = yaml.safe_load(attr_text(attrs, "config")) or {}
        world = json.loads(attr_text(attrs, "world") or "{}")
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}': unreadable config or world attribute ({exc.__class__.__name__})") from None
    algorithm = config.get("algorithm") or {}
    method = str(algorithm.get("method", "local_sgd"))
    label = method_label(method, str(algorithm.get("outer", "none")))
    task = f"{(config.get('data') or {}).get('name', '?')}/{(config.get('model') or {}).get('name', '?')}"
    language = read_language(path, attrs)
    digest = language.corpus.short_digest if language is not None and language.corpus is not None else None
    if digest is not None:  # runs on different text are different tasks, never seeds of one configuration
        task += f" (corpus {digest})"
    evals = series["evals"]
    missing = [name for name in _EVAL_FIELDS if name not in evals]
    if missing:
        raise UserError(f"'{path}' has no evals/{missing[0]} dataset: not a metrics file this version can read")
    # A read that races a flush could see fields of different lengths; keep the rows all fields have.
    rows = min((len(values) for values in evals.values()), default=0)
    train_seconds, compute_seconds = summed_step_times(np.asarray(evals["step"][:rows]), series.get("steps", {}))
    return Run(
        path=path,
        task=task,
        method=label,
        sync_period=1 if method == "allreduce" else int(algorithm.get("sync_period", 1)),
        workers=int(world.get("size", 1)),
        seed=int(config.get("seed", 0)),
        total_steps=int(attrs.get(TOTAL_STEPS_ATTR, 0)),
        evals=Evals(
            **{name: np.asarray(evals[name][:rows]) for name in _EVAL_FIELDS},
            # Files written before levels existed count everything as global.
            **{
                f"global_{counter}": np.asarray(evals.get(f"global_{counter}", evals[counter])[:rows])
                for counter in ("bytes_sent", "sync_rounds")
            },
            train_seconds=train_seconds,
            compute_seconds=compute_seconds,
        ),
        settings=_flatten(config),
        stopped=attr_text(attrs, STOPPED_ATTR) or None,
        stopped_step=int(attrs[STOPPED_STEP_ATTR]) if STOPPED_STEP_ATTR in attrs else None,
        emulated_link=attr_text(attrs, EMULATED_LINK_ATTR) or None,
        language=language,
        global_batch=int(attrs["global_batch"]) if "global_batch" in attrs else None,
        membership=_membership(path, series.get(MEMBERSHIP)),
    )


def _membership(path: Path, table: dict[str, np.ndarray] | None) -> Membership | None:
    if table is None:
        return None
    missing = [name for name in (*MEMBERSHIP_FIELDS, MEMBERSHIP_DESCRIPTION) if name not in table]
    if missing:
        raise UserError(f"'{path}' has no {MEMBERSHIP}/{missing[0]} dataset: not a metrics file this version can read")
    rows = min(len(values) for values in table.values())  # a read racing an append: the rows every field has
    return Membership(
        **{name: np.asarray(table[name][:rows]) for name in MEMBERSHIP_FIELDS},
        description=np.asarray([str(text) for text in table[MEMBERSHIP_DESCRIPTION][:rows]], dtype=object),
    )


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def read_language(path: Path, attrs: dict[str, Any]) -> Language | None:
    """The run's ``language`` attribute, or None for a classifier run (files without it).

    Raises :class:`UserError` when it is there but is not the JSON object the training loop writes."""
    text = attr_text(attrs, LANGUAGE_ATTR)
    if not text:
        return None
    try:
        document = json.loads(text)
        corpus = document.get("corpus")
        bytes_per_token = document.get("bytes_per_token")
        if bytes_per_token is None and isinstance(corpus, dict):
            bytes_per_token = corpus.get("bytes_per_token")
        return Language(
            tokens_per_sample=_optional(int, document.get("tokens_per_sample")),
            bytes_per_token=_optional(float, bytes_per_token),
            corpus=None
            if not isinstance(corpus, dict)
            else Corpus(
                source=str(corpus.get("source", "?")),
                **{name: _optional(int, corpus.get(name)) for name in ("files", "bytes", "train_tokens", "val_tokens")},
                digest=_optional(str, corpus.get("digest")),
                unigram_entropy=_optional(float, corpus.get("unigram_entropy")),
            ),
        )
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise UserError(f"'{path}': unreadable {LANGUAGE_ATTR} attribute ({exc.__class__.__name__})") from None


def summed_step_times(eval_steps: np.ndarray, steps: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rank 0's summed step time and compute time at each evaluation step, from the step table; NaN
    where the table does not hold steps 1 … that step in order (a metrics file restarted on resume
    after damage begins later; a read racing a flush may end earlier)."""
    total = np.full(len(eval_steps), np.nan)
    compute = np.full(len(eval_steps), np.nan)
    if not all(name in steps for name in ("step", "compute_seconds", "comm_seconds")):
        return total, compute
    rows = min(len(steps[name]) for name in ("step", "compute_seconds", "comm_seconds"))
    numbered = np.asarray(steps["step"][:rows], dtype=np.int64)
    gaps = np.flatnonzero(numbered != np.arange(1, rows + 1))
    complete = int(gaps[0]) if len(gaps) else rows  # steps 1 … complete are all there, in order
    own = np.asarray(steps["compute_seconds"][:complete], dtype=np.float64)
    blocked = np.asarray(steps["comm_seconds"][:complete], dtype=np.float64)
    total_sum, compute_sum = np.cumsum(own + blocked), np.cumsum(own)
    for i, step in enumerate(np.asarray(eval_steps, dtype=np.int64)):
        if 1 <= step <= complete:
            total[i], compute[i] = total_sum[step - 1], compute_sum[step - 1]
    return total, compute


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Settings that say where and how a run ran, not what it computed: never part of a label.
_NOT_A_VARIANT = (
    "seed",
    "output.",
    "comm.",
    "checkpoint.",
    "train.threads",
    "train.device",
    "train.log_every_steps",
    "data.num_workers",
    "data.path",
)


# ... except these comm settings, which change what a sync computes (compressed updates or gradients).
_COMPUTING_COMM_SETTINGS = ("comm.sync_compression", "comm.error_feedback", "comm.gradient_compression")


def _is_location(key: str) -> bool:
    if key in _COMPUTING_COMM_SETTINGS:
        return False
    return any(key == skip or (skip.endswith(".") and key.startswith(skip)) for skip in _NOT_A_VARIANT)


def _label_variants(runs: list[Run]) -> list[Run]:
    """Runs of one (task, method, H, workers) that differ in another setting (SlowMo's β, the LR)
    are different methods to a reader: the differing settings join their label, e.g.
    "SlowMo (slow_momentum=0.2)"."""
    groups: dict[tuple[str, str, int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.method, run.sync_period, run.workers), []).append(run)
    labelled: list[Run] = []
    for members in groups.values():
        every_key = {k for run in members for k in run.settings}
        keys = sorted(
            k for k in every_key if not _is_location(k) and len({repr(run.settings.get(k)) for run in members}) > 1
        )
        for run in members:
            if keys:
                detail = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.settings.get(k)}" for k in keys)
                run = replace(run, method=f"{run.method} ({detail})")
            labelled.append(run)
    return labelled


def read_run(
    path: str | Path, attempts: int = 5, pause_seconds: float = 0.2, warn: Callable[[str], None] = _warn
) -> Run | None:
    """The run in ``path``, or None (after a warning) when it cannot be read right now.

    Raises :class:`UserError` for a file that is not an HDF5 file or not an hpc-localsgd metrics file.
    """
    path = Path(path)
    if path.stat().st_size > 0 and not is_hdf5(path):
        raise UserError(f"'{path}' is not an HDF5 file")
    failure: BaseException | None = None
    for attempt in range(attempts):
        try:
            attrs, series = _read_once(path)
            break
        # KeyError: a group or dataset the writer has not created yet (file being created).
        except (OSError, KeyError) as exc:
            failure = exc
            if attempt + 1 < attempts:
                time.sleep(pause_seconds)
    else:
        if not is_hdf5(path):
            raise UserError(f"'{path}' is not an HDF5 file")
        reason = open_error_reason(failure) if failure else "unknown"
        warn(f"skipping '{path}': unreadable after {attempts} attempts ({reason})")
        return None
    return _run_from(path, attrs, series)


def collect_runs(
    paths: Sequence[str | Path], warn: Callable[[str], None] = _warn, pause_seconds: float = 0.2
) -> list[Run]:
    """Every readable run with at least one evaluation below ``paths``; ``pause_seconds`` between
    attempts to read a file that a running job may be writing.

    Raises :class:`UserError` when a path is bad or when no run is left to report on.
    """
    runs: list[Run] = []
    for file in find_metrics_files(paths):
        run = read_run(file, pause_seconds=pause_seconds, warn=warn)
        if run is None:
            continue
        diverged = f"diverged at step {run.stopped_step}" if run.stopped == DIVERGED else ""
        if len(run.evals) == 0:
            warn(f"skipping '{file}': {diverged + ' before its first evaluation' if diverged else 'no evaluation yet'}")
            continue
        if diverged:
            warn(f"'{file}' {diverged}: its last evaluation before that (step {int(run.evals.step[-1])}) is reported")
        runs.append(run)
    if not runs:
        raise UserError("no run with an evaluation to report on in " + ", ".join(f"'{p}'" for p in paths))
    runs = _label_variants(runs)
    seen: dict[tuple[str, str, int, int, int], Path] = {}
    for run in runs:
        key = (run.task, run.method, run.sync_period, run.workers, run.seed)
        if key in seen:
            # Two runs of one configuration and seed: usually a rerun left next to the original, or
            # the same run on two backends (a simulation and its MPI check).
            warn(
                f"'{run.path}' and '{seen[key]}' are both {run.method} H={run.sync_period} with "
                f"{run.workers} workers, seed {run.seed}; both are averaged"
            )
        seen.setdefault(key, run.path)
    return runs
