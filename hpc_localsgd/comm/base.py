"""The communicator interface: everything the algorithms need from a backend, and no more.

Backends (``single``, ``mpi``, ``horovod``, ``torch``, ``threads``, ``simulated``) each live in one
file and implement the four primitives below on *contiguous* tensors, plus ``split`` into groups of
consecutive ranks (a worker of several ranks, a node). Nothing above this package imports horovod,
mpi4py or torch.distributed.

Averaging is "sum, then divide by size" everywhere so that every backend computes the
same value; backends with a native average may use it (results agree to float rounding).
"""

from __future__ import annotations

import abc

import torch

from ..launcher.env import WorldLayout


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

    @abc.abstractmethod
    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        """Start an in-place allreduce (sum, or mean when ``average``) of a contiguous tensor.

        Collectives must be started in the same order on every rank.
        """

    def allreduce_(self, buffer: torch.Tensor, average: bool = True) -> None:
        """Blocking in-place allreduce of a contiguous tensor."""
        self.iallreduce_(buffer, average).wait()

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

    def close(self) -> None:
        """Release backend resources; the communicator is unusable afterwards."""
        return None


def check_group_size(ranks: int, size: int) -> None:
    """Groups of consecutive ranks tile the communicator only when their size divides its size."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or size % ranks != 0:
        raise ValueError(
            f"cannot split a communicator of {size} ranks into groups of {ranks!r} ranks: "
            f"the group size must be a positive divisor of {size}"
        )


def group_layout(rank: int, ranks: int) -> WorldLayout:
    """The layout of rank ``rank``'s group of ``ranks`` consecutive ranks (see ``Communicator.split``)."""
    return WorldLayout(
        rank=rank % ranks, size=ranks, local_rank=rank % ranks, local_size=ranks, node_rank=0, num_nodes=1
    )
