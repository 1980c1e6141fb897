"""The training loop: model, data, LR and progress around the averaging engine.

Every rank runs this function; rank 0 alone prints and writes metrics.h5.
"""
from __future__ import annotations

import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..algorithms.accounting import CommStats
from ..algorithms.engine import AveragingEngine, local_start_step
from ..algorithms.schedule import SyncSchedule
from ..comm import make_communicator
from ..comm.base import Communicator
from ..config.load import config_to_yaml
from ..config.schema import RunConfig
from ..errors import UserError
from ..io.checkpoint import CheckpointWriter, RankState
from ..io.metrics import MetricsWriter
from ..io.rundir import prepare_run_dir, write_text_atomically
from ..launcher.env import (LaunchEnvironment, detect_launch, select_device, software_versions,
                             threads_for_rank)
from .control import JobControl, requeue_slurm_job
from .data import ShardedBatches, build_datasets, derive_seed, eval_batches
from .lr import LRSchedule
from .models import build_model
from .resume import choose_checkpoint, restore


@dataclass
class EvalResult:
    test_loss: float
    test_accuracy: float
    train_loss: float


@dataclass
class TrainResult:
    model: torch.nn.Module
    engine: AveragingEngine
    steps: int
    wall_seconds: float
    final: Optional[EvalResult]  # None when the run stopped early (signal or --stop-at-step)
    stats: CommStats
    evals: list[EvalResult] = field(default_factory=list)
    stopped: Optional[str] = None
    checkpoint: Optional[Path] = None


@dataclass
class _ProgressWindow:
    """Rank 0's training figures since the last progress line."""

    seconds: float = 0.0
    comm_seconds: float = 0.0
    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0

    def add(self, seconds: float, comm_seconds: float, loss: float, correct: int, samples: int) -> None:
        self.seconds += seconds
        self.comm_seconds += comm_seconds
        self.loss_sum += loss * samples
        self.correct += correct
        self.samples += samples

    def summary(self, world_size: int) -> str:
        samples, seconds = max(1, self.samples), max(self.seconds, 1e-9)
        return (f"loss {self.loss_sum / samples:.4f} | acc {self.correct / samples:.3f} | "
                f"{samples * world_size / seconds:.0f} samples/s | comm {100 * self.comm_seconds / seconds:.0f}%")


def describe_method(cfg: RunConfig) -> str:
    a = cfg.algorithm
    name = {"allreduce": "all-reduce SGD", "local_sgd": f"local SGD H={a.sync_period}",
            "post_local_sgd": f"post-local SGD H={a.sync_period}"}[a.method]
    if a.outer == "slowmo":
        name += f" + SlowMo (α={a.slow_lr:g}, β={a.slow_momentum:g})"
    elif a.outer == "nesterov":
        name += f" + outer Nesterov (η={a.outer_lr:g}, μ={a.outer_momentum:g})"
    return name


