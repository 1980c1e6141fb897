"""The codecs of a compressed sync: a rank's update in fewer bytes, with error feedback so that nothing is lost.

What is encoded is a rank's update since the last global sync, Δ = x_prev − x (small, centred numbers where
low precision is safe), never the parameters. With error feedback each rank keeps e (zero at the start):

    q = Q(Δ + e)          what this rank sends (encoded)
    e ← (Δ + e) − q       the compression error, re-sent at the next sync instead of lost

(Seide et al. 2014; Karimireddy et al. 2019). How the ranks' q are averaged is algorithms/compression.py.

Codecs (``CODECS``: the values of ``comm.sync_compression``, the configuration's one list of them;
``comm.gradient_compression`` takes none, bf16 and fp16, without error feedback: algorithms/gradients.py):
    none   fp32, averaged by the communicator's allreduce: today's sync (Q is the identity, e stays 0).
    bf16   round to nearest even bfloat16; 2 bytes an element.
    fp16   round to nearest even float16, saturated at ±65504 (an overflow becomes the largest half, and
           error feedback carries the rest, rather than an infinity that would poison e); 2 bytes.
    int8   blocks of ``INT8_BLOCK`` = 256 consecutive elements (the last one shorter), each with a float32
           scale s = max|x|/127 over the block; q = round(x/s) (to nearest, ties to even) in [−127, 127];
           decoded q·s, so |x − q·s| ≤ s/2. A block of zeros has s = 0. 1 byte an element plus 4 bytes a
           block: ``encoded_bytes``. A non-finite value makes its block decode to NaN.

Speed: the values being encoded are the encoding's working space (no copy of them); int8 works through
them in chunks of whole blocks that stay in cache between its passes, with error feedback computed from
the quantised levels (no decoding of this rank's own bytes), and received rows are decoded a chunk at a
time straight into the fp32 sum (``decode_sum_int8``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import torch

from ..config.schema import SyncCompression

Codec = SyncCompression
CODECS: tuple[Codec, ...] = get_args(SyncCompression)
INT8_BLOCK = 256  # elements per int8 scale: 4 bytes of scale per 256 of payload, 1.6 %
INT8_LEVELS = 127  # symmetric: −127..127 (−128 unused, so that negation is exact)
_FP16_MAX = torch.finfo(torch.float16).max
_ELEMENT_BYTES: dict[Codec, int] = {"none": 4, "bf16": 2, "fp16": 2, "int8": 1}


def check_codec(codec: str) -> None:
    """Refuse a name outside ``CODECS`` (from a caller the configuration did not check)."""
    if codec not in CODECS:
        raise ValueError(f"unknown sync compression {codec!r}; choose one of {', '.join(CODECS)}")


def int8_blocks(numel: int) -> int:
    """How many blocks (and float32 scales) ``numel`` elements make for int8."""
    return math.ceil(numel / INT8_BLOCK)


def encoded_bytes(codec: Codec, numel: int) -> int:
    """The exact bytes of ``numel`` fp32 elements once encoded: payload, plus the scales for int8."""
    check_codec(codec)
    scales = 4 * int8_blocks(numel) if codec == "int8" else 0
    return _ELEMENT_BYTES[codec] * numel + scales


def encode(codec: Codec, values: torch.Tensor) -> torch.Tensor:
    """``values`` (float32, last dimension n) as uint8 rows of ``encoded_bytes(codec, n)`` bytes each.
    int8 rows hold the block scales' bytes first, then the n int8 values."""
    check_codec(codec)
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
    check_codec(codec)
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


def encode_into(codec: Codec, values: torch.Tensor, out: torch.Tensor, error: torch.Tensor | None = None) -> None:
    """Q(values + e) into the bytes ``out``; with ``error`` (e), e ← values + e − Q(values + e), exactly
    what the others decode from those bytes; without, Q(values). ``values`` is overwritten."""
    if codec == "int8":
        _encode_int8(values, out, error)  # adds e to values first, chunk by chunk
        return
    if error is not None:
        values.add_(error)
    encoded = encode(codec, values)
    out.copy_(encoded)
    if error is not None:
        torch.sub(values, decode(codec, encoded, values.numel()), out=error)


def decode_into(codec: Codec, row: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """The values the bytes ``row`` encode, into (or added to) the 1-D ``out``."""
    if codec == "int8":
        _decode_int8(row, out, add)
    elif add:
        out.add_(decode(codec, row, out.numel()))
    else:
        out.copy_(decode(codec, row, out.numel()))


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
        decode_sum_int8([row], out, first_adds=True)
    else:
        decode_sum_int8([row], out)


def decode_sum_int8(rows: list[torch.Tensor], out: torch.Tensor, divisor: int = 1, first_adds: bool = False) -> None:
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
