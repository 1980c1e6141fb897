"""Groups of consecutive ranks (``Communicator.split``) on the in-process backends: exact values built
from rank numbers, sums over each group only, in the group's rank order.

The MPI backends' groups are checked under ``mpirun -np 4`` (tests/mpi/test_collectives.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hpc_localsgd.comm import Communicator, SingleCommunicator, make_communicator
from hpc_localsgd.comm.simulated import SimulatedCommunicator
from hpc_localsgd.comm.threads import ThreadCommunicator, ThreadGroup
from hpc_localsgd.launcher.env import LaunchEnvironment, WorldLayout


def members(rank: int, ranks: int) -> range:
    """The world ranks of ``rank``'s group of ``ranks`` consecutive ranks."""
    first = rank - rank % ranks
    return range(first, first + ranks)


def ramp(length: int = 10) -> torch.Tensor:
    """k − 5 for k = 0..length−1: negative entries exercise integer flooring."""
    return torch.arange(length, dtype=torch.int64) - 5


def expected_reduction(rank: int, ranks: int, dtype: torch.dtype, average: bool) -> torch.Tensor:
    total = ramp() * sum(r + 1 for r in members(rank, ranks))
    if not average:
        return total.to(dtype)
    return (total / ranks if dtype.is_floating_point else torch.div(total, ranks, rounding_mode="floor")).to(dtype)


