"""The six measurements. Each appends ``Figure``s to the run's list and never prints.

Inside a phase the configurations being compared alternate within every repetition
(A B, then B A, ...), and every timed region starts behind a barrier, so that each
repetition yields one paired sample per configuration measured under the same conditions.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import xxhash

from ..algorithms.accounting import GLOBAL
from ..algorithms.engine import AveragingEngine
from ..algorithms.flat import PARAMS
from ..algorithms.hierarchy import Hierarchy
from ..comm.agree import broadcast_text
from ..comm.base import Communicator
from ..io.checkpoint import Checkpoint, CheckpointWriter, bytes_of, fsync_path, to_numpy
from ..launcher.env import LaunchEnvironment
from ..train.checkpointer import rank_state
from .options import BenchOptions
from .stats import Figure, Target, gather, paired_ratios, rank_mean, slowest
from .workload import LEARNING_RATE, EngineLoop, PlainLoop, TrainingLoop, Workload, synchronize_device, time_window

SYNC_TARGET = Target("<=", 1.10)
THROUGHPUT_TARGET = Target(">=", 0.95)
LOCAL_SGD_TARGET = Target(">=", 0.90)
LOCAL_SGD_TARGET_PERIOD = 16
SLOWMO_MEMORY_TARGET = Target("<=", 2.0)
CHECKPOINT_TARGET = Target(">=", 0.80)
# SlowMo's paper period; only the checkpoint phase trains with it (one step, no sync).
SLOWMO_SYNC_PERIOD = 12


@dataclass
class BenchContext:
    options: BenchOptions
    comm: Communicator
    launch: LaunchEnvironment
    device: torch.device
    workload: Workload
    figures: list[Figure] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Measured values the projection needs (compute time per step).
    facts: dict[str, float] = field(default_factory=dict)
    _local: EngineLoop | None = None
    _allreduce: EngineLoop | None = None

    def local_loop(self) -> EngineLoop:
        """Local SGD with plain averaging; one model serves every H and the no-communication limit."""
        if self._local is None:
            self._local = EngineLoop("local_sgd", self.workload, self.comm, "local_sgd", 1)
        return self._local

    def allreduce_loop(self) -> EngineLoop:
        """Method allreduce: the engine's bucketed gradient allreduce."""
        if self._allreduce is None:
            self._allreduce = EngineLoop("allreduce", self.workload, self.comm, "allreduce")
        return self._allreduce

    def close(self) -> None:
        for loop in (self._local, self._allreduce):
            if loop is not None:
                loop.close()

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def skip(self, figure_id: str, reason: str) -> None:
        self.skipped.append({"id": figure_id, "reason": reason})


def _hash_all(arrays: dict[str, np.ndarray]) -> None:
    """The checkpoint's integrity digests of ``arrays`` alone (what the package adds to a raw write)."""
    for array in arrays.values():
        xxhash.xxh3_64_intdigest(bytes_of(array))


def _timed(comm: Communicator, device: torch.device, action: Callable[[], None]) -> float:
    comm.barrier()
    start = time.perf_counter()
    action()
    synchronize_device(device)
    return time.perf_counter() - start


def _alternating(
    comm: Communicator, device: torch.device, actions: list[Callable[[], None]], repeats: int, warmup: int
) -> list[list[float]]:
    """Seconds per repetition for each action (slowest rank), the order rotating every repetition."""
    for _ in range(warmup):
        for action in actions:
            action()
    per_rank: list[list[float]] = [[] for _ in actions]
    for repetition in range(repeats):
        order = list(range(len(actions)))
        shift = repetition % len(actions)
        for index in order[shift:] + order[:shift]:
            per_rank[index].append(_timed(comm, device, actions[index]))
    flat = slowest(comm, [t for times in per_rank for t in times])
    return [flat[i * repeats : (i + 1) * repeats] for i in range(len(actions))]


