"""``RUN_DIR/metrics.h5``: per-step and per-evaluation series, written by rank 0.

Rows are buffered and appended by open–write–close, so between flushes the file is a
complete, closed HDF5 file that h5py and h5dump read while the run goes on (SWMR is avoided
on purpose: it is unreliable on parallel filesystems). A resumed run appends to the same file.

Layout: groups ``steps`` and ``evals``, one 1-D dataset per field (all the same length);
root attributes ``config`` (the resolved YAML), ``world`` (JSON), ``versions`` (JSON),
``format`` = "hpc-localsgd/metrics", ``format_version`` = 1, ``total_steps`` (the steps the run
was planned for), ``levels`` (JSON: the levels of the run's hierarchy, ``global`` last) and more
written by the training loop; ``stopped`` ("diverged"), ``stopped_step`` and ``stopped_reason``
when training stopped on a non-finite loss or model; ``first_step`` when the file was started
afresh on a resume (its rows begin after that step: the damaged file before it was set aside);
``emulated_link`` (the rate, e.g. "10mbit") when the ranks ran on an emulated slow network;
``language`` (JSON) only for language-model runs: ``tokens_per_sample`` (the window length),
``bytes_per_token`` (1 for byte-level text, null when unknown) and ``corpus`` (``source``, ``files``,
``bytes``, ``digest``, ``train_tokens``, ``val_tokens``, ``bytes_per_token``, ``unigram_entropy`` in
nats per token). In such runs ``evals/test_loss`` is the validation loss in nats per token,
``evals/test_accuracy`` the next-token accuracy and ``global_batch`` counts sequences per step.
Besides the totals ``bytes_sent`` and ``sync_rounds``, both groups have ``<level>_bytes_sent``
and ``<level>_sync_rounds`` for every level (files written before levels existed have neither:
all their traffic is ``global``).

A third group, ``syncs``, has one row per global sync (model average) with what it measured
(``SYNC_FIELDS``, see ``algorithms/drift.py``): ``step`` (completed steps at the sync),
``consensus_distance`` (mean over workers of ‖xᵢ − x̄‖², relative to ‖x̄‖²), ``model_norm`` (‖x̄‖),
``outer_update_norm`` and ``outer_update_cosine`` (‖Δ‖ of the outer step, Δ = x_prev − x̄, and its
cosine with the previous outer step's Δ; NaN where no outer step ran, the cosine also at the first)
and ``outer_step`` (1 where the outer optimizer stepped). A table of its own rather than columns of
``steps`` that would be NaN between syncs. Files written before it existed have no ``syncs`` group;
:func:`read_metrics` then gives none, and a resumed run adds it.

A fourth group, ``membership``, has one row per change of the workers taking part
(``MEMBERSHIP_FIELDS``; ``comm.on_worker_loss: continue``): ``step`` (completed steps at the global
sync where the change took effect), ``workers_before`` and ``workers_after``, ``left`` and ``joined``
(how many workers left and joined there), ``recovery_seconds`` (from the failure being noticed to the
survivors' state being agreed) and ``description``, a variable-length UTF-8 string saying who and
why ("worker 2 (rank 2) lost: connection closed"). Each row is written at once (a change is rare, and
the run may be about to crash). Most runs have none: an empty group. The root attribute ``world``
stays the world the run started with. Files written before the group existed have none;
:func:`read_metrics` and :func:`read_membership` then give none, and a resumed run adds it.

This module owns that contract: the file name, the format tag, the fields and when a run counts as
finished (:func:`run_finished`) or diverged (:func:`run_status`). It imports no torch, so that
the report reads metrics files without it.

Appends never lose the rows already written: free space is checked before HDF5 touches the file
(HDF5 does not roll back a write that runs out of space midway), and a failed append leaves its
rows pending and says so in one line (:class:`~hpc_localsgd.errors.WriteFailed`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import WriteFailed, one_line
from .hdf5 import attr_text, check_free_space, failed_writes_reported_once

METRICS_FILE = "metrics.h5"  # in the run directory
METRICS_FORMAT = "hpc-localsgd/metrics"  # the root attribute ``format``
METRICS_FORMAT_VERSION = 1
TOTAL_STEPS_ATTR = "total_steps"  # root attribute: the step the run ends at
STOPPED_ATTR = "stopped"  # root attribute: why training stopped before its end ("diverged", "stalled")
STOPPED_STEP_ATTR = "stopped_step"
STOPPED_REASON_ATTR = "stopped_reason"  # the one line the run ended with
FIRST_STEP_ATTR = "first_step"  # root attribute of a file restarted on resume: its rows follow this step
# Root attribute of a run whose ranks ran on an emulated slow network (launcher/slownet.py): the
# link's rate in tc's notation; its step times were measured on that link.
EMULATED_LINK_ATTR = "emulated_link"
# Root attribute (JSON) of a language-model run only: tokens_per_sample, bytes_per_token (1 for byte-level
# text, null for token files) and the corpus read (source, files, bytes, digest, train_tokens, val_tokens,
# bytes_per_token, unigram_entropy in nats per token). Its evals' test_loss is then the validation loss in
# nats per token and test_accuracy the next-token accuracy; samples are windows of tokens_per_sample.
LANGUAGE_ATTR = "language"
DIVERGED = "diverged"
# ``stopped`` of a run whose ranks stopped on a stalled rank (comm.stall_timeout_seconds): not an outcome of
# the run, which resumes from its latest checkpoint, so its status stays "unfinished".
STALLED = "stalled"
FINISHED, UNFINISHED = "finished", "unfinished"  # the other values of run_status

STEP_FIELDS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "accuracy",
    "samples_per_s",
    "comm_seconds",
    "compute_seconds",
    "bytes_sent",
    "sync_rounds",
    "synced",
)
EVAL_FIELDS = (
    "step",
    "epoch",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "wall_seconds",
    "comm_seconds",
    "bytes_sent",
    "sync_rounds",
)
SYNC_FIELDS = (
    "step",
    "consensus_distance",
    "model_norm",
    "outer_update_norm",
    "outer_update_cosine",
    "outer_step",
)
SYNCS = "syncs"  # the group of SYNC_FIELDS
MEMBERSHIP_FIELDS = ("step", "workers_before", "workers_after", "left", "joined", "recovery_seconds")
MEMBERSHIP_DESCRIPTION = "description"  # the membership group's one string dataset, beside MEMBERSHIP_FIELDS
MEMBERSHIP = "membership"  # the group of MEMBERSHIP_FIELDS and MEMBERSHIP_DESCRIPTION
_INT_FIELDS = {
    "step",
    "bytes_sent",
    "sync_rounds",
    "synced",
    "outer_step",
    "workers_before",
    "workers_after",
    "left",
    "joined",
}
LEVELS_ATTR = "levels"
GLOBAL_LEVEL = "global"  # every rank, over the slowest network: what a flat run's traffic is


def level_fields(levels: Sequence[str]) -> tuple[str, ...]:
    """The per-level counter fields of a run with these levels."""
    return tuple(f"{level}_{counter}" for level in levels for counter in ("bytes_sent", "sync_rounds"))


def _is_int(name: str) -> bool:
    return name in _INT_FIELDS or name.endswith(("_bytes_sent", "_sync_rounds"))


class MetricsWriter:
    def __init__(
        self,
        path: str | Path,
        attrs: dict[str, Any],
        flush_seconds: float,
        locking: bool = False,
        resume_after_step: int | None = None,
        levels: Sequence[str] = (GLOBAL_LEVEL,),
        defer_failures: bool = False,
    ) -> None:
        """Create ``path``; or, with ``resume_after_step``, reopen it and drop the rows logged after
        that step (they were written after the checkpoint being resumed and will be logged again).
        A file that cannot be reopened (truncated, not HDF5, not a metrics file) is moved aside to
        ``metrics.h5.damaged-<UTC time>`` (:attr:`set_aside` says where and why) and a fresh one starts
        after that step. ``levels``: the hierarchy's levels, for the per-level counters every row then
        carries. ``defer_failures``: a failed append is kept in :attr:`failure` instead of raised (MPI
        rank 0, whose ranks agree on stopping; see ``train/checkpointer.py``)."""
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.locking = locking
        self.defer_failures = defer_failures
        self.failure: str | None = None  # the last append that failed, while its rows are pending
        self.set_aside: tuple[Path, str] | None = None  # (where a damaged file went, what was wrong)
        self._pending: dict[str, list[Mapping[str, float | str]]] = {
            "steps": [],
            "evals": [],
            SYNCS: [],
            MEMBERSHIP: [],
        }
        self._last_flush = time.monotonic()
        if resume_after_step is not None and self.path.exists():
            try:
                self._truncate_after(resume_after_step)
                return
            except (OSError, KeyError, ValueError) as exc:
                self.set_aside = (_move_aside(self.path), one_line(exc))
            attrs = {**attrs, FIRST_STEP_ATTR: resume_after_step}
        with h5py.File(self.path, "w-", locking=locking) as f:
            f.attrs["format"] = METRICS_FORMAT
            f.attrs["format_version"] = METRICS_FORMAT_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
            f.attrs[LEVELS_ATTR] = json.dumps(list(levels))
            per_level = level_fields(levels)
            for group, fields in (("steps", STEP_FIELDS + per_level), ("evals", EVAL_FIELDS + per_level)):
                _create_series(f, group, fields)
            _create_series(f, SYNCS, SYNC_FIELDS)
            _create_membership(f)

    def _truncate_after(self, step: int) -> None:
        with h5py.File(self.path, "r", locking=self.locking) as f:  # read first: a damaged file is set aside untouched
            if attr_text(f.attrs, "format") != METRICS_FORMAT:
                raise ValueError(f"not an hpc-localsgd metrics file (format {attr_text(f.attrs, 'format')!r})")
            groups = [group for group in ("steps", "evals", SYNCS, MEMBERSHIP) if group in f]
            keep = {group: int(np.searchsorted(f[group]["step"][()], step, side="right")) for group in groups}
            for group in keep:
                lengths = {dataset.shape[0] for dataset in f[group].values()}
                if min(lengths) < keep[group]:
                    raise ValueError(f"{group}/ has datasets of different lengths {sorted(lengths)}")
        with h5py.File(self.path, "a", locking=self.locking) as f:
            if SYNCS not in f:  # written before per-sync measurements: they start with this resume
                _create_series(f, SYNCS, SYNC_FIELDS)
            if MEMBERSHIP not in f:  # written before membership changes were recorded
                _create_membership(f)
            for group, rows in keep.items():
                for dataset in f[group].values():
                    dataset.resize((rows,))
            for name in (STOPPED_ATTR, STOPPED_STEP_ATTR, STOPPED_REASON_ATTR):
                f.attrs.pop(name, None)  # the run goes on: whatever stopped it before no longer holds

    def log_step(self, **row: float) -> None:
        self._pending["steps"].append(row)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def log_eval(self, **row: float) -> None:
        self._pending["evals"].append(row)
        self.flush()

    def log_sync(self, **row: float) -> None:
        """One row of the ``syncs`` table (every field of ``SYNC_FIELDS``), written with the steps."""
        self._pending[SYNCS].append(row)

    def log_membership(
        self,
        *,
        step: int,
        workers_before: int,
        workers_after: int,
        left: int,
        joined: int,
        recovery_seconds: float,
        description: str,
    ) -> None:
        """One row of the ``membership`` table, appended at once (with any rows pending): a change of
        the workers is rare, and the record of it must outlive a crash that may follow. A failed append
        is handled as :meth:`flush` handles it: the row stays pending."""
        self._pending[MEMBERSHIP].append(
            {
                "step": step,
                "workers_before": workers_before,
                "workers_after": workers_after,
                "left": left,
                "joined": joined,
                "recovery_seconds": recovery_seconds,
                MEMBERSHIP_DESCRIPTION: description,
            }
        )
        self.flush()

    def flush(self) -> None:
        """Append the pending rows. On failure they stay pending (a later flush retries them), the rows
        in the file are intact, and :class:`WriteFailed` is raised (or kept in :attr:`failure`)."""
        if not any(self._pending.values()):
            return
        try:
            with failed_writes_reported_once():
                self._append()
        except (OSError, RuntimeError, ValueError) as exc:
            written = self._written_steps()
            self.failure = f"{self.path}: metrics could not be appended ({one_line(exc)}); " + (
                f"the rows up to step {written} are kept" if written is not None else "no step row was written yet"
            )
            if not self.defer_failures:
                raise WriteFailed(self.failure) from None
            return
        self.failure = None
        for rows in self._pending.values():
            rows.clear()
        self._last_flush = time.monotonic()

    def _append(self) -> None:
        rows = sum(len(r) for r in self._pending.values())
        # Data plus HDF5's chunk rounding: a new chunk of each dataset may be allocated.
        widths = len(self._pending["steps"][0]) if self._pending["steps"] else len(EVAL_FIELDS)
        check_free_space(self.path.parent, 8 * widths * (rows + 2 * 1024), f"appending to {self.path.name}")
        with h5py.File(self.path, "a", locking=self.locking) as f:
            for group, pending in self._pending.items():
                if not pending:
                    continue
                for name, dataset in f[group].items():
                    values = np.asarray([row[name] for row in pending], dtype=dataset.dtype)
                    old = dataset.shape[0]
                    dataset.resize((old + len(values),))
                    dataset[old:] = values

    def _written_steps(self) -> int | None:
        try:
            with h5py.File(self.path, "r", locking=self.locking) as f:
                steps = f["steps/step"]
                return int(steps[-1]) if steps.shape[0] else None
        except (OSError, KeyError, ValueError, RuntimeError):
            return None

    def mark_stopped(self, reason: str, step: int, line: str) -> None:
        """Record that training stopped at ``step`` (``reason``: "diverged", "stalled"), with the line it
        ended with, after appending the pending rows: the report and the sweep read it. Best effort: a
        failed write here must not replace the line the run ends with by another."""
        try:
            self.flush()
            with failed_writes_reported_once(), h5py.File(self.path, "a", locking=self.locking) as f:
                f.attrs[STOPPED_ATTR] = reason
                f.attrs[STOPPED_STEP_ATTR] = step
                f.attrs[STOPPED_REASON_ATTR] = line
        except (WriteFailed, OSError, RuntimeError, ValueError):
            pass

    def close(self) -> None:
        """Append what is pending; a failure is raised now whatever ``defer_failures`` says."""
        self.flush()
        if self.failure is not None:
            raise WriteFailed(self.failure)


def _move_aside(path: Path) -> Path:
    """Rename a damaged ``path`` to ``<name>.damaged-<UTC time>``, never over an existing file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1000):
        target = path.with_name(f"{path.name}.damaged-{stamp}" + (f".{attempt}" if attempt else ""))
        try:
            os.link(path, target)  # fails if target exists: no race can overwrite a file
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links
            if target.exists():
                continue
            path.rename(target)
            return target
        path.unlink()
        return target
    raise OSError(f"cannot find a free name to set '{path}' aside")


