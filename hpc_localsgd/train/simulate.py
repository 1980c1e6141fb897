"""``comm.backend: simulated``: W workers trained in one process with the averaging engine of MPI runs.

The differences from ``loop.train`` are where the workers live, nothing else: the model and
batches are stacked over the workers (``replicas.py``), and collectives are operations along
that stack (``comm/simulated.py``). The engine, sync schedule, outer optimizers, gradient
buckets, LR schedule, data shards, metrics file and run directory are the same objects. So a
simulation of W workers gives the parameters ``mpirun -np W`` gives, to float rounding (the
batched convolutions round differently), which ``tests/mpi/test_simulated.py`` checks.

Times in the metrics are this process's: they say how long the simulation took, not how long
W ranks would. Bytes and sync rounds are per worker, exactly what each rank would send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..algorithms.engine import AveragingEngine
from ..algorithms.hierarchy import hierarchy_from_config
from ..comm.simulated import SimulatedCommunicator
from ..comm.single import SINGLE_PROCESS_LAYOUT, SingleCommunicator
from ..config.load import config_to_yaml
from ..config.schema import RunConfig
from ..errors import UserError
from ..io.rundir import prepare_run_dir, write_text_atomically
from ..launcher.env import LaunchEnvironment, select_device, threads_for_rank
from .data import Datasets, build_datasets, eval_batches
from .device import check_precision, to_device
from .models import build_model
from .replicas import ReplicatedBatches, ReplicatedModel
from .run import (
    Batch,
    EvalResult,
    Progress,
    TrainResult,
    build_optimization,
    correct_predictions,
    cross_entropy,
    language_of,
    open_metrics,
    run_training,
    seed_everything,
    start_line,
)


class SimulatedWorkers:
    """All W workers of a run in this process (the :class:`~.run.Workers` of the simulated backend)."""

    unit = "simulated worker"

    def __init__(self, cfg: RunConfig, workers: int, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        check_precision(cfg.train.precision, device)
        self.comm = SimulatedCommunicator(workers)
        seed_everything(cfg.seed)
        self.datasets: Datasets = build_datasets(cfg.data, cfg.seed, seq_len=cfg.model.gpt.seq_len)
        self.language = language_of(self.datasets)
        self.devices = 1
        base = build_model(cfg.model, self.datasets.num_classes, self.datasets.input_shape).to(device)
        self.model = ReplicatedModel(base, workers)
        self.stacked_batches = ReplicatedBatches(
            self.datasets, cfg.data.batch_size, workers, cfg.seed, cfg.data.augment
        )
        self.steps_per_epoch = self.stacked_batches.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise UserError(
                f"data: {self.stacked_batches.shards[0].num_samples} training samples are too few for {workers} "
                f"simulated workers × data.batch_size {cfg.data.batch_size}"
            )
        self.hierarchy = hierarchy_from_config(cfg.algorithm, workers, None)
        if not self.hierarchy.is_flat:
            # comm.simulated_workers counts ranks; workers are groups of them.
            self.unit = "simulated rank"
        self.description = f"{workers} {self.unit}(s) in one process ({self.comm.collective_path(device)}), {device}"
        self.world: dict[str, Any] = {
            "size": workers,
            "nodes": 1,
            "ranks_per_node": workers,
            "launcher": "in-process",
            "backend": self.comm.name,
            "device": str(device),
        }

    def batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        for x, y in self.stacked_batches.epoch(epoch, start_batch):
            yield to_device(x, self.device, False), to_device(y, self.device, False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_w (mean loss of worker w): each worker's gradient lands in its row, unscaled."""
        out = self.model(x)
        return out, cross_entropy(out, y, reduction="sum") / y[0].numel()

    def step_figures(self, outputs: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        # The workers' mean loss: the figure rank 0 logs under MPI; accuracy over all workers' samples.
        return loss.item() / self.comm.size, correct_predictions(outputs, y), y.numel()

    def evaluate(self, engine: AveragingEngine, train_loss_sum: float, train_loss_count: int) -> EvalResult:
        """The averaged model on the whole test set, as ``RankWorkers.evaluate`` computes it across ranks."""
        loss_sum, correct, count = 0.0, 0, 0
        with engine.averaged_model():
            self.model.eval()
            with torch.no_grad():
                for x, y in eval_batches(
                    self.datasets.test, self.cfg.data.eval_batch_size, 0, 1, limit=self.cfg.data.eval_samples
                ):
                    out = self.model.worker_forward(0, x.to(self.device))  # after averaging every worker holds x̄
                    y = y.to(self.device)
                    loss_sum += cross_entropy(out, y, reduction="sum").item()
                    correct += correct_predictions(out, y)
                    count += y.numel()
            self.model.train()
        return EvalResult(
            test_loss=loss_sum / max(count, 1),
            test_accuracy=correct / max(count, 1),
            train_loss=train_loss_sum / max(train_loss_count, 1),
        )


def simulate(
    cfg: RunConfig, launch: LaunchEnvironment, *, overwrite: bool = False, print_fn: Callable[[str], None] = print
) -> TrainResult:
    """Train ``cfg.comm.simulated_workers`` workers in this process; the run directory is a normal run's."""
    if launch.layout.size != 1:
        raise UserError(
            f"comm.backend=simulated runs all its workers in one process, but the launcher "
            f"({launch.launcher}) started {launch.layout.size}; start it without mpirun/srun"
        )
    torch.set_num_threads(threads_for_rank(cfg.train.threads, SINGLE_PROCESS_LAYOUT))
    device = select_device(cfg.train.device, SINGLE_PROCESS_LAYOUT)
    run_dir = Path(cfg.output.run_dir)
    prepare_run_dir(SingleCommunicator(), run_dir, overwrite)  # decisions about files: this process alone
    write_text_atomically(run_dir / "config.yaml", config_to_yaml(cfg))

    workers = SimulatedWorkers(cfg, cfg.comm.simulated_workers, device)
    opt = build_optimization(cfg, workers.model, workers.comm, workers.steps_per_epoch, workers.hierarchy)
    metrics = open_metrics(cfg, workers, opt)
    print_fn(start_line(cfg, workers, opt))
    return run_training(cfg, workers, opt, Progress(), metrics, print_fn)
