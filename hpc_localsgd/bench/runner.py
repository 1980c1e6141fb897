"""``hpc-localsgd bench``: every rank runs :func:`run_bench`; rank 0 prints and writes the JSON."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..comm import make_communicator
from ..config import load_config
from ..errors import UserError, one_line
from ..launcher.env import detect_launch, select_device, threads_for_rank
from ..train.device import has_2d_convolutions
from .baselines import DDPLoop, DDPSession, HorovodLoop, HorovodSession, horovod_unavailable
from .compute import measure_precision, measure_simulation
from .options import BenchOptions
from .phases import (
    LOCAL_SGD_TARGET_PERIOD,
    SLOWMO_SYNC_PERIOD,
    BenchContext,
    measure_averaging,
    measure_bare_limit,
    measure_checkpoint,
    measure_hierarchy,
    measure_horovod_baseline,
    measure_slowmo,
    measure_throughput,
)
from .projection import format_projection, project
from .report import (
    build_document,
    describe_machine,
    environment,
    format_table,
    gather_rank_cores,
    summary_line,
    validate_document,
    write_document,
)
from .streaming import measure_streaming
from .workload import EngineLoop, Workload

METHOD = (
    "each figure is measured once per repetition after untimed warm-up; configurations compared with "
    "each other alternate within every repetition and start behind a barrier; a time is the slowest "
    "rank's, a share the mean over ranks; ratios are paired per repetition; median and min/max/IQR over "
    "repetitions"
)


def _probe(workload: Workload, options: BenchOptions) -> dict[str, int]:
    """Build the model and run one small forward pass before any rank communicates, so that a bad
    model name or an image size the model cannot take ends every rank with one line."""
    model = workload.new_model()
    x = workload.batches[0][0][: min(options.batch, 2)]
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f"--model {options.model} cannot train on {options.batch} image(s) of "
            f"{options.image_size}×{options.image_size}: {one_line(error)}"
        ) from None
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return {
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    }


def run_bench(
    options: BenchOptions, command: list[str] | None = None, print_fn: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """Run the benchmark on this rank; every rank calls it with the same options.

    Returns the JSON document on rank 0 (None elsewhere). Bad input raises ``UserError`` on
    every rank before any communication.
    """
    options.validate()
    started = time.perf_counter()
    launch = detect_launch()
    # Refused here, before any rank communicates; Horovod registers the workers' groups at start-up.
    ranks_per_worker = options.workers_of(launch.layout.size)
    threads = threads_for_rank(options.threads, launch.layout)
    torch.set_num_threads(threads)
    device = select_device(options.device, launch.layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = load_config(
        None,
        [
            f"model.name={options.model}",
            f"data.batch_size={options.batch}",
            f"data.image_size={options.image_size}",
            "data.name=synthetic",
            f"comm.backend={options.backend}",
            f"comm.bucket_mb={options.bucket_mb}",
            f"comm.sync_thread={'auto' if options.sync_thread is None else str(options.sync_thread).lower()}",
            f"train.threads={threads}",
            f"train.device={options.device}",
        ],
    )
    workload = Workload.create(cfg, device, launch.layout.rank, options.num_classes)
    sizes = _probe(workload, options)
    env_info = environment(device, threads)
    needs_bare = "throughput" in options.phases or "streaming" in options.phases or ranks_per_worker is not None
    bare_seconds = measure_bare_limit(options, workload) if needs_bare else []

    comm = make_communicator(
        cfg.comm.backend,
        launch,
        device,
        group_sizes=[ranks_per_worker] if ranks_per_worker else [],
        across_sizes=[ranks_per_worker] if ranks_per_worker else [],
        mpi_polling=cfg.comm.mpi_polling_choice,
    )
    say = print_fn if comm.is_root else (lambda _line: None)
    env_info["rank_cores"] = gather_rank_cores(comm)
    world = {
        "size": comm.size,
        "nodes": launch.layout.num_nodes,
        "ranks_per_node": launch.layout.local_size,
        "launcher": launch.launcher,
        "backend": comm.name,
    }
    say(
        f"hpc-localsgd bench: {comm.size} rank(s) on {world['nodes']} node(s), {comm.name} backend, {device}, "
        f"{threads} thread(s)/rank | {options.model} ({sizes['parameters'] / 1e6:.1f} M parameters) | "
        f"batch {options.batch}/rank, {options.image_size}×{options.image_size} images | phases "
        f"{', '.join(options.phases)} | {describe_machine(env_info)}"
    )
    ctx = BenchContext(options, comm, launch, device, workload)
    ran_baselines: list[str] = []
    if "averaging" in options.phases:
        measure_averaging(ctx)
    if "throughput" in options.phases:
        ddp = None
        if "ddp" in options.baselines:
            ddp = DDPSession(ctx.comm, ctx.launch, ctx.device)
            ran_baselines.append("ddp")
        measure_throughput(ctx, bare_seconds, None if ddp is None else DDPLoop(workload, ddp, options.bucket_mb))
        if ddp is not None:
            ddp.close()
        if "horovod" in options.baselines:
            reason = horovod_unavailable()
            if reason is not None:
                ctx.skip("synchronous.allreduce_over_horovod", f"horovod.torch cannot be imported: {reason}")
            else:

                def start_horovod() -> tuple[HorovodLoop, Callable[[], None]]:
                    session = HorovodSession(comm)
                    return HorovodLoop(workload, session), session.close

                measure_horovod_baseline(ctx, start_horovod)
                ran_baselines.append("horovod")
        if LOCAL_SGD_TARGET_PERIOD not in options.sync_periods:
            ctx.skip(
                f"local_sgd.h{LOCAL_SGD_TARGET_PERIOD}.efficiency",
                f"--sync-periods does not include {LOCAL_SGD_TARGET_PERIOD}, the period its target is set for",
            )
    if "streaming" in options.phases:
        measure_streaming(ctx, bare_seconds)
    if "precision" in options.phases:
        model = workload.new_model()
        channels_last = (
            options.channels_last
            if options.channels_last is not None
            else device.type == "cuda" and has_2d_convolutions(model)
        )
        measure_precision(ctx, channels_last, options.compile)
    if "simulation" in options.phases:
        measure_simulation(ctx)
    if ranks_per_worker is not None:
        measure_hierarchy(ctx, bare_seconds, ranks_per_worker)
    elif "hierarchy" in options.phases:
        ctx.skip(
            "hierarchy",
            f"{comm.size} rank(s) hold no two workers of 2 ranks; give --ranks-per-worker R, R dividing the "
            "world size and at most half of it",
        )
    if "slowmo" in options.phases or "checkpoint" in options.phases:
        slowmo = EngineLoop("slowmo", workload, comm, "local_sgd", SLOWMO_SYNC_PERIOD, outer="slowmo")
        if "slowmo" in options.phases:
            measure_slowmo(ctx, slowmo)
        if "checkpoint" in options.phases:
            measure_checkpoint(ctx, slowmo)
        slowmo.close()

    projection = None
    compute = options.projection_step_seconds or ctx.facts.get("compute_seconds_per_step")
    if compute:
        source = (
            "given with --project-step-seconds"
            if options.projection_step_seconds
            else "measured: median step time of the bare no-communication limit"
        )
        projection = project(
            compute,
            source,
            ctx.local_loop().engine.traffic().bytes_per_sync,
            sizes["gradient_bytes"],
            options.batch,
            options.sync_periods,
            ranks_per_node=options.projection_ranks_per_node,
        )
    problem = {
        "model": options.model,
        "parameters": sizes["parameters"],
        "parameter_bytes": sizes["parameter_bytes"],
        "buffer_bytes": sizes["buffer_bytes"],
        "batch_per_rank": options.batch,
        "global_batch": options.batch * comm.size,
        "image_size": options.image_size,
        "num_classes": options.num_classes,
        "quick": options.quick,
    }
    measurement = {
        "repeats": options.repeats,
        "warmup": options.warmup,
        "steps_per_window": options.steps,
        "sync_periods": list(options.sync_periods),
        "phases": list(options.phases),
        "baselines": ran_baselines,
        "bucket_mb": options.bucket_mb,
        "ranks_per_worker": ranks_per_worker,
        "precisions": list(options.precisions) if "precision" in options.phases else [],
        "simulated_workers": options.simulated_workers if "simulation" in options.phases else None,
        "streaming_variants": list(options.streaming_variants) if "streaming" in options.phases else [],
        "sync_thread": options.sync_thread_measured(),
        "method": METHOD,
    }
    ctx.close()
    document = None
    if comm.is_root:
        summary = summary_line(world, problem, ctx.figures, options.out)
        document = build_document(
            command=command if command is not None else list(sys.argv),
            environment_info=env_info,
            world=world,
            problem=problem,
            measurement=measurement,
            figures=ctx.figures,
            skipped=ctx.skipped,
            projection=projection,
            summary=summary,
            seconds=time.perf_counter() - started,
        )
        validate_document(document)
        load = document["environment"]
        say(
            format_table(
                f"-- {options.repeats} repetitions after {options.warmup} warm-up, {options.steps} steps per "
                f"training window; load average {load['load_average_start'][0]:.2f} at start, "
                f"{load['load_average_end'][0]:.2f} at end",
                ctx.figures,
            )
        )
        for skipped in ctx.skipped:
            say(f"skipped {skipped['id']}: {skipped['reason']}")
        if projection is not None:
            say(format_projection(projection))
        if options.out:
            write_document(document, options.out)
        say(summary)
    # Closed on success only, as in training: after an error the other ranks may not reach the closing collective.
    comm.close()
    return document
