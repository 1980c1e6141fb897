"""Communication accounting: rounds, bytes and seconds, counted where the collectives are issued."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The level of a flat run's every collective, and of the top of a hierarchy: all ranks, over the
# slowest network (see algorithms/hierarchy.py for the others: ``worker``, ``level1``...).
GLOBAL = "global"


@dataclass(frozen=True)
class SyncTraffic:
    """What an engine puts on the link, from its layout (exact, before any run).

    fragment_elements         the elements of each fragment's update (one fragment: the whole sync span)
    rest_bytes                fp32 bytes that travel uncompressed with fragment 0 (BN statistics, averaged
                              optimizer state) when the update is sent as Δ; 0 for a plain average
    bytes_per_sync            what a rank sends per global sync of the whole model, scales included
    gradient_bytes_per_step   what a rank sends per synchronous step (its gradients; 0 without them)
    """

    fragment_elements: tuple[int, ...]
    rest_bytes: int
    bytes_per_sync: int = 0
    gradient_bytes_per_step: int = 0


@dataclass
class CommStats:
    """Totals since the start of training.

    sync_rounds   steps that communicated: one per synchronous step (all its gradient buckets)
                  and one per model average in local SGD.
    bytes_sent    payload bytes this rank contributed to allreduces. A ring allreduce moves
                  about 2·(m−1)/m of this over each rank's link.
    comm_seconds  wall time this rank spent blocked in collectives (not hidden by overlap).
    rounds_by_level, bytes_by_level
                  the same two counts per level of the hierarchy (``global``, and ``worker``,
                  ``level1``... when ranks form workers): what crosses the slow network is ``global``.
    """

    sync_rounds: int = 0
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    rounds_by_level: dict[str, int] = field(default_factory=dict)
    bytes_by_level: dict[str, int] = field(default_factory=dict)

    def count(self, level: str, nbytes: int) -> None:
        """One round of ``level`` in which this rank contributed ``nbytes``."""
        self.sync_rounds += 1
        self.bytes_sent += nbytes
        self.rounds_by_level[level] = self.rounds_by_level.get(level, 0) + 1
        self.bytes_by_level[level] = self.bytes_by_level.get(level, 0) + nbytes

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.comm_seconds += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        """Flat, for a checkpoint's JSON: the totals, then ``rounds.<level>`` and ``bytes.<level>``."""
        flat: dict[str, float] = {
            "sync_rounds": self.sync_rounds,
            "bytes_sent": self.bytes_sent,
            "comm_seconds": self.comm_seconds,
        }
        flat.update({f"rounds.{level}": n for level, n in self.rounds_by_level.items()})
        flat.update({f"bytes.{level}": n for level, n in self.bytes_by_level.items()})
        return flat

    def load(self, saved: dict[str, float]) -> None:
        self.sync_rounds = int(saved["sync_rounds"])
        self.bytes_sent = int(saved["bytes_sent"])
        self.comm_seconds = float(saved["comm_seconds"])
        self.rounds_by_level = {k[len("rounds.") :]: int(v) for k, v in saved.items() if k.startswith("rounds.")}
        self.bytes_by_level = {k[len("bytes.") :]: int(v) for k, v in saved.items() if k.startswith("bytes.")}
        if not self.rounds_by_level and self.sync_rounds:
            # Written before counts per level existed: every collective of a flat run is global.
            self.rounds_by_level, self.bytes_by_level = {GLOBAL: self.sync_rounds}, {GLOBAL: self.bytes_sent}


def human_bytes(n: float) -> str:
    """Decimal units, as network and filesystem throughput are quoted: ``512 B``, ``20.0 KB``."""
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} {units[-1]}"
