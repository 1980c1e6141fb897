"""The engine's global sync: one protocol, and what every implementation of it shares.

The engine calls a ``GlobalSync`` around each step (``begin_step``; ``before_backward``; ``end_step``,
which averages when the schedule says so and returns what the sync measured), asks it for its state
(``rank_state``, ``shared_state``, ``load_state``), lets it finish what is in flight (``settle``, at a
checkpoint or when training stops early) and ``close``s it. Two syncs implement it: ``BlockingAverage``
below, which averages the model x itself where it is due, and ``StreamingSync`` (streaming.py), which
averages each rank's update Δ = x_prev − x: compressed, delayed behind the next steps, or a fragment at a
time.

What they share exists once, here:

* the exchange between workers (``WorkerExchange``): with workers of R ranks (algorithms/hierarchy.py)
  rank j of each worker averages shard j of R with rank j of every other worker, and the worker's ranks
  assemble the shards, so a rank sends 1/R over the slow network;
* the BatchNorm rule: running statistics differ between a worker's ranks (each sees its own batches), so
  they are averaged inside the worker first, then between workers with everything else the sync
  averages. So at every global sync they become their mean over all ranks, and a rank sends 1/R of them
  between workers. The streaming sync sends them (and averaged optimizer state) this way with fragment 0,
  uncompressed and blocking;
* the anchor x_prev (the model after the previous sync) and the outer optimizer's state, saved in checkpoints;
* the optimizer-state policy at a sync (``optimizer_state``: keep, average with the model, or reset);
* how the bytes of a sync are counted: what this rank sends, between workers (``global``) and inside its
  worker (``worker``), once per sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..comm.base import Communicator, Handle
from ..comm.membership import may_lose_members, run_agreed
from ..config.schema import AlgorithmConfig
from ..launcher.faults import NO_FAULTS, FaultPlan
from .accounting import GLOBAL, CommStats, SyncTraffic
from .drift import SyncMeasurement, first_row, relative_consensus_distance, row_dot
from .flat import BUFFERS, PARAMS, FlatGroup, contiguous_part
from .hierarchy import WORKER
from .optimizer_state import STATE_KINDS
from .outer import OuterOptimizer
from .schedule import SyncSchedule

# A range [start, end) of one flat group's buffer.
Span = tuple[FlatGroup, int, int]


@runtime_checkable
class GlobalSync(Protocol):
    """What the engine asks of its global sync."""

    anchors: list[torch.Tensor]  # x_prev per flat group (parameters only); empty until the local phase
    bytes_per_sync: int  # what a rank sends between workers per sync of the whole model

    def begin_step(self, step: int) -> None: ...
    def before_backward(self, completed: int) -> None: ...
    def end_step(self, completed: int, lr: float) -> SyncMeasurement | None: ...
    def agreed_after_sync(self) -> list[torch.Tensor]: ...
    def traffic(self, gradient_bytes_per_step: int) -> SyncTraffic: ...
    def rank_state(self) -> dict[str, torch.Tensor]: ...
    def shared_state(self) -> dict[str, torch.Tensor]: ...
    def load_state(self, shared_state: dict[str, torch.Tensor], completed_steps: int) -> None: ...
    def settle(self) -> None: ...
    def close(self) -> None: ...

    @property
    def uses_sync_thread(self) -> bool: ...
    @property
    def no_sync_thread_because(self) -> str | None: ...
    @property
    def sync_thread_cpu_seconds(self) -> float: ...


class WorkerExchange:
    """The ranks a global sync averages over: the world, and with workers of R > 1 ranks the worker's
    ranks and rank j of every worker (the module docstring)."""

    def __init__(self, comm: Communicator, ranks_per_worker: int) -> None:
        self.comm = comm
        self.worker = comm.split(ranks_per_worker) if ranks_per_worker > 1 else None
        self.across = comm.split_across(ranks_per_worker) if ranks_per_worker > 1 else None
        self.shards = ranks_per_worker
        self.mine = comm.rank % ranks_per_worker  # this rank's shard
        # The shards this process averages: its own; every one where it simulates every rank.
        self.owned = list(range(ranks_per_worker)) if comm.replicas > 1 else [self.mine]
        # Whose bytes a process counts: its own; rank 0 of a worker's in a simulation, as for every process.
        self.counted = self.mine if comm.replicas == 1 else 0

    @property
    def between(self) -> Communicator:
        """What an update travels over between workers: rank j of every worker (the world when R = 1)."""
        return self.across if self.across is not None else self.comm

    def shard(self, start: int, end: int, index: int) -> tuple[int, int]:
        return contiguous_part(start, end, self.shards, index)

    def bytes_sent(self, spans: list[Span], statistics: list[torch.Tensor]) -> tuple[int, int]:
        """(between workers, inside the worker): what ``average`` sends from this rank, counted as if every
        rank took part (a world of one sends nothing; ``average`` then counts nothing)."""
        if self.worker is None:
            return sum((end - start) * g.flat.element_size() for g, start, end in spans), 0
        inside = sum(t.shape[-1] * t.element_size() for t in statistics)
        between = 0
        if self.between.size > 1:
            inside += sum((end - start) * g.flat.element_size() for g, start, end in spans)
            between = sum(
                (b - a) * g.flat.element_size()
                for g, start, end in spans
                for a, b in [self.shard(start, end, self.counted)]
            )
        return between, inside

    def average(self, spans: list[Span], statistics: list[torch.Tensor]) -> tuple[int, int]:
        """Average ``spans`` over all ranks, blocking. ``statistics``: tensors inside the spans that differ
        between a worker's ranks (BN statistics). With workers: those are averaged inside the worker, then
        rank j of each worker averages shard j of every span with rank j of the others, and the worker's
        ranks assemble the shards (each puts its own into zeros; summed: exact). Equal to the plain average
        over all ranks up to rounding (it sums workers, not ranks). Returns the bytes sent, as
        ``bytes_sent``, or (0, 0) in a world of one."""
        if self.comm.size == 1:
            return 0, 0
        if self.worker is None or self.across is None:
            wait_all([self.comm.iallreduce_(g.flat[..., a:b], average=True) for g, a, b in spans])
            return self.bytes_sent(spans, statistics)
        wait_all([self.worker.iallreduce_(t, average=True) for t in statistics if t.shape[-1]])
        if self.across.size > 1:  # else one worker: its ranks already agree
            shards = [(g, *self.shard(start, end, j)) for g, start, end in spans for j in self.owned]
            wait_all([self.across.iallreduce_(g.flat[..., a:b], average=True) for g, a, b in shards])
            if self.comm.replicas == 1:  # a simulation's rows already hold every averaged shard
                for g, start, end in spans:
                    a, b = self.shard(start, end, self.mine)
                    g.flat[..., start:a].zero_()
                    g.flat[..., b:end].zero_()
                self.assemble([g.flat[..., start:end] for g, start, end in spans])
        return self.bytes_sent(spans, statistics)

    def assemble(self, wholes: list[torch.Tensor]) -> None:
        """Sum ``wholes`` over the worker's ranks (each holds its shard and zeros elsewhere)."""
        assert self.worker is not None
        wait_all([self.worker.iallreduce_(whole, average=False) for whole in wholes])


