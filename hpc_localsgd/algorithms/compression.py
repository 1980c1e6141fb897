"""Compressed synchronisation: the average of every rank's update, sent in fewer bytes.

Each rank sends q = Q(Δ + e), its update since the last global sync encoded with error feedback
(algorithms/codecs.py: the codecs, and e), and every rank ends with

    avg = (1/m)·Σ_r q_r   decoded to fp32 and summed in fp32, rank order 0..m−1, then divided by m

The caller's new model is x_prev − avg, or the outer optimizer's step on avg.

Speed: the update being averaged is the encoding's working space (no copy of it), and the received
rows are decoded into the fp32 sum (int8 a chunk at a time, no row in memory: ``codecs.decode_sum_int8``).

Exchange, among m ranks. Nothing is ever summed in low precision or on the wire; every rank ends with
the same bytes, bit for bit, deterministic.
- m ≤ 2, gathered: one allgather of the encoded bytes (payload and scales in one uint8 row per rank),
  then each rank decodes the m rows and sums them in fp32 in rank order: exactly avg_r Q(Δᵣ + eᵣ).
- m ≥ 3, two-phase (torchft's shape, with error feedback added): the update is cut into m chunks of
  whole int8 blocks (``chunk``); an all-to-all sends chunk k of every rank's encoded update to rank k,
  which decodes and sums them in fp32 in rank order, divides, and re-encodes its chunk of the average,
  Q(avg + a), with its own error feedback a ← avg + a − Q(avg + a) (without error feedback a is 0 and
  not kept); an allgather brings every rank all the re-encoded chunks. Without the second error
  feedback the re-encoding's rounding would bias the average sync after sync; with it, the time
  average converges to the exact one as for the first (tested). The engine starts the second phase
  at the end of the step after the first, or before the backward of the step whose end applies the
  average if that comes sooner (``CompressedAverageHandle.advance``, the same point on every rank),
  so both travel behind training.
The simulated backend holds every worker's row already: its gather is the identity, its allreduce sums
the decoded rows of each group in the same worker order, and among three or more it re-encodes the
average (whole rows encode as their chunks do, chunks being whole blocks).
Cost through a rank's link (``link_bytes``): the allgather (m − 1)·B; two-phase about 2·(m − 1)/m·B
(padding each chunk's row to the longest adds less than one block per chunk); an fp32 ring allreduce
2·(m − 1)/m·4n. So the ratio to fp32 is B/4n at every m ≥ 3, as at m = 2.

Bytes counted (``bytes_per_sync``): the encoded bytes a rank contributes per sync, scales included, the
same convention as ``accounting.CommStats.bytes_sent`` (the payload a rank contributes to a collective)
and the engine's ``bytes_per_sync`` (4n for fp32), so their ratio is the compression ratio.
"""

from __future__ import annotations

import math

import torch

from ..comm.base import Communicator, DoneHandle, Handle
from .codecs import (
    INT8_BLOCK,
    Codec,
    check_codec,
    decode,
    decode_into,
    decode_sum_int8,
    encode,
    encode_into,
    encoded_bytes,
    int8_blocks,
)
from .flat import contiguous_part


def link_bytes(codec: Codec, numel: int, size: int) -> float:
    """Bytes that cross one rank's link per sync among ``size`` ranks: the ring allreduce of fp32 for
    ``none`` (2·(m − 1)/m of the buffer); the allgather of the encoded update for m ≤ 2 ((m − 1)× it);
    for m ≥ 3 the two-phase exchange's all-to-all and allgather of chunk rows padded to the longest,
    (m − 1) rows each."""
    if codec == "none":
        return 2 * (size - 1) / size * encoded_bytes(codec, numel)
    if size <= 2:
        return (size - 1) * encoded_bytes(codec, numel)
    blocks = int8_blocks(numel)
    longest = min(math.ceil(blocks / size) * INT8_BLOCK, numel)
    return 2 * (size - 1) * encoded_bytes(codec, longest)


