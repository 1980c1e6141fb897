"""The α–β projection's formulas against values worked out by hand here (a small, round problem).

The problem: gradients 8 MB, one model average 10 MB, 0.1 s of compute per step, 8 samples per GPU;
an intra-node fabric of α = 1 µs, β = 100 GB/s; a network of α = 10 µs, β = 10 GB/s; 2 nodes of 4 GPUs.
"""

from __future__ import annotations

import pytest

from hpc_localsgd.bench.projection import (
    LABEL,
    Interconnect,
    format_projection,
    project,
    project_two_fabrics,
    ring_allreduce_seconds,
    two_level_allreduce_seconds,
)

FAST = Interconnect("fast", 1e-6, 100e9)
NETWORK = Interconnect("network", 10e-6, 10e9)
GRADIENTS, MODEL, COMPUTE, BATCH = 8e6, 1e7, 0.1, 8


def test_ring_allreduce() -> None:
    # 2(m−1)α + 2(m−1)/m · n/β with m = 4: 6 · 10 µs + 1.5 · 8e6 / 10e9 = 60 µs + 1.2 ms
    assert ring_allreduce_seconds(GRADIENTS, 4, NETWORK) == pytest.approx(1.26e-3, rel=1e-12)
    assert ring_allreduce_seconds(GRADIENTS, 1, NETWORK) == 0.0


def test_two_level_allreduce_is_a_ring_inside_the_node_plus_a_ring_between_nodes() -> None:
    # inside (p = 4): 6 µs + 1.5 · 8e6 / 100e9 = 126 µs; between (N = 2): 20 µs + 1 · 8e6 / 10e9 = 820 µs
    assert two_level_allreduce_seconds(GRADIENTS, 2, 4, FAST, NETWORK) == pytest.approx(9.46e-4, rel=1e-12)
    # the model: 6 µs + 150 µs inside, 20 µs + 1 ms between
    assert two_level_allreduce_seconds(MODEL, 2, 4, FAST, NETWORK) == pytest.approx(1.176e-3, rel=1e-12)


def rows_by_method(projection: dict) -> dict[str, dict]:
    return {row["method"]: row for row in projection["rows"]}


def test_two_fabrics_all_reduce_flat_and_node_level_local_sgd() -> None:
    projection = project_two_fabrics(
        COMPUTE, MODEL, GRADIENTS, BATCH, [2], ranks_per_node=4, intra=FAST, interconnects=[NETWORK], nodes=[2]
    )
    assert projection["label"] == LABEL and projection["ranks_per_node"] == 4
    rows = rows_by_method(projection)
    assert len(projection["rows"]) == 3
    # all-reduce SGD: the two-level allreduce of the gradients every step
    allreduce = rows["allreduce"]
    assert (allreduce["workers"], allreduce["sync_period"]) == (8, 1)
    assert allreduce["comm_seconds_per_step"] == pytest.approx(9.46e-4, rel=1e-12)
    assert allreduce["step_seconds"] == pytest.approx(0.100946, rel=1e-12)
    assert allreduce["efficiency"] == pytest.approx(0.1 / 0.100946, rel=1e-12)
    assert allreduce["samples_per_s"] == pytest.approx(64 / 0.100946, rel=1e-12)
    assert allreduce["speedup_over_allreduce"] == pytest.approx(1.0, rel=1e-12)
    # each node's port sends 2(N−1)/N = 1 times the gradients per step
    assert allreduce["inter_node_bytes_per_step"] == pytest.approx(8e6, rel=1e-12)
    # flat local SGD, 8 workers: the two-level average of the model every 2 steps
    flat = rows["local_sgd"]
    assert (flat["workers"], flat["sync_period"]) == (8, 2)
    assert flat["comm_seconds_per_step"] == pytest.approx(5.88e-4, rel=1e-12)
    assert flat["efficiency"] == pytest.approx(0.1 / 0.100588, rel=1e-12)
    assert flat["speedup_over_allreduce"] == pytest.approx(0.100946 / 0.100588, rel=1e-12)
    assert flat["inter_node_bytes_per_step"] == pytest.approx(5e6, rel=1e-12)
    # node-level local SGD, 2 workers: gradients inside the node every step (126 µs) plus the same average
    node = rows["node_local_sgd"]
    assert (node["workers"], node["sync_period"]) == (2, 2)
    assert node["comm_seconds_per_step"] == pytest.approx(7.14e-4, rel=1e-12)
    assert node["efficiency"] == pytest.approx(0.1 / 0.100714, rel=1e-12)
    assert node["samples_per_s"] == pytest.approx(64 / 0.100714, rel=1e-12)
    assert node["inter_node_bytes_per_step"] == pytest.approx(5e6, rel=1e-12)


