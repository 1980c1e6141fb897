"""The communicator interface: everything the algorithms need from a backend, and no more.

Backends (``single``, ``mpi``, ``horovod``, ``torch``, ``threads``, ``simulated``) each live in one
file and implement the primitives below on *contiguous* tensors, plus ``split`` into groups of
consecutive ranks (a worker of several ranks, a node) and ``split_across`` them (the ranks at one position
in every group, to average a worker's model between workers one shard per rank). Nothing above this
package imports horovod, mpi4py or torch.distributed.

Averaging is "sum, then divide by size" everywhere so that every backend computes the
same value; backends with a native average may use it (results agree to float rounding).
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..launcher.env import WorldLayout


class PeerLost(RuntimeError):
    """A collective failed because a member of the communicator was lost (it died, or stopped answering).
    Only communicators whose members may leave (``comm/elastic.py``) raise it; the message says why."""


@dataclass(frozen=True)
class MembershipChange:
    """One change of membership, as the training loop records and prints it."""

    workers_before: int
    workers_after: int
    left: tuple[int, ...]  # ids (launcher ranks) that left
    joined: tuple[int, ...]
    recovery_seconds: float
    reason: str
    ranks_per_worker: int = 1

    @property
    def left_workers(self) -> list[int]:
        return sorted({i // self.ranks_per_worker for i in self.left})

    @property
    def joined_workers(self) -> list[int]:
        return sorted({i // self.ranks_per_worker for i in self.joined})

    def description(self) -> str:
        """Who left and why, who joined: "worker 2 (rank 2) lost: connection closed by peer (Gloo)"."""

        def named(ids: Sequence[int]) -> str:
            workers = sorted({i // self.ranks_per_worker for i in ids})
            noun = "worker" if len(workers) == 1 else "workers"
            ranks = "rank" if len(ids) == 1 else "ranks"
            return f"{noun} {', '.join(map(str, workers))} ({ranks} {', '.join(map(str, sorted(ids)))})"

        parts = []
        if self.left:
            parts.append(f"{named(self.left)} lost: {self.reason}")
        if self.joined:
            parts.append(f"{named(self.joined)} joined with rank 0's state")
        return "; ".join(parts)


class Membership(Protocol):
    """A world whose members may leave (comm/elastic.py): its communicator and every split of it carry it."""

    changes: list[MembershipChange]  # not yet taken by the training loop

    def commit(self) -> None: ...
    def recover(self, lost: PeerLost) -> MembershipChange: ...
    def admit_replacements(self) -> tuple[int, ...]: ...
    def become_spare(self) -> int: ...
    def wait_for_admission(self) -> MembershipChange: ...


class Handle(abc.ABC):
    """A non-blocking collective in flight."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the collective has completed and its buffer holds the result."""

    def progress(self) -> None:
        """Give the backend a chance to advance the collective, without blocking. MPI libraries
        without an asynchronous progress thread advance non-blocking collectives only inside MPI
        calls; backends with their own thread (Horovod, Gloo, NCCL) need nothing."""
        return None

    def wait_beside(self) -> None:
        """Complete the collective from a thread beside the one that started it (the streaming sync's
        thread), leaving its result in place, without telling the backend that training waits for it. The
        starting thread still calls ``wait`` where every rank calls it; that then only does the backend's
        bookkeeping. Only on a communicator whose ``waits_beside`` is true."""
        self.wait()

    def step_waits(self) -> None:
        """Training now waits for this collective, which a thread beside it is waiting for: a backend
        that paces its progress by whether the step waits (mpi's polled exchanges) may hurry."""
        return None


class DoneHandle(Handle):
    """A collective that completed when it was started (single process, blocking fall-backs)."""

    def wait(self) -> None:
        return None


