"""The averaging step (``AveragingEngine.sync``) against a raw allreduce of tensors with the same dtypes
and sizes on the same backend: what the engine adds to the collective it cannot avoid."""

from __future__ import annotations

import torch

from ..algorithms.engine import AveragingEngine
from .context import BenchContext
from .figures import bytes_figure
from .stats import Figure, Target, paired_ratios
from .timing import alternating
from .workload import LEARNING_RATE

SYNC_TARGET = Target("<=", 1.10)


def sync_floor_buffers(engine: AveragingEngine) -> list[torch.Tensor]:
    """Plain tensors with the dtypes and element counts of what one sync reduces."""
    return [
        torch.randn(end - start, device=group.flat.device).to(group.flat.dtype)
        for group in engine.groups
        for start, end in group.span(engine.averaged_kinds)
    ]


def bus_bandwidth(nbytes: float, seconds: list[float], size: int) -> list[float]:
    """nccl-tests' bus bandwidth: what each link carries in a ring allreduce, 2(m−1)/m · n per rank."""
    factor = 2 * (size - 1) / size
    return [factor * nbytes / t / 1e9 for t in seconds]


def run(ctx: BenchContext) -> None:
    comm, options = ctx.comm, ctx.options
    engine = ctx.limit_loop().engine
    floors = sync_floor_buffers(engine)

    def floor() -> None:
        handles = [comm.iallreduce_(buffer, average=True) for buffer in floors]
        for handle in handles:
            handle.wait()

    sync_times, floor_times = alternating(
        comm, ctx.device, [lambda: engine.sync(LEARNING_RATE), floor], options.repeats, options.warmup
    )
    nbytes = engine.traffic().bytes_per_sync
    ctx.add(
        bytes_figure(
            "averaging.bytes_per_sync",
            "averaging",
            "bytes one model average reduces per rank: parameters and BatchNorm statistics",
            [nbytes],
            "B",
        ),
        Figure(
            "averaging.sync_seconds",
            "averaging",
            "AveragingEngine.sync: one model average (plain outer step)",
            "s",
            sync_times,
        ),
        Figure(
            "averaging.floor_seconds",
            "averaging",
            "raw comm.allreduce_ of tensors with the same dtypes and sizes on the same backend",
            "s",
            floor_times,
        ),
        Figure(
            "averaging.sync_over_floor",
            "averaging",
            "time of a sync over the raw allreduce (paired)",
            "ratio",
            paired_ratios(sync_times, floor_times),
            target=SYNC_TARGET,
        ),
    )
    if comm.size > 1:
        ctx.add(
            Figure(
                "averaging.sync_bus_bandwidth",
                "averaging",
                "bus bandwidth of a sync, 2(m−1)/m · bytes / time (nccl-tests convention)",
                "GB/s",
                bus_bandwidth(nbytes, sync_times, comm.size),
            ),
            Figure(
                "averaging.floor_bus_bandwidth",
                "averaging",
                "bus bandwidth of the raw allreduce",
                "GB/s",
                bus_bandwidth(nbytes, floor_times, comm.size),
            ),
        )