def count_sync(stats: CommStats, between: int, inside: int) -> None:
    """One global sync's bytes: one round between workers, one inside the worker, where any were sent."""
    if between:
        stats.count(GLOBAL, between)
    if inside:
        stats.count(WORKER, inside)


def reset_optimizer_state(groups: list[FlatGroup]) -> None:
    """``optimizer_state: reset``: the inner optimizer's per-parameter state restarts at zero."""
    for group in groups:
        for kind in STATE_KINDS:
            group.slice(kind).zero_()


def averaged_statistics(groups: list[FlatGroup], averaged_kinds: frozenset[str]) -> list[torch.Tensor]:
    """The BN statistics a sync averages (those that differ between a worker's ranks), non-empty ones."""
    if BUFFERS not in averaged_kinds:
        return []
    return [t for t in (g.slice(BUFFERS) for g in groups) if t.shape[-1]]


@dataclass(frozen=True)
class SyncParts:
    """What every global sync is built from: the engine's flat storage and what a sync averages of it,
    the exchange between ranks, the settings, the schedule, the outer optimizer and the counters."""

    groups: list[FlatGroup]
    sync_spans: list[list[tuple[int, int]]]  # per flat group: the averaged prefix [start, end)
    averaged_kinds: frozenset[str]
    exchange: WorkerExchange
    cfg: AlgorithmConfig
    schedule: SyncSchedule
    outer: OuterOptimizer
    stats: CommStats
    faults: FaultPlan = NO_FAULTS  # launcher/faults.py: the blocking average fires its ``sync`` points


