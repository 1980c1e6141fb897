"""How every phase times what it compares, so that each repetition yields one paired sample per
configuration measured under the same conditions.

The configurations compared alternate within every repetition (A B, then B A, ...) and every timed
region starts behind a barrier, so that the ranks start together. For anything collective the value
of a repetition is the slowest rank's (a collective, a training window or a checkpoint is done when
its last rank is done); shares and CPU seconds are averaged over ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..algorithms.accounting import GLOBAL
from ..comm.base import Communicator
from .workload import EngineLoop, TrainingLoop, synchronize_device


# --- the ranks' values reduced to one per repetition ----------------------------------------------------
def gather(comm: Communicator, values: Sequence[float]) -> torch.Tensor:
    """Every rank's ``values`` on every rank, as a (ranks × len(values)) float64 matrix.

    One summed allreduce of a matrix where each rank fills only its own row: the communicator
    interface has no gather, and this costs one small collective per phase, outside any timing.
    """
    rows = torch.zeros(comm.size, len(values), dtype=torch.float64)
    rows[comm.rank] = torch.tensor(list(values), dtype=torch.float64)
    if comm.size > 1:
        comm.allreduce_(rows, average=False)
    return rows


def slowest(comm: Communicator, values: Sequence[float]) -> list[float]:
    """Per entry, the largest value over ranks (the time at which the last rank finished)."""
    return gather(comm, values).max(dim=0).values.tolist()


def rank_mean(comm: Communicator, values: Sequence[float]) -> list[float]:
    return gather(comm, values).mean(dim=0).tolist()


def split_by_repetition(values: Sequence[float], repeats: int) -> list[list[float]]:
    """Values laid out configuration after configuration, ``repeats`` each, as one list per configuration."""
    return [list(values[i : i + repeats]) for i in range(0, len(values), repeats)]


# --- actions: any callable, timed alone ----------------------------------------------------------------
def timed(comm: Communicator, device: torch.device, action: Callable[[], None]) -> float:
    """This rank's seconds for ``action``, started behind a barrier, queued device work included."""
    comm.barrier()
    start = time.perf_counter()
    action()
    synchronize_device(device)
    return time.perf_counter() - start


def alternating(
    comm: Communicator, device: torch.device, actions: Sequence[Callable[[], None]], repeats: int, warmup: int
) -> list[list[float]]:
    """Seconds per repetition for each action (slowest rank), the order rotating every repetition."""
    for _ in range(warmup):
        for action in actions:
            action()
    per_rank: list[list[float]] = [[] for _ in actions]
    for repetition in range(repeats):
        order = list(range(len(actions)))
        shift = repetition % len(actions)
        for index in order[shift:] + order[:shift]:
            per_rank[index].append(timed(comm, device, actions[index]))
    return split_by_repetition(slowest(comm, [t for times in per_rank for t in times]), repeats)


def time_alone(run: Callable[[int], None], steps: int, repeats: int, warmup: int) -> list[float]:
    """This rank's seconds per window of ``steps`` steps of ``run``, without a barrier: for a loop that
    runs before any communicator exists (the ranks start it together when they start)."""
    for _ in range(warmup):
        run(steps)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        seconds.append(time.perf_counter() - start)
    return seconds


# --- training windows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """``steps`` steps of ``loop``, one timed sample per repetition."""

    loop: TrainingLoop
    steps: int


@dataclass
class Measured:
    """What the windows of one configuration measured, one entry per repetition."""

    steps: int
    seconds: list[float]  # slowest rank
    share: list[float] = field(default_factory=list)  # blocked-in-communication share, mean over ranks
    sent: list[int] = field(default_factory=list)  # bytes this rank sent (alike on every rank, to one element's)
    sent_global: list[int] = field(default_factory=list)  # of which over all ranks
    # CPU seconds a step (mean over ranks) of the step's thread, of the process, and for engine loops of the
    # sync thread and of the backend's communication thread (the last only where the backend measures it).
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, samples_per_step: int) -> list[float]:
        """Samples per second of each repetition; ``samples_per_step``: over all ranks."""
        return [samples_per_step * self.steps / t for t in self.seconds]

    def bytes_per_sample(self, batch: int, sent: Sequence[int] | None = None) -> list[float]:
        """Bytes this rank sent per sample it trained (``sent``: another count than all it sent)."""
        return [b / (self.steps * batch) for b in (self.sent if sent is None else sent)]


def time_window(comm: Communicator, loop: TrainingLoop, steps: int) -> tuple[float, float, int, int, dict[str, float]]:
    """(seconds, seconds blocked in communication, bytes sent, of which over all ranks, CPU seconds by
    thread) of ``steps`` steps on this rank.

    The ranks start together (a barrier outside the timing), so the slowest rank's time is the time
    the window took. The CPU is read inside the timing too: a barrier that spins would otherwise count.
    """
    comm.barrier()
    comm_before, bytes_before, global_before, cpu_before = (
        loop.comm_seconds(),
        loop.bytes_sent(),
        global_bytes(loop),
        thread_cpu(loop),
    )
    start = time.perf_counter()
    loop.run(steps)
    seconds = time.perf_counter() - start
    used = {name: after - cpu_before[name] for name, after in thread_cpu(loop).items() if name in cpu_before}
    sent, sent_global = loop.bytes_sent() - bytes_before, global_bytes(loop) - global_before
    return seconds, loop.comm_seconds() - comm_before, sent, sent_global, used


def interleaved_windows(
    comm: Communicator, windows: dict[str, Window], repeats: int, warmup: int
) -> dict[str, Measured]:
    """Every window once per repetition, the order rotating, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for window in windows.values():
            time_window(comm, window.loop, window.steps)
    names = list(windows)
    mine: dict[str, Measured] = {name: Measured(windows[name].steps, []) for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, blocked, sent, sent_global, used = time_window(comm, windows[name].loop, windows[name].steps)
            m = mine[name]
            m.seconds.append(seconds)
            m.share.append(blocked / seconds)
            m.sent.append(sent)
            m.sent_global.append(sent_global)
            for thread, cpu_seconds in used.items():
                m.cpu.setdefault(thread, []).append(cpu_seconds / m.steps)
    slow = split_by_repetition(slowest(comm, [t for m in mine.values() for t in m.seconds]), repeats)
    shares = split_by_repetition(rank_mean(comm, [s for m in mine.values() for s in m.share]), repeats)
    for m, slow_seconds, mean_share in zip(mine.values(), slow, shares, strict=True):
        m.seconds, m.share = slow_seconds, mean_share
        # Every rank runs the same loops on the same backend, so every rank has the same threads to average.
        m.cpu = {thread: rank_mean(comm, values) for thread, values in sorted(m.cpu.items())}
    return mine


def global_bytes(loop: TrainingLoop) -> int:
    """Bytes ``loop`` has sent in collectives over all ranks (for an engine: its ``global`` level)."""
    return loop.bytes_by_level().get(GLOBAL, 0) if isinstance(loop, EngineLoop) else loop.bytes_sent()


def thread_cpu(loop: TrainingLoop) -> dict[str, float]:
    """CPU seconds so far of the step's thread (this one), of the whole process (every thread, the C++
    ones of Horovod, Gloo and MPI included), and for an engine loop of its sync thread and of the
    backend's communication thread (where measured)."""
    used = {"step": time.thread_time(), "process": time.process_time()}
    if isinstance(loop, EngineLoop):
        sync, communication = loop.thread_cpu_seconds()
        used["sync"] = sync
        if communication is not None:
            used["communication"] = communication
    return used
