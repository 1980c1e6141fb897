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

import math
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..algorithms.engine import AveragingEngine
from ..comm.simulated import SimulatedCommunicator
from ..comm.single import SINGLE_PROCESS_LAYOUT, SingleCommunicator
from ..config.load import config_to_yaml
from ..config.schema import RunConfig
from ..errors import UserError
from ..io.metrics import MetricsWriter
from ..io.rundir import prepare_run_dir, write_text_atomically
from ..launcher.env import LaunchEnvironment, select_device, software_versions, threads_for_rank
from .data import build_datasets, eval_batches
from .loop import (EvalResult, TrainResult, _human_bytes, _seed_everything, build_optimization, describe_method,
                   sgd_step)
from .models import build_model
from .replicas import ReplicatedBatches, ReplicatedModel


def _logits_and_summed_loss(model: ReplicatedModel, x: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_w (mean loss of worker w): each worker's gradient lands in its row, unscaled."""
    out = model(x)
    return out, F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]


def evaluate_replicated(engine: AveragingEngine, model: ReplicatedModel, test_set, cfg: RunConfig,
                        device: torch.device, train_loss_sum: float, train_loss_count: int) -> EvalResult:
    """The averaged model on the whole test set, as ``loop.evaluate`` computes it across ranks."""
    loss_sum, correct, count = 0.0, 0, 0
    with engine.averaged_model():
        model.eval()
        with torch.no_grad():
            for x, y in eval_batches(test_set, cfg.data.eval_batch_size, 0, 1):
                out = model.worker_forward(0, x.to(device))  # after averaging every worker holds x̄
                y = y.to(device)
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += int((out.argmax(1) == y).sum().item())
                count += y.numel()
        model.train()
    return EvalResult(test_loss=loss_sum / max(count, 1), test_accuracy=correct / max(count, 1),
                      train_loss=train_loss_sum / max(train_loss_count, 1))


