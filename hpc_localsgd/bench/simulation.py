"""The simulated backend's W workers stepped as one batched model against one model stepped W times in
a row on the same samples: what running W workers in one process buys (comm.backend simulated)."""

from __future__ import annotations

import dataclasses

import torch

from ..algorithms.engine import AveragingEngine
from ..algorithms.schedule import SyncSchedule
from ..comm.simulated import SimulatedCommunicator
from ..train.replicas import ReplicatedModel
from ..train.run import cross_entropy
from .context import BenchContext
from .stats import Figure, paired_ratios
from .timing import alternating
from .workload import LEARNING_RATE, PlainLoop, Workload, synchronize_device


class ReplicatedLoop:
    """W simulated workers in one process: the simulated backend's batched model (torch.func.vmap over
    stacked weights) and the engine's step over it, synchronous throughout as all-reduce SGD trains: the
    gradients are averaged over the stacked workers in-process every step, the model never."""

    def __init__(self, workload: Workload, workers: int) -> None:
        self.workload = workload
        self.model = ReplicatedModel(workload.new_model(), workers).to(workload.device)
        self.model.train()
        self.optimizer = workload.new_optimizer(self.model)
        algorithm = dataclasses.replace(workload.cfg.algorithm, method="local_sgd", sync_period=1, outer="none")
        schedule = SyncSchedule(1, None)
        self.engine = AveragingEngine(self.model, self.optimizer, SimulatedCommunicator(workers), algorithm, schedule)
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
        # Over the last dimension, so that a language model's every position counts: y[0] is one worker's targets.
        return out, cross_entropy(out, y, reduction="sum") / y[0].numel()

    def run(self, steps: int) -> None:
        for step in range(steps):
            x, y = self.stacked[step % len(self.stacked)]
            self.engine.train_step(step, LEARNING_RATE, lambda x=x, y=y: self._forward(x, y))  # type: ignore[misc]
        synchronize_device(self.workload.device)

    def close(self) -> None:
        self.engine.close()


def run(ctx: BenchContext) -> None:
    """The same samples either way: W workers' batches as one batched step, or W steps of one model."""
    options, workers = ctx.options, ctx.options.simulated_workers
    steps = options.window_steps()
    replicated = ReplicatedLoop(ctx.workload, workers)
    one_model = PlainLoop(ctx.workload)
    batched_times, sequential_times = alternating(
        ctx.comm,
        ctx.device,
        [lambda: replicated.run(steps), lambda: one_model.run(workers * steps)],
        options.repeats,
        max(1, options.warmup),
    )
    replicated.close()
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
