"""The α–β cost of a ring allreduce: the one network model the benchmark's projection and the
report's trade-off figure share (it lives below both, which must not import each other).

    t_allreduce(n, m) = 2(m−1)·α + 2(m−1)/m · n/β        (Thakur, Rabenseifner, Gropp 2005)

n bytes per rank, m ranks, α the per-message latency, β the per-rank link bandwidth: a ring
reduce-scatter then a ring allgather, each m−1 messages of n/m bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Interconnect:
    name: str
    alpha_seconds: float  # latency per message
    beta_bytes_per_second: float  # link bandwidth per rank


# Typical values for MPI over each network; measure yours with the OSU or nccl-tests benchmarks.
INTERCONNECTS = (
    Interconnect("10 Gb/s Ethernet (TCP)", 30e-6, 1.25e9),
    Interconnect("100 Gb/s InfiniBand EDR", 2e-6, 12.5e9),
)


def ring_allreduce_seconds(nbytes: float, workers: int, link: Interconnect) -> float:
    if workers <= 1:
        return 0.0
    return 2 * (workers - 1) * link.alpha_seconds + 2 * (workers - 1) / workers * nbytes / link.beta_bytes_per_second
