"""``hpc-localsgd bench``: every rank runs :func:`run_bench` with the same options, which measures the
phases asked for in the registry's order (phases.py); rank 0 prints and writes the JSON.

Bad input is refused on every rank before any rank communicates: the options' checks, the model's
probe and the bare no-communication limit all run before the communicator starts.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..comm import make_communicator
from ..comm.base import Communicator
from ..config import load_config
from ..config.schema import RunConfig
from ..errors import UserError, one_line
from ..launcher.env import LaunchEnvironment, detect_launch, select_device, threads_for_rank
from .context import BenchContext
from .options import BenchOptions
from .phases import Phase, selected
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
from .timing import time_alone
from .workload import PlainLoop, Workload

METHOD = (
    "each figure is measured once per repetition after untimed warm-up; configurations compared with "
    "each other alternate within every repetition and start behind a barrier; a time is the slowest "
    "rank's, a share the mean over ranks; ratios are paired per repetition; median and min/max/IQR over "
    "repetitions"
)


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
    cfg = bench_config(options, threads)
    workload = Workload.create(cfg, device, launch.layout.rank, options.num_classes)
    sizes = probe(workload, options)
    env_info = environment(device, threads)
    phases = selected(options.phases)
    bare_seconds = bare_limit_seconds(options, workload, phases, launch.layout.size)
    comm = start_communicator(cfg, launch, device, ranks_per_worker)
    say = print_fn if comm.is_root else (lambda _line: None)
    env_info["rank_cores"] = gather_rank_cores(comm)
    say(start_line(options, comm, launch, device, threads, sizes, env_info))
    ctx = BenchContext(options, comm, launch, device, workload, bare_seconds, ranks_per_worker)
    for phase in phases:
        reason = phase.unavailable(options, comm.size)
        if reason is None:
            phase.run(ctx)
        else:
            ctx.skip(phase.name, reason)
    projection = projection_of(ctx, sizes)
    problem = problem_of(options, cfg, sizes, comm.size)
    ctx.close()
    document = None
    if comm.is_root:
        world = world_of(comm, launch)
        document = build_document(
            command=command if command is not None else list(sys.argv),
            environment_info=env_info,
            world=world,
            problem=problem,
            measurement=measurement_of(ctx),
            figures=ctx.figures,
            skipped=ctx.skipped,
            projection=projection,
            summary=summary_line(world, problem, ctx.figures, options.out),
            seconds=time.perf_counter() - started,
        )
        validate_document(document)
        publish(document, ctx, projection, say)
    # Closed on success only, as in training: after an error the other ranks may not reach the closing collective.
    comm.close()
    return document


def bare_limit_seconds(options: BenchOptions, workload: Workload, phases: list[Phase], world_size: int) -> list[float]:
    """This rank's seconds per window training alone, where a phase that will run compares with it.

    The no-communication limit in the strict sense: measured before any communication library starts
    (so without a barrier: the ranks start it together when they start). The in-process limit measured
    later, communicator started but idle, shows what an idle library costs (Horovod's thread polls).
    """
    if not any(p.needs_bare_limit and p.unavailable(options, world_size) is None for p in phases):
        return []
    return time_alone(PlainLoop(workload).run, options.window_steps(), options.repeats, options.warmup)


def bench_config(options: BenchOptions, threads: int) -> RunConfig:
    """The run config the measured engines are built from: the options' problem on synthetic data."""
    sync_thread = "auto" if options.sync_thread is None else str(options.sync_thread).lower()
    return load_config(
        None,
        [
            f"model.name={options.model}",
            f"data.batch_size={options.batch}",
            *(language_settings(options) if options.model == "gpt" else image_settings(options)),
            f"comm.backend={options.backend}",
            f"comm.bucket_mb={options.bucket_mb}",
            f"comm.sync_thread={sync_thread}",
            f"train.threads={threads}",
            f"train.device={options.device}",
        ],
    )


def image_settings(options: BenchOptions) -> list[str]:
    """A classifier learns synthetic images (made by the workload, never read) with the default SGD recipe."""
    return [f"data.image_size={options.image_size}", "data.name=synthetic"]


# A language model trains as nanoGPT and configs/lm do: AdamW with decoupled weight decay 0.1 and the gradient
# clipped to norm 1; the package's step and the plain loops alike.
LANGUAGE_OPTIMIZER = ("optim.name=adamw", "optim.weight_decay=0.1", "optim.clip_grad_norm=1.0")


def language_settings(options: BenchOptions) -> list[str]:
    """The transformer of the --gpt-* options. data.name text (path null) satisfies the config's rule that a
    language model learns token data; nothing is read: the workload makes random token ids."""
    shape = {
        "layers": options.gpt_layers,
        "heads": options.gpt_heads,
        "dim": options.gpt_dim,
        "seq_len": options.gpt_seq_len,
        "vocab": options.gpt_vocab,
    }
    return [*(f"model.gpt.{key}={value}" for key, value in shape.items()), "data.name=text", *LANGUAGE_OPTIMIZER]


def probe(workload: Workload, options: BenchOptions) -> dict[str, int]:
    """Build the model and run one small forward pass before any rank communicates, so that a bad
    model name or an image size the model cannot take ends every rank with one line."""
    model = workload.new_model()
    x = workload.batches[0][0][: min(options.batch, 2)]
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f"--model {options.model} cannot train on {describe_samples(options)}: {one_line(error)}"
        ) from None
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return {
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    }


