"""Ranks agreeing on one outcome: a decision rank 0 takes, a failure any rank sees, a text.

Every function here is a collective: all ranks of the communicator call it together, in the same
order, and all of them return the same value (or raise the same error). That is what lets a
refusal or a failure end every rank together instead of leaving some waiting in a collective
that the others never reach. They move a few integers and bytes, so they are meant for process
communicators (one rank per process), not for the simulated backend's stacked workers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UserError
from .base import Communicator


def broadcast_text(comm: Communicator, text: str | None, root: int = 0) -> str:
    """``root``'s ``text`` on every rank (the other ranks' ``text`` is ignored; None is "").

    Any length: the byte count travels first, so nothing is cut and every rank sizes its buffer alike.
    """
    encoded = (text or "").encode() if comm.rank == root else b""
    length = torch.tensor([len(encoded)], dtype=torch.int64)
    comm.broadcast_(length, root=root)
    size = int(length.item())
    if size == 0:
        return ""
    buffer = torch.zeros(size, dtype=torch.uint8)
    if comm.rank == root:
        buffer.copy_(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    comm.broadcast_(buffer, root=root)
    return bytes(buffer.tolist()).decode()


def agree_on_failure(comm: Communicator, failure: str | None) -> str | None:
    """None when no rank failed, else the lowest failing rank's message, on every rank.

    ``failure`` is this rank's message, None when it succeeded. The lowest failing rank is chosen so
    that the outcome does not depend on timing, and every rank can report the same cause.
    """
    failed = torch.zeros(comm.size, dtype=torch.int64)
    failed[comm.rank] = 0 if failure is None else 1
    comm.allreduce_(failed, average=False)
    if not int(failed.sum().item()):
        return None
    first = int(failed.nonzero()[0].item())
    return broadcast_text(comm, failure, root=first)


def decide_on_root(comm: Communicator, decide: Callable[[], int | None]) -> int:
    """Run ``decide`` on rank 0 only and give its integer result (None counts as 0) to every rank.

    A ``UserError`` raised by ``decide`` is raised again, with rank 0's message, on every rank, so that
    a refusal seen by rank 0 ends all ranks together. Used for decisions about shared files that must
    not race between ranks (creating the run directory, choosing the checkpoint to resume).
    """
    message: str | None = None
    value = 0
    if comm.is_root:
        try:
            value = int(decide() or 0)
        except UserError as exc:
            message = str(exc)
    outcome = torch.tensor([0 if message is None else 1, value], dtype=torch.int64)
    comm.broadcast_(outcome, root=0)
    if int(outcome[0].item()):
        raise UserError(broadcast_text(comm, message, root=0))
    return int(outcome[1].item())