class CompressedAverageHandle(Handle):
    """A compressed average in flight. Gathered (m ≤ 2): the gather, then decoding and the fp32 sum in
    ``wait``. Two-phase (m ≥ 3): the all-to-all; ``advance`` (at the same point on every rank) waits for
    it, sums this rank's chunk and starts gathering the re-encoded chunks; ``wait`` advances if not yet
    done, waits for the gather and decodes. Beside the step (the sync thread), ``sum_beside`` waits for
    the all-to-all and sums the chunk before ``advance``, and ``wait_beside`` waits for the gather and
    decodes before ``wait``; those then only start the gather and do the backend's bookkeeping."""

    def __init__(self, averager: CompressedAverager, comm: Communicator, pending: Handle, update: torch.Tensor) -> None:
        self._averager = averager
        self._comm = comm
        self._pending: Handle | None = pending
        self._update = update
        self._first_phase = comm.replicas == 1 and averager.two_phase(comm)
        self._finished = False  # decoded beside the step; ``wait`` then only completes the bookkeeping
        self._summed = False  # two-phase: this rank's chunk summed beside the step; ``advance`` only gathers

    def progress(self) -> None:
        if self._pending is not None:
            self._pending.progress()

    @property
    def before_second_phase(self) -> bool:
        """Whether ``advance`` has work to do: a two-phase average whose second phase has not started."""
        return self._pending is not None and self._first_phase

    def advance(self) -> None:
        """Start the second phase of a two-phase average (a collective: call it at the same point on
        every rank); nothing for a gathered one."""
        if self._pending is None or not self._first_phase:
            return
        self._pending.wait()  # after ``sum_beside``: the backend's bookkeeping only
        if not self._summed:
            self._averager._sum_chunk(self._comm, self._update)
        self._first_phase = False
        self._pending = self._averager._gather_chunk(self._comm)

    def sum_beside(self) -> None:
        """Two-phase, on a thread beside the step: wait for the all-to-all (``Handle.wait_beside``) and sum
        and re-encode this rank's chunk, so that ``advance`` only starts the gather. Nothing otherwise."""
        if self._pending is None or not self._first_phase or self._summed:
            return
        self._pending.wait_beside()
        self._averager._sum_chunk(self._comm, self._update)
        self._summed = True

    def wait(self) -> None:
        self.advance()
        if self._pending is None:
            return
        self._pending.wait()  # after ``wait_beside``: the backend's bookkeeping only
        self._pending = None
        if not self._finished:
            self._averager._finish(self._comm, self._update)

    def step_waits(self) -> None:
        if self._pending is not None:
            self._pending.step_waits()

    def wait_beside(self) -> None:
        """The gathered exchange's wait and decoding, beside the step (``Handle.wait_beside``); a
        two-phase average's second phase is a collective, started by ``advance`` where every rank does."""
        if self._pending is None or self._finished:
            return
        if self._first_phase:
            raise RuntimeError("a two-phase average is waited for beside the step before its second phase")
        self._pending.wait_beside()
        self._averager._finish(self._comm, self._update)
        self._finished = True


