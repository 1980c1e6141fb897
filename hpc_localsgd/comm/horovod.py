"""Horovod backend (``horovod.torch``): Horovod's background thread runs the collectives.

Horovod matches operations across ranks by name, and a name may not be reused while an
operation with it is in flight. Names are stable (:class:`_OperationNames`): the same buffer role
gets the same name at every step, so Horovod's response cache answers its negotiation after the
first step (a fresh name per operation made every collective a cache miss, and evicted entries).
A group's names also carry its process set's id, so no two sets' names collide.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import BackendUnavailable, one_line
from ..launcher.env import WorldLayout
from ._buffers import check_alltoall, check_buffer, check_gather, divide_by_size_
from .base import (
    Communicator,
    Handle,
    Partition,
    across_layout,
    check_group_size,
    group_layout,
    partition_across,
    partition_into,
)
from .single import SingleCommunicator

# The dtypes horovod.torch 0.28 accepts (horovod/torch/adapter_v2.cc); bfloat16 is not one of them.
_HOROVOD_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64}
)
# Broadcast moves bits without arithmetic: other dtypes travel as integers of the same width.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# How often a wait beside the step polls an operation: Horovod's own wait spins holding the Python lock,
# which would stall the step's thread for the whole transfer.
_BESIDE_POLL_SECONDS = 0.001


class _BesideWaitable(Handle):
    """A Horovod operation waited for beside the step (``wait_beside``): polled, its result put in place;
    its name is freed only by ``wait``, on the thread that started it, so that every rank draws the same
    names for the operations it starts next."""

    def __init__(self, hvd: Any, hvd_handle: int, release_name: Callable[[], None]) -> None:
        self._hvd = hvd
        self._hvd_handle: int | None = hvd_handle
        self._release_name = release_name
        self._done = False

    def wait(self) -> None:
        if self._hvd_handle is None:
            return
        if not self._done:
            self._complete(self._hvd.synchronize(self._hvd_handle))
        self._hvd_handle = None
        self._release_name()

    def wait_beside(self) -> None:
        if self._hvd_handle is None or self._done:
            return
        while not self._hvd.poll(self._hvd_handle):
            time.sleep(_BESIDE_POLL_SECONDS)
        self._complete(self._hvd.synchronize(self._hvd_handle))  # done: returns at once
        self._done = True

    def _complete(self, result: Any) -> None:
        """Put the operation's result in place."""
        raise NotImplementedError


