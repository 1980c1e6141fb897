"""The averaging engine: all-reduce SGD, local SGD, post-local SGD, SlowMo and outer Nesterov
are settings of this one object (when to sync, what the outer step is, what happens to buffers).

The engine owns the training step's protocol: ``engine.train_step(s, lr, forward)`` is the one
place that, for step s (0-based), sets the LR, arms gradient averaging in the synchronous phase,
runs forward and backward (gradient buckets start their allreduces during backward), waits for
them, steps the optimizer and averages the model when the schedule says so. The training loop
of MPI ranks and of simulated workers, the benchmark and the tests all call it, so a change to
the protocol (mixed precision, compression, worker groups) is made here once.

The model average itself is the engine's ``GlobalSync`` (global_sync.py): the blocking average of x, or
the streaming sync of Δ (streaming.py) where updates are compressed, delayed or fragmented. The engine
calls it at the same points of every step and asks it for its state; it never asks which one it holds.

Invariants: after a sync every rank holds the same parameters; with method ``allreduce``
the parameters stay identical on every rank at every step (BatchNorm statistics excepted,
which are averaged whenever the model is evaluated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..comm.base import Communicator, PeerLost
from ..comm.watchdog import GLOBAL_SYNC, GRADIENT_ALLREDUCE, GROUP_AVERAGE
from ..config.schema import AlgorithmConfig, GradientCompression, Precision, SyncCompression
from ..launcher.faults import NO_FAULTS, FaultPlan
from .accounting import GLOBAL, CommStats, SyncTraffic
from .drift import SyncMeasurement
from .flat import BUFFERS, PARAMS, FlatGroup, flatten_training_state
from .global_sync import BlockingAverage, GlobalSync, SyncParts, WorkerExchange, wait_all
from .gradients import GradientAllreduce
from .hierarchy import WORKER, Hierarchy
from .optimizer_state import STATE_KINDS, load_scalar_state, scalar_state
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
        clip_grad_norm: float | None = None,
        faults: FaultPlan = NO_FAULTS,
    ) -> None:
        """``sync_thread``: a delayed sync's encoding, decoding and wait run on a thread beside the step
        (``comm.sync_thread``; algorithms/streaming.py says where it applies). ``clip_grad_norm``: the
        gradient's largest L2 norm at each inner step, after it is averaged (None: no clipping). ``faults``: what
        this rank is to suffer on purpose (launcher/faults.py): the training loop fires its ``step`` points, the
        blocking sync its ``sync`` points."""
        self.model = model
        self.optimizer = optimizer
        self.comm = comm
        self.cfg = cfg
        self.schedule = schedule
        self.clip_grad_norm = clip_grad_norm
        self.faults = faults
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
        # Worker groups: the global sync runs between workers, one shard per rank (global_sync.py).
        self.exchange = WorkerExchange(comm, ranks_per_worker)
        self.worker_comm = self.exchange.worker
        self.level_comms = [comm.split(level.ranks) for level in self.hierarchy.levels]

        averaged = {PARAMS}
        if cfg.average_bn_buffers:
            averaged.add(BUFFERS)
        if cfg.optimizer_state == "average":
            averaged.update(STATE_KINDS)
        self.averaged_kinds = frozenset(averaged)
        self.groups: list[FlatGroup] = flatten_training_state(model, optimizer, self.averaged_kinds, comm.replicas)
        # One contiguous prefix per dtype group by construction of the layout.
        self.sync_spans = [g.span(self.averaged_kinds) for g in self.groups]
        assert all(len(spans) <= 1 for spans in self.sync_spans)
        self.last_sync: SyncMeasurement | None = None  # what the latest global sync measured
        self.global_sync = self._make_global_sync(cfg, schedule, compression, error_feedback, sync_thread)
        self.gradients: GradientAllreduce | None = None
        if schedule.local_start is None or schedule.local_start > 0 or self.worker_comm is not None:
            self.gradients = GradientAllreduce(
                list(model.parameters()), comm, bucket_bytes, self.stats, gradient_compression
            )

    def _make_global_sync(
        self,
        cfg: AlgorithmConfig,
        schedule: SyncSchedule,
        compression: SyncCompression,
        error_feedback: bool,
        sync_thread: bool,
    ) -> GlobalSync:
        """The blocking average, or the streaming sync where updates are compressed, delayed or fragmented."""
        parts = SyncParts(
            self.groups,
            self.sync_spans,
            self.averaged_kinds,
            self.exchange,
            cfg,
            schedule,
            self.outer,
            self.stats,
            self.faults,
        )
        if compression == "none" and cfg.sync_delay == 0 and cfg.fragments == 1:
            return BlockingAverage(parts)
        return StreamingSync(parts, compression, error_feedback, sync_thread)

    # --- what the sync costs, for the benchmark and the start-up line -------------------------------
    def traffic(self) -> SyncTraffic:
        """The bytes of a global sync and of a synchronous step, from the layout."""
        return self.global_sync.traffic(0 if self.gradients is None else self.gradients.bytes_per_step)

    @property
    def bytes_per_sync(self) -> int:
        """What a rank sends between workers per global sync of the whole model."""
        return self.global_sync.bytes_per_sync

    @property
    def no_sync_thread_because(self) -> str | None:
        """Why the sync thread cannot run here (None: it can; ``uses_sync_thread`` says whether it does)."""
        return self.global_sync.no_sync_thread_because

    @property
    def uses_sync_thread(self) -> bool:
        return self.global_sync.uses_sync_thread

    @property
    def sync_thread_cpu_seconds(self) -> float:
        """CPU seconds the sync thread has used so far (0 without one)."""
        return self.global_sync.sync_thread_cpu_seconds

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
        self.global_sync.before_backward(step + 1)
        if self.gradients is not None:  # its buckets start during backward
            self.comm.note_phase(GRADIENT_ALLREDUCE, step)
        skipped = False
        if self.scaler is None:
            loss.backward()
            self.finish_gradients()
            self._clip_gradients()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.finish_gradients()
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradient; step() then skips unscaling
                self._clip_gradients()
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # unscales; skips the step on inf or NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale  # the scale backs off exactly when a step is skipped
            self.skipped_steps += int(skipped)
        return StepResult(outputs, loss, self.end_step(step + 1, lr), skipped)

    def _clip_gradients(self) -> None:
        """Scale the gradient down to ``clip_grad_norm`` where its L2 norm is larger: each simulated
        worker's by its own norm (the leading dimension), as a rank's, with ``clip_grad_norm_``'s formula."""
        if self.clip_grad_norm is None:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.comm.replicas == 1:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            return
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)
        scale = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype).reshape(-1, *[1] * (g.dim() - 1)))

    def model_finite(self, step: int, synced: bool) -> bool | None:
        """Whether the model is finite after step ``step`` (0-based), judged only where every rank
        holds the same values, so that all ranks reach the same verdict without a collective: after a
        global sync what it averaged (parameters, and BN statistics and momentum where averaged),
        and after a step of the synchronous phase the parameters (averaged gradients). None after a
        local step: a replica's NaN reaches every rank at the next sync. One float64 sum per span,
        which NaN or inf makes non-finite (finite float32 values cannot overflow it); fp16's skipped
        steps leave the model finite."""
        if synced:
            spans = self.global_sync.agreed_after_sync()
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
        self.global_sync.begin_step(step)

    def finish_gradients(self) -> None:
        """Wait for this step's gradient average. Where members may leave (comm/elastic.py), an average that lost
        a member is done again among the survivors, from the gradients this rank computed (still in ``.grad``),
        and an average over every worker (the synchronous phase) is committed by all before the optimizer steps
        on it; a rank whose own worker lost a rank leaves instead (``WorkerDropped``)."""
        if self.gradients is None:
            return
        membership = self.comm.membership
        over_all = self.gradients.averaged_over_all
        while True:
            try:
                self.gradients.finish()
                if membership is not None and over_all:
                    membership.commit()
                return
            except PeerLost as lost:
                if membership is None:
                    raise
                membership.recover(lost)
                self.gradients.restart()

    def end_step(self, completed_steps: int, lr: float) -> bool:
        """Average the model if a sync is due after ``completed_steps`` steps; ``lr`` is the base
        LR the last step used (SlowMo's γ). Returns whether a (global) sync happened; an
        intermediate level of a hierarchy averages its groups when it alone is due (after the
        global sync's fragments, where those are due at the same step)."""
        if self.schedule.averages_after(completed_steps):
            self.comm.note_phase(GLOBAL_SYNC, completed_steps)
        measurement = self.global_sync.end_step(completed_steps, lr)
        if measurement is not None:
            self.last_sync = measurement
        level = self.hierarchy.level_due(completed_steps, self.schedule.local_start, self.schedule.sync_period)
        if level is not None:
            self.comm.note_phase(GROUP_AVERAGE, completed_steps)
            self._average_level(self.level_comms[level], f"level{level + 1}")
        return measurement is not None

    def sync(self, lr: float, outer_step: bool = True) -> None:
        """A global average of the whole model now, outside the schedule (the benchmark times it; the drift
        tests place it): the blocking average, then the outer step unless ``outer_step`` is false. What it
        measured is in ``last_sync``."""
        if not isinstance(self.global_sync, BlockingAverage):
            raise ValueError("an immediate sync needs the blocking average (no compression, delay or fragments)")
        self.last_sync = self.global_sync.sync(lr, outer_step)

    def _average_level(self, comm: Communicator, level: str) -> None:
        """An intermediate level: x (and what a sync averages with it) inside each group of ``comm``, one
        allreduce per dtype."""
        if comm.size == 1:
            return
        spans = [
            g.flat[..., start:end]
            for g, group_spans in zip(self.groups, self.sync_spans, strict=True)
            for start, end in group_spans
        ]
        with self.stats.timed():
            wait_all([comm.iallreduce_(span, average=True) for span in spans])
        self.stats.count(level, sum(span.shape[-1] * span.element_size() for span in spans))

    # --- state for checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict[str, torch.Tensor]:
        """What may differ between ranks: live views of parameters, BN statistics and the optimizer's
        per-parameter state, snapshots of its scalar state and of fp16's loss-scaler state, and the global
        sync's own (error feedback). Averages in flight are settled first (a collective: call it at the
        same point on every rank), since settling a two-phase average moves its error state."""
        self.global_sync.settle()
        return {
            **{
                f"flat{index}.{kind}": group.flat[..., start:end]
                for index, group in enumerate(self.groups)
                for kind, start, end in group.segments
                if end > start
            },
            **scalar_state(self.optimizer),
            **self.loss_scaler_state(),
            **self.global_sync.rank_state(),
        }

    def is_optimizer_state(self, name: str) -> bool:
        """Whether ``rank_state``'s ``name`` is the inner optimizer's state (what a re-shard with ``reset``
        starts at zero)."""
        return name.startswith("optimizer.") or name.rpartition(".")[2] in STATE_KINDS

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
        """What is identical on every rank: the outer optimizer's anchor (x_prev) and momentum, and the
        averages in flight (settled)."""
        return self.global_sync.shared_state()

    @property
    def anchors(self) -> list[torch.Tensor]:
        """x_prev per flat group: the model after the previous global sync (parameters only)."""
        return self.global_sync.anchors

    @anchors.setter
    def anchors(self, anchors: list[torch.Tensor]) -> None:
        self.global_sync.anchors = anchors

    def load_state(
        self, rank_state: dict[str, torch.Tensor], shared_state: dict[str, torch.Tensor], completed_steps: int
    ) -> None:
        """Copy saved state into the live (flat) storage; the tensors' identities never change."""
        with torch.no_grad():
            for name, live in self.rank_state().items():
                if name in rank_state:
                    live.copy_(rank_state[name].reshape(live.shape))
                else:
                    live.zero_()  # optimizer state absent from a checkpoint (re-shard with reset)
        load_scalar_state(self.optimizer, rank_state)
        self.load_loss_scaler_state(rank_state)
        self.global_sync.load_state(shared_state, completed_steps)

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
        self.global_sync.settle()

    def close(self) -> None:
        if self.gradients is not None:
            self.gradients.remove()
        self.global_sync.close()
