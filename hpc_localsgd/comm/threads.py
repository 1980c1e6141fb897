"""W ranks as W threads of one process, for tests and many-worker simulations on one machine.

Each collective is one ``threading.Barrier`` round: every thread leaves its buffer in its
slot, the barrier's action (run by exactly one thread once all have arrived) combines the
slots in rank order 0..W−1, and every thread copies the one combined tensor into its own
buffer. Summing in a fixed order makes the result deterministic and identical on every
thread, bit for bit.

One round per collective is enough: the combined tensor of round n is replaced only by the
action of round n+1, which cannot run before every thread has arrived there, that is after
every thread has copied round n's result.

``split`` is a round too: its action builds one ``ThreadGroup`` per group of consecutive ranks, so
every thread of a group gets the very same sub-group object, and the sub-groups' rounds only ever
involve their own threads. ``split_across`` is the same round with one ``ThreadGroup`` per position in
the groups (the ranks j, j + R, j + 2R, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ._buffers import check_alltoall, check_buffer, check_gather, divide_by_size_
from .base import Communicator, DoneHandle, Handle, group_layout

T = TypeVar("T")

# 16-bit floats are summed in float32 (as the mpi backend does) and rounded once at the end.
_ACCUMULATION_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclass
class _Contribution:
    """What one rank brought to a collective round."""

    kind: str  # "allreduce", "allgather", "alltoall", "broadcast", "barrier", "split" or "split_across"
    buffer: torch.Tensor | None = None
    output: torch.Tensor | None = None  # where the result goes, when not into ``buffer`` (allgather, alltoall)
    average: bool = False
    root: int = 0
    ranks: int = 0  # the group size, for "split" and "split_across"

    def signature(self) -> tuple[object, ...]:
        """What every rank must agree on; a difference means the ranks called different collectives."""
        if self.buffer is None:
            return self.kind, self.ranks
        return self.kind, self.average, self.root, tuple(self.buffer.shape), self.buffer.dtype


class ThreadGroup:
    """``size`` communicators for ``size`` threads of this process.

    ``communicators[r]`` is rank r's; hand each to its own thread (``run`` does that). All
    ranks share one node. The groups a ``split`` makes are ``ThreadGroup``s too, driven by the
    threads of this one. ``timeout`` bounds every wait for the other threads, so a thread
    that died or skipped a collective ends the others with ``threading.BrokenBarrierError``
    instead of a hang.
    """

    def __init__(self, size: int, timeout: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"a thread group needs at least one rank, got {size}")
        self.size = size
        self._timeout = timeout
        self._slots: list[_Contribution | None] = [None] * size
        self._combined: torch.Tensor | None = None
        # The last split's groups, in order of their first rank (for "split_across": of their position j).
        self._split_groups: list[ThreadGroup] = []
        self._descendants: list[ThreadGroup] = []  # every group split off, aborted with this one
        self._round = threading.Barrier(size, action=self._combine, timeout=timeout)
        self.communicators: list[ThreadCommunicator] = [ThreadCommunicator(self, rank) for rank in range(size)]

    def run(self, function: Callable[[ThreadCommunicator], T]) -> list[T]:
        """Call ``function(communicator)`` on one thread per rank; the results in rank order.

        The first failure (by rank; one that caused others to break counts first) is re-raised here.
        """
        results: list[T | None] = [None] * self.size
        failures: list[BaseException | None] = [None] * self.size

        def run_rank(rank: int) -> None:
            try:
                results[rank] = function(self.communicators[rank])
            except BaseException as failure:  # re-raised in the caller below
                failures[rank] = failure
                self.abort()  # the other ranks fail now rather than at the timeout

        threads = [threading.Thread(target=run_rank, args=(rank,), name=f"rank-{rank}") for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        raised = [failure for failure in failures if failure is not None]
        if raised:
            root_causes = [failure for failure in raised if not isinstance(failure, threading.BrokenBarrierError)]
            raise (root_causes or raised)[0]
        return results  # type: ignore[return-value]  # every rank returned

    def abort(self) -> None:
        """Break this group's and its sub-groups' rounds: threads waiting in them raise BrokenBarrierError."""
        self._round.abort()
        for group in self._descendants:
            group.abort()

    def _collective(self, rank: int, contribution: _Contribution) -> None:
        """One round: deposit, wait for all (the last arrival combines), copy the combined value back."""
        self._slots[rank] = contribution
        self._round.wait()
        destination = contribution.buffer if contribution.output is None else contribution.output
        if destination is not None and self._combined is not None:
            # An all-to-all's combined value holds every rank's rows: this rank takes column ``rank``.
            destination.copy_(self._combined[:, rank] if contribution.kind == "alltoall" else self._combined)

    def _combine(self) -> None:
        """The barrier's action: runs once per round, while every thread is waiting."""
        contributions = [slot for slot in self._slots if slot is not None]
        self._slots = [None] * self.size
        signatures = {contribution.signature() for contribution in contributions}
        if len(contributions) != self.size or len(signatures) != 1:
            raise RuntimeError(
                f"the ranks of a thread group started different collectives: {sorted(map(str, signatures))}"
            )
        first = contributions[0]
        if first.kind == "allreduce":
            assert first.buffer is not None
            total = first.buffer.to(dtype=_ACCUMULATION_DTYPES.get(first.buffer.dtype, first.buffer.dtype), copy=True)
            for contribution in contributions[1:]:
                assert contribution.buffer is not None
                total.add_(contribution.buffer.to(device=total.device, dtype=total.dtype))
            if first.average:
                divide_by_size_(total, self.size)
            self._combined = total
        elif first.kind in ("allgather", "alltoall"):
            # Rank order: row r is rank r's buffer.
            self._combined = torch.stack([c.buffer for c in contributions if c.buffer is not None])
        elif first.kind == "broadcast":
            root_buffer = contributions[first.root].buffer
            assert root_buffer is not None
            self._combined = root_buffer.clone()
        elif first.kind in ("split", "split_across"):
            # Groups of ``ranks`` consecutive ranks, or ``ranks`` groups across them of size // ranks each.
            count, size = (
                (self.size // first.ranks, first.ranks)
                if first.kind == "split"
                else (first.ranks, self.size // first.ranks)
            )
            self._split_groups = [ThreadGroup(size, timeout=self._timeout) for _ in range(count)]
            self._descendants += self._split_groups
            self._combined = None
        else:
            self._combined = None


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a ``ThreadGroup``; collectives complete when started, so handles are already done."""

    name = "threads"

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        super().__init__(group_layout(rank, group.size))
        self._group = group

    @property
    def waits_beside(self) -> bool:
        return True  # every handle is done when the collective returns

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        check_buffer(buffer)
        self._group._collective(self.rank, _Contribution("allreduce", buffer, average=average))
        return DoneHandle()

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_gather(buffer, output, self.size)
        self._group._collective(self.rank, _Contribution("allgather", buffer, output=output))
        return DoneHandle()

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        check_alltoall(buffer, output, self.size)
        self._group._collective(self.rank, _Contribution("alltoall", buffer, output=output))
        return DoneHandle()

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        check_buffer(buffer)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this group of {self.size}")
        self._group._collective(self.rank, _Contribution("broadcast", buffer, root=root))

    def barrier(self) -> None:
        self._group._collective(self.rank, _Contribution("barrier"))

    def _split(self, ranks: int) -> Communicator:
        self._group._collective(self.rank, _Contribution("split", ranks=ranks))
        # Read before this thread enters another round of the parent, the only thing that replaces it.
        return self._group._split_groups[self.rank // ranks].communicators[self.rank % ranks]

    def _split_across(self, ranks: int) -> Communicator:
        self._group._collective(self.rank, _Contribution("split_across", ranks=ranks))
        # As in ``_split``: read before this thread enters another round of the parent.
        return self._group._split_groups[self.rank % ranks].communicators[self.rank // ranks]
