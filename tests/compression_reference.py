"""An independent reference for compressed averaging with error feedback, in numpy float32.

Written from the definitions in the docstrings of ``hpc_localsgd/algorithms/codecs.py`` and
``compression.py``, not from their code: bfloat16 rounding by bit arithmetic, float16 by numpy,
int8 block by block in a Python loop. Every operation is one IEEE float32 operation, so torch must
agree bit for bit.
"""

from __future__ import annotations

import numpy as np

BLOCK = 256
HALF_MAX = np.float32(65504.0)


def expected_bytes(codec: str, numel: int) -> int:
    """Payload plus one float32 scale per started block of 256 (int8)."""
    per_element = {"none": 4, "bf16": 2, "fp16": 2, "int8": 1}[codec]
    scales = 4 * -(-numel // BLOCK) if codec == "int8" else 0
    return per_element * numel + scales


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) by integer arithmetic on the bits."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def int8_scales(values: np.ndarray) -> np.ndarray:
    return np.array(
        [np.float32(np.abs(values[i : i + BLOCK]).max()) / np.float32(127) for i in range(0, len(values), BLOCK)],
        dtype=np.float32,
    )


def quantize(codec: str, values: np.ndarray) -> np.ndarray:
    """Q(x): what the other ranks decode from this rank's bytes."""
    values = values.astype(np.float32)
    if codec == "none":
        return values.copy()
    if codec == "bf16":
        return to_bfloat16(values)
    if codec == "fp16":
        return np.clip(values, -HALF_MAX, HALF_MAX).astype(np.float16).astype(np.float32)
    out = np.empty_like(values)
    for block, scale in enumerate(int8_scales(values)):
        chunk = values[block * BLOCK : (block + 1) * BLOCK]
        levels = np.zeros_like(chunk) if scale == 0 else np.clip(np.round(chunk / scale), -127, 127)
        out[block * BLOCK : (block + 1) * BLOCK] = levels.astype(np.float32) * scale
    return out


def compressed_average(
    codec: str,
    updates: list[np.ndarray],
    errors: list[np.ndarray] | None,
    average_error: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray] | None, np.ndarray | None]:
    """avg_r Q(Δ_r + e_r), summed in rank order in float32; and the new errors e_r ← Δ_r + e_r − Q(Δ_r + e_r)
    (``errors`` None: no error feedback). Among three or more ranks the average is encoded once more
    (the two-phase exchange re-encodes the average it gathers): Q(avg + a), with a ← avg + a − Q(avg + a)
    under error feedback (``average_error`` a, zero at first), plain Q(avg) without. Returns the
    average, the new errors and the new a (None where there is none)."""
    zeros = [np.zeros_like(u, dtype=np.float32) for u in updates]
    corrected = [u.astype(np.float32) + e for u, e in zip(updates, errors or zeros, strict=True)]
    sent = [quantize(codec, c) for c in corrected]
    total = sent[0].copy()
    for q in sent[1:]:
        total = total + q
    average = total / np.float32(len(updates))
    new_errors = None if errors is None else [c - q for c, q in zip(corrected, sent, strict=True)]
    new_average_error = None
    if len(updates) >= 3:
        if errors is not None:
            average = average + (np.zeros_like(average) if average_error is None else average_error)
            requantized = quantize(codec, average)
            new_average_error = average - requantized
            average = requantized
        else:
            average = quantize(codec, average)
    return average, new_errors, new_average_error


def rank_update(rank: int, numel: int) -> np.ndarray:
    """A rank's test update: small centred numbers, a block of zeros, one large outlier, a block above
    the float16 range (saturation) — the same on every rank that computes it."""
    values = (np.random.default_rng(100 + rank).standard_normal(numel) * 1e-2).astype(np.float32)
    if numel > 3 * BLOCK:
        values[BLOCK : 2 * BLOCK] = 0.0
        values[2 * BLOCK + 7] = 3.0 * (rank + 1)
    if numel > 4 * BLOCK:
        values[3 * BLOCK + 1] = 7e4 * (1 - 2 * (rank % 2))
    return values
