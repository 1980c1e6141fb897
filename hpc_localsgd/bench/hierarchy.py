"""Local SGD with workers of several ranks (gradients averaged inside a worker every step, the model
over all ranks every H steps) against flat local SGD and all-reduce SGD, with the bytes that cross
between workers: what grouping the ranks of a node into one worker saves on the slow network."""

from __future__ import annotations

import numpy as np

from ..algorithms.hierarchy import Hierarchy
from .context import BenchContext
from .figures import bytes_figure, rate_figures
from .stats import Figure, paired_ratios
from .throughput import bare_limit
from .timing import Measured, Window, interleaved_windows
from .workload import EngineLoop


def worker_loops(ctx: BenchContext, ranks_per_worker: int) -> dict[int, EngineLoop]:
    """At every H, local SGD with workers of ``ranks_per_worker`` consecutive ranks: gradients averaged
    inside the worker every step (bucketed, overlapped with backward), the model over all ranks every H
    steps. The caller closes them."""
    return {
        h: EngineLoop(
            f"workers_r{ranks_per_worker}_h{h}",
            ctx.workload,
            ctx.comm,
            "local_sgd",
            h,
            hierarchy=Hierarchy(ctx.comm.size, ranks_per_worker),
        )
        for h in ctx.options.sync_periods
    }


def run(ctx: BenchContext) -> None:
    """At every H: local SGD with workers of R ranks, flat local SGD (a worker per rank) and method
    allreduce, interleaved with the in-process no-communication limit in one block.

    Bytes are what each rank sent per sample it trained, split by level: ``global`` (collectives
    over all ranks, the traffic that crosses the slow network between nodes when a worker is a
    node) and ``worker`` (the gradient allreduces inside a worker)."""
    options, r = ctx.options, ctx.ranks_per_worker
    assert r is not None, "the runner skips the phase where the world holds no two workers"
    flat, grouped = ctx.local_sgd_loops(options.sync_periods), worker_loops(ctx, r)
    windows = {
        "limit": Window(ctx.limit_loop(), options.window_steps()),
        "allreduce": Window(ctx.allreduce_loop(), options.window_steps()),
    }
    for h in options.sync_periods:
        windows[f"local_sgd_h{h}"] = Window(flat[h], options.window_steps(h))
        windows[f"workers_r{r}_h{h}"] = Window(grouped[h], options.window_steps(h))
    try:
        measured = interleaved_windows(ctx.comm, windows, options.repeats, options.warmup)
    finally:
        for loop in [*flat.values(), *grouped.values()]:
            loop.close()
    bare_median = float(np.median(bare_limit(ctx).rate(ctx.samples_per_step)))
    limit = measured["limit"].rate(ctx.samples_per_step)
    ctx.add(
        Figure(
            "hierarchy.limit.samples_per_s",
            "hierarchy",
            "in-process no-communication limit, interleaved with this block (global samples/s)",
            "samples/s",
            limit,
        )
    )
    for name, label in configurations(ctx.comm.size, r, options.sync_periods):
        _add_configuration(ctx, name, label, measured[name], bare_median, limit)
    for h in options.sync_periods:
        _add_between_levels(ctx, r, h, measured[f"workers_r{r}_h{h}"], measured[f"local_sgd_h{h}"])


def configurations(world_size: int, r: int, periods: tuple[int, ...]) -> list[tuple[str, str]]:
    """(name, label) of every configuration the phase reports, in the order it reports them."""
    named = [("allreduce", "all-reduce SGD (method allreduce, gradients over all ranks every step)")]
    for h in periods:
        named += [
            (f"local_sgd_h{h}", f"flat local SGD, {world_size} workers of 1 rank, H={h}"),
            (
                f"workers_r{r}_h{h}",
                f"local SGD with {world_size // r} workers of {r} ranks (gradients inside a worker every step), H={h}",
            ),
        ]
    return named


def _add_configuration(
    ctx: BenchContext, name: str, label: str, m: Measured, bare_median: float, limit: list[float]
) -> None:
    batch = ctx.options.batch
    ctx.add(
        *rate_figures(f"hierarchy.{name}", "hierarchy", label, m.rate(ctx.samples_per_step), bare_median, limit),
        bytes_figure(
            f"hierarchy.{name}.global_bytes_per_sample",
            "hierarchy",
            f"{label}: bytes each rank sends to collectives over all ranks per sample it trains",
            m.bytes_per_sample(batch, m.sent_global),
            "B/sample",
        ),
        bytes_figure(
            f"hierarchy.{name}.bytes_per_sample",
            "hierarchy",
            f"{label}: bytes each rank sends to all collectives per sample it trains",
            m.bytes_per_sample(batch),
            "B/sample",
        ),
    )


def _add_between_levels(ctx: BenchContext, r: int, h: int, grouped: Measured, flat: Measured) -> None:
    """What stays inside a worker, and what grouping buys over flat local SGD at the same H."""
    inside = [b - g for b, g in zip(grouped.sent, grouped.sent_global, strict=True)]
    ctx.add(
        bytes_figure(
            f"hierarchy.workers_r{r}_h{h}.worker_bytes_per_sample",
            "hierarchy",
            f"workers of {r} ranks, H={h}: bytes each rank sends to its worker's gradient allreduces "
            "per sample it trains",
            grouped.bytes_per_sample(ctx.options.batch, inside),
            "B/sample",
        ),
        Figure(
            f"hierarchy.workers_r{r}_h{h}.over_local_sgd",
            "hierarchy",
            f"workers of {r} ranks over flat local SGD, H={h}: throughput (paired)",
            "ratio",
            paired_ratios(grouped.rate(ctx.samples_per_step), flat.rate(ctx.samples_per_step)),
        ),
    )
