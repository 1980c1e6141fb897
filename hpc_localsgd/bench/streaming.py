"""The global sync's variants against the no-communication limit: longer periods, overlap
(``sync_delay``), fragments and compressed updates (``comm.sync_compression``), and beside them
all-reduce SGD with fp32 and bf16 gradients (``comm.gradient_compression``), each a configuration
of the package's one training step, measured as training windows interleaved repetition by
repetition (timing.py), and the exact bytes each sends per sync (per step for all-reduce).

Run it where the network is slow, for example the emulated 1 Gb/s link of ``launcher/slownet.py``:

    python -m hpc_localsgd.launcher.slownet 2 1gbit -- python -m hpc_localsgd bench --phases streaming ...
"""

from __future__ import annotations

import numpy as np

from ..algorithms.accounting import SyncTraffic
from ..algorithms.codecs import encoded_bytes
from ..algorithms.compression import link_bytes
from ..algorithms.engine import AveragingEngine
from ..algorithms.network import Interconnect, emulated_link, ring_allreduce_seconds
from ..launcher.env import emulated_link_rate
from .context import BenchContext
from .figures import cpu_figures, rate_figures
from .stats import Figure, paired_ratios
from .timing import Measured, Window, interleaved_windows, slowest
from .variants import BYTES_TARGETS, SYNC_THREAD_SUFFIX, VARIANTS, SyncVariant
from .workload import EngineLoop

LIMIT = "limit"  # the in-process no-communication window's name among the configurations'


def projected_efficiency(
    variant: SyncVariant, traffic: SyncTraffic, ranks: int, step_seconds: float, link: Interconnect
) -> float:
    """The α–β projection of ``variant``'s efficiency: compute time per step over compute plus the sync
    time it cannot hide. A fragment's sync costs its exchange's bytes through the link (``link_bytes``:
    the fp32 ring allreduce, or the compressed exchange) over β plus 2(m − 1) latencies; a delay of τ
    hides up to τ steps of compute. All-reduce SGD's gradients count as one sync per step, not
    overlapped with backward (a lower bound on its efficiency). The CPU that communication takes from
    compute is not modelled: the gap between this and the measurement is that cost."""
    if ranks <= 1:
        return 1.0
    exposed = 0.0
    for fragment, elements in enumerate(traffic.fragment_elements):
        seconds = link_bytes(variant.codec, elements, ranks) / link.beta_bytes_per_second
        seconds += 2 * (ranks - 1) * link.alpha_seconds
        if fragment == 0 and traffic.rest_bytes:
            seconds += ring_allreduce_seconds(traffic.rest_bytes, ranks, link)
        exposed += max(0.0, seconds - variant.sync_delay * step_seconds)
    return step_seconds / (step_seconds + exposed / variant.sync_period)


def sync_traffic(engine: AveragingEngine, synchronous: bool = False) -> SyncTraffic:
    """What ``engine`` puts on the link per sync of every fragment; ``synchronous``: the gradients of one
    step, as one fp32 (or bf16) exchange of their elements."""
    traffic = engine.traffic()
    if synchronous:
        return SyncTraffic((sum(traffic.fragment_elements),), 0, 0, traffic.gradient_bytes_per_step)
    return traffic


def _bytes_figure(variant: SyncVariant, engine: AveragingEngine) -> Figure:
    """What a rank sends: per step for all-reduce SGD (its gradients), per sync of the whole model else."""
    if variant.synchronous:
        return Figure(
            f"streaming.{variant.name}.bytes_per_step",
            "streaming",
            f"{variant.describe()}: bytes a rank sends per step (its gradients)",
            "B",
            [float(engine.traffic().gradient_bytes_per_step)],
            exact=True,
        )
    return Figure(
        f"streaming.{variant.name}.bytes_per_sync",
        "streaming",
        f"{variant.describe()}: bytes a rank sends per sync of the whole model, scales included",
        "B",
        [float(engine.traffic().bytes_per_sync)],
        exact=True,
    )


_THREADS = {
    "step": "the step's thread (compute, and the sync's work left on it)",
    "sync": "the sync thread (encoding, the waits for the average, its sums and decoding)",
    "communication": "the backend's communication thread (its MPI calls and sums; every loop's)",
}


def _with_sync_thread_twins(variants: list[SyncVariant]) -> list[SyncVariant]:
    """Each overlapped configuration without and then with the sync thread, side by side in every
    repetition; the others (their syncs block, and the thread takes none) once, as they are."""
    return [
        twin
        for variant in variants
        for twin in (
            (variant.with_sync_thread(False), variant.with_sync_thread(True)) if variant.overlapped else (variant,)
        )
    ]