class Communicator(abc.ABC):
    """A group of ranks that reduce and broadcast contiguous tensors in place."""

    name: str = "abstract"
    # Workers this process stands for. Only the simulated backend has more than one: it runs
    # every worker in one process, and the tensors given to its collectives are stacked over
    # them (leading dimension ``replicas``, one row per worker, rows not necessarily contiguous).
    replicas: int = 1
    # Set where members may leave (comm/elastic.py): the agreement among them. None: every member stays.
    membership: Membership | None = None

    def __init__(self, layout: WorldLayout) -> None:
        self.layout = layout

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def local_rank(self) -> int:
        return self.layout.local_rank

    @property
    def is_root(self) -> bool:
        return self.layout.rank == 0

    @property
    def waits_beside(self) -> bool:
        """Whether a handle's ``wait_beside`` may run on another thread while this one goes on starting
        collectives: the wait gives up the Python lock, and the backend's bookkeeping stays in ``wait``."""
        return False

    @abc.abstractmethod
    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        """Start an in-place allreduce (sum, or mean when ``average``) of a contiguous tensor.

        Collectives must be started in the same order on every rank.
        """

    def allreduce_(self, buffer: torch.Tensor, average: bool = True) -> None:
        """Blocking in-place allreduce of a contiguous tensor."""
        self.iallreduce_(buffer, average).wait()

    @abc.abstractmethod
    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        """Start gathering every rank's ``buffer`` into ``output`` on every rank: after ``wait``,
        ``output[r]`` holds rank r's buffer, bit for bit (no arithmetic, so any dtype travels).

        ``buffer`` is contiguous; ``output`` is contiguous with shape ``(size, *buffer.shape)`` and the
        buffer's dtype and device. Neither may be touched until ``wait`` returns. Collectives, this one
        included, must be started in the same order on every rank, as for ``iallreduce_``.
        The simulated backend is the exception to the shape: there every worker's row is already in
        the one process, so ``output`` has the buffer's shape and receives a copy of it (``size`` rows of
        each group sit along the rows as for its allreduce).
        """

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        """Start an all-to-all of raw rows: row r of ``buffer`` goes to rank r, and after ``wait``
        ``output[r]`` holds rank r's row for this rank, bit for bit (no arithmetic, so any dtype travels).

        ``buffer`` and ``output`` are contiguous, of the same shape ``(size, ...)``, dtype and device, and
        untouched until ``wait`` returns; started in the same order on every rank. The simulated backend
        has no all-to-all: its averages see every worker's rows in one process (compression.py)."""
        raise NotImplementedError(f"the {self.name} backend has no all-to-all")

    @abc.abstractmethod
    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        """Blocking in-place broadcast of a contiguous tensor from ``root``."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Block until every rank has arrived."""

    def split(self, ranks: int) -> Communicator:
        """This rank's group of ``ranks`` consecutive ranks (global ranks g*ranks ... g*ranks + ranks - 1,
        g = rank // ranks) as a communicator of its own: rank = rank % ranks, size = ranks.
        Collective over this communicator: every rank calls it, with the same ``ranks``, in the same order.
        ``ranks`` must divide ``size`` (else ValueError). ranks == size may return self; ranks == 1 gives a
        communicator of one rank (its collectives are no-ops that complete at once). The returned communicator
        supports iallreduce_/allreduce_/broadcast_ (root is a rank *within the group*)/barrier, and
        its collectives may be interleaved with those of the parent and of other groups in any order that
        is the same on every rank of the group. ``close()`` of the parent releases its groups.

        A group's ``layout`` has the rank and size within the group, also as local rank and size, and
        node_rank 0 of num_nodes 1: the group does not know how its ranks sit on nodes (the parent's
        layout does). Its ``name`` and ``replicas`` are the parent's.
        """
        check_group_size(ranks, self.size)
        if ranks == self.size:
            return self
        return self._split(ranks)

    def _split(self, ranks: int) -> Communicator:
        """``split`` for 1 <= ranks < size, ``ranks`` dividing size (checked by ``split``)."""
        raise NotImplementedError(f"the {self.name} backend has no groups of ranks")

    def split_across(self, ranks: int) -> Communicator:
        """The ranks at this rank's position in every group of ``ranks`` consecutive ranks: the ranks
        {rank % ranks + k * ranks for k in range(size // ranks)}, as a communicator of its own:
        rank = rank // ranks, size = size // ranks (so for workers of R ranks, rank j of every worker).
        Collective over this communicator: every rank calls it with the same ``ranks``, in the same order.
        ``ranks`` must divide ``size`` (else ValueError naming both). ranks == 1 returns self; ranks == size
        gives a communicator of one rank.

        Everything else is as for ``split``: the layout (rank and size within the new communicator, also as
        local rank and size, node_rank 0 of num_nodes 1), the parent's ``name`` and ``replicas``, broadcast
        roots that are ranks within the new communicator, interleaving with the collectives of the parent and
        of other groups in an order that is the same on every rank, and ``close()`` of the parent.
        """
        check_group_size(ranks, self.size, across=True)
        if ranks == 1:
            return self
        return self._split_across(ranks)

    def _split_across(self, ranks: int) -> Communicator:
        """``split_across`` for 1 < ranks <= size, ``ranks`` dividing size (checked by ``split_across``)."""
        raise NotImplementedError(f"the {self.name} backend has no communicators across groups of ranks")

    def note_phase(self, phase: str, step: int) -> None:
        """This rank is now in ``phase`` (one of ``watchdog``'s phases) with ``step`` steps completed: the
        stall watchdog's heartbeat says so, and names it in its lines. Cheap (an assignment); nothing where
        no watchdog watches this communicator."""
        return None

    def collective_path(self, device: torch.device) -> str:
        """How this backend's collectives move tensors that live on ``device`` (the start-up line names it:
        on GPUs, whether the reduction runs on device memory or is staged through the host)."""
        return f"{self.name} collectives"

    def thread_cpu_seconds(self) -> float | None:
        """CPU seconds the backend's own communication thread in this process has used so far, where the
        backend has one it can measure (mpi's); None elsewhere (Horovod's and Gloo's run in C++)."""
        return None

    def close(self) -> None:
        """Release backend resources; the communicator is unusable afterwards."""
        return None


