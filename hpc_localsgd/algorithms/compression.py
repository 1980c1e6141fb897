"""Compressed synchronisation with error feedback: the average of every rank's update, sent in fewer bytes.

What travels is a rank's update since the last global sync, Δ = x_prev − x (small, centred numbers where
low precision is safe), never the parameters. With error feedback each rank keeps e (zero at the start):

    q = Q(Δ + e)          what this rank sends (encoded)
    e ← (Δ + e) − q       the compression error, re-sent at the next sync instead of lost
    avg = (1/m)·Σ_r q_r   decoded to fp32 and summed in fp32, rank order 0..m−1, then divided by m

(Seide et al. 2014; Karimireddy et al. 2019). The caller's new model is
x_prev − avg, or the outer optimizer's step on avg.

Codecs (``CODECS``):
    none   fp32, averaged by the communicator's allreduce: today's sync (Q is the identity, e stays 0).
    bf16   round to nearest even bfloat16; 2 bytes an element.
    fp16   round to nearest even float16, saturated at ±65504 (an overflow becomes the largest half, and
           error feedback carries the rest, rather than an infinity that would poison e); 2 bytes.
    int8   blocks of ``INT8_BLOCK`` = 256 consecutive elements (the last one shorter), each with a float32
           scale s = max|x|/127 over the block; q = round(x/s) (to nearest, ties to even) in [−127, 127];
           decoded q·s, so |x − q·s| ≤ s/2. A block of zeros has s = 0. 1 byte an element plus 4 bytes a
           block: ``encoded_bytes``. A non-finite value makes its block decode to NaN.

Speed: the update being averaged is the encoding's working space (no copy of it), int8 works through
it in chunks of whole blocks that stay in cache between its passes, with error feedback computed from
the quantised levels (no decoding of this rank's own bytes), and the received rows are decoded a chunk
at a time straight into the fp32 sum.

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
from collections.abc import Callable
from typing import Literal, get_args

import torch

from ..comm.base import Communicator, DoneHandle, Handle
from .flat import contiguous_part

Codec = Literal["none", "bf16", "fp16", "int8"]
CODECS: tuple[Codec, ...] = get_args(Codec)
INT8_BLOCK = 256  # elements per int8 scale: 4 bytes of scale per 256 of payload, 1.6 %
INT8_LEVELS = 127  # symmetric: −127..127 (−128 unused, so that negation is exact)
_FP16_MAX = torch.finfo(torch.float16).max
_ELEMENT_BYTES = {"none": 4, "bf16": 2, "fp16": 2, "int8": 1}


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown sync compression {codec!r}; choose one of {', '.join(CODECS)}")


def int8_blocks(numel: int) -> int:
    """How many blocks (and float32 scales) ``numel`` elements make for int8."""
    return math.ceil(numel / INT8_BLOCK)


def encoded_bytes(codec: Codec, numel: int) -> int:
    """The exact bytes of ``numel`` fp32 elements once encoded: payload, plus the scales for int8."""
    _check_codec(codec)
    scales = 4 * int8_blocks(numel) if codec == "int8" else 0
    return _ELEMENT_BYTES[codec] * numel + scales


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


def encode(codec: Codec, values: torch.Tensor) -> torch.Tensor:
    """``values`` (float32, last dimension n) as uint8 rows of ``encoded_bytes(codec, n)`` bytes each.
    int8 rows hold the block scales' bytes first, then the n int8 values."""
    _check_codec(codec)
    if values.dtype != torch.float32:
        raise TypeError(f"compression encodes float32 values, got {values.dtype}")
    if codec == "none":
        return values.contiguous().view(torch.uint8)
    if codec == "bf16":
        return values.to(torch.bfloat16).view(torch.uint8)
    if codec == "fp16":
        return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).view(torch.uint8)
    numel = values.shape[-1]
    rows = values.reshape(-1, numel)
    encoded = torch.empty((rows.shape[0], encoded_bytes(codec, numel)), dtype=torch.uint8, device=values.device)
    for row, out in zip(rows, encoded, strict=True):
        _encode_int8(row.clone(), out)
    return encoded.view(*values.shape[:-1], -1)


def decode(codec: Codec, encoded: torch.Tensor, numel: int) -> torch.Tensor:
    """The float32 values (last dimension ``numel``) that ``encode`` rows hold; exact inverse for bf16,
    fp16 and none (every encoded value is a float32), q·s for int8."""
    _check_codec(codec)
    if encoded.shape[-1] != encoded_bytes(codec, numel):
        raise ValueError(
            f"{codec} rows of {numel} elements have {encoded_bytes(codec, numel)} bytes, got {encoded.shape[-1]}"
        )
    if codec == "none":
        return encoded.contiguous().view(torch.float32).clone()
    if codec in ("bf16", "fp16"):
        return encoded.contiguous().view(torch.bfloat16 if codec == "bf16" else torch.float16).float()
    rows = encoded.reshape(-1, encoded.shape[-1])
    decoded = torch.empty((rows.shape[0], numel), dtype=torch.float32, device=encoded.device)
    for row, out in zip(rows, decoded, strict=True):
        _decode_int8(row, out)
    return decoded.view(*encoded.shape[:-1], numel)