def run(ctx: BenchContext) -> None:
    """Every variant's windows (whole sync periods; each goes on from the step its variant's last one
    ended at, so that at sync_delay = sync_period the average in flight at a window's end is applied in
    the next), against the bare limit measured before any communication library started."""
    options = ctx.options
    asked = [v for v in VARIANTS if v.name in options.streaming_variants]
    chosen = _with_sync_thread_twins(asked) if options.compare_sync_thread else asked
    loops = {v.name: variant_loop(ctx, v) for v in chosen}
    for v in [v for v in chosen if v.sync_thread]:
        engine = loops[v.name].engine
        if not engine.uses_sync_thread:
            # The same reason on every rank (backend, world, device), so every rank drops the twin.
            ctx.skip(f"streaming.{v.name}", f"the sync thread cannot run here: {engine.no_sync_thread_because}")
            loops.pop(v.name).close()
            chosen.remove(v)
    windows = {v.name: Window(loops[v.name], options.window_steps(v.sync_period)) for v in chosen}
    # The no-communication limit once more, among the configurations: an efficiency against it is paired
    # per repetition, so that the machine's drift since the bare limit (measured first) cancels.
    windows[LIMIT] = Window(ctx.limit_loop(), options.window_steps())
    try:
        measured = interleaved_windows(ctx.comm, windows, options.repeats, options.warmup)
    finally:
        for loop in loops.values():
            loop.close()
    bare_rate = float(
        np.median(Measured(options.window_steps(), slowest(ctx.comm, ctx.bare_seconds)).rate(ctx.samples_per_step))
    )
    limit = _add_limit(ctx, measured[LIMIT], bare_rate)
    for variant in chosen:
        _add_variant(ctx, variant, loops[variant.name].engine, measured[variant.name], bare_rate, limit)
    _add_sync_thread_speedups(ctx, asked, measured)
    _add_projections(ctx, chosen, {v.name: loops[v.name].engine for v in chosen}, bare_rate)
    _add_codec_ratios(ctx, sum(p.numel() for p in next(iter(loops.values())).model.parameters()))


def variant_loop(ctx: BenchContext, variant: SyncVariant) -> EngineLoop:
    return EngineLoop(
        f"streaming_{variant.name}",
        ctx.workload,
        ctx.comm,
        variant.method,
        variant.sync_period,
        sync_delay=variant.sync_delay,
        fragments=variant.fragments,
        compression=variant.compression,
        gradient_compression=variant.gradient_compression,
        sync_thread=variant.sync_thread,
    )


def _add_limit(ctx: BenchContext, measured: Measured, bare_rate: float) -> list[float]:
    limit = measured.rate(ctx.samples_per_step)
    ctx.add(
        Figure(
            "streaming.limit.samples_per_s",
            "streaming",
            "in-process limit: every rank trains alone, communicator started but idle, interleaved with the "
            "configurations (global samples/s)",
            "samples/s",
            limit,
        ),
        Figure(
            "streaming.limit_over_bare",
            "streaming",
            "in-process limit over the median bare limit: the machine's drift since the bare limit, and what "
            "idle communication libraries cost",
            "ratio",
            [rate / bare_rate for rate in limit],
        ),
    )
    return limit


def _add_variant(
    ctx: BenchContext, variant: SyncVariant, engine: AveragingEngine, m: Measured, bare_rate: float, limit: list[float]
) -> None:
    prefix, label = f"streaming.{variant.name}", variant.describe()
    threads = {t: what for t, what in _THREADS.items() if t != "sync" or engine.uses_sync_thread}
    ctx.add(
        *rate_figures(prefix, "streaming", label, m.rate(ctx.samples_per_step), bare_rate, limit, variant.target),
        Figure(
            f"{prefix}.comm_share",
            "streaming",
            f"{label}: share of the time blocked in communication (encoding included)",
            "fraction",
            m.share,
        ),
        _bytes_figure(variant, engine),
        *cpu_figures(prefix, "streaming", label, m.cpu, threads),
    )


def _add_sync_thread_speedups(ctx: BenchContext, asked: list[SyncVariant], measured: dict[str, Measured]) -> None:
    for variant in asked:
        twin = variant.name + SYNC_THREAD_SUFFIX
        if twin in measured:
            ctx.add(
                Figure(
                    f"streaming.{variant.name}.sync_thread_speedup",
                    "streaming",
                    f"{variant.describe()}: samples/s with the sync thread over without, paired per repetition",
                    "ratio",
                    paired_ratios(
                        measured[twin].rate(ctx.samples_per_step), measured[variant.name].rate(ctx.samples_per_step)
                    ),
                )
            )


def _add_projections(
    ctx: BenchContext, chosen: list[SyncVariant], engines: dict[str, AveragingEngine], bare_rate: float
) -> None:
    """On an emulated link (launcher/slownet.py), each variant's α–β projection beside its measurement."""
    link_rate = emulated_link_rate()
    if not link_rate:
        return
    link = emulated_link(link_rate)
    step_seconds = ctx.samples_per_step / bare_rate
    for variant in chosen:
        traffic = sync_traffic(engines[variant.name], variant.synchronous)
        ctx.add(
            Figure(
                f"streaming.{variant.name}.projected_efficiency",
                "streaming",
                f"{variant.describe()}: α–β projection on the {link.name} link (a projection, not a "
                "measurement; the CPU communication takes is not in it)",
                "ratio",
                [projected_efficiency(variant, traffic, ctx.comm.size, step_seconds, link)],
                exact=True,
            )
        )


def _add_codec_ratios(ctx: BenchContext, numel: int) -> None:
    for codec, target in BYTES_TARGETS.items():
        ctx.add(
            Figure(
                f"streaming.{codec}.bytes_vs_fp32",
                "streaming",
                f"bytes of the model's update in {codec} over fp32 (parameters; scales included)",
                "ratio",
                [encoded_bytes(codec, numel) / encoded_bytes("none", numel)],
                target=target,
                exact=True,
            ),
        )
