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
from typing import Literal, get_args

import torch
import torch.nn.functional as F

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
    blocks = int8_blocks(numel)
    padded = F.pad(values, (0, blocks * INT8_BLOCK - numel)).view(*values.shape[:-1], blocks, INT8_BLOCK)
    scales = padded.abs().amax(dim=-1) / INT8_LEVELS
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # a block of zeros stays zero
    quantized = torch.round(padded / divisor.unsqueeze(-1)).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    quantized = quantized.view(*values.shape[:-1], blocks * INT8_BLOCK)[..., :numel]
    return torch.cat([scales.view(torch.uint8), quantized.view(torch.uint8)], dim=-1)


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
    blocks = int8_blocks(numel)
    leading = encoded.shape[:-1]
    # Copied out: a row of a gathered buffer need not start at a multiple of 4 bytes, as a float32 view wants.
    scales = torch.empty((*leading, blocks), dtype=torch.float32, device=encoded.device)
    scales.view(torch.uint8).copy_(encoded[..., : 4 * blocks])
    quantized = encoded[..., 4 * blocks :].view(torch.int8).float()
    padded = F.pad(quantized, (0, blocks * INT8_BLOCK - numel)).view(*leading, blocks, INT8_BLOCK)
    return (padded * scales.unsqueeze(-1)).view(*leading, blocks * INT8_BLOCK)[..., :numel].contiguous()


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
        must not be touched meanwhile. On one rank the average is Q(Δ + e) itself, with no collective."""
        self._check(comm, update)
        if self._in_flight:
            raise RuntimeError("a compressed average is already in flight on this averager; wait for it first")
        corrected = update if self.error is None else update + self.error
        if self.codec == "none":
            if corrected is not update:
                update.copy_(corrected)
            return comm.iallreduce_(update, average=True) if comm.size > 1 else DoneHandle()
        encoded = encode(self.codec, corrected)
        if self.error is not None:
            # e ← (Δ + e) − Q(Δ + e), from this rank's own decoded bytes: what the others will receive.
            torch.sub(corrected, decode(self.codec, encoded, self.numel), out=self.error)
        if comm.size == 1:
            update.copy_(decode(self.codec, encoded, self.numel))
            return DoneHandle()
        gathered_shape = encoded.shape if comm.replicas > 1 else (comm.size, *encoded.shape)
        if self._gathered is None or tuple(self._gathered.shape) != tuple(gathered_shape):
            self._gathered = torch.empty(gathered_shape, dtype=torch.uint8, device=encoded.device)
        self._encoded = encoded
        self._in_flight = True
        return _AverageHandle(self, comm, comm.iallgather(encoded, self._gathered), update)

    def average_(self, comm: Communicator, update: torch.Tensor) -> None:
        """Blocking ``iaverage_``."""
        self.iaverage_(comm, update).wait()

    def _finish(self, comm: Communicator, update: torch.Tensor) -> None:
        gathered = self._gathered
        assert gathered is not None
        self._encoded = None
        self._in_flight = False
        if comm.replicas > 1:
            # Every worker's row is here: decode them all, and let the simulated allreduce sum each group's
            # rows in worker order (in fp32) and divide, as the gathered rows are summed below.
            update.copy_(decode(self.codec, gathered, self.numel))
            comm.allreduce_(update, average=True)
            return
        # Rank order, one row at a time (memory: one decoded row besides the sum).
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
        """Bytes this averager holds between and during syncs over ``size`` ranks: the fp32 error (if
        any), and while a sync runs its encoded rows and the gathered rows of every rank (on a rank;
        the simulated backend gathers in place of its encoded rows). Decoding adds transient fp32 rows."""
        rows = self.shape[0] if len(self.shape) == 2 else 1
        error = 4 * self.numel * rows if self.error is not None else 0
        if self.codec == "none" or size == 1:
            return error
        gathered_rows = rows if rows > 1 else size
        return error + self.bytes_per_sync * (rows + gathered_rows)