def _print_now(line: str) -> None:
    # Flushed at once: under srun or mpirun stdout is a pipe, and a job that is requeued or killed
    # must not lose its last lines in a buffer.
    print(line, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class Optimization:
    """How a run optimizes: its length, LR schedule, SGD and averaging engine."""

    total_steps: int
    global_batch: int
    lr_schedule: LRSchedule
    optimizer: torch.optim.SGD
    engine: AveragingEngine


def build_optimization(cfg: RunConfig, model: torch.nn.Module, comm: Communicator,
                       steps_per_epoch: int) -> Optimization:
    """SGD and the averaging engine for ``model`` (every worker starting from worker 0's state),
    the LR scaled to the global batch of ``comm.size`` workers. Shared by MPI ranks and simulations."""
    total_steps = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = cfg.data.batch_size * comm.size
    lr_schedule = LRSchedule.from_config(cfg.optim, global_batch, steps_per_epoch, total_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_schedule.peak, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    schedule = SyncSchedule(cfg.algorithm.sync_period,
                            local_start_step(cfg.algorithm, steps_per_epoch, lr_schedule.first_decay_step))
    engine = AveragingEngine(model, optimizer, comm, cfg.algorithm, schedule,
                             bucket_bytes=int(cfg.comm.bucket_mb * 2**20))
    engine.broadcast_initial_state()
    return Optimization(total_steps, global_batch, lr_schedule, optimizer, engine)


def sgd_step(engine: AveragingEngine, optimizer: torch.optim.Optimizer, step: int, lr: float,
             forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Step ``step`` (0-based) in the engine's protocol (see algorithms/engine.py). ``forward``
    returns (outputs, loss); returns them and whether the model was averaged after the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    engine.begin_step(step)
    optimizer.zero_grad(set_to_none=True)
    out, loss = forward()
    loss.backward()
    engine.finish_gradients()
    optimizer.step()
    return out, loss, engine.end_step(step + 1, lr)


def _logits_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out, F.cross_entropy(out, y)


def evaluate(engine: AveragingEngine, datasets_test, cfg: RunConfig, device: torch.device,
             train_loss_sum: float, train_loss_count: int) -> EvalResult:
    """Loss and accuracy of the globally averaged model on the whole test set (each rank takes
    a disjoint part), plus the mean training loss of all ranks since the last evaluation."""
    comm = engine.comm
    sums = torch.zeros(5, dtype=torch.float64)
    with engine.averaged_model() as model:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for x, y in eval_batches(datasets_test, cfg.data.eval_batch_size, comm.rank, comm.size,
                                     cfg.data.num_workers):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                sums[0] += F.cross_entropy(out, y, reduction="sum").item()
                sums[1] += (out.argmax(1) == y).sum().item()
                sums[2] += y.numel()
        model.train(was_training)
    sums[3], sums[4] = train_loss_sum, train_loss_count
    if comm.size > 1:
        with engine.eval_stats.timed():
            comm.allreduce_(sums, average=False)
        engine.eval_stats.bytes_sent += sums.numel() * sums.element_size()
    test_count = max(sums[2].item(), 1.0)
    return EvalResult(test_loss=sums[0].item() / test_count, test_accuracy=sums[1].item() / test_count,
                      train_loss=sums[3].item() / max(sums[4].item(), 1.0))


# Horovod's cycle for local and post-local SGD: its background thread busy-polls MPI once per cycle
# even when no collective is pending, which under local SGD takes CPU from the local steps
# (H = 16 reached 0.67 of the no-communication limit at 1 ms, 0.94 at 10 ms; docs/BENCHMARKS.md).
LOCAL_SGD_HOROVOD_CYCLE_TIME_MS = 10.0


def horovod_cycle_time_ms(cfg: RunConfig) -> Optional[float]:
    """The configured cycle time; else the user's HOROVOD_CYCLE_TIME or Horovod's default for
    all-reduce SGD (a gradient allreduce every step wants a short cycle), and a longer one for
    the local methods (one sync per H steps waits at most one extra cycle)."""
    if cfg.comm.horovod_cycle_time_ms is not None:
        return cfg.comm.horovod_cycle_time_ms
    if "HOROVOD_CYCLE_TIME" in os.environ or cfg.algorithm.method == "allreduce":
        return None
    return LOCAL_SGD_HOROVOD_CYCLE_TIME_MS


def train(cfg: RunConfig, *, overwrite: bool = False, resume: Optional[str] = None, reshard: Optional[str] = None,
          stop_at_step: Optional[int] = None, launch: Optional[LaunchEnvironment] = None,
          comm: Optional[Communicator] = None, print_fn: Callable[[str], None] = _print_now) -> TrainResult:
    """Run one training job on this rank. Every rank calls this with the same arguments.

    ``resume``: "auto" (the newest valid checkpoint of the run dir, or a fresh start) or a
    checkpoint path. ``reshard``: "average" or "reset" to accept a checkpoint of another world
    size or algorithm. ``stop_at_step``: checkpoint and stop there, as a preempted job would.
    """
    launch = launch or detect_launch()
    if cfg.comm.backend == "simulated":
        if resume is not None or reshard is not None or stop_at_step is not None:
            raise UserError("comm.backend=simulated writes no checkpoints: --resume, --reshard and --stop-at-step "
                            "do not apply")
        from .simulate import simulate
        return simulate(cfg, launch, overwrite=overwrite, print_fn=print_fn)
    torch.set_num_threads(threads_for_rank(cfg.train.threads, launch.layout))
    device = select_device(cfg.train.device, launch.layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if comm is not None:
        return _train(cfg, comm, launch, device, overwrite, resume, reshard, stop_at_step, print_fn)
    own = make_communicator(cfg.comm.backend, launch, device, horovod_cycle_time_ms(cfg))
    result = _train(cfg, own, launch, device, overwrite, resume, reshard, stop_at_step, print_fn)
    # Closed on success only: after an error the other ranks may not reach the closing collective.
    own.close()
    return result


def _train(cfg: RunConfig, comm: Communicator, launch: LaunchEnvironment, device: torch.device, overwrite: bool,
           resume: Optional[str], reshard: Optional[str], stop_at_step: Optional[int],
           print_fn: Callable[[str], None]) -> TrainResult:
    rank, size = comm.rank, comm.size
    say = print_fn if comm.is_root else (lambda _msg: None)

    run_dir = Path(cfg.output.run_dir)
    locking = cfg.output.hdf5_file_locking
    prepare_run_dir(comm, run_dir, overwrite, resuming=resume is not None)
    chosen = None
    if resume is not None:
        chosen = choose_checkpoint(comm, resume, run_dir / "checkpoints", locking,
                                   lambda line: say(f"hpc-localsgd: warning: {line}"), cfg, reshard)
    checkpoint = chosen.checkpoint if chosen is not None else None
    if comm.is_root:
        write_text_atomically(run_dir / "config.yaml", config_to_yaml(cfg))

    # Same seed on every rank: identical initial models (broadcast anyway by the engine).
    _seed_everything(cfg.seed)
    datasets = build_datasets(cfg.data, cfg.seed)
    model = build_model(cfg.model, datasets.num_classes, datasets.input_shape).to(device)
    batches = ShardedBatches(datasets.train, cfg.data.batch_size, rank, size, cfg.seed,
                             num_workers=cfg.data.num_workers, augment=cfg.data.augment)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch < 1:
        raise UserError(f"data: {len(datasets.train)} training samples are too few for {size} ranks "
                        f"× data.batch_size {cfg.data.batch_size}")
    optimization = build_optimization(cfg, model, comm, steps_per_epoch)
    total_steps, global_batch = optimization.total_steps, optimization.global_batch
    lr_schedule, optimizer, engine = optimization.lr_schedule, optimization.optimizer, optimization.engine
    # From here on each rank draws its own random numbers (dropout, say): same seed, other stream.
    _seed_everything(derive_seed(cfg.seed, "rank", rank))
    start_step, wall_offset = 0, 0.0
    train_loss_sum, train_loss_count = 0.0, 0
    if chosen is not None and checkpoint is not None:
        saved_stats, train_loss_sum, train_loss_count = restore(chosen, engine, model, rank, reshard)
        chosen = None  # the state read while choosing is in the engine now: let it go
        engine.stats.load(saved_stats)
        start_step = checkpoint.meta.step
        wall_offset = float(checkpoint.meta.attrs.get("wall_seconds", 0.0))
    writer = CheckpointWriter(run_dir / "checkpoints", comm, cfg.checkpoint.keep, locking)
    control = JobControl(comm, cfg.checkpoint.poll_every_steps, cfg.checkpoint.every_minutes)

    metrics: Optional[MetricsWriter] = None
    if comm.is_root:
        world = {"size": size, "nodes": launch.layout.num_nodes, "ranks_per_node": launch.layout.local_size,
                 "launcher": launch.launcher, "backend": comm.name, "device": str(device),
                 "threads_per_rank": torch.get_num_threads(), "host": platform.node()}
        versions = software_versions()
        metrics = MetricsWriter(run_dir / "metrics.h5",
                                {"config": config_to_yaml(cfg), "world": world, "versions": versions,
                                 "method": describe_method(cfg), "steps_per_epoch": steps_per_epoch,
                                 "total_steps": total_steps, "global_batch": global_batch},
                                cfg.output.metrics_flush_seconds, locking=locking,
                                # Resuming without a checkpoint (stopped before the first one) starts afresh.
                                resume_after_step=start_step if resume is not None else None)
    say(f"hpc-localsgd: {describe_method(cfg)} | {size} rank(s) on {launch.layout.num_nodes} node(s), "
        f"{comm.name} backend, {device} | {cfg.model.name} on {cfg.data.name} | global batch {global_batch}, "
        f"peak lr {lr_schedule.peak:.4g} | {total_steps} steps ({steps_per_epoch}/epoch) | run dir {run_dir}")
    if checkpoint is not None:
        say(f"hpc-localsgd: resuming from {checkpoint.path} at step {start_step}"
            + (f" (re-shard: {reshard})" if reshard else ""))

    def save_checkpoint(step: int) -> Path:
        if metrics is not None:
            metrics.flush()  # rows up to this step must survive a crash that follows
        path = writer.write(
            step, step / steps_per_epoch,
            {"config": config_to_yaml(cfg), "method": describe_method(cfg), "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps, "wall_seconds": wall_offset + time.perf_counter() - start,
             "world": {"size": size, "nodes": launch.layout.num_nodes, "backend": comm.name},
             "versions": software_versions()},
            engine.shared_state(),
            RankState(tensors=engine.rank_state(),
                      int_buffers={n: b for n, b in model.named_buffers() if not b.is_floating_point()},
                      comm_stats=stats.as_dict(), train_loss_sum=train_loss_sum, train_loss_count=train_loss_count))
        control.checkpoint_written()
        return path

    eval_interval = max(1, int(round(cfg.train.eval_every_epochs * steps_per_epoch)))
    stats = engine.stats
    evals: list[EvalResult] = []
    window = _ProgressWindow()
    start = time.perf_counter()
    step = start_step
    stopped: Optional[str] = None
    last_checkpoint: Optional[Path] = None
    model.train()
    try:
        for epoch in range(start_step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            # Step time runs from the end of the previous step, so data loading counts as compute.
            step_start = time.perf_counter()
            first_batch = start_step % steps_per_epoch if epoch == start_step // steps_per_epoch else 0
            for x, y in batches.epoch(epoch, start_batch=first_batch):
                if step >= total_steps:
                    break
                comm_before = stats.comm_seconds
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lr = lr_schedule.at(step)
                out, loss, synced = sgd_step(engine, optimizer, step, lr, lambda: _logits_and_loss(model, x, y))
                step += 1

                loss_value = loss.item()
                correct = (out.argmax(1) == y).sum().item()
                elapsed = time.perf_counter() - step_start
                comm_seconds = stats.comm_seconds - comm_before
                train_loss_sum += loss_value
                train_loss_count += 1
                if metrics is not None:
                    metrics.log_step(step=step, epoch=step / steps_per_epoch, lr=lr, loss=loss_value,
                                     accuracy=correct / y.numel(), samples_per_s=global_batch / elapsed,
                                     comm_seconds=comm_seconds, compute_seconds=elapsed - comm_seconds,
                                     bytes_sent=stats.bytes_sent, sync_rounds=stats.sync_rounds, synced=int(synced))
                    window.add(elapsed, comm_seconds, loss_value, correct, y.numel())
                    if step % cfg.train.log_every_steps == 0 or step == total_steps:
                        say(f"step {step}/{total_steps} | epoch {step / steps_per_epoch:.2f} | lr {lr:.4g} | "
                            f"{window.summary(size)}")
                        window = _ProgressWindow()

                if step % eval_interval == 0 or step == total_steps:
                    result = evaluate(engine, datasets.test, cfg, device, train_loss_sum, train_loss_count)
                    train_loss_sum, train_loss_count = 0.0, 0
                    evals.append(result)
                    if metrics is not None:
                        metrics.log_eval(step=step, epoch=step / steps_per_epoch, train_loss=result.train_loss,
                                         test_loss=result.test_loss, test_accuracy=result.test_accuracy,
                                         wall_seconds=wall_offset + time.perf_counter() - start,
                                         comm_seconds=stats.comm_seconds,
                                         bytes_sent=stats.bytes_sent, sync_rounds=stats.sync_rounds)
                    say(f"eval step {step} | epoch {step / steps_per_epoch:.2f} | train loss {result.train_loss:.4f} | "
                        f"test loss {result.test_loss:.4f} | test acc {result.test_accuracy:.4f}")

                decision = control.poll(step)
                every = cfg.checkpoint.every_steps
                if step == stop_at_step:
                    decision.checkpoint = decision.stop = True
                    decision.stop_signal = decision.stop_signal or f"--stop-at-step {stop_at_step}"
                if decision.checkpoint or (every and step % every == 0) or \
                        (step == total_steps and cfg.checkpoint.at_end):
                    last_checkpoint = save_checkpoint(step)
                if decision.stop and step < total_steps:
                    stopped = decision.stop_signal
                    break
                step_start = time.perf_counter()
            if step >= total_steps or stopped:
                break
    finally:
        if metrics is not None:
            metrics.close()
        engine.close()
        control.close()

    if stopped:
        say(f"hpc-localsgd: stopped at step {step}/{total_steps} ({stopped}); checkpoint {last_checkpoint}; "
            "continue with --resume auto")
        if comm.is_root and stopped == "SIGUSR1" and cfg.checkpoint.requeue_on_usr1:
            say(requeue_slurm_job())
        return TrainResult(model=model, engine=engine, steps=step, wall_seconds=time.perf_counter() - start,
                           final=None, stats=stats, evals=evals, stopped=stopped, checkpoint=last_checkpoint)

    wall = time.perf_counter() - start
    final = evals[-1] if evals else evaluate(engine, datasets.test, cfg, device, train_loss_sum, train_loss_count)
    comm_share = 100 * stats.comm_seconds / max(wall, 1e-9)
    say(f"hpc-localsgd: done | {describe_method(cfg)} | {size} ranks | {step} steps in {wall:.1f} s | "
        f"test acc {final.test_accuracy:.4f} | {stats.sync_rounds} sync rounds, "
        f"{_human_bytes(stats.bytes_sent)} sent per rank | comm {comm_share:.0f}% of time")
    return TrainResult(model=model, engine=engine, steps=step, wall_seconds=wall, final=final, stats=stats,
                       evals=evals, checkpoint=last_checkpoint)