class _OperationNames:
    """Stable operation names, the same on every rank: ``<prefix>.<kind>.<dtype>.<shape>.<op>.<n>``.

    What a buffer is (its dtype and shape, the operation) names it, so a flat group's sync or a
    gradient bucket carries the same name at every step and Horovod's response cache recognises it.
    ``n`` is the smallest number not in flight with the same description, so that two buffers of
    one shape in flight at once never share a name. The buffer's address is not part of the name:
    it differs between ranks, and names must match across ranks. Every rank starts and waits for
    its collectives in the same order, so every rank draws the same ``n``.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._in_flight: dict[str, set[int]] = {}

    def take(self, kind: str, tensor: torch.Tensor, op: str) -> tuple[str, Callable[[], None]]:
        """A name for an operation about to start, and the call that frees it once it has completed."""
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = "x".join(str(n) for n in tensor.shape) or "scalar"
        description = f"{kind}.{dtype}.{shape}.{op}"
        busy = self._in_flight.setdefault(description, set())
        number = 0
        while number in busy:
            number += 1
        busy.add(number)
        return f"{self._prefix}.{description}.{number}", lambda: busy.discard(number)


class _HorovodHandle(_BesideWaitable):
    """A Horovod allreduce in flight; integer averaging and bfloat16 copy-back happen once it completes."""

    def __init__(
        self,
        hvd: Any,
        hvd_handle: int,
        buffer: torch.Tensor,
        reduced: torch.Tensor,
        divisor: int,
        release_name: Callable[[], None],
    ) -> None:
        super().__init__(hvd, hvd_handle, release_name)
        self._buffer = buffer
        self._reduced = reduced  # ``buffer`` itself, or its float32 copy for bfloat16
        self._divisor = divisor

    def _complete(self, result: Any) -> None:
        divide_by_size_(self._reduced, self._divisor)
        if self._reduced is not self._buffer:
            self._buffer.copy_(self._reduced)


class _HorovodGatherHandle(_BesideWaitable):
    """A Horovod allgather or all-to-all in flight; Horovod returns a new tensor, copied into the output
    once it completes."""

    def __init__(self, hvd: Any, hvd_handle: int, output: torch.Tensor, release_name: Callable[[], None]) -> None:
        super().__init__(hvd, hvd_handle, release_name)
        self._output = output

    def _complete(self, result: Any) -> None:
        gathered = result[0] if isinstance(result, tuple) else result  # an all-to-all also returns the splits
        self._output.reshape(-1).view(torch.uint8).view(gathered.shape).copy_(gathered)


class HorovodCommunicator(Communicator):
    """Collectives through ``horovod.torch``; Horovod's own rank and size, node fields from the launcher.

    ``group_sizes`` are the sizes ``split`` will be asked for, ``across_sizes`` those ``split_across``
    will be asked for (both of this, the world's, communicator). Horovod 0.28 runs collectives on a
    subset of ranks through process sets, which exist either from ``hvd.init(process_sets=[...])`` on
    or, with dynamic process sets switched on before ``hvd.init``, from ``hvd.add_process_set`` on.
    They are registered at ``hvd.init`` here: dynamic process sets make Horovod's background thread
    coordinate the table of sets on every cycle, for every operation, also in runs that never split
    (Horovod's own test suite keeps its process-set tests on static sets because dynamic ones were
    seen to slow all operations down), while the sizes a run needs are known from its configuration
    before the communicator exists. A run without groups initialises Horovod exactly as before.
    Each group of ``n`` consecutive ranks is one process set, and so is each class across groups of
    ``n`` (ranks j, j + n, ...); the two are asked for separately because each registered set costs
    Horovod's background thread some coordination on every cycle. ``split(n)`` for an ``n`` not among
    ``group_sizes``, or ``split_across(n)`` for one not among ``across_sizes`` (other than 1 and the world
    size), raises ValueError; so does a split of a group into sets not registered (say, across the
    groups inside a group): only the world's consecutive groups and the classes across them exist.
    """

    name = "horovod"

    def __init__(
        self,
        launcher_layout: WorldLayout,
        cycle_time_ms: float | None = None,
        group_sizes: Sequence[int] = (),
        across_sizes: Sequence[int] = (),
        stall_check_seconds: float | None = None,
    ) -> None:
        import horovod.torch as hvd  # imported here: horovod is optional and initialises MPI

        if cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"  # read once, by hvd.init()
        if stall_check_seconds is not None:
            # Horovod's coordinator (rank 0) warns of operations some ranks have not submitted; its lines
            # (naming the missing ranks and tensors) appear beside the stall watchdog's, after the same time.
            os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, math.ceil(stall_check_seconds)))
            # Its shutdown stays off: it sees nothing when rank 0 itself is the stalled one, and the ranks it
            # shuts down end with a HorovodInternalError, not the watchdog's line, exit status 5 and requeue.
            os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = "0"

        world = launcher_layout.size
        for ranks in group_sizes:
            check_group_size(ranks, world)
        for ranks in across_sizes:
            check_group_size(ranks, world, across=True)
        world_ranks = tuple(range(world))
        # Every rank registers every set, in the same order (Horovod requires it); sets of one rank
        # and of the whole world need none (the splits handle those without Horovod).
        sizes = sorted({ranks for ranks in group_sizes if 1 < ranks < world})
        sizes_across = sorted({ranks for ranks in across_sizes if 1 < ranks < world})
        partitions = [partition_into((world_ranks,), ranks) for ranks in sizes]
        partitions += [partition_across((world_ranks,), ranks) for ranks in sizes_across]
        process_sets = {partition: [hvd.ProcessSet(list(part)) for part in partition] for partition in partitions}
        try:
            if process_sets:
                hvd.init(process_sets=[each for sets in process_sets.values() for each in sets])
            else:
                hvd.init()
        except Exception as error:  # e.g. a Gloo-only build started by mpirun instead of horovodrun
            # The sets are built for the launcher's world: a Horovod that sees a smaller one (built
            # against another MPI) refuses them here, before ``check_world`` could name the mismatch.
            described = [f"groups of {ranks}" for ranks in sizes] + [f"across groups of {r}" for r in sizes_across]
            hint = (
                f" (it was given process sets for {', '.join(described)} of the launcher's "
                f"{world} ranks; is Horovod built against another MPI than the launcher's?)"
                if process_sets
                else ""
            )
            raise BackendUnavailable(
                f"comm.backend is 'horovod' but Horovod failed to start: {one_line(error)}{hint}"
            ) from None
        if hasattr(hvd, "barrier"):
            # hvd.init reads its table of process sets after its background thread has started; a rank
            # that finished early and then stopped (bad input found next) would shut the others' threads
            # down under them, and a slower rank's init fails with "Process set table was modified
            # outside of _get_process_set_ids_and_ranks()". No rank goes on until every init is done.
            hvd.barrier()
        self._hvd = hvd
        # A Horovod built without NCCL cannot reduce CUDA tensors: they are staged through the host.
        self._nccl = bool(hvd.nccl_built())
        self._process_set: Any = hvd.global_process_set
        self._process_sets = process_sets  # by partition of the world: the sets of its parts, in order
        self._registered = (sizes, sizes_across)  # for the messages of refused splits
        self._members = world_ranks  # the world ranks of this communicator's ranks 0, 1, ...
        self._partition: Partition = (world_ranks,)  # this communicator's members and its siblings'
        # This rank's communicator on each partition's set: one per set, so operation names never repeat.
        self._groups: dict[Partition, HorovodCommunicator] = {}
        self._is_world = True
        self._world: HorovodCommunicator = self
        self._names = _OperationNames("hpc_localsgd")
        super().__init__(dataclasses.replace(launcher_layout, rank=hvd.rank(), size=hvd.size()))

    def _group(self, partition: Partition, layout: WorldLayout) -> HorovodCommunicator:
        """This rank's part of ``partition`` as a communicator on its process set (the world's only)."""
        world = self._world
        if partition in world._groups:
            return world._groups[partition]
        world_rank = self._members[self.rank]
        part = next(index for index, members in enumerate(partition) if world_rank in members)
        process_set = world._process_sets[partition][part]
        group = HorovodCommunicator.__new__(HorovodCommunicator)
        group._hvd = self._hvd
        group._nccl = self._nccl
        group._process_set = process_set
        group._process_sets = {}
        group._registered = world._registered
        group._members = partition[part]
        group._partition = partition
        group._groups = {}
        group._is_world = False
        group._world = world
        # Names must be unique among the operations in flight; the set's id keeps a group's apart from
        # the world's and from other groups' (the numbers in flight are counted per communicator).
        group._names = _OperationNames(f"hpc_localsgd.set{process_set.process_set_id}")
        Communicator.__init__(group, layout)
        world._groups[partition] = group
        return group

    @property
    def waits_beside(self) -> bool:
        return True  # polled beside the step, names freed by ``wait`` (``_BesideWaitable``)

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        staging = torch.device("cpu") if buffer.device.type == "cuda" and not self._nccl else buffer.device
        if buffer.dtype == torch.bfloat16:
            reduced = buffer.to(device=staging, dtype=torch.float32)
        elif buffer.dtype in _HOROVOD_DTYPES:
            reduced = buffer.to(staging)
        else:
            raise TypeError(f"the horovod backend cannot all-reduce {buffer.dtype} buffers")
        # Horovod's Average scales by 1/size, which would truncate integers toward zero;
        # integers are summed and then floor-divided like on every other backend.
        native_average = average and reduced.is_floating_point()
        op = self._hvd.Average if native_average else self._hvd.Sum
        name, release_name = self._names.take("allreduce", reduced, "average" if native_average else "sum")
        try:
            hvd_handle = self._hvd.allreduce_async_(reduced, op=op, name=name, process_set=self._process_set)
        except BaseException:
            release_name()
            raise
        divisor = self.size if average and not native_average else 1
        return _HorovodHandle(self._hvd, hvd_handle, buffer, reduced, divisor, release_name)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, self.size)
        # Horovod concatenates along the first dimension: one row of raw bytes per rank, whatever the
        # dtype (bfloat16 is not one Horovod accepts, and no arithmetic happens).
        return self._exchange_bytes("allgather", buffer.reshape(1, -1).view(torch.uint8), output, "gather")

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_alltoall(buffer, output, self.size)
        # Raw bytes, one row per rank (Horovod splits the first dimension evenly without ``splits``).
        return self._exchange_bytes("alltoall", buffer.reshape(self.size, -1).view(torch.uint8), output, "alltoall")

    def _exchange_bytes(self, collective: str, rows: torch.Tensor, output: torch.Tensor, name_kind: str) -> Handle:
        """Horovod's ``collective``_async (allgather or alltoall) of the uint8 ``rows``, its result copied
        into ``output`` when waited on; a stable operation name per call site, as for allreduce."""
        if rows.device.type == "cuda" and not self._nccl:
            rows = rows.cpu()  # staged through the host, as allreduce is
        name, release_name = self._names.take(collective, rows, name_kind)
        try:
            hvd_handle = getattr(self._hvd, f"{collective}_async")(rows, name=name, process_set=self._process_set)
        except BaseException:
            release_name()
            raise
        return _HorovodGatherHandle(self._hvd, hvd_handle, output, release_name)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this group of {self.size}")
        # A same-width integer view shares the buffer's memory, so the broadcast still lands in place.
        travelling = buffer if buffer.dtype in _HOROVOD_DTYPES else buffer.view(_SAME_WIDTH_INT[buffer.element_size()])
        staged = travelling.cpu() if buffer.device.type == "cuda" and not self._nccl else travelling
        # Horovod names the root by its rank in the world, also within a process set.
        world_root = self._members[root]
        name, release_name = self._names.take("broadcast", staged, f"root{world_root}")
        try:
            self._hvd.broadcast_(staged, root_rank=world_root, name=name, process_set=self._process_set)
        finally:
            release_name()
        if staged is not travelling:
            travelling.copy_(staged)

    def collective_path(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "Horovod on host memory (MPI/Gloo), a background thread"
        if self._nccl:
            return "Horovod NCCL on device memory, a background thread"
        return "Horovod staged through host memory (built without NCCL), a background thread"

    def barrier(self) -> None:
        if not self._is_world:  # process sets came with Horovod 0.23, as did hvd.barrier
            self._hvd.barrier(process_set=self._process_set)
        elif hasattr(self._hvd, "barrier"):
            self._hvd.barrier()
        else:  # Horovod < 0.23: a one-element allreduce cannot finish before every rank joins it
            token = torch.zeros(1)
            name, release_name = self._names.take("barrier", token, "sum")
            try:
                self._hvd.allreduce_(token, op=self._hvd.Sum, name=name)
            finally:
                release_name()

    def _split(self, ranks: int) -> Communicator:
        if ranks == 1:
            return SingleCommunicator(name=self.name)
        # Consecutive blocks of ``ranks`` inside a group are the world's blocks of ``ranks``.
        partition = partition_into(self._partition, ranks)
        if partition not in self._world._process_sets:
            world_ranks = (self._world._members,)
            registered = ", ".join(map(str, self._registered[0])) or "none"
            if partition != partition_into(world_ranks, ranks):
                raise self._unregistered(f"groups of {ranks} ranks of a communicator across groups")
            raise ValueError(
                f"the horovod backend has no process sets for groups of {ranks} ranks (registered: {registered}); "
                f"pass group_sizes=[{ranks}, ...] to make_communicator, which registers them at hvd.init"
            )
        return self._group(partition, group_layout(self.rank, ranks))

    def _split_across(self, ranks: int) -> Communicator:
        if ranks == self.size:
            return SingleCommunicator(name=self.name)
        partition = partition_across(self._partition, ranks)
        if partition not in self._world._process_sets:
            if not self._is_world:
                raise self._unregistered(f"the communicators across groups of {ranks} ranks inside a group")
            registered = ", ".join(map(str, self._registered[1])) or "none"
            raise ValueError(
                f"the horovod backend has no process sets across groups of {ranks} ranks (registered: {registered}); "
                f"pass across_sizes=[{ranks}, ...] to make_communicator, which registers them at hvd.init"
            )
        return self._group(partition, across_layout(self.rank, ranks, self.size))

    def _unregistered(self, what: str) -> ValueError:
        return ValueError(
            f"the horovod backend has no process sets for {what}: it registers at hvd.init only the world's "
            "groups of consecutive ranks (group_sizes) and the communicators across them (across_sizes)"
        )

    def close(self) -> None:
        """The world's close shuts Horovod down, and with it every process set; a group's does nothing."""
        if self._is_world:
            self._hvd.shutdown()
