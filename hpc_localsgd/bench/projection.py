"""A projection, not a measurement: measured compute per step and bytes per sync, carried to
other interconnects and worker counts with the α–β model of a ring allreduce.

    t_allreduce(n, m) = 2(m−1)·α + 2(m−1)/m · n/β        (Thakur, Rabenseifner, Gropp 2005)
    step time         = t_compute + t_allreduce / H       (communication not overlapped)

α is the per-message latency and β the per-rank link bandwidth. All-reduce SGD sends the
gradients every step (H = 1); local SGD sends the parameters and BatchNorm statistics every
H steps. Overlap with backward (which all-reduce SGD can use and local SGD does not need) is
left out, so all-reduce SGD's figures are a lower bound on its efficiency.

Two fabrics (``project_two_fabrics``): nodes of p GPUs joined by a fast intra-node fabric,
N nodes joined by the inter-node network, one network port per node shared by its GPUs. An
allreduce over all N·p ranks is modelled as the two-level ring NCCL and Horovod's hierarchical
allreduce use: a ring reduce-scatter inside each node, a ring allreduce of the node's p shards
between the N nodes (their sum, n bytes, through the node's port), a ring allgather inside the node:

    t_two_level(n) = t_allreduce(n, p; intra) + t_allreduce(n, N; inter)

rather than one flat ring over the slower link, which carries the same bytes per node but pays
2(N·p − 1) inter-node latencies instead of 2(N − 1). Per step:

    all-reduce SGD                   t_two_level(gradients)
    flat local SGD, N·p workers      t_two_level(model) / H
    node-level local SGD, N workers  t_allreduce(gradients, p; intra) + t_two_level(model) / H

The node-level global average is the engine's: over all ranks, so over both fabrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

# The α–β ring model sits below bench and report, which both use it.
from ..algorithms.network import INTERCONNECTS, Interconnect, ring_allreduce_seconds

LABEL = "projection, not a measurement"
WORKER_COUNTS = (8, 16, 32, 64, 128, 256)
PAYS_OFF_EFFICIENCY = 0.9


# Typical values for an NVLink-class fabric inside a GPU node (order of magnitude of the allreduce
# bus bandwidth nccl-tests reports inside a node of V100/A100 GPUs), not measured here: replace them
# with nccl-tests' all_reduce_perf figures of the machine in question.
INTRA_NODE = Interconnect("NVLink-class intra-node fabric", 3e-6, 150e9)
NODE_COUNTS = (8, 16, 32, 64)
RANKS_PER_NODE = 8


def two_level_allreduce_seconds(
    nbytes: float, nodes: int, ranks_per_node: int, intra: Interconnect, inter: Interconnect
) -> float:
    """Reduce-scatter inside the node, allreduce between nodes, allgather inside the node (module docstring)."""
    return ring_allreduce_seconds(nbytes, ranks_per_node, intra) + ring_allreduce_seconds(nbytes, nodes, inter)


def project_two_fabrics(
    compute_seconds: float,
    bytes_per_sync: float,
    gradient_bytes: float,
    batch_per_rank: int,
    sync_periods: Sequence[int],
    ranks_per_node: int = RANKS_PER_NODE,
    intra: Interconnect = INTRA_NODE,
    interconnects: Sequence[Interconnect] = INTERCONNECTS,
    nodes: Sequence[int] = NODE_COUNTS,
) -> dict[str, Any]:
    """All-reduce SGD, flat local SGD (a worker per GPU) and node-level local SGD (a worker per node)
    on ``nodes`` × ``ranks_per_node`` GPUs, for every inter-node network."""
    p = ranks_per_node
    rows: list[dict[str, Any]] = []
    for link in interconnects:
        for n in nodes:
            allreduce_comm = two_level_allreduce_seconds(gradient_bytes, n, p, intra, link)
            node_gradients = ring_allreduce_seconds(gradient_bytes, p, intra)
            average = two_level_allreduce_seconds(bytes_per_sync, n, p, intra, link)
            # Bytes each node's port sends per step: a ring allreduce of n bytes between N nodes.
            through_port = 2 * (n - 1) / n
            cases = [("allreduce", 1, n * p, allreduce_comm, through_port * gradient_bytes)]
            for h in sorted(sync_periods):
                cases.append(("local_sgd", h, n * p, average / h, through_port * bytes_per_sync / h))
                cases.append(("node_local_sgd", h, n, node_gradients + average / h, through_port * bytes_per_sync / h))
            for method, period, workers, comm, port_bytes in cases:
                step = compute_seconds + comm
                rows.append(
                    {
                        "interconnect": link.name,
                        "nodes": n,
                        "workers": workers,
                        "method": method,
                        "sync_period": period,
                        "comm_seconds_per_step": comm,
                        "inter_node_bytes_per_step": port_bytes,
                        "step_seconds": step,
                        "efficiency": compute_seconds / step,
                        "samples_per_s": n * p * batch_per_rank / step,
                        "speedup_over_allreduce": (compute_seconds + allreduce_comm) / step,
                    }
                )
    return {
        "label": LABEL,
        "model": "two-level ring t(n) = t_ring(n, p; intra) + t_ring(n, N; inter), one port per node; "
        "allreduce: t(gradients); local_sgd: t(model)/H; node_local_sgd: t_ring(gradients, p; intra) + "
        "t(model)/H; no overlap of communication with compute",
        "ranks_per_node": p,
        "intra_node": asdict(intra),
        "interconnects": [asdict(link) for link in interconnects],
        "nodes": list(nodes),
        "rows": rows,
    }


def project(
    compute_seconds: float,
    compute_source: str,
    bytes_per_sync: float,
    gradient_bytes: float,
    batch_per_worker: int,
    sync_periods: Sequence[int],
    interconnects: Sequence[Interconnect] = INTERCONNECTS,
    workers: Sequence[int] = WORKER_COUNTS,
    ranks_per_node: int = RANKS_PER_NODE,
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
        "two_fabrics": project_two_fabrics(
            compute_seconds,
            bytes_per_sync,
            gradient_bytes,
            batch_per_worker,
            sync_periods,
            ranks_per_node,
            interconnects=interconnects,
        ),
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
    two = projection.get("two_fabrics")
    if two is not None:
        lines.extend(format_two_fabrics(two))
    return "\n".join(lines)


def format_two_fabrics(two: dict[str, Any]) -> list[str]:
    """Efficiency per method and node count, one block per inter-node network."""
    p, nodes, intra = two["ranks_per_node"], two["nodes"], two["intra_node"]
    lines = [
        f"{LABEL.upper()}: two fabrics, nodes of {p} GPUs on the {intra['name']} "
        f"(α = {intra['alpha_seconds'] * 1e6:g} µs, β = {intra['beta_bytes_per_second'] / 1e9:g} GB/s, typical "
        "values), nodes joined by the network below (one port per node); two-level ring allreduce"
    ]
    for link in two["interconnects"]:
        lines.append(
            f"  {link['name']} between nodes (α = {link['alpha_seconds'] * 1e6:g} µs, "
            f"β = {link['beta_bytes_per_second'] / 1e9:g} GB/s): efficiency vs nodes × {p} GPUs"
        )
        lines.append("    " + f"{'method':<30}" + "".join(f"{f'{n}×{p}':>8}" for n in nodes))
        mine = [r for r in two["rows"] if r["interconnect"] == link["name"]]
        order = {"allreduce": 0, "local_sgd": 1, "node_local_sgd": 2}
        keys = sorted({(r["sync_period"] if r["method"] != "allreduce" else 0, order[r["method"]]) for r in mine})
        for period, kind in keys:
            method = next(name for name, index in order.items() if index == kind)
            label = {
                "allreduce": "all-reduce SGD",
                "local_sgd": f"local SGD H={period}, GPU workers",
                "node_local_sgd": f"local SGD H={period}, node workers",
            }[method]
            cells = {
                r["nodes"]: r["efficiency"]
                for r in mine
                if r["method"] == method and (method == "allreduce" or r["sync_period"] == period)
            }
            lines.append("    " + f"{label:<30}" + "".join(f"{100 * cells[n]:>7.0f}%" for n in nodes))
    return lines