def describe_samples(options: BenchOptions) -> str:
    """What a rank's batch holds, in words: images of a side, or windows of tokens."""
    if options.tokens_per_sample is not None:
        return f"{options.batch} window(s) of {options.tokens_per_sample} tokens"
    return f"{options.batch} image(s) of {options.image_size}×{options.image_size}"


def start_communicator(
    cfg: RunConfig, launch: LaunchEnvironment, device: torch.device, ranks_per_worker: int | None
) -> Communicator:
    groups = [ranks_per_worker] if ranks_per_worker else []
    return make_communicator(
        cfg.comm.backend,
        launch,
        device,
        group_sizes=groups,
        across_sizes=groups,
        mpi_polling=cfg.comm.mpi_polling_choice,
    )


def world_of(comm: Communicator, launch: LaunchEnvironment) -> dict[str, Any]:
    return {
        "size": comm.size,
        "nodes": launch.layout.num_nodes,
        "ranks_per_node": launch.layout.local_size,
        "launcher": launch.launcher,
        "backend": comm.name,
    }


def start_line(
    options: BenchOptions,
    comm: Communicator,
    launch: LaunchEnvironment,
    device: torch.device,
    threads: int,
    sizes: dict[str, int],
    env_info: dict[str, Any],
) -> str:
    return (
        f"hpc-localsgd bench: {comm.size} rank(s) on {launch.layout.num_nodes} node(s), {comm.name} backend, "
        f"{device}, {threads} thread(s)/rank | {options.model} ({sizes['parameters'] / 1e6:.1f} M parameters) | "
        f"batch {describe_samples(options)} per rank | phases "
        f"{', '.join(options.phases)} | {describe_machine(env_info)}"
    )


def projection_of(ctx: BenchContext, sizes: dict[str, int]) -> dict[str, Any] | None:
    """The α–β projection, from the given compute time per step or the bare limit's measured one."""
    options = ctx.options
    compute = options.projection_step_seconds or ctx.facts.get("compute_seconds_per_step")
    if not compute:
        return None
    source = (
        "given with --project-step-seconds"
        if options.projection_step_seconds
        else "measured: median step time of the bare no-communication limit"
    )
    return project(
        compute,
        source,
        ctx.limit_loop().engine.traffic().bytes_per_sync,
        sizes["gradient_bytes"],
        options.batch,
        options.sync_periods,
        ranks_per_node=options.projection_ranks_per_node,
    )


def problem_of(options: BenchOptions, cfg: RunConfig, sizes: dict[str, int], world_size: int) -> dict[str, Any]:
    """The problem measured; a language model's image size is null, its classes its vocabulary (schema 1.8)."""
    language = options.tokens_per_sample is not None
    return {
        "model": options.model,
        "parameters": sizes["parameters"],
        "parameter_bytes": sizes["parameter_bytes"],
        "buffer_bytes": sizes["buffer_bytes"],
        "batch_per_rank": options.batch,
        "global_batch": options.batch * world_size,
        "image_size": None if language else options.image_size,
        "num_classes": cfg.model.gpt.vocab if language else options.num_classes,
        "quick": options.quick,
        "optimizer": {"name": cfg.optim.name, "clip_grad_norm": cfg.optim.clip_grad_norm},
        "tokens_per_sample": options.tokens_per_sample,
        "gpt": dataclasses.asdict(cfg.model.gpt) if language else None,
    }


def measurement_of(ctx: BenchContext) -> dict[str, Any]:
    """How the run measured: the plan, and each phase's own options where that phase ran."""
    options = ctx.options
    return {
        "repeats": options.repeats,
        "warmup": options.warmup,
        "steps_per_window": options.steps,
        "sync_periods": list(options.sync_periods),
        "phases": list(options.phases),
        "baselines": list(ctx.baselines_run),
        "bucket_mb": options.bucket_mb,
        "ranks_per_worker": ctx.ranks_per_worker,
        "precisions": list(options.precisions) if "precision" in options.phases else [],
        "simulated_workers": options.simulated_workers if "simulation" in options.phases else None,
        "streaming_variants": list(options.streaming_variants) if "streaming" in options.phases else [],
        "sync_thread": options.sync_thread_measured(),
        "mfu": ctx.mfu,
        "method": METHOD,
    }


def publish(
    document: dict[str, Any], ctx: BenchContext, projection: dict[str, Any] | None, say: Callable[[str], None]
) -> None:
    """Rank 0: the table, what was skipped and why, the projection, the JSON file and the summary line."""
    options, load = ctx.options, document["environment"]
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
    say(document["summary_line"])