class CompressedAverager:
    """The compressed average of one flat float32 update (shape ``shape``: (n,) on a rank, or (W, n) for
    the simulated backend's W workers), with this rank's error feedback state.

    ``iaverage_`` works like ``Communicator.iallreduce_(update, average=True)``: a collective started in
    the same order on every rank, non-blocking, that leaves the average in ``update`` once waited on.
    One average at a time per averager (its staging buffers are reused across syncs); use one averager per
    flat tensor (per dtype group, per fragment).
    """

    def __init__(
        self,
        codec: Codec,
        shape: tuple[int, ...],
        error_feedback: bool,
        device: torch.device | None = None,
        comm: Communicator | None = None,
    ) -> None:
        check_codec(codec)
        if len(shape) not in (1, 2):
            raise ValueError(f"a compressed average takes a flat update, (n,) or (workers, n); got shape {shape}")
        self.codec = codec
        self.shape = tuple(shape)
        self.numel = shape[-1]
        self.device = device
        # Error feedback needs a lossy codec: with ``none`` the error is always zero, so no state is kept.
        self.error = (
            torch.zeros(self.shape, dtype=torch.float32, device=device) if error_feedback and codec != "none" else None
        )
        # Two-phase with error feedback: the error of re-encoding the average, for the chunk this rank
        # re-encodes (every row's whole average in a simulation). Made now when the communicator is known
        # (so that a checkpoint restores it before the first sync), else at the first two-phase sync.
        self.average_error: torch.Tensor | None = None
        if comm is not None:
            self._average_error(comm)
        # Staging, allocated at the first sync and reused: this rank's encoded rows (gathered exchange) or
        # chunks (two-phase: row k for rank k), what arrives, and the two-phase's re-encoded chunk.
        self._buffers: dict[str, torch.Tensor] = {}
        self._in_flight = False

    @property
    def bytes_per_sync(self) -> int:
        """Encoded bytes a rank (each simulated worker) contributes per sync, scales included."""
        return encoded_bytes(self.codec, self.numel)

    @staticmethod
    def two_phase(comm: Communicator) -> bool:
        """Whether averages over ``comm`` take two phases (m ≥ 3 workers) rather than one gather."""
        return comm.size >= 3

    def chunk(self, parts: int, index: int) -> tuple[int, int]:
        """Chunk ``index`` of ``parts`` of the update in the two-phase exchange: whole int8 blocks (so
        that encoding chunk by chunk gives the bytes of encoding the whole), the first ones longer."""
        first, last = contiguous_part(0, int8_blocks(self.numel), parts, index)
        return min(first * INT8_BLOCK, self.numel), min(last * INT8_BLOCK, self.numel)

    def iaverage_(self, comm: Communicator, update: torch.Tensor) -> Handle:
        """Start averaging ``update`` (this rank's Δ) over ``comm``; after ``wait`` it holds
        avg_r Q(Δ_r + e_r) (re-encoded, Q(avg_r Q(Δ_r + e_r)), among three or more), identical on every
        rank, and e has moved on (error feedback). ``update`` is working space meanwhile: do not touch
        it. On one rank the average is Q(Δ + e) itself, with no collective. ``encode_`` then ``start``."""
        self.encode_(comm, update)
        return self.start(comm, update)

    def encode_(self, comm: Communicator, update: torch.Tensor) -> None:
        """The first part of ``iaverage_``: this rank's Q(Δ + e) into the bytes it will send, and e moved
        on. No collective, so it may run on a thread beside the one that then calls ``start``."""
        self._check(comm, update)
        if self._in_flight:
            raise RuntimeError("a compressed average is already in flight on this averager; wait for it first")
        if self.codec == "none":
            return
        if comm.size == 1:  # Q(Δ + e) itself, row by row (a simulation's one-worker groups too)
            encoded = self._encode_rows(update)
            for row, out in zip(encoded.view(-1, self.bytes_per_sync), update.view(-1, self.numel), strict=True):
                decode_into(self.codec, row, out)
            return
        self._in_flight = True
        if comm.replicas == 1 and self.two_phase(comm):
            size = comm.size
            width = max(encoded_bytes(self.codec, b - a) for a, b in (self.chunk(size, k) for k in range(size)))
            chunks = self._buffer("chunks", (size, width))
            for k in range(size):
                a, b = self.chunk(size, k)
                error = None if self.error is None else self.error[a:b]
                encode_into(self.codec, update[a:b], chunks[k, : encoded_bytes(self.codec, b - a)], error)
            return
        self._encode_rows(update)

    def start(self, comm: Communicator, update: torch.Tensor) -> Handle:
        """The second part of ``iaverage_``: the collective that averages what ``encode_`` encoded."""
        if self.codec == "none":
            return comm.iallreduce_(update, average=True) if comm.size > 1 else DoneHandle()
        if comm.size == 1:
            return DoneHandle()
        if comm.replicas == 1 and self.two_phase(comm):
            chunks = self._buffers["chunks"]
            pending = comm.ialltoall(chunks, self._buffer("received", tuple(chunks.shape)))
            return CompressedAverageHandle(self, comm, pending, update)
        encoded = self._buffers["encoded"]
        gathered_shape = encoded.shape if comm.replicas > 1 else (comm.size, *encoded.shape)
        pending = comm.iallgather(encoded, self._buffer("gathered", tuple(gathered_shape)))
        return CompressedAverageHandle(self, comm, pending, update)

    def average_(self, comm: Communicator, update: torch.Tensor) -> None:
        """Blocking ``iaverage_``."""
        self.iaverage_(comm, update).wait()

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            # Zeros: a two-phase row's padding travels too, and should be the same bytes on every run.
            buffer = self._buffers[name] = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        return buffer

    def _encode_rows(self, update: torch.Tensor) -> torch.Tensor:
        """Every row of ``update`` (one on a rank, one per worker in a simulation) into the encoded rows."""
        encoded = self._buffer("encoded", (*self.shape[:-1], self.bytes_per_sync))
        rows = zip(update.view(-1, self.numel), encoded.view(-1, self.bytes_per_sync), self._errors(), strict=True)
        for row, out, error in rows:
            encode_into(self.codec, row, out, error)
        return encoded

    def _errors(self) -> list[torch.Tensor | None]:
        rows = 1 if len(self.shape) == 1 else self.shape[0]
        return [None] * rows if self.error is None else list(self.error.view(-1, self.numel))

    def _average_error(self, comm: Communicator) -> torch.Tensor | None:
        if self.error is None or not self.two_phase(comm):
            return None
        if self.average_error is None:
            a, b = self.chunk(comm.size, comm.rank) if comm.replicas == 1 else (0, self.numel)
            self.average_error = torch.zeros((*self.shape[:-1], b - a), dtype=torch.float32, device=self.device)
        return self.average_error

    def _sum_chunk(self, comm: Communicator, update: torch.Tensor) -> None:
        """Two-phase, once the all-to-all is done: this rank's chunk summed over the ranks in rank order
        in fp32 and divided, and re-encoded (with its own error feedback, where kept) for the gather."""
        received, rank, size = self._buffers["received"], comm.rank, comm.size
        a, b = self.chunk(size, rank)
        nbytes = encoded_bytes(self.codec, b - a)
        average = update[a:b]  # this chunk's levels are spent: the sum goes here
        if self.codec == "int8":
            decode_sum_int8([received[source, :nbytes] for source in range(size)], average, size)
        else:
            decode_into(self.codec, received[0, :nbytes], average)
            for source in range(1, size):
                decode_into(self.codec, received[source, :nbytes], average, add=True)
            average.div_(size)
        mine = self._buffer("chunk", (received.shape[1],))
        # error feedback for the re-encoding too (its error is added first), so nothing is lost
        encode_into(self.codec, average, mine[:nbytes], self._average_error(comm))

    def _gather_chunk(self, comm: Communicator) -> Handle:
        """Two-phase, the second phase: every rank's re-encoded chunk gathered from every rank."""
        received = self._buffers["received"]
        return comm.iallgather(self._buffers["chunk"], self._buffer("gathered", tuple(received.shape)))

    def _finish(self, comm: Communicator, update: torch.Tensor) -> None:
        self._in_flight = False
        gathered = self._buffers["gathered"]
        if comm.replicas > 1:
            # Every worker's row is here: decode them all, and let the simulated allreduce sum each group's
            # rows in worker order (in fp32) and divide, as the ranks' exchanges do; with three or more in
            # a group, re-encode the average as a two-phase exchange does (chunks are whole blocks, so
            # encoding whole rows gives the same values).
            update.copy_(decode(self.codec, gathered, self.numel))
            comm.allreduce_(update, average=True)
            if self.two_phase(comm):
                average_error = self._average_error(comm)
                if average_error is not None:
                    update.add_(average_error)
                requantized = decode(self.codec, encode(self.codec, update), self.numel)
                if average_error is not None:
                    torch.sub(update, requantized, out=average_error)
                update.copy_(requantized)
            return
        if self.two_phase(comm):
            for k in range(comm.size):
                a, b = self.chunk(comm.size, k)
                decode_into(self.codec, gathered[k, : encoded_bytes(self.codec, b - a)], update[a:b])
            return
        # Rank order, in float32 (int8: decoded a chunk at a time into the sum, no row in memory).
        if self.codec == "int8" and comm.size == 2 and self.error is not None:
            # With error feedback the encoding left this rank's own decoded row, q·s, in ``update``: only the
            # other's row is decoded and added (x + y = y + x: rank order's bits either way).
            decode_sum_int8([gathered[1 - comm.rank]], update, comm.size, first_adds=True)
            return
        if self.codec == "int8":
            decode_sum_int8(list(gathered), update, comm.size)
            return
        decode_into(self.codec, gathered[0], update)
        for rank in range(1, comm.size):
            decode_into(self.codec, gathered[rank], update, add=True)
        update.div_(comm.size)

    def _check(self, comm: Communicator, update: torch.Tensor) -> None:
        if update.dtype != torch.float32 or tuple(update.shape) != self.shape or not update.is_contiguous():
            raise ValueError(
                f"this averager takes contiguous float32 updates of shape {self.shape}; "
                f"got {update.dtype} {tuple(update.shape)}"
            )
        expected_rows = comm.replicas if comm.replicas > 1 else None
        rows = self.shape[0] if len(self.shape) == 2 else None
        if rows != expected_rows:
            raise ValueError(
                f"a {comm.name} communicator with {comm.replicas} worker(s) per process takes updates of "
                f"shape {'(workers, n)' if expected_rows else '(n,)'}; this averager's are {self.shape}"
            )

    # --- state for checkpoints ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's error feedback state (it differs between ranks): its update's error and, in a
        two-phase exchange, the error of the chunk of the average it re-encodes; empty without."""
        state = {} if self.error is None else {"error": self.error}
        if self.average_error is not None:
            state["average_error"] = self.average_error
        return state

    def load_state_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors``; an absent error (a run saved without error feedback) starts at zero."""
        for name, live in self.state_tensors().items():
            if name in saved:
                live.copy_(saved[name].reshape(live.shape))
            else:
                live.zero_()

    def memory_bytes(self, size: int) -> int:
        """Bytes this averager holds over ``size`` ranks: the fp32 error (if any) and its staging, kept
        from the first sync on for reuse: gathered (m ≤ 2, and the simulated backend) its encoded rows
        and the gathered rows of every rank (a simulation gathers in place of its encoded rows);
        two-phase (m ≥ 3) its m chunks, the m it receives, its re-encoded chunk and the m gathered. The
        update being averaged is the encoding's working space; int8 decodes a chunk of 256 Ki elements
        at a time (bf16 and fp16 decode a transient fp32 row or chunk). With error feedback, a
        two-phase exchange also keeps the error of re-encoding (the longest chunk's counted; a
        simulation's whole rows)."""
        rows = self.shape[0] if len(self.shape) == 2 else 1
        error = 4 * self.numel * rows if self.error is not None else 0
        if self.codec == "none" or size == 1:
            return error
        chunks = [self.chunk(size, k) for k in range(size)]
        if rows == 1 and size >= 3:
            width = max(encoded_bytes(self.codec, b - a) for a, b in chunks)
            # the fp32 error of the chunk it re-encodes: the longest (rank 0's) counted
            average_error = 4 * max(b - a for a, b in chunks) if self.error is not None else 0
            return error + (3 * size + 1) * width + average_error
        gathered_rows = rows if rows > 1 else size
        average_error = 4 * self.numel * rows if self.error is not None and rows > 1 and size >= 3 else 0
        return error + self.bytes_per_sync * (rows + gathered_rows) + average_error