def check_group_size(ranks: int, size: int, across: bool = False) -> None:
    """Groups of consecutive ranks tile the communicator only when their size divides its size
    (``across``: the message speaks of ``split_across``)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or size % ranks != 0:
        preposition = "across" if across else "into"
        raise ValueError(
            f"cannot split a communicator of {size} ranks {preposition} groups of {ranks!r} ranks: "
            f"the group size must be a positive divisor of {size}"
        )


def group_layout(rank: int, ranks: int) -> WorldLayout:
    """The layout of rank ``rank``'s group of ``ranks`` consecutive ranks (see ``Communicator.split``)."""
    return WorldLayout(
        rank=rank % ranks, size=ranks, local_rank=rank % ranks, local_size=ranks, node_rank=0, num_nodes=1
    )


def across_layout(rank: int, ranks: int, size: int) -> WorldLayout:
    """The layout of rank ``rank``'s communicator across the groups of ``ranks`` consecutive ranks of a
    communicator of ``size`` ranks (see ``Communicator.split_across``)."""
    return WorldLayout(
        rank=rank // ranks,
        size=size // ranks,
        local_rank=rank // ranks,
        local_size=size // ranks,
        node_rank=0,
        num_nodes=1,
    )


# A partition of the world's ranks into communicators of equal size, each as its world ranks in rank order:
# how the backends that must create every group on every rank (torch, horovod) name the groups of a split.
Partition = tuple[tuple[int, ...], ...]


def partition_into(partition: Partition, ranks: int) -> Partition:
    """Every part split into its groups of ``ranks`` consecutive ranks, in order (``split``)."""
    return tuple(part[first : first + ranks] for part in partition for first in range(0, len(part), ranks))


def partition_across(partition: Partition, ranks: int) -> Partition:
    """Every part split across its groups of ``ranks`` (``split_across``): positions j, j + ranks, ..., in order."""
    return tuple(part[position::ranks] for part in partition for position in range(ranks))


class SerialThread:
    """A daemon thread that runs the calls submitted to it one at a time, in the order they were
    submitted; each call's result or exception is in the future ``submit`` returns. Daemon (a
    ThreadPoolExecutor's thread is joined at exit): a rank that stops on an error must be able to exit
    even when a call waits for a collective that a peer will never join."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self.cpu_seconds = 0.0  # CPU time the calls took on the thread (its sleeps and waits excluded)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, call, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call, args = item
            started = time.thread_time()
            try:
                result = call(*args)
            except BaseException as exc:  # handed to whoever waits on the future
                self.cpu_seconds += time.thread_time() - started
                future.set_exception(exc)
            else:
                self.cpu_seconds += time.thread_time() - started  # counted before the waiter wakes
                future.set_result(result)

    def stop(self) -> None:
        """Let the thread end once the calls already submitted are done, without waiting for it."""
        self._queue.put(None)

    def shutdown(self) -> None:
        self.stop()
        self._thread.join()
