"""What every phase of one run shares: the options, the ranks and the problem, the figures and skips
recorded so far, and the few loops that several phases measure (built on first use, closed once).

A phase appends ``Figure``s here and never prints: rank 0 prints and writes them all at the end. For a
language model every rate in samples/s gets its twin in tokens/s here, so that no phase has to know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..comm.base import Communicator
from ..launcher.env import LaunchEnvironment
from .options import BenchOptions
from .stats import Figure
from .workload import EngineLoop, Workload

# SlowMo's paper period; only the checkpoint phase trains with it (one step, no sync).
SLOWMO_SYNC_PERIOD = 12


@dataclass
class BenchContext:
    options: BenchOptions
    comm: Communicator
    launch: LaunchEnvironment
    device: torch.device
    workload: Workload
    # This rank's seconds per window training alone before any communication library started (empty when
    # no phase asked for the bare no-communication limit).
    bare_seconds: list[float] = field(default_factory=list)
    # Ranks per worker of the hierarchy phase (None: it does not run).
    ranks_per_worker: int | None = None
    figures: list[Figure] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Measured values the projection needs (compute time per step).
    facts: dict[str, float] = field(default_factory=dict)
    # The reference loops that ran (JSON: measurement.baselines).
    baselines_run: list[str] = field(default_factory=list)
    # What the precision phase's MFU divides by, for a language model (JSON: measurement.mfu).
    mfu: dict[str, Any] | None = None
    _shared_loops: dict[str, EngineLoop] = field(default_factory=dict)

    @property
    def samples_per_step(self) -> int:
        """Samples one step trains over all ranks."""
        return self.comm.size * self.options.batch

    def limit_loop(self) -> EngineLoop:
        """Local SGD that never averages: every rank trains alone with the communicator started and idle
        (the in-process no-communication limit); its engine also times a plain sync on demand."""
        return self._shared("limit", lambda: EngineLoop("limit", self.workload, self.comm, "local_sgd", None))

    def allreduce_loop(self) -> EngineLoop:
        """Method allreduce: the engine's bucketed gradient allreduce."""
        return self._shared("allreduce", lambda: EngineLoop("allreduce", self.workload, self.comm, "allreduce"))

    def slowmo_loop(self) -> EngineLoop:
        """Local SGD with SlowMo's outer step, at SlowMo's period (the slowmo and checkpoint phases)."""
        return self._shared(
            "slowmo",
            lambda: EngineLoop("slowmo", self.workload, self.comm, "local_sgd", SLOWMO_SYNC_PERIOD, outer="slowmo"),
        )

    def local_sgd_loops(self, periods: tuple[int, ...]) -> dict[int, EngineLoop]:
        """Plain local SGD at each period, one loop (and one engine) per period; the caller closes them."""
        return {h: EngineLoop(f"local_sgd_h{h}", self.workload, self.comm, "local_sgd", h) for h in periods}

    def _shared(self, name: str, build: Callable[[], EngineLoop]) -> EngineLoop:
        if name not in self._shared_loops:
            self._shared_loops[name] = build()
        return self._shared_loops[name]

    def close(self) -> None:
        for loop in self._shared_loops.values():
            loop.close()
        self._shared_loops.clear()

    def add(self, *figures: Figure) -> None:
        """Record ``figures``; for a language model each rate in samples/s is followed by its twin in tokens/s."""
        for figure in figures:
            self.figures.append(figure)
            twin = tokens_twin(figure, self.workload.tokens_per_sample)
            if twin is not None:
                self.figures.append(twin)

    def skip(self, figure_id: str, reason: str) -> None:
        self.skipped.append({"id": figure_id, "reason": reason})


def tokens_twin(figure: Figure, tokens_per_sample: int | None) -> Figure | None:
    """``<id with tokens_per_s for samples_per_s>``: the rate of a samples/s figure times the tokens in a sample,
    repetition by repetition (None for a classifier, or a figure of another unit). Never judged: a target is
    on a ratio, which tokens leave as it is."""
    if tokens_per_sample is None or figure.unit != "samples/s" or "samples_per_s" not in figure.id:
        return None
    return replace(
        figure,
        id=figure.id.replace("samples_per_s", "tokens_per_s"),
        description=f"{figure.description}; in tokens/s ({tokens_per_sample} tokens per sample)",
        unit="tokens/s",
        samples=[v * tokens_per_sample for v in figure.samples],
        target=None,
        notes=list(figure.notes),
    )