def _bus_bandwidth(nbytes: float, seconds: list[float], size: int) -> list[float]:
    """nccl-tests' bus bandwidth: what each link carries in a ring allreduce, 2(m−1)/m · n per rank."""
    factor = 2 * (size - 1) / size
    return [factor * nbytes / t / 1e9 for t in seconds]


def sync_floor_buffers(engine: AveragingEngine) -> list[torch.Tensor]:
    """Plain tensors with the dtypes and element counts of what one sync reduces."""
    return [
        torch.randn(end - start, device=group.flat.device).to(group.flat.dtype)
        for group in engine.groups
        for start, end in group.span(engine.averaged_kinds)
    ]


# --- 1. the averaging step against a raw allreduce of the same bytes ---------------------------------
def measure_averaging(ctx: BenchContext) -> None:
    comm, options = ctx.comm, ctx.options
    engine = ctx.local_loop().engine
    floors = sync_floor_buffers(engine)

    def floor() -> None:
        handles = [comm.iallreduce_(buffer, average=True) for buffer in floors]
        for handle in handles:
            handle.wait()

    sync_times, floor_times = _alternating(
        comm, ctx.device, [lambda: engine.sync(LEARNING_RATE), floor], options.repeats, options.warmup
    )
    nbytes = engine.traffic().bytes_per_sync
    ctx.add(
        Figure(
            "averaging.bytes_per_sync",
            "averaging",
            "bytes one model average reduces per rank: parameters and BatchNorm statistics",
            "B",
            [float(nbytes)],
            exact=True,
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
                _bus_bandwidth(nbytes, sync_times, comm.size),
            ),
            Figure(
                "averaging.floor_bus_bandwidth",
                "averaging",
                "bus bandwidth of the raw allreduce",
                "GB/s",
                _bus_bandwidth(nbytes, floor_times, comm.size),
            ),
        )


# --- 2 and 3. training throughput: synchronous against its baselines, local SGD against the limit -------
def measure_bare_limit(options: BenchOptions, workload: Workload) -> list[float]:
    """This rank's seconds per window training alone, before any communication library starts.

    Run before the communicator exists (so without a barrier: the ranks start it together when
    they start). It is the no-communication limit in the strict sense; the in-process limit
    measured later, with the communicator started and idle, shows what an idle library costs
    (Horovod's background thread polls, for one).
    """
    loop = PlainLoop(workload)
    for _ in range(options.warmup):
        loop.run(options.window_steps())
    seconds = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        loop.run(options.window_steps())
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclass
class _Window:
    loop: TrainingLoop
    steps: int
    sync_period: int | None = None  # for a local SGD loop: H, or None for the no-communication limit
    local: bool = False  # a local SGD EngineLoop whose period is set to sync_period before the window


@dataclass
class _Measured:
    steps: int
    seconds: list[float]  # per repetition, slowest rank
    share: list[float]  # per repetition, blocked-in-communication share, mean over ranks
    sent: list[int]  # per repetition, bytes this rank sent (alike on every rank, to one element's bytes)
    sent_global: list[int] = field(default_factory=list)  # per repetition, of which over all ranks
    # Per repetition, CPU seconds a step (mean over ranks) of the step's thread, of the sync thread and of the
    # backend's communication thread (engine loops; the last only where the backend's thread is measured).
    cpu: dict[str, list[float]] = field(default_factory=dict)


def _global_bytes(loop: TrainingLoop) -> int:
    """Bytes ``loop`` has sent in collectives over all ranks (for an engine: its ``global`` level)."""
    return loop.bytes_by_level().get(GLOBAL, 0) if isinstance(loop, EngineLoop) else loop.bytes_sent()


