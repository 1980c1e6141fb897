"""A projection, not a measurement: measured compute per step and bytes per sync, carried to
other interconnects and worker counts with the α–β model of a ring allreduce.

    t_allreduce(n, m) = 2(m−1)·α + 2(m−1)/m · n/β        (Thakur, Rabenseifner, Gropp 2005)
    step time         = t_compute + t_allreduce / H       (communication not overlapped)

α is the per-message latency and β the per-rank link bandwidth. All-reduce SGD sends the
gradients every step (H = 1); local SGD sends the parameters and BatchNorm statistics every
H steps. Overlap with backward (which all-reduce SGD can use and local SGD does not need) is
left out, so all-reduce SGD's figures are a lower bound on its efficiency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

LABEL = "projection, not a measurement"
WORKER_COUNTS = (8, 16, 32, 64, 128, 256)
PAYS_OFF_EFFICIENCY = 0.9


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


def project(
    compute_seconds: float,
    compute_source: str,
    bytes_per_sync: float,
    gradient_bytes: float,
    batch_per_worker: int,
    sync_periods: Sequence[int],
    interconnects: Sequence[Interconnect] = INTERCONNECTS,
    workers: Sequence[int] = WORKER_COUNTS,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    pays_off: list[dict[str, Any]] = []
    for link in interconnects:
        for m in workers:
            allreduce_comm = ring_allreduce_seconds(gradient_bytes, m, link)
            allreduce_step = compute_seconds + allreduce_comm
            cases = [("allreduce", 1, allreduce_comm)] + [
                ("local_sgd", h, ring_allreduce_seconds(bytes_per_sync, m, link) / h) for h in sorted(sync_periods)
            ]
            smallest: int | None = None
            for method, period, comm in cases:
                step = compute_seconds + comm
                efficiency = compute_seconds / step
                rows.append(
                    {
                        "interconnect": link.name,
                        "workers": m,
                        "method": method,
                        "sync_period": period,
                        "comm_seconds_per_step": comm,
                        "step_seconds": step,
                        "efficiency": efficiency,
                        "samples_per_s": m * batch_per_worker / step,
                        "speedup_over_allreduce": allreduce_step / step,
                    }
                )
                if method == "local_sgd" and smallest is None and efficiency >= PAYS_OFF_EFFICIENCY:
                    smallest = period
            pays_off.append(
                {
                    "interconnect": link.name,
                    "workers": m,
                    "allreduce_efficiency": compute_seconds / allreduce_step,
                    "smallest_sync_period_reaching_target": smallest,
                }
            )
    return {
        "label": LABEL,
        "model": "ring allreduce t = 2(m-1)*alpha + 2(m-1)/m * n/beta; step = t_compute + t_allreduce/H; "
        "no overlap of communication with compute",
        "compute_seconds_per_step": compute_seconds,
        "compute_source": compute_source,
        "bytes_per_sync": bytes_per_sync,
        "gradient_bytes_per_step": gradient_bytes,
        "batch_per_worker": batch_per_worker,
        "efficiency_target": PAYS_OFF_EFFICIENCY,
        "interconnects": [asdict(link) for link in interconnects],
        "workers": list(workers),
        "rows": rows,
        "pays_off": pays_off,
    }


def format_projection(projection: dict[str, Any]) -> str:
    """Efficiency (compute time over step time) per method and worker count, one block per interconnect."""
    workers = projection["workers"]
    lines = [
        f"{LABEL.upper()}: α–β ring allreduce, compute {projection['compute_seconds_per_step'] * 1e3:.1f} ms/step "
        f"({projection['compute_source']}), {projection['bytes_per_sync'] / 1e6:.1f} MB per sync, "
        f"{projection['gradient_bytes_per_step'] / 1e6:.1f} MB of gradients per all-reduce step"
    ]
    for link in projection["interconnects"]:
        lines.append(
            f"  {link['name']} (α = {link['alpha_seconds'] * 1e6:g} µs, "
            f"β = {link['beta_bytes_per_second'] / 1e9:g} GB/s): efficiency vs workers"
        )
        lines.append("    " + f"{'method':<16}" + "".join(f"{m:>8}" for m in workers))
        mine = [r for r in projection["rows"] if r["interconnect"] == link["name"]]
        keys = sorted({(r["method"] != "allreduce", r["sync_period"]) for r in mine})
        for local, period in keys:
            label = f"local SGD H={period}" if local else "all-reduce SGD"
            cells = {
                r["workers"]: r["efficiency"]
                for r in mine
                if (r["method"] != "allreduce", r["sync_period"]) == (local, period)
            }
            lines.append("    " + f"{label:<16}" + "".join(f"{100 * cells[m]:>7.0f}%" for m in workers))
        smallest = {
            p["workers"]: p["smallest_sync_period_reaching_target"]
            for p in projection["pays_off"]
            if p["interconnect"] == link["name"]
        }
        lines.append(
            "    "
            + f"{'H for ≥90%':<16}"
            + "".join(f"{('-' if smallest[m] is None else smallest[m]):>8}" for m in workers)
        )
    return "\n".join(lines)
