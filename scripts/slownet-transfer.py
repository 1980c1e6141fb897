"""Where a sync's time goes on an emulated link: one transfer beside a training step, per way of waiting.

Run under the emulated network, 2 ranks (as root):

    source scripts/mpi-env.sh
    PYTHONPATH=$PWD .venv/bin/python -m hpc_localsgd.launcher.slownet 2 1gbit -- \\
        $PWD/.venv/bin/python scripts/slownet-transfer.py --way all

Each rank first times ``--alone`` transfers of ``--elements`` float32 values with nothing else running
(their time and the CPU they take), then training steps of a torchvision model (one compute thread)
without communication, then the steps while a second thread runs transfers back to back, as the mpi
backend's communication thread does, and prints per way of waiting: the transfer's time alone and beside
the steps, the step's speed meanwhile (1.0: untouched), the core time the step lost per transfer, and
the CPU time the transferring thread took per transfer, and the whole machine's CPU time by kind
(``/proc/stat``, every core together: user, system, and softirq, where the kernel's network stack runs
packets through the veth pairs, the bridge and HTB, charged to no thread): per transfer alone, and per
second of the bare steps and of the steps beside the transfers. Ways:

    allreduce          blocking MPI_Allreduce (the backend's allreduces)
    allreduce-polled   MPI_Iallreduce tested every millisecond (Open MPI advances it one round per test)
    allgather          blocking MPI_Allgather of the bytes of a quarter of the values (an int8 sync's size)
    allgather-polled   MPI_Iallgather of the same, tested every millisecond (the backend's byte exchanges
                       when Open MPI yields while idle)
    allreduce-exchanges the backend's allreduce when Open MPI yields while idle: an all-to-all of the
                       parts, each rank's part summed, an allgather, both tested every millisecond
    wakeups            no transfer: the thread only sleeps between tests for 0.5 s (what waking up
                       costs the step, without MPI)

``--poll-ms`` sets the interval between tests (the backend's ``POLL_SECONDS`` by default, set in the
backend too for ``allreduce-exchanges``).

``--nice N`` lowers the communication thread's priority, to see whether the transfer's cost to the step
is its CPU work or its scheduling. Open MPI yields while idle here (``OMPI_MCA_mpi_yield_when_idle=1``,
as the package sets on a fully subscribed node).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import torch
import torchvision

from hpc_localsgd.launcher.env import OPEN_MPI_YIELD_WHEN_IDLE

os.environ.setdefault(OPEN_MPI_YIELD_WHEN_IDLE, "1")  # before MPI starts
from mpi4py import MPI  # noqa: E402

from hpc_localsgd.comm import mpi as mpi_backend

WAYS = ("allreduce", "allreduce-polled", "allgather", "allgather-polled", "allreduce-exchanges", "wakeups")
RECEIVED = mpi_backend.ReceiveSpace()
CPU_KINDS = {"user": (0, 1), "system": (2,), "softirq": (6,), "irq": (5,)}  # /proc/stat's columns, nice in user
WAKEUPS_SECONDS = 0.5


def transfer(way: str, comm: MPI.Intracomm, values: np.ndarray, scratch: np.ndarray) -> None:
    if way == "allreduce-exchanges":
        mpi_backend.polled_allreduce(comm, MPI, values, RECEIVED, threading.Event())
        return
    if way == "wakeups":
        end = time.perf_counter() + WAKEUPS_SECONDS
        while time.perf_counter() < end:
            time.sleep(mpi_backend.POLL_SECONDS)
        return
    if way == "allreduce":
        comm.Allreduce(MPI.IN_PLACE, values, MPI.SUM)
        return
    if way == "allgather":
        comm.Allgather(values.view(np.uint8)[: values.size], scratch)
        return
    if way == "allreduce-polled":
        request = comm.Iallreduce(MPI.IN_PLACE, values, MPI.SUM)
    else:
        request = comm.Iallgather(values.view(np.uint8)[: values.size], scratch)
    while not request.Test():
        time.sleep(mpi_backend.POLL_SECONDS)


def machine_cpu() -> dict[str, float]:
    """Seconds of CPU the whole machine has spent, by kind, since boot (every core together)."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    hertz = os.sysconf("SC_CLK_TCK")
    return {kind: sum(ticks[i] for i in columns) / hertz for kind, columns in CPU_KINDS.items()}