def _interleaved_windows(ctx: BenchContext, windows: dict[str, _Window]) -> dict[str, _Measured]:
    comm, options = ctx.comm, ctx.options

    def run(window: _Window) -> tuple[float, float, int, int, dict[str, float]]:
        if window.local:
            assert isinstance(window.loop, EngineLoop)
            window.loop.set_sync_period(window.sync_period)
        global_before = _global_bytes(window.loop)
        seconds, blocked, sent, used = time_window(comm, window.loop, window.steps, lambda: _thread_cpu(window.loop))
        cpu = {name: seconds_used / window.steps for name, seconds_used in used.items()}
        return seconds, blocked, sent, _global_bytes(window.loop) - global_before, cpu

    for _ in range(options.warmup):
        for window in windows.values():
            run(window)
    names = list(windows)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    sent: dict[str, list[int]] = {n: [] for n in names}
    sent_global: dict[str, list[int]] = {n: [] for n in names}
    cpu: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for repetition in range(options.repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            t, c, b, g, used = run(windows[name])
            seconds[name].append(t)
            shares[name].append(c / t)
            sent[name].append(b)
            sent_global[name].append(g)
            for thread, per_step in used.items():
                cpu[name].setdefault(thread, []).append(per_step)
    r = options.repeats
    slow = slowest(comm, [t for n in names for t in seconds[n]])
    mean = rank_mean(comm, [c for n in names for c in shares[n]])
    # Every rank runs the same loops on the same backend, so every rank has the same threads to average.
    cpu_mean = {(n, thread): rank_mean(comm, values) for n in names for thread, values in sorted(cpu[n].items())}
    return {
        n: _Measured(
            windows[n].steps,
            slow[i * r : (i + 1) * r],
            mean[i * r : (i + 1) * r],
            sent[n],
            sent_global[n],
            {thread: values for (name, thread), values in cpu_mean.items() if name == n},
        )
        for i, n in enumerate(names)
    }


def _thread_cpu(loop: TrainingLoop) -> dict[str, float]:
    """CPU seconds so far of the step's thread (this one), of the whole process (every thread, the C++
    ones of Horovod, Gloo and MPI included), and for an engine loop of its sync thread and of the
    backend's communication thread (where measured)."""
    used = {"step": time.thread_time(), "process": time.process_time()}
    if isinstance(loop, EngineLoop):
        sync, communication = loop.thread_cpu_seconds()
        used["sync"] = sync
        if communication is not None:
            used["communication"] = communication
    return used


def _rate(ctx: BenchContext, measured: _Measured) -> list[float]:
    """Global samples per second of each repetition."""
    return [ctx.comm.size * ctx.options.batch * measured.steps / t for t in measured.seconds]


def measure_throughput(ctx: BenchContext, bare_seconds: list[float], ddp: TrainingLoop | None) -> None:
    """Local SGD at every H, the in-process limit, method allreduce and (when given) DDP, interleaved."""
    comm, options = ctx.comm, ctx.options
    batch = options.batch
    local = ctx.local_loop()
    windows: dict[str, _Window] = {"limit": _Window(local, options.window_steps(), None, local=True)}
    for period in options.sync_periods:
        windows[f"h{period}"] = _Window(local, options.window_steps(period), period, local=True)
    windows["allreduce"] = _Window(ctx.allreduce_loop(), options.window_steps())
    if ddp is not None:
        windows["ddp"] = _Window(ddp, options.window_steps())
    measured = _interleaved_windows(ctx, windows)

    bare_slowest = slowest(comm, bare_seconds)
    bare = _rate(ctx, _Measured(options.window_steps(), bare_slowest, [], []))
    bare_median = float(np.median(bare))
    limit = _rate(ctx, measured["limit"])
    step_seconds = [t / measured["limit"].steps for t in measured["limit"].seconds]
    bare_step_seconds = [t / options.window_steps() for t in bare_slowest]
    # Pure compute: what the projection carries to other interconnects.
    ctx.facts["compute_seconds_per_step"] = float(np.median(bare_step_seconds))
    ctx.add(
        Figure(
            "throughput.bare_limit_samples_per_s",
            "local_sgd",
            "no-communication limit: every rank trains alone, before any communication library starts "
            "(global samples/s; measured first, not interleaved)",
            "samples/s",
            bare,
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
            bare_step_seconds,
        ),
        Figure(
            "throughput.limit_step_seconds",
            "local_sgd",
            "time of one training step in the in-process limit (slowest rank)",
            "s",
            step_seconds,
        ),
    )
    for period in options.sync_periods:
        m = measured[f"h{period}"]
        rate = _rate(ctx, m)
        ctx.add(
            Figure(
                f"local_sgd.h{period}.samples_per_s",
                "local_sgd",
                f"local SGD, model averaged every {period} steps (global samples/s)",
                "samples/s",
                rate,
            ),
            Figure(
                f"local_sgd.h{period}.efficiency",
                "local_sgd",
                f"local SGD H={period} throughput over the median no-communication (bare) limit",
                "ratio",
                [v / bare_median for v in rate],
                target=LOCAL_SGD_TARGET if period == LOCAL_SGD_TARGET_PERIOD else None,
            ),
            Figure(
                f"local_sgd.h{period}.efficiency_in_process",
                "local_sgd",
                f"local SGD H={period} throughput over the in-process limit (paired)",
                "ratio",
                paired_ratios(rate, limit),
            ),
            Figure(
                f"local_sgd.h{period}.comm_share",
                "local_sgd",
                f"share of the step time blocked in communication at H={period} (mean over ranks)",
                "fraction",
                m.share,
            ),
            Figure(
                f"local_sgd.h{period}.bytes_per_sample",
                "local_sgd",
                f"bytes each rank sends to allreduces per sample it trains, H={period}",
                "B/sample",
                [b / (m.steps * batch) for b in m.sent],
                exact=True,
            ),
        )
    m = measured["allreduce"]
    allreduce = _rate(ctx, m)
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
        Figure(
            "synchronous.allreduce.comm_share",
            "synchronous",
            "share of the step time blocked in communication, method allreduce (mean over ranks)",
            "fraction",
            m.share,
        ),
        Figure(
            "synchronous.allreduce.bytes_per_sample",
            "synchronous",
            "bytes each rank sends to allreduces per sample it trains, method allreduce",
            "B/sample",
            [b / (m.steps * batch) for b in m.sent],
            exact=True,
        ),
    )
    _synchronous_cpu_figures(ctx, "allreduce", "method allreduce", m)
    if ddp is not None:
        _add_baseline(ctx, "ddp", "plain torch DistributedDataParallel loop", allreduce, _rate(ctx, measured["ddp"]))
        _synchronous_cpu_figures(ctx, "ddp", "plain DDP loop", measured["ddp"])


