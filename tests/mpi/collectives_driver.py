"""Run under ``mpirun -np N``: exercises one backend's collectives and checks exact values.

Every buffer is built from the rank number, so the expected results follow from sums over
ranks 0..N−1 (written out below with numpy, independently of the code under test).
Prints ``OK <backend> rank <r> of <N>`` on success; exits 1 naming the first wrong value
otherwise, or 2 with ``hpc-localsgd: error: <message>`` for a ``UserError``.

    mpirun -np 2 python tests/mpi/collectives_driver.py --backend mpi
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback

import numpy as np
import torch

from hpc_localsgd.comm import Communicator, make_communicator
from hpc_localsgd.errors import UserError, print_line
from hpc_localsgd.launcher.env import detect_launch

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


def check_sixteen_bit_average(comm: Communicator, device: torch.device) -> None:
    """float16/bfloat16 have no MPI type; their averages must still be right (values chosen to be exact)."""
    rank, size = comm.rank, comm.size
    ramp = np.arange(64, dtype=np.int64)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("auto", "horovod", "mpi", "torch", "single"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        comm = make_communicator(args.backend, detect_launch(), device)
    except UserError as error:
        print_line(f"hpc-localsgd: error: {error}", sys.stderr)
        return error.exit_code
    try:
        check_allreduce(comm, device)
        check_sixteen_bit_average(comm, device)
        check_several_in_flight(comm, device)
        check_slices_of_one_flat_buffer(comm, device)
        check_progress_then_wait(comm, device)
        check_broadcast(comm, device)
        comm.barrier()
    except Exception as failure:
        detail = str(failure) if isinstance(failure, CheckFailed) else traceback.format_exc()
        print_line(f"FAIL {comm.name} rank {comm.rank} of {comm.size}: {detail}", sys.stderr)
        return 1
    print(f"OK {comm.name} rank {comm.rank} of {comm.size}", flush=True)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
