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


# An emulated link (launcher/slownet.py): an HTB rate limit in tc's notation, TCP between network
# namespaces. Its latency is taken as the projection's 10 Gb/s Ethernet's.
_TC_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
TCP_LATENCY_SECONDS = 30e-6  # per message


def emulated_link(rate: str) -> Interconnect:
    """The α–β model of an emulated link of ``rate`` (tc's notation, e.g. "1gbit") each way."""
    for unit, scale in _TC_UNITS.items():
        if rate.endswith(unit) and rate[: -len(unit)].replace(".", "", 1).isdigit():
            return Interconnect(f"emulated {rate}", TCP_LATENCY_SECONDS, float(rate[: -len(unit)]) * scale / 8)
    raise ValueError(f"not a tc rate such as 1gbit or 100mbit: {rate!r}")