class AnchoredSync:
    """What both syncs keep the same way: x_prev (``anchors``) from the start of the local phase, when the
    sync needs it, and the outer optimizer's state beside it in a checkpoint; and what they are built from
    (``SyncParts``), the BN statistics they average and the optimizer-state policy."""

    def __init__(self, parts: SyncParts) -> None:
        self.groups, self.outer, self.schedule = parts.groups, parts.outer, parts.schedule
        self.exchange, self.stats, self.faults = parts.exchange, parts.stats, parts.faults
        self.statistics = averaged_statistics(parts.groups, parts.averaged_kinds)
        self.reset_state = parts.cfg.optimizer_state == "reset"
        self.anchors: list[torch.Tensor] = []

    @property
    def needs_anchor(self) -> bool:
        return self.outer.needs_anchor

    def begin_step(self, step: int) -> None:
        if step == self.schedule.local_start and self.needs_anchor and not self.anchors:
            self.anchors = [g.slice(PARAMS).clone() for g in self.groups]

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What is identical on every rank: the anchor (x_prev) and the outer optimizer's momentum."""
        state = {f"anchor{index}": anchor for index, anchor in enumerate(self.anchors)}
        for name, tensors in self.outer.state_tensors().items():
            state.update({f"outer_{name}{index}": t for index, t in enumerate(tensors)})
        return state

    def load_state(self, shared_state: dict[str, torch.Tensor], completed_steps: int) -> None:
        self.anchors = [
            shared_state[f"anchor{i}"].clone() for i in range(len(self.groups)) if f"anchor{i}" in shared_state
        ]
        outer: dict[str, dict[int, torch.Tensor]] = {}
        for name, t in shared_state.items():
            if name.startswith("outer_"):
                base = name[len("outer_") :].rstrip("0123456789")
                outer.setdefault(base, {})[int(name[len("outer_") + len(base) :])] = t
        self.outer.load_state_tensors(
            {base: [by_index[i] for i in sorted(by_index)] for base, by_index in outer.items()}
        )
        local_start = self.schedule.local_start
        if self.needs_anchor and not self.anchors and local_start is not None and completed_steps > local_start:
            # Re-sharded into an outer optimizer from a run without one: start it here.
            self.anchors = [g.slice(PARAMS).clone() for g in self.groups]


