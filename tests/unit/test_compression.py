"""Compressed averaging with error feedback (algorithms/codecs.py, compression.py) and the allgather beneath it.

Expected values come from ``tests/compression_reference.py`` (numpy, written from the definitions) or
from the maths of error feedback; ranks are threads (``comm/threads.py``) or simulated workers.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from hpc_localsgd.algorithms import codecs
from hpc_localsgd.algorithms.codecs import CODECS, INT8_BLOCK, INT8_CHUNK, decode, encode, encoded_bytes
from hpc_localsgd.algorithms.compression import CompressedAverager, link_bytes
from hpc_localsgd.comm import SingleCommunicator, ThreadCommunicator, ThreadGroup
from hpc_localsgd.comm.simulated import SimulatedCommunicator
from hpc_localsgd.config.schema import GradientCompression, SyncCompression
from tests.compression_reference import compressed_average, expected_bytes, int8_scales, quantize, rank_update

LOSSY = ("bf16", "fp16", "int8")
RANKS = 4


# --- codecs -------------------------------------------------------------------------------------
def test_the_codecs_are_the_configurations_sync_compressions() -> None:
    assert CODECS == typing.get_args(SyncCompression)
    assert set(typing.get_args(GradientCompression)) <= set(CODECS)  # gradients travel through the same codecs


@pytest.mark.parametrize("codec", CODECS)
def test_encoding_matches_the_reference_bit_for_bit(codec: str) -> None:
    values = rank_update(0, 5 * INT8_BLOCK + 3)
    decoded = decode(codec, encode(codec, torch.from_numpy(values)), len(values))  # type: ignore[arg-type]
    assert torch.equal(decoded, torch.from_numpy(quantize(codec, values)))


@pytest.mark.parametrize("codec", CODECS)
def test_rows_are_encoded_independently(codec: str) -> None:
    rows = np.stack([rank_update(rank, 1000) for rank in range(3)])
    encoded = encode(codec, torch.from_numpy(rows))  # type: ignore[arg-type]
    assert encoded.shape == (3, encoded_bytes(codec, 1000))  # type: ignore[arg-type]
    decoded = decode(codec, encoded, 1000)  # type: ignore[arg-type]
    assert torch.equal(decoded, torch.from_numpy(np.stack([quantize(codec, row) for row in rows])))


@pytest.mark.parametrize(("codec", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_sixteen_bit_codecs_are_exact_for_representable_values(codec: str, dtype: torch.dtype) -> None:
    representable = (torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).float()
    decoded = decode(codec, encode(codec, representable), 10_000)  # type: ignore[arg-type]
    assert torch.equal(decoded, representable)


def test_fp16_saturates_instead_of_overflowing() -> None:
    values = torch.tensor([7e4, -1e6, 1.0])
    assert decode("fp16", encode("fp16", values), 3).tolist() == [65504.0, -65504.0, 1.0]


def test_int8_error_is_at_most_half_a_scale_per_block() -> None:
    values = torch.from_numpy(rank_update(3, 40 * INT8_BLOCK + 17))
    encoded = encode("int8", values)
    blocks = -(-values.numel() // INT8_BLOCK)
    levels = encoded[4 * blocks :].view(torch.int8)
    assert levels.abs().max().item() == 127  # the block maximum maps to ±127
    scales = torch.from_numpy(int8_scales(values.numpy()))
    bound = scales.repeat_interleave(INT8_BLOCK)[: values.numel()] / 2
    error = (values - decode("int8", encoded, values.numel())).abs()
    # Half a step from rounding to nearest, plus the float32 rounding of q·s (below 2^-23 of the block maximum).
    assert torch.all(error <= bound * (1 + 2**-16))
    assert torch.all(error[INT8_BLOCK : 2 * INT8_BLOCK] == 0)  # rank_update's block of zeros: scale 0, exact


@pytest.mark.parametrize("numel", [1, 49, 50, 255, 256, 257, 1000, 100_003])
@pytest.mark.parametrize("codec", CODECS)
def test_byte_counts_are_exact(codec: str, numel: int) -> None:
    encoded = encode(codec, torch.zeros(numel))  # type: ignore[arg-type]
    assert encoded.dtype == torch.uint8
    assert encoded.numel() == encoded_bytes(codec, numel) == expected_bytes(codec, numel)  # type: ignore[arg-type]
    assert CompressedAverager(codec, (numel,), False).bytes_per_sync == expected_bytes(codec, numel)  # type: ignore[arg-type]


def test_compression_ratios() -> None:
    """bf16/fp16 send exactly half of fp32; int8 with its scales at most 0.27 of it from 50 elements on."""
    for numel in range(1, 3000):
        fp32 = encoded_bytes("none", numel)
        assert fp32 == 4 * numel
        assert 2 * encoded_bytes("bf16", numel) == 2 * encoded_bytes("fp16", numel) == fp32
        assert (encoded_bytes("int8", numel) <= 0.27 * fp32) == (numel >= 50), numel
    assert encoded_bytes("int8", 25_000_000) / encoded_bytes("none", 25_000_000) == pytest.approx(0.25 + 1 / 256)


def test_link_bytes() -> None:
    # Ring allreduce of fp32: 2(m−1)/m of the buffer; allgather of the encoded update between 2: (m−1)× it;
    # two-phase among m ≥ 3: (m−1) chunk rows out in the all-to-all and (m−1) in the allgather.
    assert link_bytes("none", 1000, 4) == 1.5 * 4000
    assert link_bytes("int8", 1024, 2) == 1024 + 16
    assert link_bytes("bf16", 1000, 4) == 2 * 3 * 2 * 256  # chunks of one block, the longest 256
    assert link_bytes("int8", 25_600_000, 64) == 2 * 63 * (1563 * 256 + 4 * 1563)  # ⌈100000 / 64⌉ blocks a chunk
    ratio = link_bytes("int8", 25_600_000, 64) / link_bytes("none", 25_600_000, 64)
    assert ratio == pytest.approx(0.254, abs=0.003)  # int8's saving holds at 64 ranks


def test_unknown_codec_and_wrong_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown sync compression 'int4'"):
        encoded_bytes("int4", 10)  # type: ignore[arg-type]
    averager = CompressedAverager("int8", (10,), True)
    with pytest.raises(ValueError, match="float32 updates of shape"):
        averager.average_(SingleCommunicator(), torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="workers"):
        averager.average_(SimulatedCommunicator(2), torch.zeros(10))


# --- the allgather ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64])
def test_threads_allgather_gives_rows_in_rank_order(dtype: torch.dtype) -> None:
    def gather(comm: ThreadCommunicator) -> torch.Tensor:
        buffer = torch.full((3, 5), comm.rank + 1, dtype=dtype)
        output = torch.empty((comm.size, 3, 5), dtype=dtype)
        comm.iallgather(buffer, output).wait()
        return output

    expected = torch.arange(1, RANKS + 1).to(dtype).view(RANKS, 1, 1).expand(RANKS, 3, 5)
    for output in ThreadGroup(RANKS).run(gather):
        assert torch.equal(output, expected)


def test_allgather_in_a_group_of_threads() -> None:
    def gather(comm: ThreadCommunicator) -> list[float]:
        group = comm.split(2)
        output = torch.empty(2, 1)
        group.iallgather(torch.tensor([float(comm.rank)]), output).wait()
        return output.view(-1).tolist()

    assert ThreadGroup(RANKS).run(gather) == [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]


def test_allgather_refuses_a_wrong_output() -> None:
    with pytest.raises(ValueError, match=r"needs a \(1, 4\) torch.float32 output"):
        SingleCommunicator().iallgather(torch.zeros(4), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_threads_alltoall_sends_row_r_to_rank_r(dtype: torch.dtype) -> None:
    def exchange(comm: ThreadCommunicator) -> torch.Tensor:
        rows = torch.stack([torch.full((2, 3), 10 * comm.rank + to, dtype=dtype) for to in range(comm.size)])
        output = torch.empty_like(rows)
        comm.ialltoall(rows, output).wait()
        return output

    for rank, output in enumerate(ThreadGroup(RANKS).run(exchange)):
        expected = torch.stack([torch.full((2, 3), 10 * source + rank, dtype=dtype) for source in range(RANKS)])
        assert torch.equal(output, expected), rank


def test_alltoall_on_one_rank_refusals_and_the_simulated_backend() -> None:
    output = torch.empty(1, 3)
    SingleCommunicator().ialltoall(torch.tensor([[1.0, 2.0, 3.0]]), output).wait()
    assert output.tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="sends one row per rank"):
        SingleCommunicator().ialltoall(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs an output alike"):
        SingleCommunicator().ialltoall(torch.zeros(1, 3), torch.zeros(1, 4))
    with pytest.raises(NotImplementedError, match="simulated backend has no all-to-all"):
        SimulatedCommunicator(4).ialltoall(torch.zeros(4, 2), torch.zeros(4, 2))


def test_single_and_simulated_allgathers() -> None:
    output = torch.empty(1, 3)
    SingleCommunicator().iallgather(torch.tensor([1.0, 2.0, 3.0]), output).wait()
    assert output.tolist() == [[1.0, 2.0, 3.0]]
    stacked = torch.arange(8.0).view(4, 2)
    gathered = torch.empty(4, 2)
    SimulatedCommunicator(4).iallgather(stacked, gathered).wait()  # every worker's row is already here
    assert torch.equal(gathered, stacked)


# --- the compressed average ---------------------------------------------------------------------
NUMEL = 3 * INT8_BLOCK + 100


def thread_averages(codec: str, feedback: bool, syncs: int, ranks: int = RANKS) -> list[list[torch.Tensor]]:
    """Every rank's average after each of ``syncs`` syncs of its fixed update ``rank_update(rank)``."""

    def run(comm: ThreadCommunicator) -> list[torch.Tensor]:
        averager = CompressedAverager(codec, (NUMEL,), feedback)  # type: ignore[arg-type]
        results = []
        for _ in range(syncs):
            update = torch.from_numpy(rank_update(comm.rank, NUMEL))
            averager.average_(comm, update)
            results.append(update)
        return results

    return ThreadGroup(ranks).run(run)


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("codec", CODECS)
def test_every_rank_gets_the_reference_average_bit_for_bit(codec: str, feedback: bool) -> None:
    per_rank = thread_averages(codec, feedback, syncs=3)
    updates = [rank_update(rank, NUMEL) for rank in range(RANKS)]
    errors = [np.zeros(NUMEL, dtype=np.float32)] * RANKS if feedback else None
    average_error = None
    for sync in range(3):
        expected, errors, average_error = compressed_average(codec, updates, errors, average_error)
        for rank in range(RANKS):
            assert torch.equal(per_rank[rank][sync], torch.from_numpy(expected)), (rank, sync)
    # Deterministic: a second run gives the very same bits.
    again = thread_averages(codec, feedback, syncs=3)
    assert all(torch.equal(a, b) for ra, rb in zip(per_rank, again, strict=True) for a, b in zip(ra, rb, strict=True))


