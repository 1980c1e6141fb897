"""Run under ``mpirun -np N``: exercises one backend's collectives and checks exact values.

Every buffer is built from the rank number, so the expected results follow from sums over
ranks 0..N−1 (written out below with numpy, independently of the code under test).
Prints ``OK <backend> rank <r> of <N> (<the backend's collective_path>)`` on success; exits 1 naming the
first wrong value
otherwise, or 2 with ``hpc-localsgd: error: <message>`` for a ``UserError`` (and for a refused
``--split``).

Allgathers are checked too (rows in rank order, bit for bit, any dtype), and where the mpi backend polls
its large allreduces, that they sum in rank order, bit for bit. With ``--compression`` it checks
only allgathers and the compressed average (``algorithms/compression.py``) of every codec, with and
without error feedback, over three syncs, bit for bit against the numpy reference
(``tests/compression_reference.py``) and identical on every rank.

With ``--groups`` it also checks the communicators of groups of consecutive ranks (``split``) of
sizes 2, N and 1, where they divide N: sums over the group's ranks only, broadcasts from a rank of
the group, and group collectives in flight together with the world's. With ``--across`` it checks the
communicators across groups of 2 (``split_across``): sums over ranks j, j + 2, ... only, broadcasts from
a rank of that communicator, and an allreduce of the consecutive group started while one across is in
flight.

    mpirun -np 2 python tests/mpi/collectives_driver.py --backend mpi
    mpirun -np 4 --oversubscribe python tests/mpi/collectives_driver.py --backend horovod --groups --across
    mpirun -np 2 python tests/mpi/collectives_driver.py --backend torch --compression
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback

import numpy as np
import torch

from hpc_localsgd.algorithms.codecs import CODECS
from hpc_localsgd.algorithms.compression import CompressedAverager
from hpc_localsgd.comm import Communicator, make_communicator
from hpc_localsgd.errors import UserError, print_line
from hpc_localsgd.launcher.env import detect_launch
from tests.compression_reference import compressed_average, rank_update

EXACT_DTYPES = (torch.float32, torch.float64, torch.int64)
# An odd length checks that nothing assumes a multiple of a vector width; the large one is ~1M elements.
# Sums stay below 2^24 (exact in float32, whatever the order of additions) for up to 7 ranks.
LENGTHS = (1, 1000, 1_048_577)


class CheckFailed(Exception):
    pass


def expect_equal(what: str, actual: torch.Tensor, expected: np.ndarray) -> None:
    expected_tensor = torch.from_numpy(np.ascontiguousarray(expected)).to(actual.dtype)
    if actual.shape != expected_tensor.shape:
        raise CheckFailed(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected_tensor.shape)}")
    if not torch.equal(actual.cpu(), expected_tensor):
        wrong = (actual.cpu() != expected_tensor).nonzero()
        raise CheckFailed(
            f"{what}: {len(wrong)} wrong values, first at {wrong[0].tolist()}: "
            f"got {actual.cpu().reshape(-1)[:4].tolist()}..., "
            f"expected {expected.reshape(-1)[:4].tolist()}..."
        )


def signed_ramp(length: int) -> np.ndarray:
    """k − length//2 for k = 0..length−1: negative values too, so integer flooring is exercised."""
    return np.arange(length, dtype=np.int64) - length // 2


def check_allreduce(comm: Communicator, device: torch.device) -> None:
    rank, size = comm.rank, comm.size
    rank_sum = size * (size + 1) // 2  # Σ_r (r + 1)
    for dtype in EXACT_DTYPES:
        for length in LENGTHS:
            ramp = signed_ramp(length)
            for average in (False, True):
                buffer = torch.from_numpy(ramp * (rank + 1)).to(device=device, dtype=dtype)
                comm.allreduce_(buffer, average=average)
                total = ramp * rank_sum
                if not average:
                    expected = total
                elif dtype.is_floating_point:
                    expected = total.astype(np.float64) / size
                else:
                    expected = total // size  # numpy's // floors, also for negatives
                expect_equal(f"allreduce {'average' if average else 'sum'} {dtype} length {length}", buffer, expected)