# The CPU of a synchronous loop's rank, where its time goes besides the step's own thread.
_SYNCHRONOUS_CPU = {
    "step": "the step's thread (forward, backward, the gradient hooks, the optimizer)",
    "communication": "the mpi backend's communication thread (its MPI calls and sums)",
    "process": "the whole process: every thread, the libraries' own (Horovod's, Gloo's, MPI's) included",
}


def _synchronous_cpu_figures(ctx: BenchContext, name: str, label: str, measured: _Measured) -> None:
    """CPU seconds a step of a synchronous loop's threads (mean over ranks): on a rank with one core the
    wall time of a step is at least their sum, so a communication that spins shows here."""
    ctx.add(
        *(
            Figure(
                f"synchronous.{name}.cpu_per_step.{thread}",
                "synchronous",
                f"{label}: CPU seconds a step of {what} (mean over ranks)",
                "s",
                measured.cpu[thread],
            )
            for thread, what in _SYNCHRONOUS_CPU.items()
            if thread in measured.cpu
        )
    )


def _add_baseline(ctx: BenchContext, name: str, label: str, allreduce: list[float], baseline: list[float]) -> None:
    ctx.add(
        Figure(
            f"synchronous.{name}.samples_per_s", "synchronous", f"{label} (global samples/s)", "samples/s", baseline
        ),
        Figure(
            f"synchronous.allreduce_over_{name}",
            "synchronous",
            f"method allreduce throughput over the {label} (paired, measured in the same block)",
            "ratio",
            paired_ratios(allreduce, baseline),
            target=THROUGHPUT_TARGET,
        ),
    )