@pytest.mark.parametrize(("world", "ranks"), [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_thread_groups_reduce_and_broadcast_within_each_group(world: int, ranks: int, dtype: torch.dtype) -> None:
    root = 1  # a rank of the group, not of the world

    def worker(comm: ThreadCommunicator) -> dict[str, object]:
        group = comm.split(ranks)
        summed = (ramp() * (comm.rank + 1)).to(dtype)
        averaged = summed.clone()
        everyone = torch.tensor([comm.rank + 1], dtype=dtype)
        group.allreduce_(summed, average=False)
        comm.allreduce_(everyone, average=False)  # the world's collectives go on between the group's
        group.allreduce_(averaged, average=True)
        broadcast = torch.full((4,), 10 * comm.rank + 7, dtype=dtype)
        group.broadcast_(broadcast, root=root)
        group.barrier()
        layout = (group.rank, group.size, group.local_rank, group.layout.local_size, group.name, group.replicas)
        return {"summed": summed, "averaged": averaged, "everyone": everyone, "broadcast": broadcast, "layout": layout}

    for rank, result in enumerate(ThreadGroup(world, timeout=30).run(worker)):
        assert torch.equal(result["summed"], expected_reduction(rank, ranks, dtype, average=False))
        assert torch.equal(result["averaged"], expected_reduction(rank, ranks, dtype, average=True))
        assert torch.equal(result["everyone"], torch.tensor([world * (world + 1) // 2], dtype=dtype))
        source = members(rank, ranks)[root]
        assert torch.equal(result["broadcast"], torch.full((4,), 10 * source + 7, dtype=dtype))
        assert result["layout"] == (rank % ranks, ranks, rank % ranks, ranks, "threads", 1)


def test_thread_groups_in_flight_with_the_world_and_with_two_levels() -> None:
    # Groups of 2 and of 4 in a world of 8, their collectives interleaved with the world's and with
    # each other's, handles waited in another order than started.
    def worker(comm: ThreadCommunicator) -> list[float]:
        pairs, quads = comm.split(2), comm.split(4)
        buffers = [torch.tensor([float(comm.rank + 1)]) for _ in range(4)]
        handles = [
            pairs.iallreduce_(buffers[0], average=False),
            comm.iallreduce_(buffers[1], average=False),
            quads.iallreduce_(buffers[2], average=False),
            pairs.split(1).iallreduce_(buffers[3], average=False),  # a group of one, split from a group
        ]
        for handle in reversed(handles):
            handle.wait()
        return [buffer.item() for buffer in buffers]

    for rank, sums in enumerate(ThreadGroup(8, timeout=30).run(worker)):
        assert sums == [
            sum(r + 1 for r in members(rank, 2)),
            36.0,
            sum(r + 1 for r in members(rank, 4)),
            rank + 1.0,
        ]


def test_every_thread_of_a_group_gets_the_same_group() -> None:
    groups = ThreadGroup(6, timeout=30).run(lambda comm: comm.split(3)._group)  # type: ignore[attr-defined]
    assert groups[0] is groups[1] is groups[2] and groups[3] is groups[4] is groups[5]
    assert groups[0] is not groups[3] and groups[0].size == 3


def test_thread_group_sums_in_the_groups_rank_order_like_the_simulation() -> None:
    # float32 addition is not associative: 1e8 + 1 + (−1e8) + 1 depends on the order, and the
    # simulated backend sums a group's rows in the same order, so both agree bit for bit.
    contributions = np.array([5.0, 1e8, 1.0, -1e8, 1.0, 3.0, 7.0, -2.0], dtype=np.float32)

    def worker(comm: ThreadCommunicator) -> float:
        buffer = torch.tensor([contributions[comm.rank]])
        comm.split(4).allreduce_(buffer, average=False)
        return buffer.item()

    stacked = torch.from_numpy(contributions).reshape(8, 1).clone()
    SimulatedCommunicator(8).split(4).allreduce_(stacked, average=False)
    in_order = np.float32(0)
    for value in contributions[4:]:
        in_order = np.float32(in_order + value)
    threads = ThreadGroup(8, timeout=30).run(worker)
    assert threads == stacked.reshape(-1).tolist()
    assert threads[4:] == [in_order] * 4


def test_split_into_the_whole_world_is_the_communicator_itself_and_into_one_rank_a_no_op() -> None:
    def worker(comm: ThreadCommunicator) -> tuple[bool, float, float, tuple[int, int]]:
        alone = comm.split(1)
        buffer = torch.tensor([float(comm.rank)])
        alone.allreduce_(buffer, average=True)
        broadcast = torch.tensor([float(comm.rank)])
        alone.broadcast_(broadcast, root=0)
        return comm.split(comm.size) is comm, buffer.item(), broadcast.item(), (alone.rank, alone.size)

    assert ThreadGroup(3, timeout=30).run(worker) == [(True, float(r), float(r), (0, 1)) for r in range(3)]


def world_of(size: int) -> list[Communicator]:
    """One communicator of every in-process kind with ``size`` ranks (for the threads, rank 0's)."""
    return [ThreadGroup(size).communicators[0], SimulatedCommunicator(size)]


@pytest.mark.parametrize("ranks", [0, -2, 3, 5, 8])
def test_group_sizes_that_do_not_divide_the_world_are_refused(ranks: int) -> None:
    for comm in [*world_of(4), SingleCommunicator()]:
        with pytest.raises(ValueError, match=rf"communicator of {comm.size} ranks into groups of {ranks} ranks"):
            comm.split(ranks)


def test_a_refused_split_leaves_the_threads_able_to_go_on() -> None:
    # Every thread refuses the same size before any round, so none waits for the others.
    def worker(comm: ThreadCommunicator) -> float:
        with pytest.raises(ValueError, match="groups of 3 ranks"):
            comm.split(3)
        buffer = torch.tensor([1.0])
        comm.split(2).allreduce_(buffer, average=False)
        return buffer.item()

    assert ThreadGroup(4, timeout=30).run(worker) == [2.0] * 4


def test_threads_splitting_into_different_sizes_fail_instead_of_mixing() -> None:
    with pytest.raises(RuntimeError, match="different collectives"):
        ThreadGroup(4, timeout=10).run(lambda comm: comm.split(2 if comm.rank == 0 else 1))


def test_a_rank_failing_ends_its_group_partners_at_once() -> None:
    # Rank 2 waits in its group's round for rank 3, which has failed: it must not wait for the timeout.
    started = time.monotonic()
    entered = threading.Event()

    def worker(comm: ThreadCommunicator) -> None:
        group = comm.split(2)
        if comm.rank == 3:
            entered.wait(10)
            raise KeyError("rank 3 broke")
        if comm.rank == 2:
            entered.set()
        group.allreduce_(torch.zeros(2))

    with pytest.raises(KeyError, match="rank 3 broke"):
        ThreadGroup(4, timeout=60).run(worker)
    assert time.monotonic() - started < 30


def test_single_process_splits_only_into_itself() -> None:
    comm = SingleCommunicator()
    assert comm.split(1) is comm
    with pytest.raises(ValueError, match="groups of 2 ranks"):
        comm.split(2)


@pytest.mark.parametrize(("workers", "ranks"), [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_simulated_groups_reduce_within_blocks_of_rows(workers: int, ranks: int, dtype: torch.dtype) -> None:
    group = SimulatedCommunicator(workers).split(ranks)
    assert (group.rank, group.size, group.replicas, group.name) == (0, ranks, workers, "simulated")
    # Rows are workers; the columns 1..10 of a wider storage (not contiguous, like the engine's views).
    storage = torch.zeros(workers, 12, dtype=dtype)
    for average in (False, True):
        storage[:, 1:11] = torch.stack([ramp() * (worker + 1) for worker in range(workers)]).to(dtype)
        group.allreduce_(storage[:, 1:11], average=average)
        for worker in range(workers):
            assert torch.equal(storage[worker, 1:11], expected_reduction(worker, ranks, dtype, average))
        assert not storage[:, 0].any() and not storage[:, 11].any()  # outside untouched
    rows = torch.stack([torch.full((3,), 10 * worker + 7) for worker in range(workers)]).to(dtype)
    group.broadcast_(rows, root=1)
    for worker in range(workers):
        assert torch.equal(rows[worker], torch.full((3,), 10 * members(worker, ranks)[1] + 7, dtype=dtype))


def test_simulated_groups_interleave_with_the_world() -> None:
    world = SimulatedCommunicator(4)
    pairs = world.split(2)
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    pairs.allreduce_(values, average=False)  # 3, 3, 7, 7
    world.allreduce_(values, average=True)  # 5 everywhere
    values += torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    pairs.allreduce_(values, average=True)  # 5.5, 5.5, 7.5, 7.5
    assert values.reshape(-1).tolist() == [5.5, 5.5, 7.5, 7.5]
    assert world.split(4) is world
    alone = world.split(1)
    alone.allreduce_(values, average=False)
    alone.broadcast_(values, root=0)
    assert values.reshape(-1).tolist() == [5.5, 5.5, 7.5, 7.5] and alone.size == 1


def test_simulated_groups_sum_sixteen_bit_floats_in_float32() -> None:
    # Per group of 4: float16 summed in order would give 2048 + 1 = 2048, + 1 = 2048, + 2 = 2050.
    values = torch.tensor([[2048.0], [1.0], [1.0], [2.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float16)
    SimulatedCommunicator(8).split(4).allreduce_(values, average=False)
    assert values.reshape(-1).tolist() == [2052.0] * 4 + [10.0] * 4
    # bfloat16 (8 significant bits): summed in order, 256 + 1 rounds back to 256 each time and the mean
    # is 64; in float32 the sum is 259 and the mean 64.75, rounded once, to 65. The second group is exact.
    halves = torch.tensor([[256.0], [1.0], [1.0], [1.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.bfloat16)
    SimulatedCommunicator(8).split(4).allreduce_(halves, average=True)
    assert halves.reshape(-1).tolist() == [65.0] * 4 + [2.5] * 4


def test_simulated_groups_check_shapes_and_roots() -> None:
    group = SimulatedCommunicator(6).split(3)
    with pytest.raises(ValueError, match="stacked over its 6 workers"):
        group.allreduce_(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="root 3"):
        group.broadcast_(torch.zeros(6, 2), root=3)


def test_make_communicator_checks_the_announced_group_sizes() -> None:
    alone = LaunchEnvironment("none", WorldLayout(0, 1, 0, 1, 0, 1))
    assert make_communicator("single", alone, torch.device("cpu"), group_sizes=[1]).name == "single"
    with pytest.raises(ValueError, match="communicator of 1 ranks into groups of 2 ranks"):
        make_communicator("single", alone, torch.device("cpu"), group_sizes=[2])


# Communicators across the groups (``split_across``): rank j of every group of ``ranks`` consecutive ranks.


def across(rank: int, ranks: int, world: int) -> range:
    """The world ranks at ``rank``'s position in every group of ``ranks`` consecutive ranks."""
    return range(rank % ranks, world, ranks)


def expected_across(rank: int, ranks: int, world: int, dtype: torch.dtype, average: bool) -> torch.Tensor:
    total = ramp() * sum(r + 1 for r in across(rank, ranks, world))
    size = world // ranks
    if not average:
        return total.to(dtype)
    return (total / size if dtype.is_floating_point else torch.div(total, size, rounding_mode="floor")).to(dtype)


@pytest.mark.parametrize(("world", "ranks"), [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_threads_across_groups_reduce_and_broadcast_over_one_position(
    world: int, ranks: int, dtype: torch.dtype
) -> None:
    root = 1  # a rank of the communicator across, not of the world

    def worker(comm: ThreadCommunicator) -> dict[str, object]:
        group = comm.split(ranks)
        across_groups = comm.split_across(ranks)
        summed = (ramp() * (comm.rank + 1)).to(dtype)
        averaged = summed.clone()
        in_group = torch.tensor([comm.rank + 1], dtype=dtype)
        everyone = torch.tensor([comm.rank + 1], dtype=dtype)
        across_groups.allreduce_(summed, average=False)
        group.allreduce_(in_group, average=False)  # the group's and the world's go on between
        comm.allreduce_(everyone, average=False)
        across_groups.allreduce_(averaged, average=True)
        broadcast = torch.full((4,), 10 * comm.rank + 7, dtype=dtype)
        across_groups.broadcast_(broadcast, root=root)
        across_groups.barrier()
        layout = (
            across_groups.rank,
            across_groups.size,
            across_groups.local_rank,
            across_groups.layout.local_size,
            across_groups.name,
            across_groups.replicas,
        )
        return {
            "summed": summed,
            "averaged": averaged,
            "in_group": in_group,
            "everyone": everyone,
            "broadcast": broadcast,
            "layout": layout,
        }

    for rank, result in enumerate(ThreadGroup(world, timeout=30).run(worker)):
        assert torch.equal(result["summed"], expected_across(rank, ranks, world, dtype, average=False))
        assert torch.equal(result["averaged"], expected_across(rank, ranks, world, dtype, average=True))
        assert torch.equal(result["in_group"], torch.tensor([sum(r + 1 for r in members(rank, ranks))], dtype=dtype))
        assert torch.equal(result["everyone"], torch.tensor([world * (world + 1) // 2], dtype=dtype))
        source = across(rank, ranks, world)[root]
        assert torch.equal(result["broadcast"], torch.full((4,), 10 * source + 7, dtype=dtype))
        assert result["layout"] == (rank // ranks, world // ranks, rank // ranks, world // ranks, "threads", 1)


@pytest.mark.parametrize(("world", "ranks"), [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_simulated_across_groups_reduce_over_stride_classes_of_rows(world: int, ranks: int, dtype: torch.dtype) -> None:
    across_groups = SimulatedCommunicator(world).split_across(ranks)
    assert (across_groups.rank, across_groups.size, across_groups.replicas, across_groups.name) == (
        0,
        world // ranks,
        world,
        "simulated",
    )
    storage = torch.zeros(world, 12, dtype=dtype)  # columns 1..10 of a wider storage: rows not contiguous
    for average in (False, True):
        storage[:, 1:11] = torch.stack([ramp() * (worker + 1) for worker in range(world)]).to(dtype)
        across_groups.allreduce_(storage[:, 1:11], average=average)
        for worker in range(world):
            assert torch.equal(storage[worker, 1:11], expected_across(worker, ranks, world, dtype, average))
        assert not storage[:, 0].any() and not storage[:, 11].any()
    rows = torch.stack([torch.full((3,), 10 * worker + 7) for worker in range(world)]).to(dtype)
    across_groups.broadcast_(rows, root=1)
    for worker in range(world):
        assert torch.equal(rows[worker], torch.full((3,), 10 * across(worker, ranks, world)[1] + 7, dtype=dtype))


def test_simulated_across_groups_interleave_with_groups_and_the_world() -> None:
    world = SimulatedCommunicator(4)
    pairs, across_pairs = world.split(2), world.split_across(2)
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    across_pairs.allreduce_(values, average=False)  # rows 0+2, 1+3: 4, 6, 4, 6
    pairs.allreduce_(values, average=False)  # 10 everywhere
    values += torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    across_pairs.allreduce_(values, average=True)  # 11, 12, 11, 12
    world.allreduce_(values, average=False)  # 46 everywhere
    values += torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    across_pairs.broadcast_(values, root=1)  # from rows 2 and 3
    assert values.reshape(-1).tolist() == [48.0, 49.0, 48.0, 49.0]


def test_simulated_across_groups_sum_sixteen_bit_floats_in_float32() -> None:
    # Rows 0, 2, 4, 6 and 1, 3, 5, 7 (across groups of 2): float16 summed in order would give 2048.
    values = torch.tensor([[2048.0], [1.0], [1.0], [2.0], [1.0], [2.0], [2.0], [4.0]], dtype=torch.float16)
    SimulatedCommunicator(8).split_across(2).allreduce_(values, average=False)
    assert values.reshape(-1).tolist() == [2052.0, 9.0] * 4


def float32_sums_that_depend_on_order(world: int) -> np.ndarray:
    """float32 values whose sums depend on the order of additions (1e8 + 1 rounds back to 1e8)."""
    pattern = np.array([5.0, 1e8, 1.0, -1e8, 1.0, 3.0, 7.0, -2.0, 1e8, 1.0, -1e8, 0.5], dtype=np.float32)
    return pattern[:world].copy()


def nested_sums(comm: Communicator, buffer: torch.Tensor, ranks: int) -> None:
    """Every kind of communicator in turn on one buffer: across, the group, across inside the group when
    it splits, the group of the across, and the world (sums only, so values keep depending on order)."""
    comm.split_across(ranks).allreduce_(buffer, average=False)
    buffer.mul_(1.5)
    comm.split(ranks).allreduce_(buffer, average=True)
    across_groups = comm.split_across(ranks)
    if across_groups.size % 2 == 0:  # consecutive pairs of the communicator across
        buffer.add_(1.0)
        across_groups.split(2).allreduce_(buffer, average=False)
    if ranks % 2 == 0:  # across pairs inside the group
        buffer.sub_(3.0)
        comm.split(ranks).split_across(2).allreduce_(buffer, average=False)
    comm.allreduce_(buffer, average=True)


@pytest.mark.parametrize(("world", "ranks"), [(4, 2), (6, 2), (6, 3), (8, 2), (8, 4), (12, 2)])
def test_simulated_across_groups_equal_threads_bit_for_bit(world: int, ranks: int) -> None:
    contributions = float32_sums_that_depend_on_order(world)

    def worker(comm: ThreadCommunicator) -> list[float]:
        first = torch.tensor([contributions[comm.rank]])
        comm.split_across(ranks).allreduce_(first, average=False)
        nested = torch.tensor([contributions[comm.rank]])
        nested_sums(comm, nested, ranks)
        return [first.item(), nested.item()]

    threads = ThreadGroup(world, timeout=30).run(worker)
    simulated = SimulatedCommunicator(world)
    first = torch.from_numpy(contributions).reshape(world, 1).clone()
    simulated.split_across(ranks).allreduce_(first, average=False)
    nested = torch.from_numpy(contributions).reshape(world, 1).clone()
    nested_sums(simulated, nested, ranks)
    assert [result[0] for result in threads] == first.reshape(-1).tolist()
    assert [result[1] for result in threads] == nested.reshape(-1).tolist()
    # Summed in rank order of the class, which the pattern makes observable: 5 + 1 + 1e8 (+ ...) in float32.
    in_order = np.float32(0)
    for value in contributions[0::ranks]:
        in_order = np.float32(in_order + value)
    assert threads[0][0] == in_order


def test_across_one_rank_per_group_is_the_communicator_itself_and_across_the_whole_world_one_rank() -> None:
    def worker(comm: ThreadCommunicator) -> tuple[bool, float, tuple[int, int]]:
        alone = comm.split_across(comm.size)
        buffer = torch.tensor([float(comm.rank)])
        alone.allreduce_(buffer, average=True)
        alone.broadcast_(buffer, root=0)
        return comm.split_across(1) is comm, buffer.item(), (alone.rank, alone.size)

    assert ThreadGroup(3, timeout=30).run(worker) == [(True, float(r), (0, 1)) for r in range(3)]
    simulated = SimulatedCommunicator(3)
    assert simulated.split_across(1) is simulated
    alone = simulated.split_across(3)
    values = torch.tensor([[1.0], [2.0], [3.0]])
    alone.allreduce_(values, average=False)
    alone.broadcast_(values, root=0)
    assert (alone.size, alone.replicas, values.reshape(-1).tolist()) == (1, 3, [1.0, 2.0, 3.0])
    single = SingleCommunicator()
    assert single.split_across(1) is single


@pytest.mark.parametrize("ranks", [0, -2, 3, 5, 8])
def test_sizes_across_that_do_not_divide_the_world_are_refused(ranks: int) -> None:
    for comm in [*world_of(4), SingleCommunicator()]:
        with pytest.raises(ValueError, match=rf"communicator of {comm.size} ranks across groups of {ranks} ranks"):
            comm.split_across(ranks)


def test_a_refused_split_across_leaves_the_threads_able_to_go_on() -> None:
    def worker(comm: ThreadCommunicator) -> float:
        with pytest.raises(ValueError, match="across groups of 3 ranks"):
            comm.split_across(3)
        buffer = torch.tensor([1.0])
        comm.split_across(2).allreduce_(buffer, average=False)
        return buffer.item()

    assert ThreadGroup(4, timeout=30).run(worker) == [2.0] * 4


def test_threads_splitting_across_and_into_groups_at_once_fail_instead_of_mixing() -> None:
    with pytest.raises(RuntimeError, match="different collectives"):
        ThreadGroup(4, timeout=10).run(lambda comm: comm.split(2) if comm.rank == 0 else comm.split_across(2))


def test_every_thread_across_the_groups_gets_the_same_communicator() -> None:
    groups = ThreadGroup(6, timeout=30).run(lambda comm: comm.split_across(3)._group)  # type: ignore[attr-defined]
    assert groups[0] is groups[3] and groups[1] is groups[4] and groups[2] is groups[5]
    assert len({id(group) for group in groups}) == 3 and groups[0].size == 2


def test_make_communicator_checks_the_announced_sizes_across() -> None:
    alone = LaunchEnvironment("none", WorldLayout(0, 1, 0, 1, 0, 1))
    assert make_communicator("single", alone, torch.device("cpu"), across_sizes=[1]).name == "single"
    with pytest.raises(ValueError, match="communicator of 1 ranks across groups of 2 ranks"):
        make_communicator("single", alone, torch.device("cpu"), across_sizes=[2])
