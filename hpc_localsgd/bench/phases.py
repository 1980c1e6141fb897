"""The bench's phases, in the order a run measures them: one entry each, which drives the runner, the
``--phases`` choices and their help. A new phase is a module ``bench/<name>.py`` with ``run(ctx)`` and
an entry here.

The registry names each phase's module rather than importing it: the command line builds its help
from these entries, and ``hpc-localsgd report`` must start where torch is missing or slow to import.
A phase's measurement is imported when it runs. For the same reason, and because the options import
this registry for their ``phases`` choices, nothing here imports the options or the context.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Plan(Protocol):
    """What a phase's availability may ask of the run's options (options.BenchOptions)."""

    def workers_of(self, world_size: int) -> int | None: ...


def _always(_options: Plan, _world_size: int) -> str | None:
    return None


def _without_two_workers(options: Plan, world_size: int) -> str | None:
    if options.workers_of(world_size) is not None:
        return None
    return (
        f"{world_size} rank(s) hold no two workers of 2 ranks; give --ranks-per-worker R, R dividing the "
        "world size and at most half of it"
    )


@dataclass(frozen=True)
class Phase:
    name: str  # also its module, bench/<name>.py, and the prefix of most of its figure ids
    description: str  # one line, for --phases
    # It compares with the bare no-communication limit, which is measured before the communicator starts.
    needs_bare_limit: bool = False
    # Why it cannot run with these options in a world of that many ranks (None: it can); the run then
    # records the phase as skipped, with the reason, instead of measuring it.
    unavailable: Callable[[Plan, int], str | None] = _always

    @property
    def run(self) -> Callable[[Any], None]:
        """The phase's measurement, ``run(ctx)`` of bench/<name>.py (ctx: the run's context.BenchContext):
        it appends its figures to the context and never prints."""
        module = importlib.import_module(f"{__package__}.{self.name}")
        measure: Callable[[Any], None] = module.run
        return measure


PHASES: tuple[Phase, ...] = (
    Phase("averaging", "AveragingEngine.sync against a raw allreduce of the same bytes"),
    Phase(
        "throughput",
        "local SGD at every H against the no-communication limits; all-reduce SGD against plain DDP and Horovod",
        needs_bare_limit=True,
    ),
    Phase(
        "streaming",
        "overlapped, fragmented and compressed syncs against the limits (best on a slow network)",
        needs_bare_limit=True,
    ),
    Phase("precision", "the training step alone per train.precision against a plain PyTorch loop"),
    Phase("simulation", "the simulated backend's batched workers against one model stepped W times"),
    Phase(
        "hierarchy",
        "local SGD with workers of several ranks against flat local SGD and all-reduce SGD",
        needs_bare_limit=True,
        unavailable=_without_two_workers,
    ),
    Phase("slowmo", "SlowMo's extra time per sync and extra memory"),
    Phase("checkpoint", "checkpoint write and read against raw h5py of the same bytes"),
)

PHASE_NAMES = tuple(phase.name for phase in PHASES)


def selected(names: tuple[str, ...]) -> list[Phase]:
    """The phases named, in the registry's order (the order a run measures them)."""
    return [phase for phase in PHASES if phase.name in names]


def describe_phases() -> str:
    """One line per phase, ``name: description``, for the help of ``--phases``."""
    return "; ".join(f"{phase.name}: {phase.description}" for phase in PHASES)