def measure_horovod_baseline(
    ctx: BenchContext, start_horovod: Callable[[], tuple[TrainingLoop, Callable[[], None]]]
) -> None:
    """Method allreduce against plain Horovod, like with like.

    With the horovod backend the package runs on Horovod itself: both loops share its background
    thread, and their windows are interleaved. With another backend, Horovod's thread (started by
    ``start_horovod``, stopped by the function it returns) would take CPU from the package's
    windows were they measured while it runs (the mpi backend measured 0.82x Horovod that way and
    1.07x alone): the package's windows run just before Horovod starts and again just after it
    has shut down, Horovod's in between, and Horovod's repetition i is paired with the mean of
    the package's two i-th windows (which also cancels a steady drift of the machine)."""
    options = ctx.options
    allreduce = {"allreduce": _Window(ctx.allreduce_loop(), options.window_steps())}
    if ctx.comm.name == "horovod":
        horovod, stop = start_horovod()
        measured = _interleaved_windows(ctx, {**allreduce, "horovod": _Window(horovod, options.window_steps())})
        stop()
        package, horovod_measured = _rate(ctx, measured["allreduce"]), measured["horovod"]
    else:
        before = _interleaved_windows(ctx, allreduce)["allreduce"]
        horovod, stop = start_horovod()
        try:
            horovod_measured = _interleaved_windows(ctx, {"horovod": _Window(horovod, options.window_steps())})[
                "horovod"
            ]
        finally:
            stop()
        after = _interleaved_windows(ctx, allreduce)["allreduce"]
        around = [(a + b) / 2 for a, b in zip(before.seconds, after.seconds, strict=True)]
        package = _rate(ctx, _Measured(before.steps, around, [], []))
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
    _add_baseline(ctx, "horovod", "plain Horovod hvd.DistributedOptimizer loop", package, _rate(ctx, horovod_measured))
    _synchronous_cpu_figures(ctx, "horovod", "plain Horovod loop", horovod_measured)


# --- 3b. worker groups: hierarchical local SGD against the flat methods -------------------------------
def hierarchy_loop(ctx: BenchContext, ranks_per_worker: int) -> EngineLoop:
    """Local SGD with workers of ``ranks_per_worker`` consecutive ranks: gradients averaged inside the
    worker every step (bucketed, overlapped with backward), the model over all ranks every H steps."""
    return EngineLoop(
        f"workers_r{ranks_per_worker}",
        ctx.workload,
        ctx.comm,
        "local_sgd",
        1,
        hierarchy=Hierarchy(ctx.comm.size, ranks_per_worker),
    )


def _bytes_per_sample(sent: list[int], steps: int, batch: int) -> list[float]:
    """Bytes each rank sent per sample it trained, per repetition."""
    return [b / (steps * batch) for b in sent]


