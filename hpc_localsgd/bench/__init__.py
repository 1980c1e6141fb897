"""``hpc-localsgd bench``: the package's communication and I/O against their floors and baselines.

One run, the same ranks, model and batches throughout, measures the phases of ``phases.PHASES`` that
were asked for, in its order (eight: averaging, throughput, streaming, precision, simulation,
hierarchy, slowmo, checkpoint; each ``bench/<phase>.py`` with ``run(ctx)``), then projects the
measured step time and bytes per sync onto real interconnects, worker counts and nodes of GPUs
joined by a fast fabric (``projection.py``). Output: a table, one ``hpc-localsgd-bench:`` line, and
JSON following ``schema.json`` (``report.py``).

Beside the phases: ``options.py`` (what a run measures, and the checks of bad input), ``context.py``
(what the phases of a run share), ``timing.py`` (alternating, interleaved and paired timing),
``workload.py`` (the model, batches and training loops), ``figures.py`` (figures several phases
report alike), ``stats.py`` (the figure type), ``rawio.py`` (raw h5py, the checkpoint phase's floor),
``baselines.py`` (plain DDP and Horovod loops), ``variants.py`` (the streaming configurations) and
``runner.py`` (one run on every rank).

Importing this package, its options or its phase registry does not import torch: the command line
builds its help from them for every verb. ``run_bench`` and the report's names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import BASELINES, BenchOptions
from .phases import PHASES

# Names whose modules import torch, loaded when first asked for.
_LAZY = {"run_bench": "runner", "SCHEMA_VERSION": "report", "SUMMARY_PREFIX": "report", "load_schema": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BASELINES", "PHASES", "SCHEMA_VERSION", "SUMMARY_PREFIX", "BenchOptions", "load_schema", "run_bench"]