def cpu_since(before: dict[str, float], per: float) -> str:
    """The machine's CPU time by kind since ``before``, divided by ``per`` (transfers, or seconds)."""
    after = machine_cpu()
    return ", ".join(f"{kind} {(after[kind] - before[kind]) / per:.3f}" for kind in CPU_KINDS)


def measure(way: str, args: argparse.Namespace, step: object, world: MPI.Intracomm) -> str:
    comm = world.Dup()  # the communication thread's own, as in the backend
    values = np.zeros(args.elements, dtype=np.float32)
    scratch = np.zeros((comm.Get_size(), values.size), dtype=np.uint8)
    alone, alone_cpu = [], time.thread_time()
    world.Barrier()
    alone_machine = machine_cpu()
    for _ in range(args.alone):
        world.Barrier()
        start = time.perf_counter()
        transfer(way, comm, values, scratch)
        alone.append(time.perf_counter() - start)
    alone_cpu = (time.thread_time() - alone_cpu) / max(len(alone), 1)
    alone_machine_text = cpu_since(alone_machine, len(alone)) if alone else "-"
    seconds: list[float] = []
    thread_seconds: list[float] = []  # the communication thread's CPU time, over all its transfers
    stop = np.zeros(1, dtype=np.int32)

    def transfers() -> None:
        if args.nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.nice)
        agreed = np.zeros(1, dtype=np.int32)
        cpu = time.thread_time()
        while True:  # until every rank's steps are done, decided together
            start = time.perf_counter()
            transfer(way, comm, values, scratch)
            seconds.append(time.perf_counter() - start)
            agreed[0] = stop[0]
            comm.Allreduce(MPI.IN_PLACE, agreed, MPI.MAX)
            if agreed[0]:
                thread_seconds.append(time.thread_time() - cpu)
                return

    def timed_steps() -> tuple[float, str]:
        """Seconds a step, and the machine's CPU by kind per second over exactly these steps."""
        world.Barrier()
        before = machine_cpu()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()  # type: ignore[operator]
        elapsed = time.perf_counter() - start
        return elapsed / args.steps, cpu_since(before, elapsed)

    bare, bare_machine_text = timed_steps()
    thread = threading.Thread(target=transfers)
    thread.start()
    busy, busy_machine_text = timed_steps()
    stop[0] = 1
    thread.join()
    comm.Free()
    typical = float(np.median(seconds))
    speed = bare / busy
    alone_text = f"alone {np.median(alone):.3f} s and {alone_cpu:.3f} s of CPU, " if alone else ""
    return (
        f"rank {world.Get_rank()} {way:16s} transfer {alone_text}{typical:.3f} s beside the step "
        f"({len(seconds)} of them); "
        f"step {bare:.3f} s bare, {busy:.3f} s beside it: speed {speed:.2f}, "
        f"{(1 - speed) * typical:.3f} s of the step's core lost per transfer, "
        f"{thread_seconds[0] / len(seconds):.3f} s of CPU in the thread per transfer; "
        f"the machine's CPU seconds per transfer alone: {alone_machine_text}; "
        f"per second of the bare steps: {bare_machine_text}; per second beside the transfers: {busy_machine_text}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--way", choices=(*WAYS, "all"), default="all")
    parser.add_argument("--elements", type=int, default=23_528_522, help="float32 values (ResNet-50's)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--poll-ms", type=float, default=mpi_backend.POLL_SECONDS * 1000)
    parser.add_argument("--alone", type=int, default=3, help="transfers timed alone first, per way")
    args = parser.parse_args()
    mpi_backend.POLL_SECONDS = args.poll_ms / 1000  # read at each test, by the backend's exchanges too
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up
    world = MPI.COMM_WORLD
    for way in WAYS if args.way == "all" else (args.way,):
        lines = world.gather(measure(way, args, step, world), root=0)
        if lines is not None:  # rank 0 prints every rank's line: mpirun would interleave the ranks' output
            print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
