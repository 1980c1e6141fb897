"""Training throughput: local SGD at every H against the no-communication limits, and synchronous
training (method ``allreduce``) against plain DDP and plain Horovod loops, in interleaved windows."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .baselines import DDPLoop, DDPSession, HorovodLoop, HorovodSession, horovod_unavailable
from .context import BenchContext
from .figures import bytes_figure, comm_share_figure, cpu_figures, rate_figures
from .stats import Figure, Target, paired_ratios
from .timing import Measured, Window, interleaved_windows, slowest
from .workload import TrainingLoop

THROUGHPUT_TARGET = Target(">=", 0.95)
LOCAL_SGD_TARGET = Target(">=", 0.90)
LOCAL_SGD_TARGET_PERIOD = 16

# The CPU of a synchronous loop's rank, where its time goes besides the step's own thread.
SYNCHRONOUS_THREADS = {
    "step": "the step's thread (forward, backward, the gradient hooks, the optimizer)",
    "communication": "the mpi backend's communication thread (its MPI calls and sums)",
    "process": "the whole process: every thread, the libraries' own (Horovod's, Gloo's, MPI's) included",
}


def bare_limit(ctx: BenchContext) -> Measured:
    """The bare no-communication limit's windows (slowest rank); also records their step time, the
    compute time per step that the projection carries to other interconnects."""
    steps = ctx.options.window_steps()
    bare = Measured(steps, slowest(ctx.comm, ctx.bare_seconds))
    ctx.facts.setdefault("compute_seconds_per_step", float(np.median([t / steps for t in bare.seconds])))
    return bare


def run(ctx: BenchContext) -> None:
    """Local SGD at every H, the in-process limit, method allreduce and (when asked) DDP, interleaved;
    then Horovod (apart from the package unless the package runs on it)."""
    options = ctx.options
    ddp = DDPSession(ctx.comm, ctx.launch, ctx.device) if "ddp" in options.baselines else None
    local = ctx.local_sgd_loops(options.sync_periods)
    windows = {"limit": Window(ctx.limit_loop(), options.window_steps())}
    windows.update({f"h{h}": Window(loop, options.window_steps(h)) for h, loop in local.items()})
    windows["allreduce"] = Window(ctx.allreduce_loop(), options.window_steps())
    if ddp is not None:
        windows["ddp"] = Window(DDPLoop(ctx.workload, ddp, options.bucket_mb), options.window_steps())
        ctx.baselines_run.append("ddp")
    try:
        measured = interleaved_windows(ctx.comm, windows, options.repeats, options.warmup)
    finally:
        for loop in local.values():
            loop.close()
        if ddp is not None:
            ddp.close()
    bare = bare_limit(ctx)
    bare_median = float(np.median(bare.rate(ctx.samples_per_step)))
    limit = _add_limits(ctx, bare, measured["limit"])
    for period in options.sync_periods:
        _add_local_sgd(ctx, period, measured[f"h{period}"], bare_median, limit)
    allreduce = _add_allreduce(ctx, measured["allreduce"], bare_median)
    if ddp is not None:
        _add_baseline(
            ctx, "ddp", "plain torch DistributedDataParallel loop", allreduce, measured["ddp"], "plain DDP loop"
        )
    if "horovod" in options.baselines:
        _measure_horovod(ctx)
    if LOCAL_SGD_TARGET_PERIOD not in options.sync_periods:
        ctx.skip(
            f"local_sgd.h{LOCAL_SGD_TARGET_PERIOD}.efficiency",
            f"--sync-periods does not include {LOCAL_SGD_TARGET_PERIOD}, the period its target is set for",
        )


def _add_limits(ctx: BenchContext, bare: Measured, measured: Measured) -> list[float]:
    bare_rate, limit = bare.rate(ctx.samples_per_step), measured.rate(ctx.samples_per_step)
    bare_median = float(np.median(bare_rate))
    ctx.add(
        Figure(
            "throughput.bare_limit_samples_per_s",
            "local_sgd",
            "no-communication limit: every rank trains alone, before any communication library starts "
            "(global samples/s; measured first, not interleaved)",
            "samples/s",
            bare_rate,
        ),
        Figure(
            "throughput.limit_samples_per_s",
            "local_sgd",
            "in-process limit: every rank trains alone and never syncs, communicator started but idle, "
            "interleaved with the windows below (global samples/s)",
            "samples/s",
            limit,
        ),
        Figure(
            "throughput.limit_over_bare",
            "local_sgd",
            "in-process limit over the median bare limit: what idle communication libraries cost",
            "ratio",
            [v / bare_median for v in limit],
        ),
        Figure(
            "throughput.bare_step_seconds",
            "local_sgd",
            "time of one training step in the bare limit (slowest rank): the compute time per step",
            "s",
            [t / bare.steps for t in bare.seconds],
        ),
        Figure(
            "throughput.limit_step_seconds",
            "local_sgd",
            "time of one training step in the in-process limit (slowest rank)",
            "s",
            [t / measured.steps for t in measured.seconds],
        ),
    )
    return limit


def _add_local_sgd(ctx: BenchContext, period: int, m: Measured, bare_median: float, limit: list[float]) -> None:
    label = f"local SGD H={period}"
    target = LOCAL_SGD_TARGET if period == LOCAL_SGD_TARGET_PERIOD else None
    prefix = f"local_sgd.h{period}"
    ctx.add(
        *rate_figures(prefix, "local_sgd", label, m.rate(ctx.samples_per_step), bare_median, limit, target),
        comm_share_figure(prefix, "local_sgd", label, m.share),
        bytes_figure(
            f"{prefix}.bytes_per_sample",
            "local_sgd",
            f"bytes each rank sends to allreduces per sample it trains, H={period}",
            m.bytes_per_sample(ctx.options.batch),
            "B/sample",
        ),
    )


def _add_allreduce(ctx: BenchContext, m: Measured, bare_median: float) -> list[float]:
    label = "method allreduce"
    allreduce = m.rate(ctx.samples_per_step)
    ctx.add(
        Figure(
            "synchronous.allreduce.samples_per_s",
            "synchronous",
            "method allreduce: the engine's bucketed gradient allreduce, overlapped with backward (global samples/s)",
            "samples/s",
            allreduce,
        ),
        Figure(
            "synchronous.allreduce.efficiency",
            "synchronous",
            "method allreduce throughput over the median no-communication (bare) limit",
            "ratio",
            [v / bare_median for v in allreduce],
        ),
        comm_share_figure("synchronous.allreduce", "synchronous", label, m.share),
        bytes_figure(
            "synchronous.allreduce.bytes_per_sample",
            "synchronous",
            "bytes each rank sends to allreduces per sample it trains, method allreduce",
            m.bytes_per_sample(ctx.options.batch),
            "B/sample",
        ),
        *cpu_figures("synchronous.allreduce", "synchronous", label, m.cpu, SYNCHRONOUS_THREADS),
    )
    return allreduce


def _add_baseline(
    ctx: BenchContext, name: str, label: str, allreduce: list[float], baseline: Measured, short_label: str
) -> None:
    """The baseline's rate, method allreduce's over it (paired) and where the baseline's CPU goes."""
    rate = baseline.rate(ctx.samples_per_step)
    ctx.add(
        Figure(f"synchronous.{name}.samples_per_s", "synchronous", f"{label} (global samples/s)", "samples/s", rate),
        Figure(
            f"synchronous.allreduce_over_{name}",
            "synchronous",
            f"method allreduce throughput over the {label} (paired, measured in the same block)",
            "ratio",
            paired_ratios(allreduce, rate),
            target=THROUGHPUT_TARGET,
        ),
        *cpu_figures(f"synchronous.{name}", "synchronous", short_label, baseline.cpu, SYNCHRONOUS_THREADS),
    )


