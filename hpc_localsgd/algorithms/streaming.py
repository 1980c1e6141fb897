"""Streaming, delayed and compressed global syncs (Douillard et al. 2025, Streaming DiLoCo): what the
engine's global sync becomes when ``comm.sync_compression``,
``algorithm.sync_delay`` or ``algorithm.fragments`` is set.

What travels is each rank's update since the last sync, Δ = x_prev − x, never the parameters:

* fragments F: the parameters of each flat group are split into F contiguous fragments; fragment f
  syncs every H steps, offset by f·H/F (fragment 0 on the usual schedule), so each sync sends 1/F of
  the model and the network is busy evenly;
* delay τ: fragment f's Δ is taken τ steps before its sync step and averaged (non-blocking) while
  those steps run; at the sync step x̄ = x_prev − avg Δ, the outer step (plain, SlowMo, Nesterov) gives
  x_g, x_prev ← x_g, and the rank continues from (1 − α)·x_g + α·x_now (α = ``sync_mix``). τ is at
  most H/F. At τ = H (F = 1) the next Δ is taken at the sync step itself, before the sync is applied,
  so every step's progress reaches x_prev one sync late and none is dropped (with H = 1: one-step-
  delayed averaging); the first Δ, H steps into the local phase, is followed by x ← (1 − α)·x_prev +
  α·x, as after a sync of a zero average. Where a sync would come after the run's last step
  (``SyncSchedule.last_step``) its update is not sent below τ = H (the rank's model holds its steps);
  at τ = H it is applied at once, blocking, as it is taken: no step's progress is left in flight;
* compression: avg Δ is the average of Q(Δ + e) (``compression.CompressedAverager``, error feedback e
  per rank); none is an fp32 allreduce of Δ.

With none of them the engine keeps the blocking average (global_sync.py), which averages x itself. BN
statistics and averaged optimizer state travel uncompressed and blocking with fragment 0's sync, by the
same exchange and rule as there (inside each worker, then between workers by shards); the policy
``optimizer_state: reset`` also acts there (on the whole model). Both syncs implement ``GlobalSync``.

Worker groups (algorithms/hierarchy.py): compression and overlap act at the global level, between
workers. A worker's R ranks hold the same x, so rank j of each worker averages only shard j of R of
each fragment's Δ with rank j of every other worker (compressed, delayed; its error state is that of
its shard), and when the average is waited for, the worker's ranks assemble the whole fragment (each
adds its shard to zeros, summed inside the worker: exact). A rank sends 1/R of the update between
workers, as the engine's own sync does. Intermediate levels average x inside their groups as usual.

Every rank starts and waits for the same collectives in the same order: at each step the updates due
are taken, then the syncs due are applied (fragment order), then the updates are sent (with τ = 0,
where each is its own sync's, they are sent first), then, at τ = H where the run ends, the updates
just sent are applied. A two-phase average's second phase starts at the end of the step after the
first, or before the backward of its sync step if sooner (τ = 1). A sync still in flight when a
checkpoint is written is waited for (``settle``), and its result is carried in the checkpoint, so a
resumed run applies the same average at the same step.

The sync thread (``comm.sync_thread``; where it applies: τ > 0, CPU models). A rank's step thread
takes Δ and applies x̄ (they read and write the model) and starts every collective, a worker's
assembly of a fragment included. A thread of the rank's own encodes Δ (its shard, in a worker of
several ranks) with error feedback and takes ‖Δ‖², and, once the average is started, waits for it
and decodes it. The encoded update is sent before the next step's backward, or at the next point
where the step thread meets the sync if that comes first (the end of a step, a checkpoint, the
at-once apply at the run's end); there the step thread first waits for the encoding to finish. That
is the same point on every rank. An fp32 update has nothing to encode: it is sent at once, as
without the thread, and only waited for beside the step. In the two-phase exchange the update is
encoded on the step's thread and sent at once, so that both phases keep their points; the sync
thread waits for the all-to-all, sums and re-encodes the rank's chunk, and after the step has
started the gather, waits for it and decodes. So the collectives keep their order, and the
arithmetic is the same in the same order: the same bits as without the thread. On a rank with a
core to spare that work leaves the step's path; on a rank of one core it only moves.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ..comm.base import Handle, SerialThread
from ..config.schema import SyncCompression
from .accounting import SyncTraffic
from .compression import CompressedAverageHandle, CompressedAverager
from .drift import SyncMeasurement, first_row
from .flat import PARAMS, FlatGroup, contiguous_part
from .global_sync import AnchoredSync, Span, SyncParts, count_sync, reset_optimizer_state


class InlineWork:
    """No sync thread: ``submit`` declines every call (None), and the step does that work itself where it
    meets the average (the handle's ``advance`` and ``wait``), as ``SerialThread`` would have beside it."""

    cpu_seconds = 0.0

    def submit(self, call: Callable[..., Any], *args: Any) -> None:
        return None

    def stop(self) -> None:
        return None


@dataclass
class _InFlight:
    """One fragment's average, started and not yet applied."""

    sync_step: int  # the completed step count at which it is applied
    # Per flat group: the shards of Δ this rank averages (one; every shard in a simulation), then, once
    # waited on and assembled, one tensor: the whole fragment's average.
    updates: list[list[torch.Tensor]]
    handles: list[Handle]
    # mean over workers of ‖Δ‖² of this fragment (float64; per simulated worker), averaged beside Δ
    squared_norm: torch.Tensor | None = None
    assembled: bool = False
    # With the sync thread: the encoding (and ‖Δ‖²) under way there, until ``_start`` sends the result;
    # then the wait for the average (and its decoding) under way there, until ``_complete`` takes it.
    encoded: Future[torch.Tensor] | None = None
    received: Future[None] | None = None
    # Two-phase with the sync thread: the wait for the all-to-all and the sum of this rank's chunk there,
    # until the step starts the second phase.
    summed: Future[None] | None = None


class StreamingSync(AnchoredSync):
    """The global syncs of one engine, fragment by fragment (see the module docstring)."""

    def __init__(
        self, parts: SyncParts, compression: SyncCompression, error_feedback: bool, sync_thread: bool = True
    ) -> None:
        super().__init__(parts)
        groups, exchange, cfg, schedule = parts.groups, parts.exchange, parts.cfg, parts.schedule
        self.comm = exchange.comm
        # Workers of R ranks: Δ travels between workers (rank j of each), shard j of R each.
        self.worker = exchange.worker
        self.between = exchange.between
        self.owned = exchange.owned
        self.local_start, self.last_step = schedule.local_start, schedule.last_step
        self.period, self.fragments, self.outer_every = cfg.sync_period, cfg.fragments, cfg.outer_every
        self.delay, self.mix = cfg.sync_delay, cfg.sync_mix
        self.compression = compression
        # Where each group's parameters lie, and the rest of its sync span (BN statistics, averaged
        # optimizer state): averaged with fragment 0 as the blocking sync averages it.
        params = [_segment(g, PARAMS) for g in groups]
        self.params_start = [start for start, _ in params]
        self.rest: list[Span] = [
            (g, end, spans[0][1])
            for g, (_, end), spans in zip(groups, params, parts.sync_spans, strict=True)
            if spans and spans[0][1] > end
        ]
        # fragment f of group g: [a, b) of its flat buffer; the first (n % F) fragments one element longer.
        self.ranges = [
            [contiguous_part(start, end, self.fragments, f) for start, end in params] for f in range(self.fragments)
        ]
        # Shard j of R of fragment f of group g, relative to the fragment's start.
        self.shards = [[[exchange.shard(0, b - a, j) for j in self.owned] for a, b in ranges] for ranges in self.ranges]
        # Lossy codecs: one averager (and error state) per fragment, group and shard; none: an allreduce of Δ.
        self.averagers = self._make_averagers(compression, error_feedback)
        self.in_flight: dict[int, _InFlight] = {}
        # Δ's memory per (fragment, group, shard, slot), reused sync after sync: a fresh ResNet-50-sized tensor
        # costs its page faults on every sync (twice the time of the subtraction itself, on one core). A
        # fragment has at most one average in flight between steps (sync_delay ≤ H / F). Below H it is applied
        # before the fragment's next Δ is taken: one slot. At τ = H the next Δ is taken while the average
        # due at the same step still waits to be applied: two slots, used in turn.
        self.update_buffers: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.last_consensus = (math.nan, math.nan)  # (Ξ²/‖x̄‖², ‖x̄‖) of the last fragment applied
        self._count_bytes()
        # The sync's work on vectors beside the step (``sync_thread``, the module docstring): the encoding
        # with error feedback and ‖Δ‖², the wait for the average and its decoding. ``no_sync_thread_because``
        # says why it cannot help here (None: it can).
        self.no_sync_thread_because = self._why_not_beside(compression)
        self.uses_sync_thread = sync_thread and self.no_sync_thread_because is None
        self.beside: SerialThread | InlineWork = (
            SerialThread("hpc-localsgd-sync") if self.uses_sync_thread else InlineWork()
        )
        # A two-phase exchange's update is encoded on the step's thread, so that its first phase starts at
        # the take, as without the thread (its second phase waits for the first at fixed points).
        self._encodes_beside = (
            self.uses_sync_thread and compression != "none" and not CompressedAverager.two_phase(self.between)
        )
        weakref.finalize(self, self.beside.stop)

    def _make_averagers(
        self, compression: SyncCompression, error_feedback: bool
    ) -> list[list[list[CompressedAverager]]]:
        if compression == "none":
            return []
        if any(g.dtype != torch.float32 for g in self.groups):
            raise ValueError("compressed syncs encode float32 parameters")
        return [
            [
                [
                    CompressedAverager(
                        compression, (*g.flat.shape[:-1], e - s), error_feedback, g.flat.device, self.between
                    )
                    for s, e in group_shards
                ]
                for g, group_shards in zip(self.groups, fragment_shards, strict=True)
            ]
            for fragment_shards in self.shards
        ]

    def _count_bytes(self) -> None:
        """What a rank sends per sync: between workers its shard of each fragment (rank 0's in a simulation,
        as every process counts), encoded, and with fragment 0 its shard of the rest; inside its worker
        what assembles the fragment."""
        groups = self.groups
        self.rest_bytes = self.exchange.bytes_sent(self.rest, self.statistics)[0]
        self.shard_bytes = [
            sum(
                self.averagers[f][g][0].bytes_per_sync if self.averagers else (e - s) * group.flat.element_size()
                for g, (group, [(s, e), *_]) in enumerate(zip(groups, fragment_shards, strict=True))
            )
            for f, fragment_shards in enumerate(self.shards)
        ]
        self.assembly_bytes = [
            sum((b - a) * group.flat.element_size() for group, (a, b) in zip(groups, ranges, strict=True))
            if self.worker is not None
            else 0
            for ranges in self.ranges
        ]
        self.bytes_per_sync = sum(self.shard_bytes) + self.rest_bytes  # a sync of every fragment, between workers

    def _why_not_beside(self, compression: SyncCompression) -> str | None:
        if self.delay == 0:
            return "no sync_delay: each average is waited for where it starts"
        if self.comm.replicas > 1:
            return "the simulated backend"
        if self.between.size == 1:
            return "one worker: nothing to average"
        if not self.between.waits_beside:
            return f"the {self.between.name} backend cannot wait for a collective on another thread here"
        if any(g.flat.device.type != "cpu" for g in self.groups):
            return "a GPU model: the sync's passes are kernels on the step's stream already"
        return None

    # --- the schedule ----------------------------------------------------------------------------------
    def offset(self, fragment: int) -> int:
        return fragment * self.period // self.fragments

    def syncs_after(self, fragment: int, completed: int) -> bool:
        """Whether fragment ``fragment`` is averaged once ``completed`` steps are done: every H steps from its
        offset, in the local phase, and only where its update was taken after the local phase began."""
        if self.local_start is None:
            return False
        since = completed - self.local_start - self.offset(fragment)
        return since >= 0 and since % self.period == 0 and completed - self.delay > self.local_start

    def starts_after(self, fragment: int, completed: int) -> bool:
        """Whether fragment ``fragment``'s update is taken and sent once ``completed`` steps are done: τ
        steps before its sync step. Below τ = H not where that step comes after the run's last: nothing
        would apply it, and the rank's model still holds its steps. At τ = H always (``end_step``)."""
        sync_step = completed + self.delay
        if not self.syncs_after(fragment, sync_step):
            return False
        return self.delay == self.period or not self.after_the_run(sync_step)

    def after_the_run(self, step: int) -> bool:
        """Whether completed step ``step`` lies beyond the run's last (never in an open-ended run)."""
        return self.last_step is not None and step > self.last_step

    def outer_step_after(self, fragment: int, completed: int) -> bool:
        """The outer step on the k-th, 2k-th, ... sync of each fragment (k = ``outer_every``)."""
        assert self.local_start is not None
        first = 1 if self.offset(fragment) > self.delay else 0  # the index of the fragment's first sync
        number = (completed - self.local_start - self.offset(fragment)) // self.period + first
        return number % self.outer_every == 0

    # --- a step's syncs --------------------------------------------------------------------------------
    def before_backward(self, completed: int) -> None:
        """Between the forward and the backward of the step that will complete ``completed`` steps: a
        two-phase average (three or more workers, compressed) due when it ends goes on to its second
        phase here, so that the phase travels behind the backward. Otherwise, sent one step before its
        sync (τ = 1), it would start and be waited for at the same point. Updates encoded beside the step
        since its end are sent here, before the backward they travel behind."""
        self._start_encoded()
        for fragment in sorted(self.in_flight):
            if self.in_flight[fragment].sync_step == completed:
                self._advance(self.in_flight[fragment])

    def end_step(self, completed: int, lr: float) -> SyncMeasurement | None:
        """Take the updates due after ``completed`` steps, apply the syncs due now, and send the updates.
        Returns what the sync measured where a fragment was synced (every rank's copy of it is then x_g,
        or the mix): the consensus distance of the synced fragment, as its update was taken."""
        self.outer.forget_update_figures()
        synced, outer_stepped = self._step_syncs(completed, lr, self.anchors)
        if not synced:
            return None
        distance, model_norm = self.last_consensus
        update_figures = self.outer.update_figures() if outer_stepped else (math.nan, math.nan)
        return SyncMeasurement(distance, model_norm, *update_figures, outer_stepped)

    @property
    def needs_anchor(self) -> bool:
        return True  # what travels is x_prev − x

    def agreed_after_sync(self) -> list[torch.Tensor]:
        return self.anchors  # x_prev ← x_g on every rank alike (the live fragment may hold a mix)

    def traffic(self, gradient_bytes_per_step: int) -> SyncTraffic:
        elements = tuple(sum(b - a for a, b in ranges) for ranges in self.ranges)
        return SyncTraffic(elements, self.rest_bytes, self.bytes_per_sync, gradient_bytes_per_step)

    def _step_syncs(self, completed: int, lr: float, anchors: list[torch.Tensor]) -> tuple[bool, bool]:
        """``end_step``'s work (the comment below gives the order). Returns whether a fragment was synced
        and whether an outer optimizer stepped."""
        # Updates encoded beside the step are sent, if the step did not (it does before its backward), and
        # two-phase compressed averages started at an earlier step go on to their second phase here, at the
        # same point on every rank, so that it travels behind the next steps as the first did.
        self._start_encoded()
        for fragment in sorted(self.in_flight):
            self._advance(self.in_flight[fragment])
        # Each Δ due is taken before the syncs due are applied: at τ = H (F = 1) a fragment's next Δ is taken
        # at its own sync step, and holds the steps up to it. It is sent after them (τ > 0), so that what those
        # syncs send (BN statistics, blocking) does not queue behind it on the communication thread; at τ = 0
        # the sync due is its own, so it goes first.
        taken = {
            fragment: self._take_update(fragment, completed + self.delay, anchors)
            for fragment in range(self.fragments)
            if self.starts_after(fragment, completed)
        }
        if self.delay == 0:
            for fragment, (updates, norms) in taken.items():
                self._send(fragment, completed, updates, norms)
        # A sync is due only if its update was sent: one whose step came after the last step of the run that
        # would have taken it (since resumed with more steps) is not made up for.
        due = [f for f in range(self.fragments) if self.syncs_after(f, completed) and f in self.in_flight]
        synced = outer_stepped = False

        def apply(fragment: int, sync_step: int) -> None:
            nonlocal synced, outer_stepped
            outer_step = self.outer.needs_anchor and self.outer_step_after(fragment, sync_step)
            self._apply(fragment, self.in_flight.pop(fragment), lr, anchors, outer_step)
            synced, outer_stepped = True, outer_stepped or outer_step

        for fragment in due:
            apply(fragment, completed)
        if self.delay > 0:
            for fragment, (updates, norms) in taken.items():
                if self.delay == self.period and fragment not in due:
                    self._restart_from_anchor(fragment, anchors)
                self._send(fragment, completed + self.delay, updates, norms)
        # τ = H: an update whose sync would come after the run's last step is applied at once (blocking): the
        # rank's model no longer holds its steps (the sync just applied, or the restart, set it to x_g).
        if self.after_the_run(completed + self.delay):
            for fragment in taken:
                apply(fragment, completed + self.delay)
        return synced, outer_stepped

    def _advance(self, pending: _InFlight) -> None:
        """Start the second phase of the two-phase averages among ``pending``'s (a collective: at the same
        point on every rank). Its wait for the first and its fp32 sum and re-encoding are the sync's cost
        (with the sync thread, the wait for that thread to have done them)."""
        if self._second_phase_due(pending):
            with self.stats.timed():
                self._start_second_phase(pending)

    @staticmethod
    def _second_phase_due(pending: _InFlight) -> bool:
        return any(isinstance(h, CompressedAverageHandle) and h.before_second_phase for h in pending.handles)

    def _start_second_phase(self, pending: _InFlight) -> None:
        """The gathers of ``pending``'s two-phase averages, once their chunks are summed (by the sync thread,
        where there is one; it then waits for the gathers)."""
        if pending.summed is not None:
            _join_beside(pending.summed, pending.handles)
            pending.summed = None
        for handle in pending.handles:
            if isinstance(handle, CompressedAverageHandle):
                handle.advance()
        pending.received = self.beside.submit(_wait_all_beside, pending.handles)

    def _take_update(
        self, fragment: int, sync_step: int, anchors: list[torch.Tensor]
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """Δ = x_prev − x of each of this rank's shards of the fragment, into its reused buffers, and ‖Δ‖²
        (taken before the average consumes Δ; by the sync thread where it encodes Δ)."""
        slot = sync_step // self.period % 2 if self.delay == self.period else 0
        updates: list[list[torch.Tensor]] = []
        norms: list[torch.Tensor] = []
        with self.stats.timed():  # the sync's cost, as the wait is
            for g, (a, _) in enumerate(self.ranges[fragment]):
                first = a - self.params_start[g]
                shards = []
                for k, (s, e) in enumerate(self.shards[fragment][g]):
                    anchor = anchors[g][..., first + s : first + e]
                    live = self.groups[g].flat[..., a + s : a + e]
                    update = self._update_buffer((fragment, g, k, slot), anchor, live)
                    torch.sub(anchor, live, out=update)
                    if not self._encodes_beside:
                        norms.append(_squared_norm(update))
                    shards.append(update)
                updates.append(shards)
        return updates, norms

    def _send(
        self, fragment: int, sync_step: int, updates: list[list[torch.Tensor]], norms: list[torch.Tensor]
    ) -> None:
        """Start averaging the fragment's Δ (encoded, when compressed) and the workers' mean ‖Δ‖². With
        the sync thread, a compressed Δ is encoded there and sent by ``_start``; an fp32 Δ, with nothing
        to encode, goes at once (a later start would only give its transfer less time), and is waited
        for there."""
        if self._encodes_beside:
            encoded = self.beside.submit(self._encode, fragment, updates, norms)
            self.in_flight[fragment] = _InFlight(sync_step, updates, [], encoded=encoded)
            return
        with self.stats.timed():  # encoding counts as the sync's cost, as the wait does
            squared_norm = self._encode(fragment, updates, norms)
            handles = self._start_collectives(fragment, updates, squared_norm)
        pending = _InFlight(sync_step, updates, handles, squared_norm)
        if self._second_phase_due(pending):
            # Two-phase: the sync thread waits for the all-to-all and sums this rank's chunk; the gather
            # starts where the step's second phase is due, and is then waited for beside it.
            pending.summed = self.beside.submit(_sum_all_beside, handles)
        else:
            pending.received = self.beside.submit(_wait_all_beside, handles)
        self.in_flight[fragment] = pending

    def _encode(self, fragment: int, updates: list[list[torch.Tensor]], norms: list[torch.Tensor]) -> torch.Tensor:
        """Encode each shard of Δ (none: nothing to do) and return ‖Δ‖² of this rank's shards (computed
        here from Δ if ``norms`` is empty), before the encoding overwrites Δ."""
        if not norms:
            norms = [_squared_norm(update) for shards in updates for update in shards]
        squared_norm = torch.stack(norms).sum(dim=0).reshape(-1).contiguous()
        if self.compression != "none":
            for g, shards in enumerate(updates):
                for k, update in enumerate(shards):
                    self.averagers[fragment][g][k].encode_(self.between, update)
        return squared_norm

    def _start_collectives(
        self, fragment: int, updates: list[list[torch.Tensor]], squared_norm: torch.Tensor
    ) -> list[Handle]:
        """The averages of the encoded Δ and of ‖Δ‖² over the workers (the consensus distance)."""
        handles: list[Handle] = []
        if self.between.size == 1:
            return handles
        for g, shards in enumerate(updates):
            for k, update in enumerate(shards):
                if self.compression != "none":
                    handles.append(self.averagers[fragment][g][k].start(self.between, update))
                else:
                    handles.append(self.between.iallreduce_(update, average=True))
        handles.append(self.between.iallreduce_(squared_norm, average=True))
        return handles

    def _start_encoded(self) -> None:
        """With the sync thread: send the updates it has encoded (fragment order, at the same point of
        the step on every rank). Waiting for an encoding to finish is the sync's cost."""
        unsent = [f for f in sorted(self.in_flight) if self.in_flight[f].encoded is not None]
        if unsent:
            with self.stats.timed():
                for fragment in unsent:
                    self._start(fragment, self.in_flight[fragment])

    def _start(self, fragment: int, pending: _InFlight) -> None:
        """Send ``pending``'s encoded update, and wait for its average beside the step."""
        assert pending.encoded is not None
        pending.squared_norm = pending.encoded.result()  # re-raises an error of the sync thread here
        pending.encoded = None
        pending.handles = self._start_collectives(fragment, pending.updates, pending.squared_norm)
        pending.received = self.beside.submit(_wait_all_beside, pending.handles)

    def _restart_from_anchor(self, fragment: int, anchors: list[torch.Tensor]) -> None:
        """τ = H, after the first Δ: it was taken H steps into the local phase, where no sync is due. Each
        rank continues from (1 − α)·x_prev + α·x, as after a sync whose average is zero, so that each later
        Δ holds only the H steps since the one before (they reach x_prev one sync late)."""
        with torch.no_grad():
            for g, (a, b) in enumerate(self.ranges[fragment]):
                first = a - self.params_start[g]
                self._mix_into(self.groups[g].flat[..., a:b], anchors[g][..., first : first + b - a])

    def _mix_into(self, live: torch.Tensor, new: torch.Tensor) -> None:
        """x ← (1 − α)·new + α·x."""
        if self.mix == 0:
            live.copy_(new)
        else:
            live.mul_(self.mix).add_(new, alpha=1.0 - self.mix)

    def _update_buffer(self, key: tuple[int, int, int, int], anchor: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        buffer = self.update_buffers.get(key)
        if buffer is None:
            buffer = torch.empty(live.shape, dtype=torch.result_type(anchor, live), device=live.device)
            self.update_buffers[key] = buffer
        return buffer

    def _complete(self, fragment: int, pending: _InFlight | None = None) -> None:
        """Wait for fragment ``fragment``'s average (``pending``, else the one in flight) and, with worker
        groups, assemble it: then ``updates`` holds one tensor per flat group, the whole fragment's average,
        identical on every rank."""
        pending = self.in_flight[fragment] if pending is None else pending
        if pending.encoded is not None:  # encoded beside the step, not sent yet (an average applied at once)
            self._start(fragment, pending)
        if self._second_phase_due(pending):  # its point not reached (a checkpoint, an average applied at once)
            self._start_second_phase(pending)
        if pending.received is not None:
            _join_beside(pending.received, pending.handles)
            pending.received = None
        for handle in pending.handles:
            handle.wait()  # after a wait beside the step, the backend's bookkeeping only
        pending.handles = []
        if pending.assembled:
            return
        pending.assembled = True
        if self.worker is None:
            return  # one shard: the whole fragment
        if self.comm.replicas > 1:  # a simulation holds every shard
            pending.updates = [[torch.cat(shards, dim=-1)] for shards in pending.updates]
            return
        # A rank of a worker holds its shard: put it in zeros and sum over the worker's ranks (exact); the
        # squared norms of the shards add up to the worker's.
        assert pending.squared_norm is not None
        wholes = [pending.squared_norm]
        for (a, b), [shard], [(start, end)] in zip(
            self.ranges[fragment], pending.updates, self.shards[fragment], strict=True
        ):
            whole = torch.zeros(b - a, dtype=shard.dtype, device=shard.device)
            whole[start:end] = shard
            wholes.append(whole)
        self.exchange.assemble(wholes)
        pending.updates = [[whole] for whole in wholes[1:]]

    def _apply(
        self, fragment: int, pending: _InFlight, lr: float, anchors: list[torch.Tensor], outer_step: bool
    ) -> None:
        """Wait for the fragment's average; x_prev ← x_g, and the rank's copy ← (1 − α)·x_g + α·x."""
        rest_between = rest_inside = 0
        with self.stats.timed():
            self._complete(fragment, pending)
            if fragment == 0:
                rest_between, rest_inside = self.exchange.average(self.rest, self.statistics)
        averaged_update = averaged_model = 0.0
        with torch.no_grad():
            for g, (a, b) in enumerate(self.ranges[fragment]):
                first = a - self.params_start[g]
                anchor = anchors[g][..., first : first + b - a]
                update = pending.updates[g][0]
                averaged_update += first_row(_squared_norm(update))
                # x̄ = x_prev − avg Δ. Plain averaging keeps it as x_prev for the next Δ, so it is formed in
                # place there (a copy of the model less per sync); else in avg Δ's memory (its last use).
                plain = not self.outer.needs_anchor
                new = torch.sub(anchor, update, out=anchor if plain else update)
                averaged_model += first_row(_squared_norm(new))
                if outer_step:
                    self.outer.step(new, anchor, lr, fragment * len(self.groups) + g)
                self._mix_into(self.groups[g].flat[..., a:b], new)
            if fragment == 0 and self.reset_state:
                reset_optimizer_state(self.groups)
        # Ξ² = mean‖xᵢ − x̄‖² = mean‖Δᵢ‖² − ‖avg Δ‖² over the fragment, as its Δ was taken (drift.py).
        assert pending.squared_norm is not None
        mean_squared = first_row(pending.squared_norm)
        spread = max(mean_squared - averaged_update, 0.0)  # rounding may leave a tiny negative: 0
        self.last_consensus = (spread / averaged_model if averaged_model > 0 else math.nan, math.sqrt(averaged_model))
        # One rank sends nothing, as the blocking sync counts it; one worker sends only inside itself.
        between = self.shard_bytes[fragment] if self.between.size > 1 else 0
        count_sync(self.stats, between + rest_between, self.assembly_bytes[fragment] + rest_inside)

    # --- in flight at a checkpoint or at the end -------------------------------------------------------
    def settle(self) -> None:
        """Wait for every average in flight (its result stays, to be applied at its sync step)."""
        with self.stats.timed():
            for fragment in sorted(self.in_flight):  # the same order on every rank (the assembly is a collective)
                self._complete(fragment)

    def close(self) -> None:
        """Let the sync thread end. Not joined: after an error it may wait for a collective that a
        stopped peer will never join (it is a daemon thread, so the process still exits)."""
        self.beside.stop()

    @property
    def sync_thread_cpu_seconds(self) -> float:
        """CPU seconds the sync thread has used so far (0 without one)."""
        return self.beside.cpu_seconds

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Live views of each rank's error-feedback state, per fragment and group (and shard, where a
        simulation holds a worker's every shard): its update's error, and among three or more workers
        the error of the chunk of the average it re-encodes (``.average_error``)."""
        return {
            f"error{f}.{g}" + (f".{k}" if len(shards) > 1 else "") + ("" if name == "error" else f".{name}"): tensor
            for f, row in enumerate(self.averagers)
            for g, shards in enumerate(row)
            for k, averager in enumerate(shards)
            for name, tensor in averager.state_tensors().items()
        }

    def shared_state(self) -> dict[str, torch.Tensor]:
        """x_prev and the outer state, then the averages in flight, settled (identical on every rank), with
        the step they apply at."""
        self.settle()
        state = super().shared_state()
        for fragment, pending in self.in_flight.items():
            state[f"inflight{fragment}.step"] = torch.tensor([pending.sync_step], dtype=torch.int64)
            if pending.squared_norm is not None:
                state[f"inflight{fragment}.norm"] = pending.squared_norm
            state.update({f"inflight{fragment}.{g}": whole for g, [whole] in enumerate(pending.updates)})
        return state

    def load_state(self, state: dict[str, torch.Tensor], completed_steps: int) -> None:
        super().load_state(state, completed_steps)
        self.in_flight = {}
        for fragment in range(self.fragments):
            if f"inflight{fragment}.step" not in state:
                continue
            updates = [
                [state[f"inflight{fragment}.{g}"].to(group.flat.device, copy=True)]
                for g, group in enumerate(self.groups)
            ]
            step = int(state[f"inflight{fragment}.step"].item())
            norm = state.get(f"inflight{fragment}.norm")
            norm = torch.full((1,), math.nan, dtype=torch.float64) if norm is None else norm.clone()
            self.in_flight[fragment] = _InFlight(step, updates, [], norm, assembled=True)


def _squared_norm(values: torch.Tensor) -> torch.Tensor:
    """‖v‖² per row, as float64. Summed in the tensor's own dtype (one fast pass, a tenth of a float64
    one): the consensus distance here is a difference of squared norms of updates, not of parameters
    (drift.py), which keeps its digits in float32."""
    return torch.linalg.vector_norm(values, dim=-1).double().square()


def _wait_all_beside(handles: list[Handle]) -> None:
    for handle in handles:
        handle.wait_beside()


def _join_beside(work: Future[None], handles: list[Handle]) -> None:
    """Wait for the sync thread's ``work`` on ``handles``; where the step gets there first, the handles hear
    that it waits (mpi's polled exchanges then go at a waiting step's pace)."""
    if not work.done():
        for handle in handles:
            handle.step_waits()
    work.result()  # re-raises an error of the sync thread here


def _sum_all_beside(handles: list[Handle]) -> None:
    for handle in handles:
        if isinstance(handle, CompressedAverageHandle):
            handle.sum_beside()


def _segment(group: FlatGroup, kind: str) -> tuple[int, int]:
    for k, start, end in group.segments:
        if k == kind:
            return start, end
    return 0, 0