@pytest.mark.parametrize("chunk", ["cpu", "three blocks"])
@pytest.mark.parametrize("feedback", [True, False])
def test_int8_across_its_working_chunks_matches_the_reference_bit_for_bit(
    feedback: bool, chunk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 encodes and decodes in chunks of whole blocks (the size depends on the device): a vector of
    several chunks and a short last block gives the reference's average and errors, sync after sync,
    whatever the chunk size."""
    if chunk != "cpu":
        monkeypatch.setattr(codecs, "_chunk_size", lambda device: 3 * INT8_BLOCK)
    numel = 2 * INT8_CHUNK + 3 * INT8_BLOCK + 5
    updates = [rank_update(rank, numel) for rank in range(2)]

    def run(comm: ThreadCommunicator) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        averager = CompressedAverager("int8", (numel,), feedback)
        results = []
        for _ in range(2):
            update = torch.from_numpy(updates[comm.rank].copy())
            averager.average_(comm, update)
            results.append(update)
        return results, averager.error

    got = ThreadGroup(2).run(run)
    errors = [np.zeros(numel, dtype=np.float32)] * 2 if feedback else None
    for sync in range(2):
        expected, errors, _ = compressed_average("int8", updates, errors)
        for rank in range(2):
            assert torch.equal(got[rank][0][sync], torch.from_numpy(expected)), (rank, sync)
    for rank in range(2):
        error = got[rank][1]
        assert (error is None) == (errors is None)
        if errors is not None and error is not None:
            assert torch.equal(error, torch.from_numpy(errors[rank])), rank


@pytest.mark.parametrize("codec", LOSSY)
def test_simulated_workers_agree_with_threads_bit_for_bit(codec: str) -> None:
    threads = thread_averages(codec, True, syncs=3)
    averager = CompressedAverager(codec, (RANKS, NUMEL), True)  # type: ignore[arg-type]
    world = SimulatedCommunicator(RANKS)
    for sync in range(3):
        stacked = torch.stack([torch.from_numpy(rank_update(rank, NUMEL)) for rank in range(RANKS)])
        averager.average_(world, stacked)
        for rank in range(RANKS):
            assert torch.equal(stacked[rank], threads[rank][sync])


@pytest.mark.parametrize("codec", LOSSY)
def test_simulated_groups_average_within_each_group(codec: str) -> None:
    averager = CompressedAverager(codec, (RANKS, NUMEL), True)  # type: ignore[arg-type]
    pairs = SimulatedCommunicator(RANKS).split(2)
    updates = [rank_update(rank, NUMEL) for rank in range(RANKS)]
    stacked = torch.from_numpy(np.stack(updates))
    averager.average_(pairs, stacked)
    for first in (0, 2):
        expected, _, _ = compressed_average(codec, updates[first : first + 2], [np.zeros(NUMEL, np.float32)] * 2)
        assert torch.equal(stacked[first], torch.from_numpy(expected))
        assert torch.equal(stacked[first + 1], torch.from_numpy(expected))


def test_a_simulated_group_of_one_worker_averages_each_row_to_its_own_quantized_update() -> None:
    """Workers as large as a simulation's world leave groups of one between them: each row is Q(Δ + e)."""
    averager = CompressedAverager("int8", (RANKS, NUMEL), True)
    alone = SimulatedCommunicator(RANKS).split_across(RANKS)
    assert alone.size == 1
    updates = [rank_update(rank, NUMEL) for rank in range(RANKS)]
    stacked = torch.from_numpy(np.stack(updates))
    averager.average_(alone, stacked)
    for rank in range(RANKS):
        assert torch.equal(stacked[rank], torch.from_numpy(quantize("int8", updates[rank]))), rank


def test_one_rank_averages_to_its_own_quantized_update() -> None:
    averager = CompressedAverager("int8", (NUMEL,), True)
    update = torch.from_numpy(rank_update(0, NUMEL))
    averager.average_(SingleCommunicator(), update)
    assert torch.equal(update, torch.from_numpy(quantize("int8", rank_update(0, NUMEL))))
    assert averager.error is not None
    assert torch.equal(averager.error, torch.from_numpy(rank_update(0, NUMEL)) - update)


@pytest.mark.parametrize("codec", ["int8", "bf16"])
def test_error_feedback_makes_the_time_average_converge_to_the_exact_average(codec: str) -> None:
    """Each rank sends Q(Δ + e) with e ← Δ + e − Q(Δ + e), so over T syncs of a fixed Δ it sends
    T·Δ − e_T in total: the time average of the compressed averages is off by avg_r e_r,T / T, and e
    stays within half a quantization step of Δ + e (for int8 below max|Δ|/253 per block)."""
    syncs = 400
    updates = [rank_update(rank, NUMEL).astype(np.float64) for rank in range(RANKS)]
    exact = sum(updates) / RANKS

    def run(comm: ThreadCommunicator, feedback: bool) -> tuple[float, list[float]]:
        averager = CompressedAverager(codec, (NUMEL,), feedback)  # type: ignore[arg-type]
        total = np.zeros(NUMEL)
        largest_error = 0.0
        gaps = []
        for sync in range(1, syncs + 1):
            update = torch.from_numpy(rank_update(comm.rank, NUMEL))
            averager.average_(comm, update)
            total += update.double().numpy()
            if averager.error is not None:
                largest_error = max(largest_error, averager.error.abs().max().item())
            gaps.append(float(np.abs(total / sync - exact).max()))
        return largest_error, gaps

    with_feedback = ThreadGroup(RANKS).run(lambda comm: run(comm, True))
    without = ThreadGroup(RANKS).run(lambda comm: run(comm, False))
    largest_update = max(np.abs(u).max() for u in updates)
    step_bound = largest_update / 253 if codec == "int8" else largest_update * 2**-8
    for largest_error, gaps in with_feedback:
        assert largest_error <= step_bound  # bounded: never accumulates
        assert gaps[-1] <= step_bound / syncs * 1.01 + 1e-9  # |avg e_T| / T, plus the float sums' rounding
        assert gaps[-1] < gaps[9] / 20  # shrinking like 1/T
    # Without error feedback the bias of Q(Δ) stays, whatever T: the same gap every sync.
    _, gaps_without = without[0]
    assert gaps_without[-1] == pytest.approx(gaps_without[0], rel=1e-6)
    assert gaps_without[-1] > 100 * with_feedback[0][1][-1]


def test_error_state_round_trips_through_a_checkpoint() -> None:
    averager = CompressedAverager("int8", (NUMEL,), True)
    averager.average_(SingleCommunicator(), torch.from_numpy(rank_update(1, NUMEL)))
    saved = {name: t.clone() for name, t in averager.state_tensors().items()}
    assert set(saved) == {"error"} and saved["error"].abs().max() > 0
    resumed = CompressedAverager("int8", (NUMEL,), True)
    resumed.load_state_tensors(saved)
    first, second = (torch.from_numpy(rank_update(2, NUMEL)) for _ in range(2))
    averager.average_(SingleCommunicator(), first)
    resumed.average_(SingleCommunicator(), second)
    assert torch.equal(first, second)
    assert CompressedAverager("none", (NUMEL,), True).state_tensors() == {}
    assert CompressedAverager("bf16", (NUMEL,), False).state_tensors() == {}


def held_bytes(averager: CompressedAverager) -> int:
    """What an averager really holds: its staging buffers and its error-feedback state."""
    tensors = [*averager._buffers.values(), *averager.state_tensors().values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("ranks", [2, 4])
def test_memory_is_counted_exactly(ranks: int) -> None:
    """After a sync: gathered (2 ranks) the error, its encoded row and every rank's; two-phase (4) the
    error, 3·4 + 1 chunk rows and the re-encoding's error of a chunk (rank 0's, the longest: counted)."""

    def run(comm: ThreadCommunicator) -> tuple[int, int]:
        averager = CompressedAverager("int8", (1000,), True)
        averager.average_(comm, torch.from_numpy(rank_update(comm.rank, 1000)))
        return held_bytes(averager), averager.memory_bytes(ranks)

    held = ThreadGroup(ranks).run(run)
    assert held[0][0] == held[0][1]
    assert all(mine <= counted for mine, counted in held)
    if ranks == 2:
        assert held[0][1] == 4 * 1000 + 3 * encoded_bytes("int8", 1000)
    else:  # chunks of one block (the last 232 elements): rows of 260 bytes, rank 0's error of 256 elements
        assert held[0][1] == 4 * 1000 + 13 * encoded_bytes("int8", 256) + 4 * 256
    assert CompressedAverager("none", (1000,), False).memory_bytes(4) == 0
    simulated = CompressedAverager("bf16", (8, 1000), True)
    simulated.average_(SimulatedCommunicator(8), torch.from_numpy(np.stack([rank_update(r, 1000) for r in range(8)])))
    # 8 workers' errors, encoded rows and gathered rows, and (two-phase among 8) the re-encoding's errors.
    assert simulated.memory_bytes(8) == held_bytes(simulated) == 8 * 4 * 1000 + 16 * 2000 + 8 * 4 * 1000
