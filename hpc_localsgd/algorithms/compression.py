"""Compressed synchronisation with error feedback: the average of every rank's update, sent in fewer bytes.

What travels is a rank's update since the last global sync, Δ = x_prev − x (small, centred numbers where
low precision is safe), never the parameters. With error feedback each rank keeps e (zero at the start):

    q = Q(Δ + e)          what this rank sends (encoded)
    e ← (Δ + e) − q       the compression error, re-sent at the next sync instead of lost
    avg = (1/m)·Σ_r q_r   decoded to fp32 and summed in fp32, rank order 0..m−1, then divided by m

(Seide et al. 2014; Karimireddy et al. 2019; ../shared/ALGORITHMS.md). The caller's new model is
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

Exchange: every compressed codec is one allgather of the encoded bytes (payload and scales in one uint8
row per rank), then each rank decodes the m rows and sums them in fp32 in rank order. Nothing is summed in
low precision or on the wire, every rank sums the same bytes in the same order, so the result is identical
on every rank, bit for bit, and deterministic; and it is exactly avg(Q(Δᵣ + eᵣ)), with no second rounding
of the average. The simulated backend holds every worker's row already: its gather is the identity and
its allreduce sums the decoded rows of each group in the same worker order.
Cost: an allgather delivers a rank's B encoded bytes to m − 1 peers, (m − 1)·B over its link (ring or
recursive doubling), where an fp32 ring allreduce of the 4n-byte buffer moves 2·(m − 1)/m·4n
(``link_bytes``). The gather therefore sends fewer bytes than the fp32 allreduce while
m < 8n/B: below 7.9 ranks for int8, below 4 for bf16/fp16 (equal at 4). A reduce-scatter of encoded
chunks, an fp32 reduction per chunk and an allgather of the re-quantised chunks (torchft) would move
about 2·(m − 1)/m·B at any m, at the price of rounding the average a second time.

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
    ``none`` (2·(m − 1)/m of the buffer), the allgather of the encoded update otherwise ((m − 1)× it)."""
    if codec == "none":
        return 2 * (size - 1) / size * encoded_bytes(codec, numel)
    return (size - 1) * encoded_bytes(codec, numel)


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


# int8 works through the vector in chunks of whole blocks small enough to stay in cache between the
# passes over them (max, divide, round, clamp, cast): a few passes over a chunk, not over 100 MB.
INT8_CHUNK = 1024 * INT8_BLOCK


def _chunks(numel: int) -> range:
    return range(0, numel, INT8_CHUNK)


def _encode_int8(values: torch.Tensor, out: torch.Tensor) -> None:
    """int8-encode the 1-D float32 ``values`` into the uint8 row ``out``; ``values`` is overwritten
    with the quantised levels q (as float32), from which q·s follows without decoding the bytes."""
    numel = values.numel()
    blocks = int8_blocks(numel)
    scales = torch.empty(blocks, dtype=torch.float32, device=values.device)
    levels = out[4 * blocks :].view(torch.int8)
    for start in _chunks(numel):
        chunk = values[start : start + INT8_CHUNK]
        first = start // INT8_BLOCK
        whole = chunk.numel() // INT8_BLOCK
        if whole:
            body = chunk[: whole * INT8_BLOCK].view(whole, INT8_BLOCK)
            low, high = torch.aminmax(body, dim=-1)
            # max|x| of each block (abs: a block of ±0 has the scale +0)
            torch.maximum(low.neg_(), high, out=scales[first : first + whole]).abs_()
        if chunk.numel() > whole * INT8_BLOCK:  # the last block, shorter
            scales[first + whole] = chunk[whole * INT8_BLOCK :].abs().max()
        chunk_scales = scales[first : first + int8_blocks(chunk.numel())].div_(INT8_LEVELS)
        divisor = torch.where(chunk_scales > 0, chunk_scales, torch.ones_like(chunk_scales))  # zeros stay zero
        _per_block(torch.div, chunk, divisor, chunk)
        chunk.round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
        levels[start : start + chunk.numel()].copy_(chunk)
    out[: 4 * blocks].copy_(scales.view(torch.uint8))


