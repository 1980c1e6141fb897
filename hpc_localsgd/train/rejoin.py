"""A replacement joining a running job (``train --rejoin``, ``comm.on_worker_loss: continue``).

At a global sync the members take in the replacements that are ready (comm/elastic.py); rank 0 then hands
each of them its whole state as it stands after that sync: its model (x̄, identical on every member), BN
statistics and integer buffers, inner optimizer state (rank 0's: the replacement continues as a copy of
rank 0 on its own data shard, rather than from an empty state whose first steps would differ from every
other worker's), the outer optimizer's anchor and momentum, and the step. The LR follows from the step, by
the run's own schedule (laid out for the starting world's global batch): the group's LR, not a fresh
schedule's. The state travels as one broadcast per tensor over the members' group; members other than the
replacements receive it into scratch memory.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..algorithms.engine import AveragingEngine
from ..comm.agree import broadcast_text
from ..comm.base import Communicator
from ..comm.membership import run_agreed

# What a replacement receives: the engine's per-rank state, its shared state, the model's integer buffers.
_PARTS = ("rank", "shared", "int")


def _state(engine: AveragingEngine) -> dict[str, dict[str, torch.Tensor]]:
    return {"rank": engine.rank_state(), "shared": engine.shared_state(), "int": engine.int_buffers()}


def _send_state(
    comm: Communicator, engine: AveragingEngine, step: int
) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Rank 0's state and ``step`` to every member (collective); the step and the state received, on every rank."""
    state = _state(engine) if comm.is_root else {}
    manifest = None
    if comm.is_root:
        shapes = {
            part: [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in state[part].items()]
            for part in _PARTS
        }
        manifest = json.dumps({"step": step, **shapes})
    described = json.loads(broadcast_text(comm, manifest))
    received: dict[str, dict[str, torch.Tensor]] = {part: {} for part in _PARTS}
    for part in _PARTS:
        for name, dtype, shape in described[part]:
            if comm.is_root:
                buffer = state[part][name].detach().clone().contiguous()
            else:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype))
            comm.broadcast_(buffer, root=0)
            received[part][name] = buffer
    return int(described["step"]), received


def admit_replacements(comm: Communicator, engine: AveragingEngine, step: int) -> tuple[int, ...]:
    """Members, after the global sync that completed ``step`` steps: take in the replacements that are ready and
    hand them the state (all-or-nothing among the members). The ids taken in; () where members never change."""
    membership = comm.membership
    if membership is None:
        return ()

    def take_in() -> tuple[int, ...]:
        started = time.monotonic()
        joining = membership.admit_replacements()
        if joining:
            _send_state(comm, engine, step)
            # The members' pause counts the state's transfer too, not only the agreement.
            change = membership.changes[-1]
            membership.changes[-1] = dataclasses.replace(change, recovery_seconds=time.monotonic() - started)
        return joining

    return run_agreed(comm, take_in, lambda: None)


def join_run(comm: Communicator, engine: AveragingEngine, model: torch.nn.Module) -> int:
    """A replacement: wait to be taken in, receive rank 0's state into the engine and the model, and return
    the step the run stands at (the replacement's training goes on from there)."""
    membership = comm.membership
    assert membership is not None  # --rejoin makes an elastic communicator
    membership.wait_for_admission()
    step, received = _send_state(comm, engine, -1)
    membership.commit()  # the members take it in all-or-nothing (admit_replacements)
    engine.load_state(received["rank"], received["shared"], step)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in received["int"].items():
            buffers[name].copy_(value)
    return step
