"""SlowMo's extra time per sync and extra memory over a plain model average: what its outer step
(slow momentum on the averaged update) costs."""

from __future__ import annotations

import torch

from .context import BenchContext
from .figures import bytes_figure
from .stats import Figure, Target
from .timing import alternating
from .workload import LEARNING_RATE

SLOWMO_MEMORY_TARGET = Target("<=", 2.0)


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(ctx: BenchContext) -> None:
    comm, options = ctx.comm, ctx.options
    plain = ctx.limit_loop().engine
    engine = ctx.slowmo_loop().engine
    engine.begin_step(0)  # local SGD starts at step 0: the anchor x_prev is taken here
    plain_times, slowmo_times = alternating(
        comm,
        ctx.device,
        [lambda: plain.sync(LEARNING_RATE), lambda: engine.sync(LEARNING_RATE)],
        options.repeats,
        max(1, options.warmup),
    )  # the first SlowMo sync allocates u: never timed
    # SlowMo's own state (x_prev and u) apart from the drift measurement's copy of the previous outer
    # update (algorithms/outer.py), which any outer optimizer keeps for the cosine in metrics.h5.
    shared = engine.shared_state()
    measurement = {name: t for name, t in shared.items() if name.startswith("outer_previous_update")}
    extra_bytes = state_bytes(shared) - state_bytes(measurement) - state_bytes(plain.shared_state())
    parameter_fp32_bytes = sum(p.numel() for p in engine.model.parameters()) * 4
    ctx.add(
        Figure(
            "slowmo.plain_sync_seconds", "slowmo", "plain model average (local SGD), for comparison", "s", plain_times
        ),
        Figure(
            "slowmo.sync_seconds",
            "slowmo",
            "SlowMo sync: average, then u ← β·u + (x_prev − x̄)/γ and x ← x_prev − α·γ·u",
            "s",
            slowmo_times,
        ),
        Figure(
            "slowmo.extra_seconds_per_sync",
            "slowmo",
            "SlowMo sync time minus plain sync time (paired)",
            "s",
            [s - p for s, p in zip(slowmo_times, plain_times, strict=True)],
        ),
        bytes_figure(
            "slowmo.extra_memory_bytes",
            "slowmo",
            "bytes of the engine's extra tensors with SlowMo: anchor x_prev and slow momentum u",
            [extra_bytes],
            "B",
        ),
        Figure(
            "slowmo.extra_memory_param_copies",
            "slowmo",
            "SlowMo's extra tensors in units of one fp32 copy of the parameters",
            "ratio",
            [extra_bytes / parameter_fp32_bytes],
            target=SLOWMO_MEMORY_TARGET,
            exact=True,
        ),
        bytes_figure(
            "slowmo.drift_measurement_bytes",
            "slowmo",
            "bytes of the previous outer update kept for the cosine between consecutive updates (metrics.h5 syncs)",
            [state_bytes(measurement)],
            "B",
        ),
    )
