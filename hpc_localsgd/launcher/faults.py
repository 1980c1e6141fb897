"""Fault injection: kill or stop a chosen rank at a chosen step, to rehearse what a job does when a
worker dies or hangs (the tests use it; so may a user before trusting a long job to it).

The plan comes from one environment variable, the same on every rank (``mpirun -x``, ``srun
--export``, torchrun pass it on)::

    HPC_LOCALSGD_INJECT_FAULT="kill:1:12"            # rank 1 kills itself (SIGKILL) after step 12
    HPC_LOCALSGD_INJECT_FAULT="stop:0:5"             # rank 0 stops itself (SIGSTOP) after step 5
    HPC_LOCALSGD_INJECT_FAULT="kill:2:16:sync"       # rank 2 dies as the global sync after step 16 begins
    HPC_LOCALSGD_INJECT_FAULT="kill:1:8,kill:3:20"   # several, comma-separated

Each entry is ``ACTION:RANK:STEP[:POINT]``. ACTION is ``kill`` (SIGKILL: the process vanishes, as on a
node failure) or ``stop`` (SIGSTOP: it hangs until someone sends SIGCONT, as on a hung mount). RANK is
the rank the launcher gave the process; STEP counts completed steps (1-based). POINT is ``step`` (after
the step's bookkeeping, before the next step begins: between syncs; the default) or ``sync`` (inside the
global sync due after that step, when this rank's part of it has begun: the other ranks find the sync
failed part-way). A plan that cannot be read ends every rank with one line, as any bad input does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError, print_line

FAULT_VARIABLE = "HPC_LOCALSGD_INJECT_FAULT"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
POINTS = ("step", "sync")


@dataclass(frozen=True)
class Fault:
    action: str  # a key of ACTIONS
    rank: int
    step: int
    point: str = "step"  # one of POINTS


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The entries of ``text`` (the variable's value); ``ConfigError`` naming the first bad one."""
    faults = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        fields = entry.split(":")
        problem = None
        if len(fields) not in (3, 4):
            problem = "expected ACTION:RANK:STEP[:POINT]"
        elif fields[0] not in ACTIONS:
            problem = f"action {fields[0]!r} is not one of {', '.join(ACTIONS)}"
        elif not (fields[1].isdigit() and fields[2].isdigit()) or int(fields[2]) < 1:
            problem = "RANK must be >= 0 and STEP >= 1, both integers"
        elif len(fields) == 4 and fields[3] not in POINTS:
            problem = f"point {fields[3]!r} is not one of {', '.join(POINTS)}"
        if problem is not None:
            raise ConfigError(f"{FAULT_VARIABLE}: {entry!r}: {problem}")
        faults.append(Fault(fields[0], int(fields[1]), int(fields[2]), fields[3] if len(fields) == 4 else "step"))
    return tuple(faults)


class FaultPlan:
    """The faults planned for this process (a rank), fired by :meth:`reached`."""

    def __init__(self, faults: tuple[Fault, ...], rank: int) -> None:
        self.faults = tuple(f for f in faults if f.rank == rank)

    @classmethod
    def from_env(cls, rank: int, env: Mapping[str, str] | None = None) -> FaultPlan:
        return cls(parse_faults((os.environ if env is None else env).get(FAULT_VARIABLE, "")), rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def reached(self, point: str, step: int) -> None:
        """This rank has reached ``point`` after completed step ``step``: fire what is planned there, saying so
        first in one line (to stderr), so that a rehearsal's log shows when the fault struck."""
        for fault in self.faults:
            if fault.point == point and fault.step == step:
                where = "inside the global sync after" if point == "sync" else "after"
                verb = {"kill": "kills", "stop": "stops"}[fault.action]
                print_line(
                    f"hpc-localsgd: fault injected: rank {fault.rank} {verb} itself {where} step {step} "
                    f"({FAULT_VARIABLE})",
                    sys.stderr,
                )
                os.kill(os.getpid(), ACTIONS[fault.action])


NO_FAULTS = FaultPlan((), 0)
