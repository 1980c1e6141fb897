"""Communication accounting: rounds, bytes and seconds, counted where the collectives are issued."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass
class CommStats:
    """Totals since the start of training.

    sync_rounds   steps that communicated: one per synchronous step (all its gradient buckets)
                  and one per model average in local SGD.
    bytes_sent    payload bytes this rank contributed to allreduces. A ring allreduce moves
                  about 2·(m−1)/m of this over each rank's link.
    comm_seconds  wall time this rank spent blocked in collectives (not hidden by overlap).
    """

    sync_rounds: int = 0
    bytes_sent: int = 0
    comm_seconds: float = 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.comm_seconds += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def load(self, saved: dict[str, float]) -> None:
        self.sync_rounds = int(saved["sync_rounds"])
        self.bytes_sent = int(saved["bytes_sent"])
        self.comm_seconds = float(saved["comm_seconds"])