def _int8_scales(row: torch.Tensor, numel: int) -> torch.Tensor:
    # Copied out: a row of a gathered buffer need not start at a multiple of 4 bytes, as a float32 view wants.
    blocks = int8_blocks(numel)
    scales = torch.empty(blocks, dtype=torch.float32, device=row.device)
    scales.view(torch.uint8).copy_(row[: 4 * blocks])
    return scales


def _decode_int8(row: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """q·s of the encoded uint8 ``row`` into the 1-D float32 ``out``, or added to it (``add``: the
    product rounded to float32 first, then the sum, as decode-then-add would)."""
    numel = out.numel()
    scales = _int8_scales(row, numel)
    levels = row[4 * int8_blocks(numel) :].view(torch.int8)
    scratch = torch.empty(min(INT8_CHUNK, numel), dtype=torch.float32, device=out.device) if add else None
    for start in _chunks(numel):
        target = out[start : start + INT8_CHUNK]
        product = target if scratch is None else scratch[: target.numel()]
        chunk_scales = scales[start // INT8_BLOCK : start // INT8_BLOCK + int8_blocks(target.numel())]
        _per_block(torch.mul, levels[start : start + target.numel()], chunk_scales, product)
        if scratch is not None:
            target.add_(product)


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


class _AverageHandle(Handle):
    """A compressed average in flight: the gather's handle, then decoding and the fp32 sum in ``wait``."""

    def __init__(self, averager: CompressedAverager, comm: Communicator, pending: Handle, update: torch.Tensor) -> None:
        self._averager = averager
        self._comm = comm
        self._pending: Handle | None = pending
        self._update = update

    def progress(self) -> None:
        if self._pending is not None:
            self._pending.progress()

    def wait(self) -> None:
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        self._averager._finish(self._comm, self._update)


class CompressedAverager:
    """The compressed average of one flat float32 update (shape ``shape``: (n,) on a rank, or (W, n) for
    the simulated backend's W workers), with this rank's error feedback state.

    ``iaverage_`` works like ``Communicator.iallreduce_(update, average=True)``: a collective started in
    the same order on every rank, non-blocking, that leaves the average in ``update`` once waited on.
    One average at a time per averager (its staging buffers are reused across syncs); use one averager per
    flat tensor (per dtype group, per fragment).
    """

    def __init__(
        self, codec: Codec, shape: tuple[int, ...], error_feedback: bool, device: torch.device | None = None
    ) -> None:
        _check_codec(codec)
        if len(shape) not in (1, 2):
            raise ValueError(f"a compressed average takes a flat update, (n,) or (workers, n); got shape {shape}")
        self.codec = codec
        self.shape = tuple(shape)
        self.numel = shape[-1]
        # Error feedback needs a lossy codec: with ``none`` the error is always zero, so no state is kept.
        self.error = (
            torch.zeros(self.shape, dtype=torch.float32, device=device) if error_feedback and codec != "none" else None
        )
        self._encoded: torch.Tensor | None = None  # this rank's encoded rows, alive while the gather runs
        self._gathered: torch.Tensor | None = None  # (size, B) on a rank; the encoded rows' shape when simulated
        self._in_flight = False

    @property
    def bytes_per_sync(self) -> int:
        """Encoded bytes a rank (each simulated worker) contributes per sync, scales included."""
        return encoded_bytes(self.codec, self.numel)

    def iaverage_(self, comm: Communicator, update: torch.Tensor) -> Handle:
        """Start averaging ``update`` (this rank's Δ) over ``comm``; after ``wait`` it holds
        avg_r Q(Δ_r + e_r), identical on every rank, and e has moved on (error feedback). ``update``
        is working space meanwhile: do not touch it. On one rank the average is Q(Δ + e) itself, with
        no collective."""
        self._check(comm, update)
        if self._in_flight:
            raise RuntimeError("a compressed average is already in flight on this averager; wait for it first")
        if self.error is not None:
            update.add_(self.error)  # Δ + e, in place: ``update`` is consumed
        if self.codec == "none":
            return comm.iallreduce_(update, average=True) if comm.size > 1 else DoneHandle()
        encoded = self._encode(update)
        if comm.size == 1:
            update.copy_(decode(self.codec, encoded, self.numel))
            return DoneHandle()
        gathered_shape = encoded.shape if comm.replicas > 1 else (comm.size, *encoded.shape)
        if self._gathered is None or tuple(self._gathered.shape) != tuple(gathered_shape):
            self._gathered = torch.empty(gathered_shape, dtype=torch.uint8, device=encoded.device)
        self._in_flight = True
        return _AverageHandle(self, comm, comm.iallgather(encoded, self._gathered), update)

    def _encode(self, corrected: torch.Tensor) -> torch.Tensor:
        """Q(Δ + e) as this rank's encoded rows (kept alive while the gather runs), and with error
        feedback e ← (Δ + e) − Q(Δ + e), exactly what the others decode from those bytes."""
        if self.codec != "int8":
            encoded = encode(self.codec, corrected)
            if self.error is not None:
                torch.sub(corrected, decode(self.codec, encoded, self.numel), out=self.error)
            self._encoded = encoded
            return encoded
        if self._encoded is None:
            self._encoded = torch.empty(
                (*self.shape[:-1], self.bytes_per_sync), dtype=torch.uint8, device=corrected.device
            )
        rows, encoded_rows = corrected.view(-1, self.numel), self._encoded.view(-1, self.bytes_per_sync)
        errors = self.error.view(-1, self.numel) if self.error is not None else [None] * rows.shape[0]
        for row, out, error in zip(rows, encoded_rows, errors, strict=True):
            if error is None:
                _encode_int8(row, out)  # the row becomes its levels: no copy needed
                continue
            error.copy_(row)
            _encode_int8(error, out)  # e holds the levels q, then q·s, then (Δ + e) − q·s
            _decode_int8(out, error)
            torch.sub(row, error, out=error)
        return self._encoded

    def average_(self, comm: Communicator, update: torch.Tensor) -> None:
        """Blocking ``iaverage_``."""
        self.iaverage_(comm, update).wait()

    def _finish(self, comm: Communicator, update: torch.Tensor) -> None:
        gathered = self._gathered
        assert gathered is not None
        self._in_flight = False
        if self.codec != "int8":
            self._encoded = None
        if comm.replicas > 1:
            # Every worker's row is here: decode them all, and let the simulated allreduce sum each group's
            # rows in worker order (in fp32) and divide, as the gathered rows are summed below.
            update.copy_(decode(self.codec, gathered, self.numel))
            comm.allreduce_(update, average=True)
            return
        # Rank order, in float32 (int8: decoded a chunk at a time into the sum, no row in memory).
        if self.codec == "int8":
            _decode_int8(gathered[0], update)
            for rank in range(1, comm.size):
                _decode_int8(gathered[rank], update, add=True)
        else:
            update.copy_(decode(self.codec, gathered[0], self.numel))
            for rank in range(1, comm.size):
                update.add_(decode(self.codec, gathered[rank], self.numel))
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
        """This rank's error feedback state (it differs between ranks); empty without error feedback."""
        return {} if self.error is None else {"error": self.error}

    def load_state_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors``; an absent error (a run saved without error feedback) starts at zero."""
        if self.error is None:
            return
        if "error" in saved:
            self.error.copy_(saved["error"].reshape(self.shape))
        else:
            self.error.zero_()

    def memory_bytes(self, size: int) -> int:
        """Bytes this averager holds over ``size`` ranks: the fp32 error (if any), its encoded rows and
        the gathered rows of every rank (on a rank; the simulated backend gathers in place of its
        encoded rows), kept from the first sync on for reuse. The update being averaged is the working
        space of the encoding; int8 decodes a chunk of 256 Ki elements at a time (bf16 and fp16 decode
        a transient fp32 row)."""
        rows = self.shape[0] if len(self.shape) == 2 else 1
        error = 4 * self.numel * rows if self.error is not None else 0
        if self.codec == "none" or size == 1:
            return error
        gathered_rows = rows if rows > 1 else size
        return error + self.bytes_per_sync * (rows + gathered_rows)