# On a CPU, int8 works through the vector in chunks of whole blocks small enough to stay in cache
# between the passes over them (max, divide, round, clamp, cast): a few passes over a chunk, not over
# 100 MB. On a GPU each pass is a kernel launch, so the chunks are large (a ResNet-50 update in two):
# 256 Ki-element chunks made that update's int8 sync launch-bound at 30 ms on an H100.
INT8_CHUNK = 1024 * INT8_BLOCK
INT8_DEVICE_CHUNK = 65536 * INT8_BLOCK


def _chunk_size(device: torch.device) -> int:
    return INT8_CHUNK if device.type == "cpu" else INT8_DEVICE_CHUNK


def _encode_int8(values: torch.Tensor, out: torch.Tensor, error: torch.Tensor | None = None) -> None:
    """int8-encode the 1-D float32 ``values`` into the uint8 row ``out``; ``values`` is overwritten
    (with the quantised levels q, as float32). With ``error`` (e, the same length), what is encoded is
    values + e, and e becomes (values + e) − q·s, exactly what the others decode from ``out``: each
    chunk's sum, levels and error are formed while the chunk is in cache; ``values`` is then left
    holding q·s, bit for bit what decoding ``out`` gives."""
    numel = values.numel()
    blocks = int8_blocks(numel)
    scales = torch.empty(blocks, dtype=torch.float32, device=values.device)
    levels = out[4 * blocks :].view(torch.int8)
    # A tensor, not a Python number: CUDA divides by a number as a multiplication by its reciprocal,
    # which rounds differently; a tensor divisor gives the CPU's (and the reference's) exact quotient.
    level_count = torch.full((), INT8_LEVELS, dtype=torch.float32, device=values.device)
    size = _chunk_size(values.device)
    magnitudes = torch.empty(min(size, numel), dtype=torch.float32, device=values.device)
    for start in range(0, numel, size):
        chunk = values[start : start + size]
        residual = None if error is None else error[start : start + size]
        if residual is not None:
            chunk.add_(residual)  # Δ + e
            residual.copy_(chunk)
        first = start // INT8_BLOCK
        count = int8_blocks(chunk.numel())
        # max|x| of each block (abs: a block of ±0 has the scale +0); a NaN propagates to its block's scale
        torch.abs(chunk, out=magnitudes[: chunk.numel()])
        _per_block_max(magnitudes[: chunk.numel()], scales[first : first + count])
        chunk_scales = scales[first : first + count].div_(level_count)
        divisor = torch.where(chunk_scales > 0, chunk_scales, torch.ones_like(chunk_scales))  # zeros stay zero
        _per_block(torch.div, chunk, divisor, chunk)
        chunk.round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
        levels[start : start + chunk.numel()].copy_(chunk)
        if residual is not None:
            _per_block(torch.mul, chunk, chunk_scales, chunk)  # q·s, as decoding gives it
            residual.sub_(chunk)  # e ← (Δ + e) − q·s
    out[: 4 * blocks].copy_(scales.view(torch.uint8))


def _per_block_max(values: torch.Tensor, out: torch.Tensor) -> None:
    """The largest of each block of the 1-D ``values`` (starting at a block boundary) into ``out``."""
    whole = values.numel() // INT8_BLOCK
    if whole:
        torch.amax(values[: whole * INT8_BLOCK].view(whole, INT8_BLOCK), dim=-1, out=out[:whole])
    if values.numel() > whole * INT8_BLOCK:
        out[whole] = values[whole * INT8_BLOCK :].max()


def _int8_scales(row: torch.Tensor, numel: int) -> torch.Tensor:
    # Copied out: a row of a gathered buffer need not start at a multiple of 4 bytes, as a float32 view wants.
    blocks = int8_blocks(numel)
    scales = torch.empty(blocks, dtype=torch.float32, device=row.device)
    scales.view(torch.uint8).copy_(row[: 4 * blocks])
    return scales


