"""Buffer rules shared by every backend, so that all of them compute the same average."""

from __future__ import annotations

import torch


def check_buffer(buffer: torch.Tensor) -> None:
    """Collectives read and write the tensor's storage directly, so it must be one contiguous block."""
    if not buffer.is_contiguous():
        raise ValueError(
            f"collective buffers must be contiguous; got shape {tuple(buffer.shape)} with strides {buffer.stride()}"
        )


def divide_by_size_(buffer: torch.Tensor, size: int) -> None:
    """Turn an all-reduced sum into the average, in place.

    Integer buffers round the mean down (floor), the only in-place choice that stays an
    integer and is the same on every backend; the sum itself is exact.
    """
    if size == 1:
        return
    if buffer.is_floating_point():
        buffer.div_(size)
    else:
        buffer.div_(size, rounding_mode="floor")


def check_gather(buffer: torch.Tensor, output: torch.Tensor, size: int) -> None:
    """An allgather's output holds ``size`` copies of the buffer's shape, in its dtype and on its device."""
    check_buffer(buffer)
    check_buffer(output)
    wanted = (size, *buffer.shape)
    if tuple(output.shape) != wanted or output.dtype != buffer.dtype or output.device != buffer.device:
        raise ValueError(
            f"an allgather of {tuple(buffer.shape)} {buffer.dtype} buffers over {size} ranks needs a "
            f"{wanted} {buffer.dtype} output on {buffer.device}; got {tuple(output.shape)} {output.dtype} "
            f"on {output.device}"
        )


def check_alltoall(buffer: torch.Tensor, output: torch.Tensor, size: int) -> None:
    """An all-to-all sends row r of ``buffer`` to rank r and receives rank r's row into ``output[r]``: both
    contiguous, ``size`` rows, the same shape, dtype and device."""
    check_buffer(buffer)
    check_buffer(output)
    if buffer.dim() < 1 or buffer.shape[0] != size:
        raise ValueError(f"an all-to-all over {size} ranks sends one row per rank; got shape {tuple(buffer.shape)}")
    if output.shape != buffer.shape or output.dtype != buffer.dtype or output.device != buffer.device:
        raise ValueError(
            f"an all-to-all of {tuple(buffer.shape)} {buffer.dtype} rows needs an output alike; got "
            f"{tuple(output.shape)} {output.dtype} on {output.device}"
        )
