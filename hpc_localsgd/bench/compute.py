"""The training step's computation alone, without communication: the package's step against a plain
PyTorch loop per ``train.precision``, and the simulated backend's batched replicas against one model
trained W times in a row (what running W workers in one process buys).

Like every phase, each appends ``Figure``s and never prints; the configurations compared alternate
inside every repetition (see phases.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..algorithms.engine import AveragingEngine
from ..algorithms.schedule import SyncSchedule
from ..comm.simulated import SimulatedCommunicator
from ..train.replicas import ReplicatedModel
from .phases import THROUGHPUT_TARGET, BenchContext, _alternating
from .stats import Figure, paired_ratios
from .workload import LEARNING_RATE, EngineLoop, PlainLoop, Workload, synchronize_device


def measure_precision(ctx: BenchContext, channels_last: bool, compiled: bool = False) -> None:
    """Per ``train.precision``: the package's training step without communication (the engine's
    train_step over its flat buffer, autocast and, for fp16, the loss scaler) against a plain loop with
    the same precision and memory format written as torchvision's reference recipe writes it, paired
    repetition by repetition. What mixed precision buys shows across the precisions' rates. With
    ``compiled`` both loops also run through torch.compile, alternating with the eager ones in every
    repetition (the compilation happens in the warm-up)."""
    comm, options = ctx.comm, ctx.options
    steps = options.window_steps()
    layout = "channels-last" if channels_last else "contiguous"
    for precision in options.precisions:
        loops: dict[str, EngineLoop | PlainLoop] = {}
        for mode in ("eager", "compiled") if compiled else ("eager",):
            engine = EngineLoop(
                f"engine_{precision}_{mode}",
                ctx.workload,
                comm,
                "local_sgd",
                precision=precision,
                channels_last=channels_last,
                compiled=mode == "compiled",
            )
            engine.set_sync_period(None)  # the step alone: no averaging, no gradient hooks
            loops[f"engine_{mode}"] = engine
            loops[f"plain_{mode}"] = PlainLoop(ctx.workload, precision, channels_last, compiled=mode == "compiled")
        measured = _alternating(
            comm,
            ctx.device,
            [lambda loop=loop: loop.run(steps) for loop in loops.values()],  # type: ignore[misc]
            options.repeats,
            max(1, options.warmup),  # the first steps allocate autocast caches and the scaler's state (and compile)
        )
        times = dict(zip(loops, measured, strict=True))
        for loop in loops.values():
            if isinstance(loop, EngineLoop):
                loop.close()

        def rate(seconds: list[float]) -> list[float]:
            return [comm.size * options.batch * steps / t for t in seconds]

        plain_label = f"a plain PyTorch loop in {precision}, {layout} (model.to(memory_format), autocast" + (
            ", GradScaler)" if precision == "fp16" else ")"
        )
        ctx.add(
            Figure(
                f"precision.{precision}.samples_per_s",
                "precision",
                f"the package's training step in {precision}, {layout}, without communication (all ranks)",
                "samples/s",
                rate(times["engine_eager"]),
            ),
            Figure(
                f"precision.{precision}.plain_samples_per_s",
                "precision",
                plain_label,
                "samples/s",
                rate(times["plain_eager"]),
            ),
            Figure(
                f"precision.{precision}.vs_plain",
                "precision",
                f"the package's step / the plain loop in {precision} (paired)",
                "ratio",
                paired_ratios(times["plain_eager"], times["engine_eager"]),
                target=THROUGHPUT_TARGET,
            ),
        )
        if compiled:
            ctx.add(
                Figure(
                    f"precision.{precision}.compiled_samples_per_s",
                    "precision",
                    f"the package's training step in {precision}, {layout}, forward through torch.compile "
                    "(train.compile), without communication (all ranks)",
                    "samples/s",
                    rate(times["engine_compiled"]),
                ),
                Figure(
                    f"precision.{precision}.compiled_plain_samples_per_s",
                    "precision",
                    plain_label + " through torch.compile(model)",
                    "samples/s",
                    rate(times["plain_compiled"]),
                ),
                Figure(
                    f"precision.{precision}.compiled_vs_plain",
                    "precision",
                    f"the package's compiled step / the compiled plain loop in {precision} (paired)",
                    "ratio",
                    paired_ratios(times["plain_compiled"], times["engine_compiled"]),
                    target=THROUGHPUT_TARGET,
                ),
                Figure(
                    f"precision.{precision}.compile_speedup",
                    "precision",
                    f"what train.compile buys: the package's compiled step / its eager step in {precision} (paired)",
                    "ratio",
                    paired_ratios(times["engine_eager"], times["engine_compiled"]),
                ),
            )


class ReplicatedLoop:
    """W simulated workers in one process: the simulated backend's batched model (torch.func.vmap over
    stacked weights) and the engine's step over it, never averaging (the step's computation alone)."""

    def __init__(self, workload: Workload, workers: int) -> None:
        self.workload = workload
        self.model = ReplicatedModel(workload.new_model(), workers).to(workload.device)
        self.model.train()
        self.optimizer = workload.new_optimizer(self.model)
        algorithm = dataclasses.replace(workload.cfg.algorithm, method="local_sgd", sync_period=1, outer="none")
        self.engine = AveragingEngine(
            self.model, self.optimizer, SimulatedCommunicator(workers), algorithm, SyncSchedule(1, None)
        )
        batches = workload.batches
        # Worker w's batch of step s is the workload's batch s + w: the replicas see different data.
        self.stacked = [
            (
                torch.stack([batches[(s + w) % len(batches)][0] for w in range(workers)]),
                torch.stack([batches[(s + w) % len(batches)][1] for w in range(workers)]),
            )
            for s in range(len(batches))
        ]

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)  # as SimulatedWorkers.forward: the sum of the workers' mean losses
        return out, F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]

    def run(self, steps: int) -> None:
        for step in range(steps):
            x, y = self.stacked[step % len(self.stacked)]
            self.engine.train_step(step, LEARNING_RATE, lambda x=x, y=y: self._forward(x, y))  # type: ignore[misc]
        synchronize_device(self.workload.device)


def measure_simulation(ctx: BenchContext) -> None:
    """The simulated backend's W workers as one batched step against W steps of one model in a row
    (what simulating W workers would cost without batching), the same samples either way."""
    options, workers = ctx.options, ctx.options.simulated_workers
    steps = options.window_steps()
    replicated = ReplicatedLoop(ctx.workload, workers)
    one_model = PlainLoop(ctx.workload)
    batched_times, sequential_times = _alternating(
        ctx.comm,
        ctx.device,
        [lambda: replicated.run(steps), lambda: one_model.run(workers * steps)],
        options.repeats,
        max(1, options.warmup),
    )
    replicated.engine.close()
    samples = workers * options.batch * steps
    ctx.add(
        Figure(
            "simulation.replicated_samples_per_s",
            "simulation",
            f"{workers} simulated workers stepped as one batched model (torch.func.vmap), one process",
            "samples/s",
            [samples / t for t in batched_times],
        ),
        Figure(
            "simulation.sequential_samples_per_s",
            "simulation",
            f"one model stepped {workers} times in a row on the same samples",
            "samples/s",
            [samples / t for t in sequential_times],
        ),
        Figure(
            "simulation.speedup",
            "simulation",
            "batched replicas / one model in a row (paired)",
            "ratio",
            paired_ratios(sequential_times, batched_times),
        ),
    )