def measure_hierarchy(ctx: BenchContext, bare_seconds: list[float], ranks_per_worker: int) -> None:
    """At every H: local SGD with workers of R ranks, flat local SGD (a worker per rank) and method
    allreduce, interleaved with the in-process no-communication limit in one block.

    Bytes are what each rank sent per sample it trained, split by level: ``global`` (collectives
    over all ranks, the traffic that crosses the slow network between nodes when a worker is a
    node) and ``worker`` (the gradient allreduces inside a worker)."""
    comm, options = ctx.comm, ctx.options
    batch, r = options.batch, ranks_per_worker
    workers = comm.size // r
    local, grouped = ctx.local_loop(), hierarchy_loop(ctx, r)
    windows: dict[str, _Window] = {
        "limit": _Window(local, options.window_steps(), None, local=True),
        "allreduce": _Window(ctx.allreduce_loop(), options.window_steps()),
    }
    for period in options.sync_periods:
        windows[f"local_sgd_h{period}"] = _Window(local, options.window_steps(period), period, local=True)
        windows[f"workers_r{r}_h{period}"] = _Window(grouped, options.window_steps(period), period, local=True)
    try:
        measured = _interleaved_windows(ctx, windows)
    finally:
        grouped.close()
    bare_slowest = slowest(comm, bare_seconds)
    bare_median = float(np.median(_rate(ctx, _Measured(options.window_steps(), bare_slowest, [], []))))
    # The projection's compute time, as the throughput phase takes it when it runs.
    ctx.facts.setdefault(
        "compute_seconds_per_step", float(np.median([t / options.window_steps() for t in bare_slowest]))
    )
    limit = _rate(ctx, measured["limit"])
    ctx.add(
        Figure(
            "hierarchy.limit.samples_per_s",
            "hierarchy",
            "in-process no-communication limit, interleaved with this block (global samples/s)",
            "samples/s",
            limit,
        )
    )
    configurations = [("allreduce", "all-reduce SGD (method allreduce, gradients over all ranks every step)")]
    for period in options.sync_periods:
        configurations += [
            (f"local_sgd_h{period}", f"flat local SGD, {comm.size} workers of 1 rank, H={period}"),
            (
                f"workers_r{r}_h{period}",
                f"local SGD with {workers} workers of {r} ranks (gradients inside a worker every step), H={period}",
            ),
        ]
    for name, label in configurations:
        m = measured[name]
        rate = _rate(ctx, m)
        ctx.add(
            Figure(f"hierarchy.{name}.samples_per_s", "hierarchy", f"{label} (global samples/s)", "samples/s", rate),
            Figure(
                f"hierarchy.{name}.efficiency",
                "hierarchy",
                f"{label}: throughput over the median no-communication (bare) limit",
                "ratio",
                [v / bare_median for v in rate],
            ),
            Figure(
                f"hierarchy.{name}.efficiency_in_process",
                "hierarchy",
                f"{label}: throughput over the in-process limit (paired)",
                "ratio",
                paired_ratios(rate, limit),
            ),
            Figure(
                f"hierarchy.{name}.global_bytes_per_sample",
                "hierarchy",
                f"{label}: bytes each rank sends to collectives over all ranks per sample it trains",
                "B/sample",
                _bytes_per_sample(m.sent_global, m.steps, batch),
                exact=True,
            ),
            Figure(
                f"hierarchy.{name}.bytes_per_sample",
                "hierarchy",
                f"{label}: bytes each rank sends to all collectives per sample it trains",
                "B/sample",
                _bytes_per_sample(m.sent, m.steps, batch),
                exact=True,
            ),
        )
    for period in options.sync_periods:
        name, flat = f"workers_r{r}_h{period}", f"local_sgd_h{period}"
        m = measured[name]
        ctx.add(
            Figure(
                f"hierarchy.{name}.worker_bytes_per_sample",
                "hierarchy",
                f"workers of {r} ranks, H={period}: bytes each rank sends to its worker's gradient allreduces "
                "per sample it trains",
                "B/sample",
                _bytes_per_sample([b - g for b, g in zip(m.sent, m.sent_global, strict=True)], m.steps, batch),
                exact=True,
            ),
            Figure(
                f"hierarchy.{name}.over_local_sgd",
                "hierarchy",
                f"workers of {r} ranks over flat local SGD, H={period}: throughput (paired)",
                "ratio",
                paired_ratios(_rate(ctx, m), _rate(ctx, measured[flat])),
            ),
        )