def _measure_horovod(ctx: BenchContext) -> None:
    reason = horovod_unavailable()
    if reason is not None:
        ctx.skip("synchronous.allreduce_over_horovod", f"horovod.torch cannot be imported: {reason}")
        return

    def start_horovod() -> tuple[TrainingLoop, Callable[[], None]]:
        session = HorovodSession(ctx.comm)
        return HorovodLoop(ctx.workload, session), session.close

    allreduce, horovod = horovod_baseline(ctx, start_horovod)
    _add_baseline(
        ctx, "horovod", "plain Horovod hvd.DistributedOptimizer loop", allreduce, horovod, "plain Horovod loop"
    )
    ctx.baselines_run.append("horovod")


def horovod_baseline(
    ctx: BenchContext, start_horovod: Callable[[], tuple[TrainingLoop, Callable[[], None]]]
) -> tuple[list[float], Measured]:
    """Method allreduce's rates and Horovod's windows, like with like.

    With the horovod backend the package runs on Horovod itself: both loops share its background
    thread, and their windows are interleaved. With another backend, Horovod's thread (started by
    ``start_horovod``, stopped by the function it returns) would take CPU from the package's
    windows were they measured while it runs (the mpi backend measured 0.82x Horovod that way and
    1.07x alone): the package's windows run just before Horovod starts and again just after it
    has shut down, Horovod's in between, and Horovod's repetition i is paired with the mean of
    the package's two i-th windows (which also cancels a steady drift of the machine)."""
    comm, options = ctx.comm, ctx.options
    steps = options.window_steps()

    def measure(windows: dict[str, Window]) -> dict[str, Measured]:
        return interleaved_windows(comm, windows, options.repeats, options.warmup)

    allreduce = {"allreduce": Window(ctx.allreduce_loop(), steps)}
    if comm.name == "horovod":
        horovod, stop = start_horovod()
        measured = measure({**allreduce, "horovod": Window(horovod, steps)})
        stop()
        return measured["allreduce"].rate(ctx.samples_per_step), measured["horovod"]
    before = measure(allreduce)["allreduce"]
    horovod, stop = start_horovod()
    try:
        horovod_measured = measure({"horovod": Window(horovod, steps)})["horovod"]
    finally:
        stop()
    after = measure(allreduce)["allreduce"]
    around = [(a + b) / 2 for a, b in zip(before.seconds, after.seconds, strict=True)]
    package = Measured(before.steps, around).rate(ctx.samples_per_step)
    ctx.add(
        Figure(
            "synchronous.allreduce_around_horovod.samples_per_s",
            "synchronous",
            "method allreduce just before Horovod starts and just after it shuts down (mean of the two "
            "windows of each repetition; what allreduce_over_horovod pairs Horovod with)",
            "samples/s",
            package,
        )
    )
    return package, horovod_measured