def test_projection_carries_the_two_fabrics_and_prints_them_labelled() -> None:
    projection = project(COMPUTE, "given", MODEL, GRADIENTS, BATCH, [2], interconnects=[NETWORK], workers=[8])
    # one flat ring over 8 workers: 14 · 10 µs + 1.75 · 1e7 / 10e9 = 1.89 ms, every 2 steps
    local = next(row for row in projection["rows"] if row["method"] == "local_sgd")
    assert local["comm_seconds_per_step"] == pytest.approx(9.45e-4, rel=1e-12)
    two = projection["two_fabrics"]
    assert two["ranks_per_node"] == 8 and 32 in two["nodes"]
    assert {row["method"] for row in two["rows"]} == {"allreduce", "local_sgd", "node_local_sgd"}
    text = format_projection(projection)
    assert text.count(LABEL.upper()) == 2
    assert "32×8" in text and "local SGD H=2, node workers" in text and "local SGD H=2, GPU workers" in text


# --- the streaming phase's projection beside its measurement on an emulated link --------------------
def test_emulated_link_reads_tc_rates() -> None:
    from hpc_localsgd.algorithms.network import emulated_link

    assert emulated_link("1gbit").beta_bytes_per_second == 1.25e8
    assert emulated_link("100mbit").beta_bytes_per_second == 1.25e7
    assert emulated_link("2.5gbit").alpha_seconds == 30e-6
    with pytest.raises(ValueError, match="not a tc rate such as 1gbit"):
        emulated_link("fast")


def test_streaming_projection_worked_by_hand() -> None:
    from hpc_localsgd.algorithms.accounting import SyncTraffic
    from hpc_localsgd.algorithms.network import emulated_link
    from hpc_localsgd.bench.streaming import projected_efficiency
    from hpc_localsgd.bench.variants import SyncVariant

    link, n = emulated_link("1gbit"), 1_000_000
    traffic = SyncTraffic((n,), 0)
    # fp32 between 2 ranks: a ring allreduce moves 4n bytes through the link, plus 2 latencies; every 4 steps.
    sync = 4 * n / 1.25e8 + 2 * 30e-6
    assert projected_efficiency(SyncVariant("h4", 4), traffic, 2, 1.0, link) == pytest.approx(1 / (1 + sync / 4))
    # Overlapped by a step of 1 s, the 0.032 s sync is hidden entirely; by a step of 0.01 s, all but 0.01 s.
    assert projected_efficiency(SyncVariant("d", 4, 1), traffic, 2, 1.0, link) == 1.0
    short = projected_efficiency(SyncVariant("d", 4, 1), traffic, 2, 0.01, link)
    assert short == pytest.approx(0.01 / (0.01 + (sync - 0.01) / 4))
    # int8 between 2: the allgather of n bytes and 4 per block of 256 (3907 blocks).
    int8 = (n + 4 * 3907) / 1.25e8 + 2 * 30e-6
    got = projected_efficiency(SyncVariant("q", 1, compression="int8"), traffic, 2, 1.0, link)
    assert got == pytest.approx(1 / (1 + int8))
    # Two fragments of n/2, each synced once per H = 4 with the BN statistics (1000 bytes) beside fragment 0.
    halves = SyncTraffic((n // 2, n // 2), 1000)
    fragment = 2 * n / 1.25e8 + 2 * 30e-6
    rest = 1000 / 1.25e8 + 2 * 30e-6
    got = projected_efficiency(SyncVariant("f", 4, 0, 2), halves, 2, 1.0, link)
    assert got == pytest.approx(1 / (1 + (2 * fragment + rest) / 4))
    assert projected_efficiency(SyncVariant("one", 4), traffic, 1, 1.0, link) == 1.0
    # All-reduce SGD with bf16 gradients between 2: each step an allgather of 2n bytes (no overlap modelled).
    bf16 = SyncVariant("g", 1, method="allreduce", gradient_compression="bf16")
    assert bf16.codec == "bf16" and bf16.describe() == "all-reduce SGD, bf16 gradient buckets"
    got = projected_efficiency(bf16, SyncTraffic((n,), 0), 2, 1.0, link)  # one step's n gradients
    assert got == pytest.approx(1 / (1 + 2 * n / 1.25e8 + 2 * 30e-6))
    # A sync_compression setting does not leak into all-reduce's gradients, nor the gradients' into local SGD.
    assert SyncVariant("a", 1, compression="int8", method="allreduce").codec == "none"
    assert SyncVariant("l", 1, gradient_compression="bf16").codec == "none"
