"""The in-process ``ThreadGroup``: exact results computed from rank numbers, identical on every thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hpc_localsgd.comm.threads import ThreadCommunicator, ThreadGroup


def ramp(length: int = 10) -> torch.Tensor:
    """k − 5 for k = 0..length−1: negative entries exercise integer flooring."""
    return torch.arange(length, dtype=torch.int64) - 5


@pytest.mark.parametrize("size", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_allreduce_sum_and_average(size: int, dtype: torch.dtype) -> None:
    rank_sum = size * (size + 1) // 2  # Σ_r (r + 1)

    def worker(comm: ThreadCommunicator) -> tuple[torch.Tensor, torch.Tensor]:
        summed = (ramp() * (comm.rank + 1)).to(dtype)
        averaged = summed.clone()
        comm.allreduce_(summed, average=False)
        comm.allreduce_(averaged, average=True)
        return summed, averaged

    total = ramp() * rank_sum
    expected_average = total / size if dtype.is_floating_point else torch.div(total, size, rounding_mode="floor")
    for summed, averaged in ThreadGroup(size).run(worker):
        assert torch.equal(summed, total.to(dtype))
        assert torch.equal(averaged, expected_average.to(dtype))


def test_integer_average_floors() -> None:
    # ranks hold −3 and 0 (sum −3) and 1 and 2 (sum 3): means −1.5 → −2 and 1.5 → 1
    results = ThreadGroup(2).run(lambda comm: _average(comm, torch.tensor([[-3, 1], [0, 2]][comm.rank])))
    assert all(result.tolist() == [-2, 1] for result in results)


def _average(comm: ThreadCommunicator, buffer: torch.Tensor) -> torch.Tensor:
    comm.allreduce_(buffer, average=True)
    return buffer


def test_sum_is_in_rank_order_and_bitwise_identical() -> None:
    # float32 addition is not associative: 1e8 + 1 + (−1e8) + 1 depends on the order.
    contributions = np.array([1e8, 1.0, -1e8, 1.0], dtype=np.float32)
    in_rank_order = np.float32(0)
    for value in contributions:
        in_rank_order = np.float32(in_rank_order + value)
    results = ThreadGroup(4).run(lambda comm: _sum(comm, torch.tensor([contributions[comm.rank]])))
    assert in_rank_order != contributions.sum(dtype=np.float64)  # the order really matters here
    assert all(result.item() == in_rank_order for result in results)


def _sum(comm: ThreadCommunicator, buffer: torch.Tensor) -> torch.Tensor:
    comm.allreduce_(buffer, average=False)
    return buffer


def test_sixteen_bit_floats_average_exactly() -> None:
    def worker(comm: ThreadCommunicator) -> list[torch.Tensor]:
        buffers = [(torch.arange(64) * (comm.rank + 1)).to(dtype) for dtype in (torch.float16, torch.bfloat16)]
        for buffer in buffers:
            comm.allreduce_(buffer)
        return buffers

    for buffers in ThreadGroup(2).run(worker):
        for buffer in buffers:
            assert torch.equal(buffer.float(), torch.arange(64) * 1.5)  # (1 + 2)/2 · k, exact in 8 bits


def test_several_in_flight_then_waited_in_reverse() -> None:
    size = 3

    def worker(comm: ThreadCommunicator) -> list[torch.Tensor]:
        buffers = [torch.full((5,), float((comm.rank + 1) * (index + 1))) for index in range(4)]
        handles = [comm.iallreduce_(buffer, average=index % 2 == 0) for index, buffer in enumerate(buffers)]
        for handle in reversed(handles):
            handle.wait()
        return buffers

    for buffers in ThreadGroup(size).run(worker):
        for index, buffer in enumerate(buffers):
            total = 6 * (index + 1)  # Σ_r (r + 1)(index + 1) for r = 0, 1, 2
            assert torch.equal(buffer, torch.full((5,), total / size if index % 2 == 0 else float(total)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16])
def test_broadcast_from_a_non_zero_root(dtype: torch.dtype) -> None:
    def worker(comm: ThreadCommunicator) -> torch.Tensor:
        buffer = torch.full((7,), 10 * comm.rank + 7, dtype=dtype)
        comm.broadcast_(buffer, root=2)
        return buffer

    assert all(torch.equal(buffer, torch.full((7,), 27, dtype=dtype)) for buffer in ThreadGroup(3).run(worker))


def test_barrier_waits_for_every_rank() -> None:
    size = 4
    arrived: list[int] = []
    lock = threading.Lock()

    def worker(comm: ThreadCommunicator) -> int:
        with lock:
            arrived.append(comm.rank)
        comm.barrier()
        with lock:
            return len(arrived)

    assert ThreadGroup(size).run(worker) == [size] * size


def test_layout_of_each_rank() -> None:
    group = ThreadGroup(3)
    assert [(comm.rank, comm.size, comm.local_rank, comm.is_root) for comm in group.communicators] == [
        (0, 3, 0, True),
        (1, 3, 1, False),
        (2, 3, 2, False),
    ]
    assert {comm.name for comm in group.communicators} == {"threads"}


def test_ranks_calling_different_collectives_fail_instead_of_mixing() -> None:
    def worker(comm: ThreadCommunicator) -> None:
        buffer = torch.zeros(3)
        if comm.rank == 0:
            comm.broadcast_(buffer, root=0)
        else:
            comm.allreduce_(buffer)

    with pytest.raises(RuntimeError, match="different collectives"):
        ThreadGroup(2, timeout=10).run(worker)


def test_a_failing_rank_ends_the_group_instead_of_hanging_it() -> None:
    def worker(comm: ThreadCommunicator) -> None:
        if comm.rank == 1:
            raise KeyError("rank 1 broke")
        comm.allreduce_(torch.zeros(3))

    with pytest.raises(KeyError, match="rank 1 broke"):
        ThreadGroup(3, timeout=30).run(worker)


def test_non_contiguous_buffers_are_refused() -> None:
    comm = ThreadGroup(1).communicators[0]
    with pytest.raises(ValueError, match="contiguous"):
        comm.allreduce_(torch.zeros(4, 4).t())