def _decode_int8(row: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """q·s of the encoded uint8 ``row`` into the 1-D float32 ``out``, or added to it (``add``: the
    product rounded to float32 first, then the sum, as decode-then-add would)."""
    if add:
        _decode_sum_int8([row], out, first_adds=True)
    else:
        _decode_sum_int8([row], out)


def _decode_sum_int8(rows: list[torch.Tensor], out: torch.Tensor, divisor: int = 1, first_adds: bool = False) -> None:
    """Σ_r q_r·s_r of the encoded uint8 ``rows`` into the 1-D float32 ``out``, summed in float32 in row
    order (each product rounded first, as decoding a row and adding it would), then divided by
    ``divisor`` (none when 1); ``first_adds``: the first row is added to ``out`` too. A chunk at a time,
    every row's product added while the chunk is in cache. The levels become float32 before the
    multiplication: the same product as int8 times float32, a third of the time."""
    numel = out.numel()
    scales = [_int8_scales(row, numel) for row in rows]
    levels = [row[4 * int8_blocks(numel) :].view(torch.int8) for row in rows]
    size = _chunk_size(out.device)
    scratch = torch.empty(min(size, numel), dtype=torch.float32, device=out.device)
    for start in range(0, numel, size):
        target = out[start : start + size]
        product = scratch[: target.numel()]
        first_block = start // INT8_BLOCK
        for index, (row_levels, row_scales) in enumerate(zip(levels, scales, strict=True)):
            into = target if index == 0 and not first_adds else product
            into.copy_(row_levels[start : start + target.numel()])
            chunk_scales = row_scales[first_block : first_block + int8_blocks(target.numel())]
            _per_block(torch.mul, into, chunk_scales, into)
            if into is product:
                target.add_(product)
        if divisor != 1:
            target.div_(divisor)


def _per_block(
    op: Callable[..., torch.Tensor], values: torch.Tensor, per_block: torch.Tensor, out: torch.Tensor
) -> None:
    """out = op(values, the value of each one's block), for 1-D ``values`` starting at a block boundary."""
    whole = values.numel() // INT8_BLOCK
    if whole:
        shape = (whole, INT8_BLOCK)
        op(values[: whole * INT8_BLOCK].view(shape), per_block[:whole, None], out=out[: whole * INT8_BLOCK].view(shape))
    if values.numel() > whole * INT8_BLOCK:
        op(values[whole * INT8_BLOCK :], per_block[whole], out=out[whole * INT8_BLOCK :])


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
        _check_codec(codec)
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
                self._decode_row(row, out)
            return
        self._in_flight = True
        if comm.replicas == 1 and self.two_phase(comm):
            size = comm.size
            width = max(encoded_bytes(self.codec, b - a) for a, b in (self.chunk(size, k) for k in range(size)))
            chunks = self._buffer("chunks", (size, width))
            for k in range(size):
                a, b = self.chunk(size, k)
                error = None if self.error is None else self.error[a:b]
                self._encode_row(update[a:b], chunks[k, : encoded_bytes(self.codec, b - a)], error)
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
            self._encode_row(row, out, error)
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

    def _encode_row(self, values: torch.Tensor, out: torch.Tensor, error: torch.Tensor | None) -> None:
        """Q(values + e) into the bytes ``out``; with ``error`` (e), e ← values + e − Q(values + e), exactly
        what the others decode from those bytes; without, Q(values). ``values`` is overwritten."""
        if self.codec == "int8":
            _encode_int8(values, out, error)  # adds e to values first, chunk by chunk
            return
        if error is not None:
            values.add_(error)
        encoded = encode(self.codec, values)
        out.copy_(encoded)
        if error is not None:
            torch.sub(values, decode(self.codec, encoded, values.numel()), out=error)

    def _decode_row(self, row: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
        """The values the bytes ``row`` encode, into (or added to) the 1-D ``out``."""
        if self.codec == "int8":
            _decode_int8(row, out, add)
        elif add:
            out.add_(decode(self.codec, row, out.numel()))
        else:
            out.copy_(decode(self.codec, row, out.numel()))

    def _sum_chunk(self, comm: Communicator, update: torch.Tensor) -> None:
        """Two-phase, once the all-to-all is done: this rank's chunk summed over the ranks in rank order
        in fp32 and divided, and re-encoded (with its own error feedback, where kept) for the gather."""
        received, rank, size = self._buffers["received"], comm.rank, comm.size
        a, b = self.chunk(size, rank)
        nbytes = encoded_bytes(self.codec, b - a)
        average = update[a:b]  # this chunk's levels are spent: the sum goes here
        if self.codec == "int8":
            _decode_sum_int8([received[source, :nbytes] for source in range(size)], average, size)
        else:
            self._decode_row(received[0, :nbytes], average)
            for source in range(1, size):
                self._decode_row(received[source, :nbytes], average, add=True)
            average.div_(size)
        mine = self._buffer("chunk", (received.shape[1],))
        # error feedback for the re-encoding too (its error is added first), so nothing is lost
        self._encode_row(average, mine[:nbytes], self._average_error(comm))

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
                self._decode_row(gathered[k, : encoded_bytes(self.codec, b - a)], update[a:b])
            return
        # Rank order, in float32 (int8: decoded a chunk at a time into the sum, no row in memory).
        if self.codec == "int8" and comm.size == 2 and self.error is not None:
            # With error feedback the encoding left this rank's own decoded row, q·s, in ``update``: only the
            # other's row is decoded and added (x + y = y + x: rank order's bits either way).
            _decode_sum_int8([gathered[1 - comm.rank]], update, comm.size, first_adds=True)
            return
        if self.codec == "int8":
            _decode_sum_int8(list(gathered), update, comm.size)
            return
        self._decode_row(gathered[0], update)
        for rank in range(1, comm.size):
            self._decode_row(gathered[rank], update, add=True)
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