def simulate(cfg: RunConfig, launch: LaunchEnvironment, *, overwrite: bool = False,
             print_fn: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg.comm.simulated_workers`` workers in this process; the run directory is a normal run's."""
    if launch.layout.size != 1:
        raise UserError(f"comm.backend=simulated runs all its workers in one process, but the launcher "
                        f"({launch.launcher}) started {launch.layout.size}; start it without mpirun/srun")
    workers = cfg.comm.simulated_workers
    torch.set_num_threads(threads_for_rank(cfg.train.threads, SINGLE_PROCESS_LAYOUT))
    device = select_device(cfg.train.device, SINGLE_PROCESS_LAYOUT)
    process = SingleCommunicator()  # decisions about files: this process alone
    comm = SimulatedCommunicator(workers)

    run_dir = Path(cfg.output.run_dir)
    prepare_run_dir(process, run_dir, overwrite)
    write_text_atomically(run_dir / "config.yaml", config_to_yaml(cfg))

    _seed_everything(cfg.seed)
    datasets = build_datasets(cfg.data, cfg.seed)
    base = build_model(cfg.model, datasets.num_classes, datasets.input_shape).to(device)
    model = ReplicatedModel(base, workers)
    batches = ReplicatedBatches(datasets, cfg.data.batch_size, workers, cfg.seed, cfg.data.augment)
    steps_per_epoch = batches.steps_per_epoch
    optimization = build_optimization(cfg, model, comm, steps_per_epoch)
    total_steps, global_batch = optimization.total_steps, optimization.global_batch
    lr_schedule, optimizer, engine = optimization.lr_schedule, optimization.optimizer, optimization.engine
    stats = engine.stats

    world = {"size": workers, "nodes": 1, "ranks_per_node": workers, "launcher": "in-process",
             "backend": comm.name, "device": str(device), "threads_per_rank": torch.get_num_threads(),
             "host": platform.node()}
    metrics = MetricsWriter(run_dir / "metrics.h5",
                            {"config": config_to_yaml(cfg), "world": world, "versions": software_versions(),
                             "method": describe_method(cfg), "steps_per_epoch": steps_per_epoch,
                             "total_steps": total_steps, "global_batch": global_batch},
                            cfg.output.metrics_flush_seconds, locking=cfg.output.hdf5_file_locking)
    print_fn(f"hpc-localsgd: {describe_method(cfg)} | {workers} simulated worker(s) in one process, {device} | "
             f"{cfg.model.name} on {cfg.data.name} | global batch {global_batch}, peak lr {lr_schedule.peak:.4g} | "
             f"{total_steps} steps ({steps_per_epoch}/epoch) | run dir {run_dir}")

    eval_interval = max(1, int(round(cfg.train.eval_every_epochs * steps_per_epoch)))
    evals: list[EvalResult] = []
    train_loss_sum, train_loss_count = 0.0, 0
    start = time.perf_counter()
    step = 0
    model.train()
    try:
        for epoch in range(math.ceil(total_steps / steps_per_epoch)):
            step_start = time.perf_counter()
            for x, y in batches.epoch(epoch):
                if step >= total_steps:
                    break
                comm_before = stats.comm_seconds
                x, y = x.to(device), y.to(device)
                lr = lr_schedule.at(step)
                out, loss, synced = sgd_step(engine, optimizer, step, lr, lambda: _logits_and_summed_loss(model, x, y))
                step += 1

                loss_value = loss.item() / workers  # the workers' mean, the figure rank 0 logs under MPI
                accuracy = (out.argmax(-1) == y).float().mean().item()
                elapsed = time.perf_counter() - step_start
                comm_seconds = stats.comm_seconds - comm_before
                train_loss_sum += loss_value
                train_loss_count += 1
                metrics.log_step(step=step, epoch=step / steps_per_epoch, lr=lr, loss=loss_value, accuracy=accuracy,
                                 samples_per_s=global_batch / elapsed, comm_seconds=comm_seconds,
                                 compute_seconds=elapsed - comm_seconds, bytes_sent=stats.bytes_sent,
                                 sync_rounds=stats.sync_rounds, synced=int(synced))
                if step % cfg.train.log_every_steps == 0 or step == total_steps:
                    print_fn(f"step {step}/{total_steps} | epoch {step / steps_per_epoch:.2f} | lr {lr:.4g} | "
                             f"loss {loss_value:.4f} | acc {accuracy:.3f}")
                if step % eval_interval == 0 or step == total_steps:
                    result = evaluate_replicated(engine, model, datasets.test, cfg, device, train_loss_sum,
                                                 train_loss_count)
                    train_loss_sum, train_loss_count = 0.0, 0
                    evals.append(result)
                    metrics.log_eval(step=step, epoch=step / steps_per_epoch, train_loss=result.train_loss,
                                     test_loss=result.test_loss, test_accuracy=result.test_accuracy,
                                     wall_seconds=time.perf_counter() - start, comm_seconds=stats.comm_seconds,
                                     bytes_sent=stats.bytes_sent, sync_rounds=stats.sync_rounds)
                    print_fn(f"eval step {step} | epoch {step / steps_per_epoch:.2f} | "
                             f"train loss {result.train_loss:.4f} | test loss {result.test_loss:.4f} | "
                             f"test acc {result.test_accuracy:.4f}")
                step_start = time.perf_counter()
            if step >= total_steps:
                break
    finally:
        metrics.close()
        engine.close()

    wall = time.perf_counter() - start
    final = evals[-1]
    print_fn(f"hpc-localsgd: done | {describe_method(cfg)} | {workers} simulated workers | {step} steps in "
             f"{wall:.1f} s | test acc {final.test_accuracy:.4f} | {stats.sync_rounds} sync rounds, "
             f"{_human_bytes(stats.bytes_sent)} sent per worker")
    return TrainResult(model=model, engine=engine, steps=step, wall_seconds=wall, final=final, stats=stats,
                       evals=evals)