def _create_series(f: h5py.File, group: str, fields: Sequence[str]) -> None:
    g = f.create_group(group)
    for name in fields:
        g.create_dataset(
            name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64 if _is_int(name) else np.float64
        )


def _create_membership(f: h5py.File) -> None:
    _create_series(f, MEMBERSHIP, MEMBERSHIP_FIELDS)
    f[MEMBERSHIP].create_dataset(
        MEMBERSHIP_DESCRIPTION, shape=(0,), maxshape=(None,), chunks=(64,), dtype=h5py.string_dtype("utf-8")
    )


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    """Each dataset as a numpy array; strings as ``str`` (h5py reads them as bytes)."""
    return {
        name: dataset.asstr()[()] if h5py.check_string_dtype(dataset.dtype) else dataset[()]
        for name, dataset in group.items()
    }


def _complete_rows(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows every field has: a read racing an append may see some datasets grown already."""
    rows = min((len(values) for values in table.values()), default=0)
    return {name: values[:rows] for name, values in table.items()}


def read_metrics(path: str | Path, locking: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The series as numpy arrays: ``{"steps": {field: array}, "evals": {...}}``, and ``"syncs"`` and
    ``"membership"`` (descriptions as ``str``) when the file has those tables (files written before
    they existed do not)."""
    with h5py.File(path, "r", locking=locking) as f:
        groups = [group for group in ("steps", "evals", SYNCS, MEMBERSHIP) if group in f]
        return {group: _read_group(f[group]) for group in groups}


def read_syncs(path: str | Path, locking: bool = False) -> dict[str, np.ndarray] | None:
    """The ``syncs`` table alone (``{field: array}``, rows every field has), or None for a file
    written before it existed."""
    with h5py.File(path, "r", locking=locking) as f:
        if SYNCS not in f:
            return None
        table = _read_group(f[SYNCS])
    return _complete_rows(table)


def read_membership(path: str | Path, locking: bool = False) -> dict[str, np.ndarray] | None:
    """The ``membership`` table alone (``{field: array}`` for ``MEMBERSHIP_FIELDS`` and ``description``,
    its strings as ``str``; rows every field has; no row when the workers never changed), or None for a
    file written before it existed."""
    with h5py.File(path, "r", locking=locking) as f:
        if MEMBERSHIP not in f:
            return None
        table = _read_group(f[MEMBERSHIP])
    return _complete_rows(table)


def membership_text(
    step: int, workers_before: int, workers_after: int, recovery_seconds: float, description: str
) -> str:
    """What changed at ``step`` and who goes on, e.g. "step 8: worker 2 (rank 2) lost: connection closed;
    3 of 4 workers go on (recovered in 3.1 s)": :func:`membership_line` and ``inspect`` say it."""
    what = " ".join(description.split()) or "the workers changed"  # one line, whatever the reason's text holds
    verb = "goes" if workers_after == 1 else "go"
    if workers_after < workers_before:
        who = f"{workers_after} of {workers_before} workers {verb} on"
    elif workers_after > workers_before:
        who = f"{workers_after} workers {verb} on, up from {workers_before}"
    else:
        who = f"{workers_after} worker{'s' if workers_after != 1 else ''} {verb} on"
    recovered = f" (recovered in {recovery_seconds:.1f} s)" if math.isfinite(recovery_seconds) else ""
    return f"step {step}: {what}; {who}{recovered}"


def membership_line(
    step: int, workers_before: int, workers_after: int, recovery_seconds: float, description: str
) -> str:
    """The one line rank 0 prints for a membership change, e.g. "hpc-localsgd: step 16: worker 2 (rank 5)
    joined from rank 0; 4 workers go on, up from 3 (recovered in 1.2 s)". A recovery time that was not
    measured (NaN) is left out."""
    return "hpc-localsgd: " + membership_text(step, workers_before, workers_after, recovery_seconds, description)


def run_finished(eval_steps: Sequence[int] | np.ndarray, total_steps: int) -> bool:
    """Whether a run with these evaluation steps (``evals/step``, in order) and ``total_steps`` has
    finished: it has an evaluation, and its last one is at step ``total_steps`` or later.

    The training loop always evaluates at its last step and writes evaluation rows at once, so the
    last evaluation row says how far the run got. "At or later", not "at": a run resumed with a
    larger ``train.max_steps`` keeps the ``total_steps`` its metrics file was created with, and must
    not look unfinished forever (a sweep would run it again and again).
    """
    return len(eval_steps) > 0 and int(eval_steps[-1]) >= int(total_steps)


def run_status(eval_steps: Sequence[int] | np.ndarray, total_steps: int, stopped: str | None) -> str:
    """``"diverged"`` when training stopped on a non-finite loss or model (the root attribute
    ``stopped``), else ``"finished"`` (:func:`run_finished`) or ``"unfinished"`` (still going, or
    stopped early by a signal, a crash, a time limit or a stalled rank (``stopped``: "stalled"): resumable)."""
    if stopped == DIVERGED:
        return DIVERGED
    return FINISHED if run_finished(eval_steps, total_steps) else UNFINISHED


def metrics_file_status(path: str | Path) -> str:
    """:func:`run_status` for a metrics file; ``"unfinished"`` when it is missing, unreadable (a
    writer may be appending right now) or lacks ``evals/step`` or ``total_steps``."""
    path = Path(path)
    if not path.is_file():
        return UNFINISHED
    try:
        with h5py.File(path, "r", locking=False) as f:
            if attr_text(f.attrs, STOPPED_ATTR) == DIVERGED:
                return DIVERGED
            return run_status(f["evals/step"][()], int(f.attrs[TOTAL_STEPS_ATTR]), None)
    except (OSError, KeyError):
        return UNFINISHED


def metrics_file_finished(path: str | Path) -> bool:
    """Whether :func:`metrics_file_status` is ``"finished"``."""
    return metrics_file_status(path) == FINISHED
