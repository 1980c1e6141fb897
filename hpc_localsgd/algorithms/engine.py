"""The averaging engine: all-reduce SGD, local SGD, post-local SGD, SlowMo and outer Nesterov
are settings of this one object (when to sync, what the outer step is, what happens to buffers).

The engine owns the training step's protocol: ``engine.train_step(s, lr, forward)`` is the one
place that, for step s (0-based), sets the LR, arms gradient averaging in the synchronous phase,
runs forward and backward (gradient buckets start their allreduces during backward), waits for
them, steps the optimizer and averages the model when the schedule says so. The training loop
of MPI ranks and of simulated workers, the benchmark and the tests all call it, so a change to
the protocol (mixed precision, compression, worker groups) is made here once.

Invariants: after a sync every rank holds the same parameters; with method ``allreduce``
the parameters stay identical on every rank at every step (BatchNorm statistics excepted,
which are averaged whenever the model is evaluated).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..comm.base import Communicator, Handle
from ..config.schema import AlgorithmConfig, GradientCompression, Precision, SyncCompression
from .accounting import GLOBAL, CommStats, SyncTraffic
from .drift import SyncMeasurement, first_row, relative_consensus_distance, row_dot
from .flat import BUFFERS, MOMENTUM, PARAMS, FlatGroup, contiguous_part, flatten_training_state
from .gradients import GradientAllreduce
from .hierarchy import WORKER, Hierarchy
from .outer import build_outer_optimizer
from .schedule import SyncSchedule
from .streaming import StreamingSync


@dataclass
class StepResult:
    """What one training step gives back: the forward's outputs and loss, and whether the model was
    averaged after it."""

    outputs: torch.Tensor
    loss: torch.Tensor
    synced: bool
    skipped: bool = False  # fp16: the (averaged) gradients overflowed and the optimizer step was skipped


class AveragingEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Communicator,
        cfg: AlgorithmConfig,
        schedule: SyncSchedule,
        bucket_bytes: int = 25 * 2**20,
        hierarchy: Hierarchy | None = None,
        precision: Precision = "fp32",
        compression: SyncCompression = "none",
        error_feedback: bool = False,
        gradient_compression: GradientCompression = "none",
        sync_thread: bool = True,
    ) -> None:
        """``sync_thread``: a delayed sync's encoding, decoding and wait run on a thread beside the step
        (``comm.sync_thread``; algorithms/streaming.py says where it applies)."""
        self.model = model
        self.optimizer = optimizer
        self.comm = comm
        self.cfg = cfg
        self.schedule = schedule
        self.stats = CommStats()  # training communication
        self.eval_stats = CommStats()  # evaluation only: never part of the training cost
        self.outer = build_outer_optimizer(cfg)
        # Mixed precision: autocast around forward and loss; fp16 scales the loss (GradScaler). The
        # scaler acts after the gradients are averaged, so in a synchronous step every rank sees the
        # same overflow and skips alike; in a local step a rank skips alone, and its step counter,
        # LR and sync schedule go on, so no rank ever waits in a collective the others skip.
        device_type = next(iter(model.parameters())).device.type
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast_device = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
        self.skipped_steps = 0  # by this rank, fp16 only
        # Worker groups (algorithms/hierarchy.py): the ranks of a worker average gradients every local
        # step; intermediate levels average models inside larger groups; ``comm`` is the world.
        self.hierarchy = hierarchy or Hierarchy(comm.size)
        if self.hierarchy.world_size != comm.size:
            raise ValueError(f"a hierarchy of {self.hierarchy.world_size} ranks for a world of {comm.size}")
        ranks_per_worker = self.hierarchy.ranks_per_worker
        self.worker_comm = comm.split(ranks_per_worker) if ranks_per_worker > 1 else None
        # Rank j of every worker: the global average runs between workers one shard per rank.
        self.across_comm = comm.split_across(ranks_per_worker) if ranks_per_worker > 1 else None
        self.level_comms = [comm.split(level.ranks) for level in self.hierarchy.levels]

        averaged = {PARAMS}
        if cfg.average_bn_buffers:
            averaged.add(BUFFERS)
        if cfg.momentum_buffers == "average":
            averaged.add(MOMENTUM)
        self.averaged_kinds = frozenset(averaged)
        self.groups: list[FlatGroup] = flatten_training_state(model, optimizer, self.averaged_kinds, comm.replicas)
        # One contiguous prefix per dtype group by construction of the layout.
        self._sync_spans = [g.span(self.averaged_kinds) for g in self.groups]
        assert all(len(spans) <= 1 for spans in self._sync_spans)
        # What a plain average of the sync spans sends, per worker (also when this process simulates several).
        self.span_bytes = sum(
            (end - start) * g.flat.element_size()
            for g, spans in zip(self.groups, self._sync_spans, strict=True)
            for start, end in spans
        )
        # What a global sync sends per worker: the spans, or the encoded updates of a streaming sync.
        self.bytes_per_sync = self.span_bytes
        # x_prev for the outer optimizer: the model right after the previous sync (parameters only).
        self.anchors: list[torch.Tensor] = []
        self.last_sync: SyncMeasurement | None = None  # what the latest global sync measured
        # Compressed, delayed or fragmented global syncs (algorithms/streaming.py); None: the plain sync below.
        self.streaming: StreamingSync | None = None
        if compression != "none" or cfg.sync_delay > 0 or cfg.fragments > 1:
            between_workers = None
            if self.worker_comm is not None and self.across_comm is not None:
                between_workers = (self.worker_comm, self.across_comm)
            self.streaming = StreamingSync(
                self.groups,
                self._sync_spans,
                comm,
                between_workers,
                cfg,
                schedule,
                compression,
                error_feedback,
                self.outer,
                self.stats,
                sync_thread,
            )
            self.bytes_per_sync = self.streaming.bytes_per_model
        self.gradients: GradientAllreduce | None = None
        if schedule.local_start is None or schedule.local_start > 0 or self.worker_comm is not None:
            self.gradients = GradientAllreduce(
                list(model.parameters()), comm, bucket_bytes, self.stats, gradient_compression
            )

    # --- what the sync costs, for the benchmark and the start-up line -------------------------------
    def traffic(self) -> SyncTraffic:
        """The bytes of a global sync and of a synchronous step, from the layout."""
        gradient_bytes = 0 if self.gradients is None else self.gradients.bytes_per_step
        if self.streaming is None:
            return SyncTraffic((self.span_bytes // 4,), 0, self.bytes_per_sync, gradient_bytes)
        elements = tuple(sum(b - a for a, b in ranges) for ranges in self.streaming.ranges)
        return SyncTraffic(elements, self.streaming.rest_bytes, self.bytes_per_sync, gradient_bytes)

    @property
    def no_sync_thread_because(self) -> str | None:
        """Why the sync thread cannot run here (None: it can; ``uses_sync_thread`` says whether it does)."""
        return "no delayed sync" if self.streaming is None else self.streaming.no_sync_thread_because

    @property
    def uses_sync_thread(self) -> bool:
        return self.streaming is not None and self.streaming.uses_sync_thread

    @property
    def sync_thread_cpu_seconds(self) -> float:
        """CPU seconds the sync thread has used so far (0 without one)."""
        return 0.0 if self.streaming is None else self.streaming.sync_thread_cpu_seconds

    def broadcast_initial_state(self) -> None:
        """Start every rank from rank 0's model (and zero momentum), whatever each rank's init did."""
        if self.comm.size > 1:
            for group in self.groups:
                self.comm.broadcast_(group.flat, root=0)

    # --- the training step ------------------------------------------------------------------------
    def train_step(self, step: int, lr: float, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """Step ``step`` (0-based) at learning rate ``lr``; ``forward`` returns (outputs, loss) and
        the loss is what backward differentiates."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.begin_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.autocast_dtype is None:
            outputs, loss = forward()
        else:
            with torch.autocast(self.autocast_device, dtype=self.autocast_dtype):
                outputs, loss = forward()
        if self.streaming is not None:
            self.streaming.before_backward(step + 1)
        skipped = False
        if self.scaler is None:
            loss.backward()
            self.finish_gradients()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.finish_gradients()
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # unscales; skips the step on inf or NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale  # the scale backs off exactly when a step is skipped
            self.skipped_steps += int(skipped)
        return StepResult(outputs, loss, self.end_step(step + 1, lr), skipped)

    def model_finite(self, step: int, synced: bool) -> bool | None:
        """Whether the model is finite after step ``step`` (0-based), judged only where every rank
        holds the same values, so that all ranks reach the same verdict without a collective: after a
        global sync what it averaged (parameters, and BN statistics and momentum where averaged),
        and after a step of the synchronous phase the parameters (averaged gradients). None after a
        local step: a replica's NaN reaches every rank at the next sync. One float64 sum per span,
        which NaN or inf makes non-finite (finite float32 values cannot overflow it); fp16's skipped
        steps leave the model finite."""
        if synced and self.streaming is not None:
            spans = self.anchors  # x_prev ← x_g on every rank alike (the live fragment may hold a mix)
        elif synced:
            spans = [
                g.flat[..., a:b]
                for g, group_spans in zip(self.groups, self._sync_spans, strict=True)
                for a, b in group_spans
            ]
        elif self.schedule.is_synchronous(step):
            spans = [g.slice(PARAMS) for g in self.groups]
        else:
            return None
        total = torch.stack([t.sum(dtype=torch.float64) for t in spans]).sum()
        return bool(torch.isfinite(total).item())

    # The parts of ``train_step``, public for measurements that time one part alone.
    def begin_step(self, step: int) -> None:
        if self.gradients is not None:
            if self.schedule.is_synchronous(step):
                self.gradients.start_step(self.comm if self.comm.size > 1 else None, GLOBAL)
            else:
                self.gradients.start_step(self.worker_comm, WORKER)
        needs_anchor = self.outer.needs_anchor or self.streaming is not None  # streaming sends x_prev − x
        if step == self.schedule.local_start and needs_anchor and not self.anchors:
            self.anchors = [g.slice(PARAMS).clone() for g in self.groups]

    def finish_gradients(self) -> None:
        if self.gradients is not None:
            self.gradients.finish()

    def end_step(self, completed_steps: int, lr: float) -> bool:
        """Average the model if a sync is due after ``completed_steps`` steps; ``lr`` is the base
        LR the last step used (SlowMo's γ). Returns whether a (global) sync happened; an
        intermediate level of a hierarchy averages its groups when it alone is due."""
        if self.streaming is not None:
            self.outer.forget_update_figures()
            synced, outer_stepped = self.streaming.end_step(completed_steps, lr, self.anchors)
            if synced:  # consensus distance of the synced fragment, as its update was taken
                distance, model_norm = self.streaming.last_consensus
                update_figures = self.outer.update_figures() if outer_stepped else (math.nan, math.nan)
                self.last_sync = SyncMeasurement(distance, model_norm, *update_figures, outer_stepped)
        elif self.schedule.averages_after(completed_steps):
            self.sync(lr, self.schedule.outer_step_after(completed_steps))
            return True
        else:
            synced = False
        # An intermediate level averages x inside its groups when due; with streaming syncs, after them.
        level = self.hierarchy.level_due(completed_steps, self.schedule.local_start, self.schedule.sync_period)
        if level is not None:
            self._average(self.level_comms[level], f"level{level + 1}")
        return synced

    def sync(self, lr: float, outer_step: bool = True) -> None:
        """One model average over all ranks, then the outer step (unless ``outer_step`` is false: a
        plain average between two outer steps, whose x_prev stays) and the buffer policy. What the
        sync measured is in ``last_sync``."""
        consensus = self._start_consensus_distance()
        if self.worker_comm is None:
            self._average(self.comm, GLOBAL)
        else:
            self._average_between_workers()
        distance, model_norm = self._finish_consensus_distance(*consensus)
        with torch.no_grad():
            for index, group in enumerate(self.groups):
                if outer_step:
                    anchor = self.anchors[index] if self.anchors else None
                    self.outer.step(group.slice(PARAMS), anchor, lr, index)
                if self.cfg.momentum_buffers == "reset":
                    group.slice(MOMENTUM).zero_()
        update_norm, update_cosine = self.outer.update_figures() if outer_step else (math.nan, math.nan)
        self.last_sync = SyncMeasurement(distance, model_norm, update_norm, update_cosine, outer_step)

    # --- drift measurements (algorithms/drift.py) ----------------------------------------------------
    def _start_consensus_distance(self) -> tuple[torch.Tensor, Handle | None]:
        """Start averaging each worker's ‖xᵢ‖² (float64, parameters only) over the workers.

        A separate allreduce of one float64 (per simulated worker), started before the model's and
        in flight beside it: the model's flat buffer is in the model's dtype (float32 or lower, which
        would lose the digits Ξ² = mean‖xᵢ‖² − ‖x̄‖² needs) and its sync span has no room for an extra
        element without changing the layout. Workers are the units: with workers of R ranks it runs
        between workers (rank j of each), whose R ranks hold the same x. Not counted in the traffic
        (8 bytes, a measurement). Parameters only."""
        buffer = self._squared_parameter_norms().reshape(-1).contiguous()
        between = self.comm if self.worker_comm is None else self.across_comm
        assert between is not None
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

    def _average(self, comm: Communicator, level: str) -> None:
        """Average what a sync averages over ``comm``: a single allreduce per dtype. One rank
        communicates nothing (its outer step, Lookahead, still runs)."""
        if comm.size == 1:
            return
        with self.stats.timed():
            handles = [
                comm.iallreduce_(g.flat[..., start:end], average=True)
                for g, spans in zip(self.groups, self._sync_spans, strict=True)
                for start, end in spans
            ]
            for handle in handles:
                handle.wait()
        self.stats.count(level, self.span_bytes)

    def _average_between_workers(self) -> None:
        """The global average when workers are groups of R ranks. A worker's ranks hold the same
        parameters and momentum (their gradients are averaged every step), so averaging them all
        over the world would send the same bytes R times: instead BatchNorm statistics, which do
        differ between a worker's ranks, are averaged inside the worker; then rank j of each
        worker averages the j-th of R shards with rank j of every other worker, and the worker's
        ranks gather the shards (each contributes its own shard and zeros, summed: exact). A rank
        sends 1/R of the model between workers, where the network is slow, and the rest inside
        its worker (a node's fast fabric). The result equals the plain average over all ranks up
        to float rounding (it sums workers instead of ranks)."""
        worker, across = self.worker_comm, self.across_comm
        assert worker is not None and across is not None
        size = worker.size
        spans = [
            (g, start, end)
            for g, group_spans in zip(self.groups, self._sync_spans, strict=True)
            for start, end in group_spans
        ]
        statistics = [g.slice(BUFFERS) for g in self.groups] if BUFFERS in self.averaged_kinds else []
        statistics = [t for t in statistics if t.shape[-1]]
        # This rank's shard; a process simulating every rank (the simulated backend) owns them all.
        mine = self.comm.rank % size
        owned = range(size) if self.comm.replicas > 1 else [mine]
        with self.stats.timed():
            _wait_all([worker.iallreduce_(t, average=True) for t in statistics])
            if across.size > 1:  # else one worker: its ranks already agree
                shards = [(g, *contiguous_part(start, end, size, j)) for g, start, end in spans for j in owned]
                _wait_all([across.iallreduce_(g.flat[..., a:b], average=True) for g, a, b in shards])
                if self.comm.replicas == 1:  # a simulation's rows already hold every averaged shard
                    for g, start, end in spans:
                        a, b = contiguous_part(start, end, size, mine)
                        g.flat[..., start:a].zero_()
                        g.flat[..., b:end].zero_()
                    _wait_all([worker.iallreduce_(g.flat[..., start:end], average=False) for g, start, end in spans])
        # What rank ``mine`` sends (a simulation counts for rank 0 of a worker, as for every process).
        counted = mine if self.comm.replicas == 1 else 0
        inside = sum(t.shape[-1] * t.element_size() for t in statistics)
        if across.size > 1:
            inside += sum((end - start) * g.flat.element_size() for g, start, end in spans)
            between = sum(
                (b - a) * g.flat.element_size()
                for g, start, end in spans
                for a, b in [contiguous_part(start, end, size, counted)]
            )
            self.stats.count(GLOBAL, between)
        if inside:
            self.stats.count(WORKER, inside)

    # --- state for checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict[str, torch.Tensor]:
        """What may differ between ranks: live views of parameters, BN statistics and momentum buffers,
        fp16's loss-scaler state (a snapshot) and error feedback. Averages in flight are settled first
        (a collective: call it at the same point on every rank), since settling a two-phase average
        moves its error state."""
        if self.streaming is not None:
            self.streaming.settle()
        return {
            **{
                f"flat{index}.{kind}": group.flat[..., start:end]
                for index, group in enumerate(self.groups)
                for kind, start, end in group.segments
                if end > start
            },
            **self.loss_scaler_state(),
            **({} if self.streaming is None else self.streaming.rank_state()),
        }

    def loss_scaler_state(self) -> dict[str, torch.Tensor]:
        """fp16's loss scale and growth tracker, per rank (a rank that overflowed alone backed off
        alone), for a checkpoint; empty otherwise."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {"loss_scaler": torch.tensor([state["scale"], state["_growth_tracker"]], dtype=torch.float64)}

    def load_loss_scaler_state(self, saved: dict[str, torch.Tensor]) -> None:
        if self.scaler is None or "loss_scaler" not in saved:
            return
        scale, tracker = saved["loss_scaler"].tolist()
        self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": scale, "_growth_tracker": int(tracker)})

    def int_buffers(self) -> dict[str, torch.Tensor]:
        """The model's integer buffers (BatchNorm's batch counters): never averaged, outside the flat
        storage, but part of what a resume restores."""
        return {name: b for name, b in self.model.named_buffers() if not b.is_floating_point()}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What is identical on every rank: the outer optimizer's anchor (x_prev) and momentum."""
        state = {f"anchor{index}": anchor for index, anchor in enumerate(self.anchors)}
        for name, tensors in self.outer.state_tensors().items():
            state.update({f"outer_{name}{index}": t for index, t in enumerate(tensors)})
        if self.streaming is not None:
            state.update(self.streaming.shared_state())  # averages in flight, settled
        return state

    def load_state(
        self, rank_state: dict[str, torch.Tensor], shared_state: dict[str, torch.Tensor], completed_steps: int
    ) -> None:
        """Copy saved state into the live (flat) storage; the tensors' identities never change."""
        with torch.no_grad():
            for name, live in self.rank_state().items():
                if name in rank_state:
                    live.copy_(rank_state[name].reshape(live.shape))
                else:
                    live.zero_()  # momentum absent from a checkpoint (re-shard with reset)
        self.load_loss_scaler_state(rank_state)
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
        if self.streaming is not None:
            self.streaming.load_shared_state(shared_state)
        local_start = self.schedule.local_start
        needs_anchor = self.outer.needs_anchor or self.streaming is not None
        if needs_anchor and not self.anchors and local_start is not None and completed_steps > local_start:
            # Re-sharded into an outer optimizer from a run without one: start it here.
            self.anchors = [g.slice(PARAMS).clone() for g in self.groups]

    # --- evaluation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def averaged_model(self) -> Iterator[torch.nn.Module]:
        """The globally averaged model (parameters and BN statistics), restored on exit so that
        evaluation never changes the training trajectory."""
        if self.comm.size == 1:
            yield self.model
            return
        kinds = {PARAMS, BUFFERS}
        backups = []
        with self.eval_stats.timed():
            for group in self.groups:
                for start, end in group.span(kinds):
                    backups.append((group.flat[..., start:end], group.flat[..., start:end].clone()))
            for live, _ in backups:
                self.comm.allreduce_(live, average=True)
        self.eval_stats.sync_rounds += 1
        self.eval_stats.bytes_sent += sum(live.shape[-1] * live.element_size() for live, _ in backups)
        try:
            yield self.model
        finally:
            for live, saved in backups:
                live.copy_(saved)

    def drain(self) -> None:
        """Wait for the averages still in flight when training stops before their step (the benchmark's
        open-ended runs, a run resumed with fewer steps): every rank started them, so every rank must
        complete them."""
        if self.streaming is not None:
            self.streaming.settle()

    def close(self) -> None:
        if self.gradients is not None:
            self.gradients.remove()
        if self.streaming is not None:
            self.streaming.close()


def _wait_all(handles: list[Handle]) -> None:
    for handle in handles:
        handle.wait()
