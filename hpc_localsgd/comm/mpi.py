"""mpi4py backend: MPI collectives directly on the tensors' memory.

CPU tensors are reduced in place through a zero-copy numpy view. Tensors MPI cannot sum
natively (float16, bfloat16: MPI has no such types) are widened to float32 first. CUDA tensors
are reduced in device memory when the MPI library says it is CUDA-aware (``cuda_aware_mpi``), and
otherwise go through a host copy; a copy is written back when the handle is waited on.

Non-blocking allreduces and allgathers run as blocking ``Allreduce`` and ``Allgather`` calls on a
communication thread with a communicator of its own, in the order they were started. Open MPI advances an
``MPI_Iallreduce`` only while the calling thread is inside MPI, so gradient buckets started
during backward would not move until ``finish_gradients`` waited on them (the benchmark saw 25-30%
of a ResNet-50 step blocked that way even with ``MPI_Test`` from every gradient hook); the thread
overlaps them with backward as Horovod's background thread and Gloo's do. Without
``MPI_THREAD_MULTIPLE`` the backend falls back to ``Iallreduce`` and ``Iallgather`` advanced by ``progress()``.

When Open MPI is told to yield while idle (a fully subscribed node, ``comm/__init__.py``) and a
communicator's ranks are on more than one node (``comm.mpi_polling``: auto), the thread runs
the byte exchanges (allgather, all-to-all: compressed syncs) as MPI's non-blocking calls and sleeps
``POLL_SECONDS`` between tests instead of waiting in the blocking call (``WAITED_POLL_SECONDS`` once the
step waits for the exchange). A thread that polls with
``sched_yield`` on a core the step's compute also uses is scheduled so rarely that a 24 MB allgather over
an emulated 1 Gb/s link took 0.40–0.42 s beside a ResNet-50 step, twice its time on the wire; tested
every millisecond it took 0.22 s, for the same compute lost (``scripts/slownet-transfer.py``,
docs/BENCHMARKS.md). Allreduces of ``POLLED_ALLREDUCE_BYTES`` or more are polled too, as two byte
exchanges (``polled_allreduce``): an all-to-all sends part k of the buffer to rank k, which sums its part
in rank order, and an allgather returns the summed parts; the bytes on the wire are a ring allreduce's.
Open MPI's own non-blocking allreduce advances a round per test and, polled, took longer than the
blocking one (94 MB: 1.74–1.77 s against 1.64–1.67 s); the blocking one, alone on the link, keeps its
core busy for the whole 0.8 s of the transfer (0.87 s of CPU a rank), the two polled exchanges use
0.12–0.15 s, the sum included, and take 0.83 s (``scripts/slownet-transfer.py``,
docs/BENCHMARKS.md). The thread keeps the space it receives the others' parts into
((m − 1)/m of the largest such buffer) for reuse.
Groups of ranks (``split``) and the communicators across them (``split_across``) are ``Comm.Split``
communicators sharing that thread (see ``MPICommunicator``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from ..launcher.env import OPEN_MPI_YIELD_WHEN_IDLE, WorldLayout
from ._buffers import check_alltoall, check_buffer, check_gather, divide_by_size_
from .base import Communicator, Handle, SerialThread, across_layout, group_layout
from .single import SingleCommunicator

# MPI reduces these in place through numpy's buffer protocol (numpy's format codes map to MPI types).
_NATIVE_SUM_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}
)
# MPI datatypes of device buffers, which MPI reads through the CUDA array interface, not numpy's
# format codes (float16/bfloat16 are widened to float32 first, as on the host).
_MPI_TYPES: dict[torch.dtype, Callable[[Any], Any]] = {
    torch.float32: lambda mpi: mpi.FLOAT,
    torch.float64: lambda mpi: mpi.DOUBLE,
    torch.int8: lambda mpi: mpi.INT8_T,
    torch.int16: lambda mpi: mpi.INT16_T,
    torch.int32: lambda mpi: mpi.INT32_T,
    torch.int64: lambda mpi: mpi.INT64_T,
    torch.uint8: lambda mpi: mpi.UINT8_T,
}
# No MPI datatype sums 16-bit floats (a uint16 view would add bit patterns), so they are
# summed as float32, which also rounds only once, at the final cast back.
_WIDENED_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
# How long the communication thread sleeps between tests of a byte exchange when Open MPI yields: at
# 1 Gb/s a millisecond is 125 kB, well inside the sockets' buffers, and a thousand wake-ups a second
# cost the step less than the yielding poll's scheduling does.
POLL_SECONDS = 0.001
# ... and once the step waits for the exchange: Open MPI's non-blocking allgather starts a round per test
# (a ring of m ranks has m − 1), so a millisecond a test would cost 63 ms among 64 ranks on a network
# that moves a round in microseconds; still a sleep, so that the kernel's network work has the core.
WAITED_POLL_SECONDS = 0.00005
# Allreduces at least this large go as two polled exchanges where byte exchanges are polled; smaller ones
# (scalars, norms, BN statistics) stay one blocking call, whose latency is a round trip, not two.
POLLED_ALLREDUCE_BYTES = 1 << 20
_POLLED_SUM_DTYPES = frozenset({torch.float32, torch.float64})


def mpi_yields_when_idle() -> bool:
    """Whether Open MPI was told to yield while idle (by ``comm/__init__.py`` on a fully subscribed
    node, or by the user); read when the communicator is made, after MPI read it."""
    return os.environ.get(OPEN_MPI_YIELD_WHEN_IDLE, "0").strip().lower() in ("1", "true", "yes")


def cuda_aware_mpi() -> bool:
    """Whether the MPI library in this process reduces CUDA device memory itself, as its own run-time
    query says (Open MPI's ``MPIX_Query_cuda_support``, MPICH's ``MPIX_GPU_query_support``); False for a
    library that has neither. Call after MPI is initialised (the symbols come with mpi4py's libmpi)."""
    library = ctypes.CDLL(None)
    if hasattr(library, "MPIX_Query_cuda_support"):
        return bool(library.MPIX_Query_cuda_support())
    if hasattr(library, "MPIX_GPU_query_support"):
        supported = ctypes.c_int(0)
        mpix_gpu_support_cuda = 0  # MPICH's enum value for CUDA
        return library.MPIX_GPU_query_support(mpix_gpu_support_cuda, ctypes.byref(supported)) == 0 and bool(
            supported.value
        )
    return False


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's own memory as a flat numpy array (CPU, contiguous); writes go to the tensor."""
    return tensor.detach().reshape(-1).numpy()


class _MPIHandle(Handle):
    """An ``Iallreduce`` in flight; the averaging division and any copy-back happen in ``wait``."""

    def __init__(self, request: Any, buffer: torch.Tensor, reduced: torch.Tensor, array: Any, divisor: int) -> None:
        self._request: Any | None = request
        self._buffer = buffer
        self._reduced = reduced  # ``buffer`` itself, or its host/float32 staging copy
        self._array = array  # keeps the memory MPI writes into alive until the request completes
        self._divisor = divisor

    def wait(self) -> None:
        if self._request is None:
            return
        self._request.Wait()
        self._finish()

    def progress(self) -> None:
        # MPI_Test drives Open MPI's schedule of a non-blocking collective one round further.
        if self._request is not None and self._request.Test():
            self._finish()

    def _finish(self) -> None:
        self._request = None
        divide_by_size_(self._reduced, self._divisor)
        if self._reduced is not self._buffer:
            self._buffer.copy_(self._reduced)


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor's memory as a flat uint8 numpy array (writes go to the tensor): collectives
    that only move data (allgather, broadcast) carry any dtype, bfloat16 included, this way."""
    return _numpy_view(tensor.reshape(-1).view(torch.uint8))


class _GatherHandle(Handle):
    """An allgather in flight, as an ``Iallgather`` request or a future of the communication thread;
    a host staging copy of a device output is copied back in ``wait``."""

    def __init__(
        self,
        pending: Any,
        output: torch.Tensor,
        staged: torch.Tensor,
        arrays: tuple[np.ndarray, np.ndarray],
        waited: threading.Event | None = None,
    ) -> None:
        self._pending: Any | None = pending
        self._output = output
        self._staged = staged  # ``output`` itself, or its host copy
        self._arrays = arrays  # the memory MPI reads and writes, alive until the collective is done
        self._waited = waited  # set when the caller waits: the thread then tests a polled exchange more often

    def wait(self) -> None:
        if self._pending is None:
            return
        if self._waited is not None:
            self._waited.set()
        if isinstance(self._pending, Future):
            self._pending.result()  # re-raises an MPI error of the thread here
        else:
            self._pending.Wait()
        self._finish()

    def wait_beside(self) -> None:
        # Only with the communication thread (``waits_beside``): a future, waited at the exchange's idle pace.
        if self._pending is not None:
            self._pending.result()
            self._finish()

    def step_waits(self) -> None:
        if self._waited is not None:
            self._waited.set()

    def progress(self) -> None:
        if self._pending is not None and not isinstance(self._pending, Future) and self._pending.Test():
            self._finish()

    def _finish(self) -> None:
        self._pending = None
        if self._staged is not self._output:
            self._output.copy_(self._staged)


class _CollectiveThread(SerialThread):
    """One thread that runs blocking collectives in the order they were submitted.

    The collectives it runs go over communicators of their own (``MPICommunicator._thread_comm``),
    so they never match one of the main thread's.
    """

    def __init__(self) -> None:
        super().__init__("hpc-localsgd-mpi")
        self.receive_space = ReceiveSpace()  # polled allreduces', used only by the thread


def _polled(start: Callable[..., Any], waited: threading.Event, *args: Any) -> None:
    """Start a non-blocking collective and test it every ``POLL_SECONDS`` until it completes (run by
    the communication thread; the sleep leaves the core to the step between tests), every
    ``WAITED_POLL_SECONDS`` once ``waited`` is set (the step waits for it: nothing to leave the core to,
    and each test may start the collective's next round)."""
    request = start(*args)
    while not request.Test():
        if waited.is_set():
            time.sleep(WAITED_POLL_SECONDS)
        else:
            waited.wait(POLL_SECONDS)  # returns at once when the step starts waiting


def polled_allreduce(
    comm: Any, mpi: Any, values: np.ndarray, receive_space: ReceiveSpace, waited: threading.Event
) -> None:
    """Sum ``values`` over ``comm``'s ranks in place, as two polled exchanges (run by the communication
    thread): an all-to-all sends part k of m contiguous parts to rank k (the first n % m parts one
    element longer); each rank sums its part over the ranks in rank order, ((x_0 + x_1) + x_2) + …, the
    same bits whatever algorithm MPI would have picked; an allgather brings every rank
    every summed part. Each rank sends and receives (m − 1)/m of the buffer twice, as in a ring allreduce."""
    size, rank = comm.Get_size(), comm.Get_rank()
    base, extra = divmod(values.size, size)
    counts = [base + (1 if k < extra else 0) for k in range(size)]
    starts = [0, *itertools.accumulate(counts)][:size]
    mine = values[starts[rank] : starts[rank] + counts[rank]]
    # What the others send of this rank's part, one row each (this rank's own row is not sent).
    received = receive_space.get(values.dtype, (size - 1) * counts[rank])
    others = [r for r in range(size) if r != rank]
    rows = {r: received[i * counts[rank] : (i + 1) * counts[rank]] for i, r in enumerate(others)}
    sent = [counts[k] if k != rank else 0 for k in range(size)]
    landing = [counts[rank] if r != rank else 0 for r in range(size)]
    offsets = [(r - (r > rank)) * counts[rank] if r != rank else 0 for r in range(size)]  # rows' starts
    _polled(comm.Ialltoallv, waited, [values, (sent, starts)], [received, (landing, offsets)])
    rows[rank] = mine
    total = rows[0]
    for r in range(1, size):
        into = mine if r == size - 1 else total  # the last addition lands in this rank's part
        np.add(total, rows[r], out=into)
        total = into
    _polled(comm.Iallgatherv, waited, mpi.IN_PLACE, [values, (counts, starts)])


class ReceiveSpace:
    """The communication thread's receive space for polled allreduces, grown to the largest and reused: a
    fresh buffer the size of a model costs its page faults on every sync. One collective runs at a time on
    the thread, so one buffer per dtype serves them all."""

    def __init__(self) -> None:
        self._buffers: dict[np.dtype[Any], np.ndarray] = {}

    def get(self, dtype: np.dtype[Any], count: int) -> np.ndarray:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.size < count:
            buffer = self._buffers[dtype] = np.empty(count, dtype=dtype)
        return buffer[:count]


class _ThreadedHandle(Handle):
    """An ``Allreduce`` queued on (or running in) the communication thread."""

    def __init__(
        self,
        future: Future[Any],
        buffer: torch.Tensor,
        reduced: torch.Tensor,
        array: Any,
        divisor: int,
        waited: threading.Event | None = None,
    ) -> None:
        self._future: Future[Any] | None = future
        self._buffer = buffer
        self._reduced = reduced
        self._array = array  # the memory the thread writes into, alive until it is done
        self._divisor = divisor
        self._waited = waited  # a polled allreduce's: set when the caller waits, to test it more often

    def wait(self) -> None:
        if self._future is None:
            return
        if self._waited is not None:
            self._waited.set()
        self._finish(self._future)

    def wait_beside(self) -> None:
        if self._future is not None:
            self._finish(self._future)  # at the polled exchange's idle pace: training is not waiting

    def step_waits(self) -> None:
        if self._waited is not None:
            self._waited.set()

    def _finish(self, future: Future[Any]) -> None:
        future.result()  # re-raises an MPI error of the thread here
        self._future = None
        divide_by_size_(self._reduced, self._divisor)
        if self._reduced is not self._buffer:
            self._buffer.copy_(self._reduced)


class MPICommunicator(Communicator):
    """Collectives over a private duplicate of ``MPI.COMM_WORLD``.

    The duplicate keeps our collectives apart from anything else in the process that uses
    ``COMM_WORLD`` (e.g. the torch backend's rendezvous). Rank and size are MPI's own, so
    that ``make_communicator`` can compare them with what the launcher announced; the node
    fields come from the launcher's layout.

    Groups (``split``, ``split_across``) are ``Comm.Split`` of this communicator, and they share its
    communication thread rather than each starting one: one thread per process, as Horovod has one
    background thread, and no more threads polling in MPI beside the compute threads. The shared thread
    runs the blocking ``Allreduce`` calls of the world and of every group one after another, in the order
    they were started. That cannot deadlock when, as ``split`` and ``split_across`` require, every rank
    starts the collectives of the same sequence of communicators (each rank on its own group of each
    kind) in the same order: the n-th collective of that sequence can run once every rank has run the
    ones before it, so the operations run in an order consistent with every rank's queue (the rule MPI
    sets for blocking collectives on overlapping communicators). Each group's allreduces go over a
    communicator of their own (split from the main one, used only by that thread), so they never match
    a broadcast or barrier that the main thread runs on the group meanwhile.
    """

    name = "mpi"

    def __init__(self, launcher_layout: WorldLayout, polling: bool | None = None) -> None:
        """``polling`` (``comm.mpi_polling``): run allgathers, all-to-alls and allreduces from
        ``POLLED_ALLREDUCE_BYTES`` on the communication thread as non-blocking calls tested every
        ``POLL_SECONDS``. None: where Open MPI yields while idle and the communicator's ranks are on more
        than one node (``_polls``), decided for each group too."""
        from mpi4py import MPI  # imported here: importing mpi4py.MPI initialises MPI

        self._mpi = MPI
        self._polling = polling
        self._comm = MPI.COMM_WORLD.Dup()
        self._poll = self._polls(self._comm)
        self._thread: _CollectiveThread | None = None
        self._thread_comm: Any = None  # used only by the communication thread
        self._owns_thread = True
        if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self._thread_comm = MPI.COMM_WORLD.Dup()
            self._thread = _CollectiveThread()
        self._groups: list[MPICommunicator] = []
        self._closed = False
        self._cuda_aware = cuda_aware_mpi()
        super().__init__(dataclasses.replace(launcher_layout, rank=self._comm.Get_rank(), size=self._comm.Get_size()))

    def thread_cpu_seconds(self) -> float | None:
        return None if self._thread is None else self._thread.cpu_seconds

    @property
    def waits_beside(self) -> bool:
        # Without the communication thread, the Iallreduce requests must be waited for by the thread that
        # makes every other MPI call (no MPI_THREAD_MULTIPLE).
        return self._thread is not None

    def _polls(self, comm: Any) -> bool:
        """Whether collectives over ``comm`` are polled (collective over ``comm``: auto asks MPI which of
        its ranks share this node's memory). Polling pays where the bytes cross a network: between tests
        the kernel and the NIC move them while the step has the core. Through shared memory the copies in
        MPI's calls are the transfer, so testing every millisecond only spreads it out: synchronous
        training polled ran at 0.79x DDP, blocking at 0.98x (2 ranks of one core, docs/BENCHMARKS.md)."""
        if self._polling is not None:
            return self._polling
        if not mpi_yields_when_idle():
            return False
        on_this_node = comm.Split_type(self._mpi.COMM_TYPE_SHARED)
        spans_nodes = bool(on_this_node.Get_size() < comm.Get_size())
        on_this_node.Free()
        return spans_nodes

    @classmethod
    def _group(
        cls,
        parent: MPICommunicator,
        comm: Any,
        thread_comm: Any | None,
        layout: WorldLayout,
    ) -> MPICommunicator:
        """A group's communicator around communicators already split; the thread stays its parent's."""
        group = cls.__new__(cls)
        group._mpi, group._comm, group._thread_comm, group._thread = parent._mpi, comm, thread_comm, parent._thread
        group._polling = parent._polling
        group._poll = parent._polls(comm)
        group._owns_thread = False
        group._groups = []
        group._closed = False
        group._cuda_aware = cuda_aware_mpi()
        Communicator.__init__(group, layout)
        return group

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        if buffer.dtype not in _NATIVE_SUM_DTYPES and buffer.dtype not in _WIDENED_DTYPES:
            raise TypeError(f"the mpi backend cannot all-reduce {buffer.dtype} buffers")
        on_device = buffer.device.type == "cuda" and self._cuda_aware
        # A CUDA-aware MPI reduces device memory itself; any other build gets a host copy.
        staging_device = buffer.device if on_device else torch.device("cpu")
        widened = _WIDENED_DTYPES.get(buffer.dtype, buffer.dtype)
        reduced = (
            buffer
            if (buffer.device == staging_device and widened == buffer.dtype)
            else buffer.to(device=staging_device, dtype=widened)
        )
        array: Any
        if on_device:
            # MPI reads the memory directly: the kernels that wrote it must have finished.
            torch.cuda.current_stream(buffer.device).synchronize()
            array = [reduced, _MPI_TYPES[widened](self._mpi)]
        else:
            array = _numpy_view(reduced)
        divisor = self.size if average else 1
        if (
            self._thread is not None
            and self._poll
            and not on_device
            and self.size > 1
            and reduced.dtype in _POLLED_SUM_DTYPES
            and reduced.numel() * reduced.element_size() >= POLLED_ALLREDUCE_BYTES
        ):
            waited = threading.Event()
            future = self._thread.submit(
                polled_allreduce, self._thread_comm, self._mpi, array, self._thread.receive_space, waited
            )
            return _ThreadedHandle(future, buffer, reduced, array, divisor, waited)
        if self._thread is not None:
            future = self._thread.submit(self._thread_comm.Allreduce, self._mpi.IN_PLACE, array, self._mpi.SUM)
            return _ThreadedHandle(future, buffer, reduced, array, divisor)
        request = self._comm.Iallreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)
        return _MPIHandle(request, buffer, reduced, array, divisor)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, self.size)
        return self._exchange_bytes("Allgather", buffer, output)

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_alltoall(buffer, output, self.size)
        # Row r of the send buffer is the r-th equal share MPI sends to rank r.
        return self._exchange_bytes("Alltoall", buffer, output)

    def _exchange_bytes(self, collective: str, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        """``collective`` (Allgather or Alltoall) of raw bytes, whatever the dtype (no arithmetic happens),
        on the communication thread or as MPI's non-blocking I-variant; device memory goes through the host."""
        send = buffer if buffer.device.type == "cpu" else buffer.cpu()
        staged = output if output.device.type == "cpu" else torch.empty_like(output, device="cpu")
        arrays = (_byte_view(send), _byte_view(staged))
        waited = None
        if self._thread is not None and self._poll:
            start, waited = getattr(self._thread_comm, "I" + collective.lower()), threading.Event()
            pending: Any = self._thread.submit(_polled, start, waited, *arrays)
        elif self._thread is not None:
            pending = self._thread.submit(getattr(self._thread_comm, collective), *arrays)
        else:
            pending = getattr(self._comm, "I" + collective.lower())(*arrays)
        return _GatherHandle(pending, output, staged, arrays, waited)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this group of {self.size}")
        # Broadcast moves bytes without arithmetic, so any dtype travels as raw bytes.
        staged = buffer if buffer.device.type == "cpu" else buffer.cpu()
        self._comm.Bcast(_numpy_view(staged.reshape(-1).view(torch.uint8)), root=root)
        if staged is not buffer:
            buffer.copy_(staged)

    def barrier(self) -> None:
        self._comm.Barrier()

    def collective_path(self, device: torch.device) -> str:
        progress = "Iallreduce progressed by polling"
        if self._thread is not None:
            polling = (
                f", byte exchanges and allreduces from {POLLED_ALLREDUCE_BYTES >> 20} MiB tested every "
                f"{POLL_SECONDS * 1000:g} ms"
                if self._poll
                else ""
            )
            progress = f"a communication thread{polling}"
        if device.type != "cuda":
            return f"MPI on host memory, {progress}"
        if self._cuda_aware:
            return f"CUDA-aware MPI on device memory, {progress}"
        return f"MPI staged through host memory (this MPI is not CUDA-aware), {progress}"

    def _split(self, ranks: int) -> Communicator:
        if ranks == 1:
            return SingleCommunicator(name=self.name)
        return self._split_by(self.rank // ranks, group_layout(self.rank, ranks))

    def _split_across(self, ranks: int) -> Communicator:
        if ranks == self.size:
            return SingleCommunicator(name=self.name)
        return self._split_by(self.rank % ranks, across_layout(self.rank, ranks, self.size))

    def _split_by(self, color: int, layout: WorldLayout) -> MPICommunicator:
        """The group of the ranks with this ``color``, ordered by rank (collective over this communicator)."""
        key = self.rank
        # Both splits run on the main thread, over the main communicator: the communication thread
        # may be inside a collective on its own communicator meanwhile, and MPI forbids two threads
        # in collectives on one communicator at once.
        comm = self._comm.Split(color, key)
        thread_comm = self._comm.Split(color, key) if self._thread is not None else None
        group = MPICommunicator._group(self, comm, thread_comm, layout)
        self._groups.append(group)
        return group

    def close(self) -> None:
        """Free this communicator's MPI communicators, its groups' first (closing a group before its
        parent is fine too, and closing twice does nothing). The world's close also ends the thread."""
        if self._closed:
            return
        self._closed = True
        for group in self._groups:
            group.close()
        if self._owns_thread and self._thread is not None:
            self._thread.shutdown()
        self._thread = None
        # When Horovod initialised MPI, its shutdown finalises MPI, after which no MPI call is allowed.
        if not self._mpi.Is_finalized():
            for comm in (self._comm, self._thread_comm):
                if comm is not None and comm != self._mpi.COMM_NULL:
                    comm.Free()
