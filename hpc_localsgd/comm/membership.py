"""What the rest of the package knows of members that may leave: an operation run all-or-nothing among them
(:func:`run_agreed`), and how a process that cannot go on ends (the record of a change, ``MembershipChange``,
and the ``Membership`` an elastic communicator carries are part of the interface, in base.py).

Only ``comm/elastic.py`` has members that may leave; this module needs no torch.distributed, so that the
algorithms and the training loop use it on every backend (where it costs nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import UserError
from .base import Communicator, PeerLost

T = TypeVar("T")


class WorkerDropped(UserError):
    """This process left the run: the survivors went on without it (its worker lost a rank, or it reached the
    agreement after they had decided). Its own exit status, so that a launcher or a script can tell it apart."""

    exit_code = 6
    same_on_every_rank = False


class RunCannotGoOn(UserError):
    """A loss that the survivors cannot recover from (the store's host, rank 0, was lost; too few workers left)."""

    exit_code = 6
    same_on_every_rank = False


# Process groups of earlier memberships, kept alive on purpose: a group whose collective still waits for a
# stopped (not dead) member cannot be destroyed before Gloo's timeout, which would hold the process at exit
# for that long. The CLI ends such a process at once, after everything is written (``end_process_now``).
_ABANDONED_GROUPS: list[object] = []


def abandon(group: object) -> None:
    """Keep ``group`` (a process group no longer used) alive until the process ends."""
    _ABANDONED_GROUPS.append(group)


def end_process_now() -> bool:
    """Whether this process must end with ``os._exit`` rather than by the interpreter's shutdown, which would
    wait for the abandoned groups' collectives."""
    return bool(_ABANDONED_GROUPS)


def may_lose_members(comm: Communicator) -> bool:
    """Whether ``comm``'s members may leave (an elastic world, or a split of one)."""
    return comm.membership is not None


def run_agreed(comm: Communicator, operation: Callable[[], T], rollback: Callable[[], None]) -> T:
    """``operation()`` (collectives over ``comm`` or its splits), all-or-nothing among the members: where they
    may leave, it is committed by every member or rolled back (``rollback()``) and run again among the
    survivors; elsewhere it simply runs. Collective: every rank calls it at the same point."""
    membership = comm.membership
    if membership is None:
        return operation()
    while True:
        try:
            result = operation()
            membership.commit()
            return result
        except PeerLost as lost:
            rollback()
            membership.recover(lost)
