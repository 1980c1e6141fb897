"""``RUN_DIR/metrics.h5``: per-step and per-evaluation series, written by rank 0.

Rows are buffered and appended by open–write–close, so between flushes the file is a
complete, closed HDF5 file that h5py and h5dump read while the run goes on (SWMR is avoided
on purpose: it is unreliable on parallel filesystems). A resumed run appends to the same file.

Layout: groups ``steps`` and ``evals``, one 1-D dataset per field (all the same length);
root attributes ``config`` (the resolved YAML), ``world`` (JSON), ``versions`` (JSON),
``format`` = "hpc-localsgd/metrics", ``format_version`` = 1, ``total_steps`` (the steps the run
was planned for), ``levels`` (JSON: the levels of the run's hierarchy, ``global`` last) and more
written by the training loop. Besides the totals ``bytes_sent`` and ``sync_rounds``, both groups
have ``<level>_bytes_sent`` and ``<level>_sync_rounds`` for every level (files written before
levels existed have neither: all their traffic is ``global``).

A third group, ``syncs``, has one row per global sync (model average) with what it measured
(``SYNC_FIELDS``, see ``algorithms/drift.py``): ``step`` (completed steps at the sync),
``consensus_distance`` (mean over workers of ‖xᵢ − x̄‖², relative to ‖x̄‖²), ``model_norm`` (‖x̄‖),
``outer_update_norm`` and ``outer_update_cosine`` (‖Δ‖ of the outer step, Δ = x_prev − x̄, and its
cosine with the previous outer step's Δ; NaN where no outer step ran, the cosine also at the first)
and ``outer_step`` (1 where the outer optimizer stepped). A table of its own rather than columns of
``steps`` that would be NaN between syncs. Files written before it existed have no ``syncs`` group;
:func:`read_metrics` then gives none, and a resumed run adds it.

This module owns that contract: the file name, the format tag, the fields and when a run counts as
finished (:func:`run_finished`). It imports no torch, so that the report reads metrics files
without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

METRICS_FILE = "metrics.h5"  # in the run directory
METRICS_FORMAT = "hpc-localsgd/metrics"  # the root attribute ``format``
METRICS_FORMAT_VERSION = 1
TOTAL_STEPS_ATTR = "total_steps"  # root attribute: the step the run ends at

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
_INT_FIELDS = {"step", "bytes_sent", "sync_rounds", "synced", "outer_step"}
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
    ) -> None:
        """Create ``path``; or, with ``resume_after_step``, reopen it and drop the rows logged after
        that step (they were written after the checkpoint being resumed and will be logged again).
        ``levels``: the hierarchy's levels, for the per-level counters every row then carries."""
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.locking = locking
        self._pending: dict[str, list[dict[str, float]]] = {"steps": [], "evals": [], SYNCS: []}
        self._last_flush = time.monotonic()
        if resume_after_step is not None and self.path.exists():
            self._truncate_after(resume_after_step)
            return
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

    def _truncate_after(self, step: int) -> None:
        with h5py.File(self.path, "a", locking=self.locking) as f:
            if SYNCS not in f:  # written before per-sync measurements: they start with this resume
                _create_series(f, SYNCS, SYNC_FIELDS)
            for group in ("steps", "evals", SYNCS):
                keep = int(np.searchsorted(f[group]["step"][()], step, side="right"))
                for dataset in f[group].values():
                    dataset.resize((keep,))

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

    def flush(self) -> None:
        if not any(self._pending.values()):
            return
        with h5py.File(self.path, "a", locking=self.locking) as f:
            for group, rows in self._pending.items():
                if not rows:
                    continue
                for name, dataset in f[group].items():
                    values = np.asarray([row[name] for row in rows], dtype=dataset.dtype)
                    old = dataset.shape[0]
                    dataset.resize((old + len(values),))
                    dataset[old:] = values
                rows.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()


def _create_series(f: h5py.File, group: str, fields: Sequence[str]) -> None:
    g = f.create_group(group)
    for name in fields:
        g.create_dataset(
            name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64 if _is_int(name) else np.float64
        )


def read_metrics(path: str | Path, locking: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The series as numpy arrays: ``{"steps": {field: array}, "evals": {...}}``, and ``"syncs"``
    when the file has that table (files written before it existed do not)."""
    with h5py.File(path, "r", locking=locking) as f:
        groups = ("steps", "evals", SYNCS) if SYNCS in f else ("steps", "evals")
        return {group: {name: f[group][name][()] for name in f[group]} for group in groups}


def read_syncs(path: str | Path, locking: bool = False) -> dict[str, np.ndarray] | None:
    """The ``syncs`` table alone (``{field: array}``, rows every field has), or None for a file
    written before it existed."""
    with h5py.File(path, "r", locking=locking) as f:
        if SYNCS not in f:
            return None
        table = {name: f[SYNCS][name][()] for name in f[SYNCS]}
    rows = min((len(values) for values in table.values()), default=0)
    return {name: values[:rows] for name, values in table.items()}


def run_finished(eval_steps: Sequence[int] | np.ndarray, total_steps: int) -> bool:
    """Whether a run with these evaluation steps (``evals/step``, in order) and ``total_steps`` has
    finished: it has an evaluation, and its last one is at step ``total_steps`` or later.

    The training loop always evaluates at its last step and writes evaluation rows at once, so the
    last evaluation row says how far the run got. "At or later", not "at": a run resumed with a
    larger ``train.max_steps`` keeps the ``total_steps`` its metrics file was created with, and must
    not look unfinished forever (a sweep would run it again and again).
    """
    return len(eval_steps) > 0 and int(eval_steps[-1]) >= int(total_steps)


def metrics_file_finished(path: str | Path) -> bool:
    """:func:`run_finished` for a metrics file; False when it is missing, unreadable (a writer may
    be appending right now) or lacks ``evals/step`` or ``total_steps``."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r", locking=False) as f:
            return run_finished(f["evals/step"][()], int(f.attrs[TOTAL_STEPS_ATTR]))
    except (OSError, KeyError):
        return False