class BlockingAverage(AnchoredSync):
    """The model average where the schedule says so: x̄ over all ranks (one allreduce per dtype, or the
    sharded exchange between workers), then the outer step and the optimizer-state policy."""

    def __init__(self, parts: SyncParts) -> None:
        super().__init__(parts)
        self.spans: list[Span] = [
            (g, start, end)
            for g, group_spans in zip(parts.groups, parts.sync_spans, strict=True)
            for start, end in group_spans
        ]
        self.bytes_per_sync = sum((end - start) * g.flat.element_size() for g, start, end in self.spans)

    # --- the protocol --------------------------------------------------------------------------------
    def before_backward(self, completed: int) -> None:
        return None

    def end_step(self, completed: int, lr: float) -> SyncMeasurement | None:
        if not self.schedule.averages_after(completed):
            return None
        return self.sync(lr, self.schedule.outer_step_after(completed), completed)

    def agreed_after_sync(self) -> list[torch.Tensor]:
        return [g.flat[..., a:b] for g, a, b in self.spans]

    def traffic(self, gradient_bytes_per_step: int) -> SyncTraffic:
        """The whole span as one fp32 exchange."""
        return SyncTraffic((self.bytes_per_sync // 4,), 0, self.bytes_per_sync, gradient_bytes_per_step)

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {}  # everything a rank holds alone is in the flat storage

    def settle(self) -> None:
        return None  # nothing is ever in flight

    def close(self) -> None:
        return None

    uses_sync_thread = False
    no_sync_thread_because: str | None = "no delayed sync"
    sync_thread_cpu_seconds = 0.0

    # --- the average ---------------------------------------------------------------------------------
    def sync(self, lr: float, outer_step: bool = True, completed: int | None = None) -> SyncMeasurement:
        """One model average over all ranks, then the outer step (unless ``outer_step`` is false: a
        plain average between two outer steps, whose x_prev stays) and the optimizer-state policy.
        ``completed``: the steps completed at this sync, where the schedule placed it (faults planned there fire
        once this rank's part has begun)."""
        comm = self.exchange.comm
        # Where members may leave, the sync is all-or-nothing: a failed one is undone and run again among the
        # survivors (comm/elastic.py), from the spans as they were before it.
        saved = [g.flat[..., a:b].clone() for g, a, b in self.spans] if may_lose_members(comm) else []

        def average() -> tuple[int, int, float, float]:
            consensus = self._start_consensus_distance()
            if completed is not None:
                self.faults.reached("sync", completed)
            with self.stats.timed():
                between, inside = self.exchange.average(self.spans, self.statistics)
            return (between, inside, *self._finish_consensus_distance(*consensus))

        def undo() -> None:
            for (g, a, b), before in zip(self.spans, saved, strict=True):
                g.flat[..., a:b].copy_(before)

        between, inside, distance, model_norm = run_agreed(comm, average, undo)
        count_sync(self.stats, between, inside)
        with torch.no_grad():
            if outer_step:
                for index, group in enumerate(self.groups):
                    anchor = self.anchors[index] if self.anchors else None
                    self.outer.step(group.slice(PARAMS), anchor, lr, index)
            if self.reset_state:
                reset_optimizer_state(self.groups)
        update_norm, update_cosine = self.outer.update_figures() if outer_step else (math.nan, math.nan)
        return SyncMeasurement(distance, model_norm, update_norm, update_cosine, outer_step)

    def _start_consensus_distance(self) -> tuple[torch.Tensor, Handle | None]:
        """Start averaging each worker's ‖xᵢ‖² (float64, parameters only) over the workers.

        A separate allreduce of one float64 (per simulated worker), started before the model's and
        in flight beside it: the model's flat buffer is in the model's dtype (float32 or lower, which
        would lose the digits Ξ² = mean‖xᵢ‖² − ‖x̄‖² needs) and its sync span has no room for an extra
        element without changing the layout. Workers are the units: with workers of R ranks it runs
        between workers (rank j of each), whose R ranks hold the same x. Not counted in the traffic
        (8 bytes, a measurement)."""
        buffer = self._squared_parameter_norms().reshape(-1).contiguous()
        between = self.exchange.between
        if between.size == 1:
            return buffer, None
        return buffer, between.iallreduce_(buffer, average=True)

    def _finish_consensus_distance(self, mean_squared: torch.Tensor, handle: Handle | None) -> tuple[float, float]:
        """(Ξ²/‖x̄‖², ‖x̄‖) once the model is averaged, before the outer step changes it."""
        if handle is not None:
            with self.stats.timed():
                handle.wait()
        averaged = first_row(self._squared_parameter_norms())
        return relative_consensus_distance(first_row(mean_squared), averaged), math.sqrt(averaged)

    def _squared_parameter_norms(self) -> torch.Tensor:
        """‖x‖² of this rank's parameters (of each simulated worker's), in float64."""
        norms = [row_dot(params, params) for params in (g.slice(PARAMS) for g in self.groups)]
        return torch.stack([n.to(norms[0].device) for n in norms]).sum(dim=0)


def wait_all(handles: list[Handle]) -> None:
    """Wait for every handle, in order."""
    for handle in handles:
        handle.wait()