def check_sum_in_rank_order(comm: Communicator, device: torch.device) -> None:
    """Where the mpi backend polls its allreduces (two exchanges, each rank summing its part), a large
    float32 sum is ((x_0 + x_1) + x_2) + … in rank order, bit for bit: values of mixed magnitudes, where
    another order rounds differently, on a length that splits unevenly between the ranks."""
    length = 1_048_579
    rows = [np.random.default_rng(rank).standard_normal(length).astype(np.float32) for rank in range(comm.size)]
    for rank, row in enumerate(rows):
        row *= np.float32(10.0 ** (3 * (rank % 3)))  # 1, 1e3, 1e6, 1, ...: the order shows in the rounding
    buffer = torch.from_numpy(rows[comm.rank].copy()).to(device)
    comm.allreduce_(buffer, average=False)
    expected = rows[0].copy()
    for row in rows[1:]:
        expected += row  # float32, one rank at a time
    expect_equal("polled allreduce summed in rank order", buffer, expected)


def check_sixteen_bit_average(comm: Communicator, device: torch.device) -> None:
    """float16/bfloat16 have no MPI type; their averages must still be right (values chosen to be exact)."""
    rank, size = comm.rank, comm.size
    # bfloat16 holds 8 significant bits: the means k·(N + 1)/2 stay exact up to k = 63 for N = 2, k = 15 for N = 4.
    ramp = np.arange(64 if size <= 2 else 16, dtype=np.int64)
    for dtype in (torch.float16, torch.bfloat16):
        buffer = torch.from_numpy(ramp * (rank + 1)).to(device=device, dtype=dtype)
        comm.allreduce_(buffer, average=True)
        expected = ramp * (size * (size + 1) // 2) / size
        expect_equal(f"allreduce average {dtype}", buffer.float(), expected)


def check_several_in_flight(comm: Communicator, device: torch.device) -> None:
    """Start several non-blocking allreduces, then wait for them in the reverse order."""
    rank, size = comm.rank, comm.size
    rank_sum = size * (size + 1) // 2
    plans = [
        (torch.float32, 1000, True),
        (torch.float64, 33, False),
        (torch.int64, 1000, False),
        (torch.float32, 1_048_577, True),
        (torch.int64, 7, True),
    ]
    buffers, handles = [], []
    for index, (dtype, length, average) in enumerate(plans):
        ramp = signed_ramp(length) + 10 * index  # a different value per buffer catches crossed results
        buffer = torch.from_numpy(ramp * (rank + 1)).to(device=device, dtype=dtype)
        buffers.append(buffer)
        handles.append(comm.iallreduce_(buffer, average=average))
    for index in reversed(range(len(plans))):
        handles[index].wait()
        dtype, length, average = plans[index]
        total = (signed_ramp(length) + 10 * index) * rank_sum
        expected = total if not average else (total / size if dtype.is_floating_point else total // size)
        expect_equal(f"in-flight allreduce #{index} ({dtype}, length {length})", buffers[index], expected)


def check_slices_of_one_flat_buffer(comm: Communicator, device: torch.device) -> None:
    """The averaging engine reduces disjoint slices of one flat buffer concurrently (buckets)."""
    rank, size = comm.rank, comm.size
    bounds = (0, 1000, 1001, 250_000, 250_007)
    ramp = signed_ramp(bounds[-1])
    flat = torch.from_numpy(ramp * (rank + 1)).to(device=device, dtype=torch.float32)
    handles = [comm.iallreduce_(flat[start:end], average=True) for start, end in itertools.pairwise(bounds)]
    for handle in handles:
        handle.wait()
    expect_equal("in-flight allreduce of slices of one flat buffer", flat, ramp * (size * (size + 1) // 2) / size)


def check_progress_then_wait(comm: Communicator, device: torch.device) -> None:
    """progress() (called from gradient hooks during backward) may complete a collective early;
    the result must be the same, written once, with wait() afterwards a no-op."""
    rank, size = comm.rank, comm.size
    for dtype, average in ((torch.float32, True), (torch.int64, True), (torch.float64, False)):
        ramp = signed_ramp(300_001)
        buffer = torch.from_numpy(ramp * (rank + 1)).to(device=device, dtype=dtype)
        handle = comm.iallreduce_(buffer, average=average)
        for _ in range(200):
            handle.progress()
        handle.wait()
        handle.wait()
        total = ramp * (size * (size + 1) // 2)
        expected = total if not average else (total / size if dtype.is_floating_point else total // size)
        expect_equal(f"allreduce {dtype} after progress() and two waits", buffer, expected)


def check_broadcast(comm: Communicator, device: torch.device) -> None:
    root = 1 % comm.size
    for dtype in (torch.float32, torch.int64, torch.bfloat16):
        for length in (1, 100_003):
            buffer = torch.full((length,), 10 * comm.rank + 7, dtype=dtype, device=device)
            comm.broadcast_(buffer, root=root)
            expect_equal(f"broadcast {dtype} length {length} from rank {root}", buffer, np.full(length, 10 * root + 7))


def gather_value(base: np.ndarray, world_rank: int) -> np.ndarray:
    """What world rank r contributes to an allgather: below 200 for 4 ranks (uint8) and exact in bfloat16."""
    return base % 50 + 50 * world_rank


def check_allgather(comm: Communicator, device: torch.device, members: list[int], what: str = "allgather") -> None:
    """Row r of the output is the buffer of the communicator's rank r (world rank ``members[r]``), bit for bit,
    for dtypes MPI cannot sum (bfloat16) and 1-byte ones; 2-D buffers gather into (size, rows, columns)."""
    world_rank = members[comm.rank]
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
        for shape in ((1,), (1000,), (100_003,), (3, 5)):
            base = np.arange(int(np.prod(shape))).reshape(shape)
            buffer = torch.from_numpy(gather_value(base, world_rank)).to(device=device, dtype=dtype)
            output = torch.empty((comm.size, *shape), dtype=dtype, device=device)
            comm.iallgather(buffer, output).wait()
            expected = np.stack([gather_value(base, member) for member in members])
            expect_equal(f"{what} {dtype} shape {shape}", output, expected)


def check_allgather_in_flight(comm: Communicator, device: torch.device) -> None:
    """Allgathers in flight together with an allreduce, waited in another order than started."""
    rank, size = comm.rank, comm.size
    first, first_out = torch.full((777,), rank + 1.0, device=device), torch.empty((size, 777), device=device)
    summed = torch.full((5,), rank + 1.0, device=device)
    second = torch.full((33,), rank + 10, dtype=torch.int64, device=device)
    second_out = torch.empty((size, 33), dtype=torch.int64, device=device)
    handles = [comm.iallgather(first, first_out), comm.iallreduce_(summed, average=False)]
    handles.append(comm.iallgather(second, second_out))
    for index in (2, 0, 1):
        handles[index].wait()
    expect_equal(
        "allgather #0 in flight with an allreduce",
        first_out,
        np.repeat(np.arange(1.0, size + 1), 777).reshape(size, 777),
    )
    expect_equal("allreduce in flight between allgathers", summed, np.full(5, size * (size + 1) / 2))
    expect_equal("allgather #2 in flight", second_out, np.repeat(np.arange(size) + 10, 33).reshape(size, 33))


COMPRESSION_LENGTH = 100_003  # 391 int8 blocks, the last one partial


def check_compressed_average(
    comm: Communicator, device: torch.device, members: list[int], what: str = "compressed average"
) -> None:
    """Three syncs of a fixed update per codec, with and without error feedback: bit for bit the numpy
    reference's avg_r Q(Δ_r + e_r) (summed in rank order; re-encoded among three or more ranks: the
    two-phase exchange through an all-to-all), and the same bytes on every rank."""
    updates = [rank_update(member, COMPRESSION_LENGTH) for member in members]
    # Among more than 2 ranks fp32 (codec none) is an allreduce, which need not sum in rank order.
    for codec in CODECS if comm.size <= 2 else [c for c in CODECS if c != "none"]:
        for feedback in (True, False) if codec != "none" else (False,):
            averager = CompressedAverager(codec, (COMPRESSION_LENGTH,), feedback, device)
            errors = [np.zeros(COMPRESSION_LENGTH, dtype=np.float32)] * comm.size if feedback else None
            average_error = None
            for sync in range(3):
                update = torch.from_numpy(updates[comm.rank].copy()).to(device)
                averager.average_(comm, update)
                expected, errors, average_error = compressed_average(codec, updates, errors, average_error)
                label = f"{what} {codec} {'with' if feedback else 'without'} error feedback, sync {sync}"
                expect_equal(label, update, expected)
            everyone = torch.empty((comm.size, COMPRESSION_LENGTH), device=device)
            comm.iallgather(update, everyone).wait()
            if not all(torch.equal(everyone[0], row) for row in everyone):
                raise CheckFailed(f"{what} {codec}: the ranks hold different averages")


def check_alltoall(comm: Communicator, device: torch.device) -> None:
    """Row r of every rank's buffer reaches rank r, in rank order, bit for bit, for several dtypes (raw
    rows: bfloat16 and 1-byte ones too), also with a second all-to-all in flight."""
    rank, size = comm.rank, comm.size
    for dtype in (torch.uint8, torch.float32, torch.bfloat16, torch.int64):
        sent = torch.stack([torch.full((5, 3), 10 * rank + destination, device=device) for destination in range(size)])
        received = torch.empty_like(sent.to(dtype))
        second, second_out = sent.to(dtype) + 1, torch.empty_like(received)
        first_handle = comm.ialltoall(sent.to(dtype).contiguous(), received)
        second_handle = comm.ialltoall(second, second_out)
        first_handle.wait()
        second_handle.wait()
        expected = np.stack([np.full((5, 3), 10 * source + rank) for source in range(size)])
        expect_equal(f"alltoall {dtype}", received, expected)
        expect_equal(f"alltoall #2 in flight {dtype}", second_out, expected + 1)


def group_sum(world_rank: int, ranks: int) -> int:
    """Σ (r + 1) over the world ranks r of ``world_rank``'s group of ``ranks`` consecutive ranks."""
    first = world_rank - world_rank % ranks
    return sum(r + 1 for r in range(first, first + ranks))


def check_group_layout(world: Communicator, group: Communicator, ranks: int) -> None:
    got = (group.rank, group.size, group.local_rank, group.name, group.is_root)
    wanted = (world.rank % ranks, ranks, world.rank % ranks, world.name, world.rank % ranks == 0)
    if got != wanted:
        raise CheckFailed(f"group of {ranks}: (rank, size, local rank, name, is_root) {got}, expected {wanted}")


def check_group_allreduce(world: Communicator, group: Communicator, ranks: int, device: torch.device) -> None:
    """Sums and averages over the group's ranks only; a world allreduce between two group ones."""
    rank_sum = group_sum(world.rank, ranks)
    for dtype in EXACT_DTYPES:
        for length in (1, 1000, 100_003):
            ramp = signed_ramp(length)
            for average in (False, True):
                buffer = torch.from_numpy(ramp * (world.rank + 1)).to(device=device, dtype=dtype)
                group.allreduce_(buffer, average=average)
                total = ramp * rank_sum
                expected = total if not average else (total / ranks if dtype.is_floating_point else total // ranks)
                what = f"group of {ranks}: allreduce {'average' if average else 'sum'} {dtype} length {length}"
                expect_equal(what, buffer, expected)
        interleaved = torch.full((5,), world.rank + 1, dtype=dtype, device=device)
        world.allreduce_(interleaved, average=False)
        expect_equal(
            f"world allreduce {dtype} between group ones", interleaved, np.full(5, world.size * (world.size + 1) // 2)
        )
    for dtype in (torch.float16, torch.bfloat16):
        # Small enough that every value and mean (a multiple of 1/4 below 64) is exact in 8 bits.
        buffer = torch.from_numpy(np.arange(16) * (world.rank + 1)).to(device=device, dtype=dtype)
        group.allreduce_(buffer, average=True)
        expect_equal(f"group of {ranks}: allreduce average {dtype}", buffer.float(), np.arange(16) * rank_sum / ranks)


def check_group_broadcast(world: Communicator, group: Communicator, ranks: int, device: torch.device) -> None:
    """The root is a rank of the group: each group gets its own root's value."""
    root = 1 % ranks
    source = world.rank - world.rank % ranks + root
    for dtype in (torch.float32, torch.float64, torch.int64, torch.bfloat16):
        buffer = torch.full((100_003,), 10 * world.rank + 7, dtype=dtype, device=device)
        group.broadcast_(buffer, root=root)
        expect_equal(
            f"group of {ranks}: broadcast {dtype} from group rank {root}", buffer, np.full(100_003, 10 * source + 7)
        )


def check_group_in_flight_with_world(
    world: Communicator, group: Communicator, ranks: int, device: torch.device
) -> None:
    """Group allreduces started while a world allreduce is in flight, and the other way round;
    waited in one order on every rank (not the order they were started in)."""
    plans = [  # (communicator, dtype, length, average)
        (world, torch.float32, 250_001, True),
        (group, torch.float32, 250_001, True),
        (group, torch.int64, 1000, False),
        (world, torch.float64, 33, False),
        (group, torch.float64, 7, True),
    ]
    buffers, handles = [], []
    for index, (comm, dtype, length, average) in enumerate(plans):
        ramp = signed_ramp(length) + 10 * index
        buffer = torch.from_numpy(ramp * (world.rank + 1)).to(device=device, dtype=dtype)
        buffers.append(buffer)
        handles.append(comm.iallreduce_(buffer, average=average))
    for index in (2, 0, 4, 1, 3):
        handles[index].wait()
        comm, dtype, length, average = plans[index]
        size = comm.size
        rank_sum = world.size * (world.size + 1) // 2 if comm is world else group_sum(world.rank, ranks)
        total = (signed_ramp(length) + 10 * index) * rank_sum
        expected = total if not average else (total / size if dtype.is_floating_point else total // size)
        which = "world" if comm is world else f"group of {ranks}"
        expect_equal(f"in flight together: {which} allreduce #{index} ({dtype})", buffers[index], expected)


def check_groups(world: Communicator, device: torch.device) -> None:
    for ranks in dict.fromkeys((2, world.size, 1)):
        if world.size % ranks != 0:
            continue
        group = world.split(ranks)
        check_group_layout(world, group, ranks)
        check_group_allreduce(world, group, ranks, device)
        check_group_broadcast(world, group, ranks, device)
        check_group_in_flight_with_world(world, group, ranks, device)
        first = world.rank - world.rank % ranks
        members = list(range(first, first + ranks))
        check_allgather(group, device, members, f"group of {ranks}: allgather")
        if ranks == 2:  # more ranks than 2 may sum fp32 (codec none) in another order than rank order
            check_compressed_average(group, device, members, f"group of {ranks}: compressed average")
        group.barrier()
        # Another split into the same size works too, and so does splitting a group further.
        again = world.split(ranks).split(1)
        buffer = torch.full((3,), float(world.rank), device=device)
        again.allreduce_(buffer)
        expect_equal(f"group of one split from a group of {ranks}", buffer, np.full(3, float(world.rank)))


def across_sum(world_rank: int, ranks: int, world_size: int) -> int:
    """Σ (r + 1) over the world ranks r at ``world_rank``'s position in every group of ``ranks``."""
    return sum(r + 1 for r in range(world_rank % ranks, world_size, ranks))


def check_across(world: Communicator, ranks: int, device: torch.device) -> None:
    """The communicator across groups of ``ranks``: layout, exact sums and averages, broadcasts, 16-bit
    averages, and collectives of the group, of the world and across in flight together."""
    across = world.split_across(ranks)
    size = world.size // ranks
    got = (across.rank, across.size, across.local_rank, across.name, across.is_root)
    wanted = (world.rank // ranks, size, world.rank // ranks, world.name, world.rank < ranks)
    if got != wanted:
        raise CheckFailed(f"across groups of {ranks}: (rank, size, local rank, name, is_root) {got}, expected {wanted}")
    rank_sum = across_sum(world.rank, ranks, world.size)
    for dtype in EXACT_DTYPES:
        for length in (1, 1000, 100_003):
            ramp = signed_ramp(length)
            for average in (False, True):
                buffer = torch.from_numpy(ramp * (world.rank + 1)).to(device=device, dtype=dtype)
                across.allreduce_(buffer, average=average)
                total = ramp * rank_sum
                expected = total if not average else (total / size if dtype.is_floating_point else total // size)
                what = f"across groups of {ranks}: allreduce {'average' if average else 'sum'} {dtype} length {length}"
                expect_equal(what, buffer, expected)
    for dtype in (torch.float16, torch.bfloat16):
        buffer = torch.from_numpy(np.arange(16) * (world.rank + 1)).to(device=device, dtype=dtype)
        across.allreduce_(buffer, average=True)
        expect_equal(
            f"across groups of {ranks}: allreduce average {dtype}", buffer.float(), np.arange(16) * rank_sum / size
        )
    root = 1 % size
    source = world.rank % ranks + root * ranks
    for dtype in (torch.float32, torch.float64, torch.int64, torch.bfloat16):
        buffer = torch.full((100_003,), 10 * world.rank + 7, dtype=dtype, device=device)
        across.broadcast_(buffer, root=root)
        expect_equal(
            f"across groups of {ranks}: broadcast {dtype} from rank {root} across",
            buffer,
            np.full(100_003, 10 * source + 7),
        )
    check_across_in_flight_with_the_group(world, across, ranks, device)
    across.barrier()
    alone = world.split_across(world.size)
    buffer = torch.full((3,), float(world.rank), device=device)
    alone.allreduce_(buffer, average=False)
    alone.broadcast_(buffer, root=0)
    expect_equal("across groups of the whole world (one rank)", buffer, np.full(3, float(world.rank)))
    if (alone.size, world.split_across(1)) != (1, world):
        raise CheckFailed("split_across(size) is not one rank, or split_across(1) is not the communicator itself")


def check_across_in_flight_with_the_group(
    world: Communicator, across: Communicator, ranks: int, device: torch.device
) -> None:
    """An allreduce inside the consecutive group started while one across is in flight (the engine's
    pattern: gradients in the worker while its model shard travels between workers), with the world's
    too; waited in one order on every rank, not the order they were started in."""
    group = world.split(ranks)
    plans = [  # (communicator, dtype, length, average)
        (across, torch.float32, 250_001, True),
        (group, torch.float32, 250_001, False),
        (world, torch.float64, 33, False),
        (across, torch.int64, 1000, False),
        (group, torch.float64, 7, True),
    ]
    buffers, handles = [], []
    for index, (comm, dtype, length, average) in enumerate(plans):
        buffer = torch.from_numpy((signed_ramp(length) + 10 * index) * (world.rank + 1)).to(device=device, dtype=dtype)
        buffers.append(buffer)
        handles.append(comm.iallreduce_(buffer, average=average))
    for index in (1, 4, 0, 2, 3):
        handles[index].wait()
        comm, dtype, length, average = plans[index]
        if comm is world:
            rank_sum, which = world.size * (world.size + 1) // 2, "world"
        elif comm is group:
            rank_sum, which = group_sum(world.rank, ranks), f"group of {ranks}"
        else:
            rank_sum, which = across_sum(world.rank, ranks, world.size), f"across groups of {ranks}"
        total = (signed_ramp(length) + 10 * index) * rank_sum
        expected = total if not average else (total / comm.size if dtype.is_floating_point else total // comm.size)
        expect_equal(f"in flight together: {which} allreduce #{index} ({dtype})", buffers[index], expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("auto", "horovod", "mpi", "torch", "single"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups", action="store_true", help="also check groups of ranks (split)")
    parser.add_argument("--across", action="store_true", help="also check the communicators across groups of 2")
    parser.add_argument("--compression", action="store_true", help="only check allgathers and the compressed average")
    parser.add_argument("--split", type=int, help="only split into groups of this size (to see it refused)")
    parser.add_argument("--split-across", type=int, help="only split across groups of this size (to see it refused)")
    parser.add_argument(
        "--group-sizes", default="2", help="the group sizes announced to make_communicator (comma-separated)"
    )
    parser.add_argument(
        "--across-sizes", default="2", help="the sizes across announced to make_communicator (comma-separated)"
    )
    parser.add_argument(
        "--mpi-polling", choices=("auto", "true", "false"), default="auto", help="comm.mpi_polling for the mpi backend"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    polling = None if args.mpi_polling == "auto" else args.mpi_polling == "true"
    group_sizes = [int(size) for size in args.group_sizes.split(",") if size]
    across_sizes = [int(size) for size in args.across_sizes.split(",") if size]
    try:
        comm = make_communicator(
            args.backend,
            detect_launch(),
            device,
            group_sizes=group_sizes,
            across_sizes=across_sizes,
            mpi_polling=polling,
        )
    except UserError as error:
        print_line(f"hpc-localsgd: error: {error}", sys.stderr)
        return error.exit_code
    if args.split is not None or args.split_across is not None:
        try:
            if args.split is not None:
                comm.split(args.split)
            if args.split_across is not None:
                comm.split_across(args.split_across)
        except ValueError as error:
            print_line(f"hpc-localsgd: error: {error}", sys.stderr)
            comm.close()
            return 2
    try:
        world_members = list(range(comm.size))
        check_allgather(comm, device, world_members)
        check_allgather_in_flight(comm, device)
        check_alltoall(comm, device)
        if args.compression:
            check_compressed_average(comm, device, world_members)
            comm.barrier()
            print_line(f"OK {comm.name} rank {comm.rank} of {comm.size} ({comm.collective_path(device)})", sys.stdout)
            comm.close()
            return 0
        check_allreduce(comm, device)
        if "allreduces from" in comm.collective_path(device):
            check_sum_in_rank_order(comm, device)
        check_sixteen_bit_average(comm, device)
        check_several_in_flight(comm, device)
        check_slices_of_one_flat_buffer(comm, device)
        check_progress_then_wait(comm, device)
        check_broadcast(comm, device)
        if args.groups:
            check_groups(comm, device)
        if args.across and comm.size % 2 == 0:
            check_across(comm, 2, device)
        comm.barrier()
    except Exception as failure:
        detail = str(failure) if isinstance(failure, CheckFailed) else traceback.format_exc()
        print_line(f"FAIL {comm.name} rank {comm.rank} of {comm.size}: {detail}", sys.stderr)
        return 1
    print_line(f"OK {comm.name} rank {comm.rank} of {comm.size} ({comm.collective_path(device)})", sys.stdout)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