# --- 4. SlowMo: extra time per sync and extra memory --------------------------------------------------
def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_slowmo(ctx: BenchContext, slowmo: EngineLoop) -> None:
    comm, options = ctx.comm, ctx.options
    plain = ctx.local_loop().engine
    engine = slowmo.engine
    engine.begin_step(0)  # local SGD starts at step 0: the anchor x_prev is taken here
    plain_times, slowmo_times = _alternating(
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
    parameter_fp32_bytes = sum(g.slice(PARAMS).numel() for g in engine.groups) * 4
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
        Figure(
            "slowmo.extra_memory_bytes",
            "slowmo",
            "bytes of the engine's extra tensors with SlowMo: anchor x_prev and slow momentum u",
            "B",
            [float(extra_bytes)],
            exact=True,
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
        Figure(
            "slowmo.drift_measurement_bytes",
            "slowmo",
            "bytes of the previous outer update kept for the cosine between consecutive updates (metrics.h5 syncs)",
            "B",
            [float(state_bytes(measurement))],
            exact=True,
        ),
    )


# --- 5. checkpoints against raw h5py ----------------------------------------------------------------
def raw_write(comm: Communicator, path: Path, shared: dict[str, np.ndarray], mine: dict[str, np.ndarray]) -> None:
    """The same bytes as a checkpoint, written the way the checkpoint writer does (rank 0 creates,
    each rank appends in turn and fsyncs, rank 0 fsyncs and renames), without its metadata,
    checksums and agreement collectives (a barrier per turn instead)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if comm.is_root:
        with h5py.File(tmp, "w", locking=False) as f:
            group = f.create_group("shared")
            for name, array in shared.items():
                group.create_dataset(name, data=array)
            f.create_group("ranks")
    comm.barrier()
    for turn in range(comm.size):
        if comm.rank == turn:
            with h5py.File(tmp, "a", locking=False) as f:
                group = f.create_group(f"ranks/{comm.rank}")
                for name, array in mine.items():
                    group.create_dataset(name, data=array)
            fsync_path(tmp)
        comm.barrier()
    if comm.is_root:
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    comm.barrier()


def raw_read(comm: Communicator, path: Path) -> int:
    nbytes = 0
    with h5py.File(path, "r", locking=False) as f:
        groups = [f[f"ranks/{comm.rank}"]] + ([f["shared"]] if comm.is_root else [])
        for group in groups:
            for name in group:
                nbytes += np.asarray(group[name][()]).nbytes
    return nbytes


def _shared_folder(comm: Communicator, parent: Path) -> Path:
    """A fresh folder made by rank 0 under ``parent``, its name broadcast to every rank."""
    made = tempfile.mkdtemp(prefix=".hpc-localsgd-bench-", dir=parent) if comm.is_root else None
    return Path(broadcast_text(comm, made, root=0))


def measure_checkpoint(ctx: BenchContext, slowmo: EngineLoop) -> None:
    comm, options = ctx.comm, ctx.options
    engine = slowmo.engine
    slowmo.run(1)  # one local step: every rank's state differs from rank 0's, so all of it is written
    state = rank_state(engine)
    shared = engine.shared_state()
    raw_shared = {n: to_numpy(t) for n, t in shared.items()} if comm.is_root else {}
    raw_mine = {n: to_numpy(t) for n, t in state.tensors.items()}
    folder = _shared_folder(comm, options.checkpoint_folder())
    writer = CheckpointWriter(folder, comm, keep=options.repeats + options.warmup + 1)
    counter = iter(range(10**9))
    written: list[Path] = []

    def write() -> None:
        written.append(writer.write(next(counter), 0.0, {"method": "bench"}, shared, state))

    def write_raw() -> None:
        raw_write(comm, folder / f"raw-{next(counter)}.h5", raw_shared, raw_mine)

    def read() -> None:  # as a resume reads: into the engine's live state
        Checkpoint(written[-1]).read(comm.rank, shared=comm.is_root, into=(engine.rank_state(), shared))

    def read_raw() -> None:
        raw_read(comm, sorted(folder.glob("raw-*.h5"))[-1])

    def warm_page_cache() -> None:
        # Both reads are timed from the page cache: freshly written pages can be reclaimed or still
        # settling after the writes, which once made whichever read came first several times slower.
        for path in (written[-1], sorted(folder.glob("raw-*.h5"))[-1]):
            with open(path, "rb") as file:
                while file.read(16 << 20):
                    pass
        comm.barrier()

    def clean() -> None:
        comm.barrier()
        if comm.is_root:
            for path in folder.glob("*.h5"):
                path.unlink()
        comm.barrier()

    try:
        for _ in range(options.warmup):
            for action in (write, write_raw, read, read_raw, clean):
                action()
        times: dict[str, list[float]] = {"write": [], "write_raw": [], "read": [], "read_raw": [], "hash": []}
        actions = {"write": write, "write_raw": write_raw, "read": read, "read_raw": read_raw}
        for repetition in range(options.repeats):
            # Writes before reads (a read needs its file); package and raw alternate which goes first.
            order = (
                ["write", "write_raw", "read", "read_raw"]
                if repetition % 2 == 0
                else ["write_raw", "write", "read_raw", "read"]
            )
            for name in order[:2]:
                times[name].append(_timed(comm, ctx.device, actions[name]))
            warm_page_cache()
            for name in order[2:]:
                times[name].append(_timed(comm, ctx.device, actions[name]))
            clean()
        # Integrity hashing is what the package adds to a raw write/read: time it alone, for the explanation.
        for _ in range(options.repeats):
            times["hash"].append(_timed(comm, ctx.device, functools.partial(_hash_all, raw_mine)))
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(folder, ignore_errors=True)
    names = list(times)
    r = options.repeats
    flat = slowest(comm, [t for n in names for t in times[n]])
    slow = {n: flat[i * r : (i + 1) * r] for i, n in enumerate(names)}
    mine = sum(a.nbytes for a in raw_mine.values()) + sum(a.nbytes for a in raw_shared.values())
    payload = float(gather(comm, [float(mine)]).sum())
    ctx.add(
        Figure(
            "checkpoint.bytes",
            "checkpoint",
            "payload of one checkpoint: every rank's parameters, BN statistics and momentum, and SlowMo's x_prev and u",
            "B",
            [payload],
            exact=True,
        ),
        Figure(
            "checkpoint.write_seconds",
            "checkpoint",
            "CheckpointWriter.write, all ranks, with fsync",
            "s",
            slow["write"],
        ),
        Figure(
            "checkpoint.raw_write_seconds",
            "checkpoint",
            "raw h5py write of the same bytes, same fsyncs",
            "s",
            slow["write_raw"],
        ),
        Figure(
            "checkpoint.write_over_raw",
            "checkpoint",
            "checkpoint write throughput over raw h5py (paired)",
            "ratio",
            paired_ratios(slow["write_raw"], slow["write"]),
            target=CHECKPOINT_TARGET,
        ),
        Figure(
            "checkpoint.read_seconds",
            "checkpoint",
            "Checkpoint(path).read(rank) into the engine's live state as a resume does, the shared state on "
            "rank 0 only (page cache warm)",
            "s",
            slow["read"],
        ),
        Figure(
            "checkpoint.raw_read_seconds", "checkpoint", "raw h5py read of the same datasets", "s", slow["read_raw"]
        ),
        Figure(
            "checkpoint.read_over_raw",
            "checkpoint",
            "checkpoint read throughput over raw h5py (paired)",
            "ratio",
            paired_ratios(slow["read_raw"], slow["read"]),
            target=CHECKPOINT_TARGET,
        ),
        Figure(
            "checkpoint.write_bandwidth",
            "checkpoint",
            "payload bytes / write time",
            "GB/s",
            [payload / t / 1e9 for t in slow["write"]],
        ),
        Figure(
            "checkpoint.hash_seconds",
            "checkpoint",
            "xxh3-64 of one rank's bytes, once (the integrity digest the package computes)",
            "s",
            slow["hash"],
        ),
    )
