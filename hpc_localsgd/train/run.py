"""What every training run shares, whether its workers are MPI ranks or simulated in one process.

A run is: the optimisation set-up (inner optimizer, LR schedule, sync schedule, averaging engine), then a
loop of ``engine.train_step`` calls with the same per-step bookkeeping (metrics row, progress
line, evaluation cadence, evaluation row), then one summary line. What really differs between
the two kinds of run sits behind :class:`Workers`: how the model(s) and batches are built, the
loss that backward sees, and evaluation. ``ranks.py`` and ``simulate.py`` implement it;
``loop.py`` adds what only MPI ranks have (resume, checkpoints, signals, requeue).
"""

from __future__ import annotations

import functools
import math
import platform
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..algorithms.accounting import CommStats, human_bytes
from ..algorithms.engine import AveragingEngine, StepResult
from ..algorithms.hierarchy import Hierarchy
from ..algorithms.optimizer_state import make_inner_optimizer
from ..algorithms.schedule import SyncSchedule
from ..comm.base import Communicator
from ..comm.watchdog import DATA_LOADING, END_OF_RUN, EVALUATION, JOB_CONTROL, TRAINING_STEP
from ..config.load import config_to_yaml
from ..config.schema import OUTER_METHODS, RunConfig
from ..errors import TrainingDiverged
from ..io.metrics import (
    DIVERGED,
    EMULATED_LINK_ATTR,
    LANGUAGE_ATTR,
    METRICS_FILE,
    TOTAL_STEPS_ATTR,
    MetricsWriter,
    membership_line,
)
from ..launcher.env import emulated_link_rate, software_versions, spare_cores
from ..launcher.faults import NO_FAULTS, FaultPlan
from .data import Datasets
from .device import peak_flops
from .gpt import flops_per_token
from .lr import LRSchedule
from .models import hidden_matrix_names
from .rejoin import admit_replacements
from .replicas import ReplicatedModel

Batch = tuple[torch.Tensor, torch.Tensor]
# Called after each completed step with the number of completed steps; returns why the run must
# stop there (a signal, say), or None to go on.
AfterStep = Callable[[int], str | None]


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
    final: EvalResult | None  # None when the run stopped early (signal or --stop-at-step)
    stats: CommStats
    evals: list[EvalResult] = field(default_factory=list)
    stopped: str | None = None
    checkpoint: Path | None = None


class Workers(Protocol):
    """The workers of a run as this process sees them: what differs between MPI ranks and a simulation."""

    steps_per_epoch: int
    description: str  # where the workers run, for the start-up line
    unit: str  # what communication is counted per: "rank" or "simulated worker"
    world: dict[str, Any]  # metrics.h5's ``world`` attribute
    hierarchy: Hierarchy  # worker groups and levels (flat: every rank a worker)
    language: dict[str, Any] | None  # metrics.h5's ``language`` attribute (language_of); None for classifiers
    cfg: RunConfig
    device: torch.device  # where the model trains
    devices: int  # how many of them the workers use together (ranks: one each; a simulation: one)

    @property
    def comm(self) -> Communicator:
        """The collectives the engine averages through."""

    @property
    def model(self) -> torch.nn.Module:
        """What the optimizer and the engine hold."""

    def batches(self, epoch: int, start_batch: int) -> Iterable[Batch]:
        """This process's batches of ``epoch`` from ``start_batch`` on, on the training device."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, the loss backward differentiates)."""

    def step_figures(self, outputs: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(mean training loss of the step, correct predictions, samples) as rank 0 reports them."""

    def evaluate(self, engine: AveragingEngine, train_loss_sum: float, train_loss_count: int) -> EvalResult:
        """The averaged model on the whole test set, and the workers' mean training loss since the last call."""


@dataclass
class Optimization:
    """How a run optimizes: its length, LR schedule, inner optimizer and averaging engine."""

    total_steps: int
    global_batch: int
    lr_schedule: LRSchedule
    optimizer: torch.optim.Optimizer
    engine: AveragingEngine


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predictions along the last dimension, whatever comes before it: a classifier's
    [batch, classes] against [batch], a language model's [batch, positions, vocab] against [batch,
    positions] (every position predicts the next token), with a leading workers dimension when stacked."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction=reduction)


def correct_predictions(outputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Top-1 hits along the last dimension: classes for a classifier, next tokens for a language model."""
    return int((outputs.argmax(-1) == targets).sum().item())


def language_of(datasets: Datasets) -> dict[str, Any] | None:
    """What metrics.h5's ``language`` attribute records of a language-model run (None for a classifier):
    tokens per sample (the window), bytes per token (1 for byte-level text, unknown for token files) and
    the corpus read (its digest tells two runs' texts apart; its unigram entropy is the loss of a model
    that learned only token frequencies)."""
    if datasets.corpus is None:
        return None
    return {
        "tokens_per_sample": datasets.input_shape[0],
        "bytes_per_token": datasets.corpus["bytes_per_token"],
        "corpus": datasets.corpus,
    }


def loss_figures(loss: float, language: dict[str, Any] | None) -> str:
    """A language model's validation loss in nats per token, with bits per byte (byte-level text) or
    perplexity (token files, whose bytes per token are unknown): lower is better."""
    per_byte = None if language is None else language["bytes_per_token"]
    scale = (
        f"{loss / math.log(2) / per_byte:.4f} bits/byte" if per_byte else f"perplexity {math.exp(min(loss, 700.0)):.2f}"
    )
    return f"val loss {loss:.4f} | {scale}"


def eval_figures(result: EvalResult, language: dict[str, Any] | None) -> str:
    """How an evaluation line gives the result: loss and accuracy for a classifier; for a language model
    :func:`loss_figures` and the next-token accuracy."""
    if language is None:
        return f"test loss {result.test_loss:.4f} | test acc {result.test_accuracy:.4f}"
    return f"{loss_figures(result.test_loss, language)} | next-token acc {result.test_accuracy:.4f}"


def final_figures(result: EvalResult, workers: Workers, samples_per_s: float) -> str:
    """The summary line's result: test accuracy for a classifier; for a language model
    :func:`loss_figures`, the tokens per second of every worker together and, on a GPU, the model
    FLOPs utilisation."""
    if workers.language is None:
        return f"test acc {result.test_accuracy:.4f}"
    tokens_per_s = samples_per_s * workers.language["tokens_per_sample"]
    return f"{loss_figures(result.test_loss, workers.language)} | {tokens_per_s:.0f} tokens/s" + utilisation(
        workers, tokens_per_s
    )


def utilisation(workers: Workers, tokens_per_s: float) -> str:
    """`` | MFU ...`` of the summary line on a GPU (:func:`utilisation_text`); empty off GPUs."""
    if workers.device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(workers.device)
    per_token = flops_per_token(workers.cfg.model.gpt)
    return utilisation_text(per_token * tokens_per_s / workers.devices, name, workers.cfg.train.precision)


def utilisation_text(flops_per_device: float, device_name: str, precision: str) -> str:
    """`` | MFU x% of <device>'s <peak> TFLOPS <precision> peak``: model FLOPs per second per device (6·N +
    attention per token, :func:`.gpt.flops_per_token`, times tokens/s) over the device's dense peak for the
    run's precision; it says so when the device is not in the package's table."""
    peak = peak_flops(device_name, precision)
    if peak is None:
        return f" | MFU unknown (no {precision} peak known for {device_name})"
    return f" | MFU {100 * flops_per_device / peak:.1f}% of {device_name}'s {peak / 1e12:.0f} TFLOPS {precision} peak"


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters Muon steps, of a rank's model or of simulated workers' stacked one."""
    if isinstance(model, ReplicatedModel):
        return [model.stacked_parameter(name) for name in hidden_matrix_names(model.base)]
    params = dict(model.named_parameters())
    return [params[name] for name in hidden_matrix_names(model)]


def build_optimization(
    cfg: RunConfig,
    model: torch.nn.Module,
    comm: Communicator,
    steps_per_epoch: int,
    hierarchy: Hierarchy,
    faults: FaultPlan = NO_FAULTS,
    broadcast_initial: bool = True,
    starting_ranks: int | None = None,
) -> Optimization:
    """The inner optimizer and the averaging engine for ``model`` (every worker starting from worker 0's state),
    the LR scaled to the global batch of ``comm.size`` workers. ``faults``: what this rank is to suffer on
    purpose (launcher/faults.py). ``broadcast_initial``: false for a replacement (train/rejoin.py), which
    receives its state from the members instead. ``starting_ranks``: the world the LR is scaled to, where it
    is not ``comm.size`` (a run resumed after it lost workers keeps the LR of the world it started with)."""
    total_steps = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = cfg.data.batch_size * (starting_ranks or comm.size)
    lr_schedule = LRSchedule.from_config(cfg.optim, global_batch, steps_per_epoch, total_steps)
    optimizer = make_inner_optimizer(model.parameters(), cfg.optim, lr_schedule.peak, hidden_matrices(model))
    schedule = SyncSchedule.from_config(cfg.algorithm, steps_per_epoch, lr_schedule.first_decay_step, total_steps)
    engine = AveragingEngine(
        model,
        optimizer,
        comm,
        cfg.algorithm,
        schedule,
        bucket_bytes=int(cfg.comm.bucket_mb * 2**20),
        hierarchy=hierarchy,
        precision=cfg.train.precision,
        compression=cfg.comm.sync_compression,
        error_feedback=cfg.comm.uses_error_feedback,
        gradient_compression=cfg.comm.gradient_compression,
        sync_thread=cfg.comm.uses_sync_thread(spare_cores(torch.get_num_threads(), comm.layout)),
        clip_grad_norm=cfg.optim.clip_grad_norm,
        faults=faults,
    )
    if broadcast_initial:
        engine.broadcast_initial_state()
    return Optimization(total_steps, global_batch, lr_schedule, optimizer, engine)


@dataclass
class Progress:
    """Where training stands, beyond the engine's state: what a checkpoint saves and a resume restores."""

    step: int = 0  # completed steps
    train_loss_sum: float = 0.0  # since the last evaluation
    train_loss_count: int = 0
    wall_offset: float = 0.0  # seconds trained by the runs this one resumes
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        return self.wall_offset + time.perf_counter() - self.started


@dataclass
class ProgressWindow:
    """Rank 0's training figures since the last progress line."""

    seconds: float = 0.0
    comm_seconds: float = 0.0
    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    global_samples: int = 0
    # A language model's throughput is counted in tokens: samples (windows) × tokens per window.
    tokens_per_sample: int | None = None

    def add(
        self, seconds: float, comm_seconds: float, loss: float, correct: int, samples: int, global_samples: int
    ) -> None:
        self.seconds += seconds
        self.comm_seconds += comm_seconds
        self.loss_sum += loss * samples
        self.correct += correct
        self.samples += samples
        self.global_samples += global_samples

    def summary(self) -> str:
        samples, seconds = max(1, self.samples), max(self.seconds, 1e-9)
        if self.tokens_per_sample is None:
            hits, rate = "acc", f"{self.global_samples / seconds:.0f} samples/s"
        else:
            hits, rate = "next-token acc", f"{self.global_samples * self.tokens_per_sample / seconds:.0f} tokens/s"
        return (
            f"loss {self.loss_sum / samples:.4f} | {hits} {self.correct / samples:.3f} | "
            f"{rate} | comm {100 * self.comm_seconds / seconds:.0f}%"
        )


class DivergenceWatch:
    """Stops a run whose model became non-finite, on every worker at the same step.

    The verdict is the engine's (:meth:`AveragingEngine.model_finite`): taken where every rank holds
    the same parameters, so every rank reaches it alike without a collective, within one sync of
    the first NaN (one step in the synchronous phase). Each worker also notes the first step since
    the last verdict at which its own loss was non-finite, to name it: only on the diverged path,
    which every rank takes together, does one small allreduce gather those notes. fp16's skipped
    steps (a non-finite loss, a finite model) are not divergence.
    """

    def __init__(self, comm: Communicator, unit: str) -> None:
        self.comm, self.unit = comm, unit
        # Per worker this process trains (several with the simulated backend): 1 + the first step
        # since the last verdict with a non-finite loss; 0: none.
        self.first_bad_loss = torch.zeros(comm.replicas, dtype=torch.int64)

    def check(
        self, engine: AveragingEngine, step: int, done: StepResult, loss: float, metrics: MetricsWriter | None
    ) -> None:
        """After completed step ``step`` (1-based), with the loss rank 0 logs: raise
        :class:`TrainingDiverged` on every rank once the model is non-finite."""
        if not math.isfinite(loss):
            bad = torch.ones(self.comm.replicas, dtype=torch.bool)
            if self.comm.replicas > 1:  # stacked workers: those whose outputs are not finite
                per_worker = ~torch.isfinite(done.outputs.detach().reshape(self.comm.replicas, -1)).all(1).cpu()
                bad = per_worker if per_worker.any() else bad
            self.first_bad_loss[bad & (self.first_bad_loss == 0)] = step
        verdict = engine.model_finite(step - 1, done.synced)
        if verdict is None:
            return
        if verdict:
            self.first_bad_loss.zero_()
            return
        line = self._message(step)
        if metrics is not None:
            metrics.mark_stopped(DIVERGED, step, line)
        raise TrainingDiverged(line)

    def _message(self, step: int) -> str:
        seen = self.first_bad_loss
        if self.comm.replicas == 1 and self.comm.size > 1:
            seen = torch.zeros(self.comm.size, dtype=torch.int64)
            seen[self.comm.rank] = self.first_bad_loss[0]
            self.comm.allreduce_(seen, average=False)
        named = [f"{self.unit} {index} at step {int(first)}" for index, first in enumerate(seen.tolist()) if first]
        who = f"non-finite loss on {', '.join(named)}" if named else "every worker's loss was finite"
        return (
            f"training diverged at step {step}: the model is NaN or inf ({who}); no checkpoint of it was written "
            "(lower the learning rate, or resume from an earlier checkpoint)"
        )


# How the start-up line and all-reduce's name give each inner optimizer (optim.name).
INNER_NAMES = {"sgd": "SGD", "adamw": "AdamW", "muon": "Muon (matrices) + AdamW"}


def describe_method(cfg: RunConfig) -> str:
    a = cfg.algorithm
    name = {
        "allreduce": f"all-reduce {INNER_NAMES[cfg.optim.name]}",
        "local_sgd": f"local SGD H={a.sync_period}",
        "post_local_sgd": f"post-local SGD H={a.sync_period}",
    }[a.method]
    name += OUTER_METHODS[a.outer].describe(a)
    if a.outer_every > 1 and a.outer != "none":
        name += f" every {a.outer_every} averages"
    if a.ranks_per_worker != 1 and a.method != "allreduce":
        name += f", workers of {'a node' if a.ranks_per_worker == 'node' else f'{a.ranks_per_worker} ranks'}"
    for level in a.levels:
        name += f", groups of {'a node' if level.ranks == 'node' else level.ranks} every {level.sync_period}"
    if a.fragments > 1:
        name += f", {a.fragments} fragments"
    if a.sync_delay > 0:
        name += f", syncs overlapped with {a.sync_delay} step(s)" + (f" (mix {a.sync_mix:g})" if a.sync_mix else "")
    if cfg.comm.sync_compression != "none":
        feedback = "with" if cfg.comm.uses_error_feedback else "without"
        name += f", {cfg.comm.sync_compression} syncs {feedback} error feedback"
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def counters(stats: CommStats, hierarchy: Hierarchy) -> dict[str, int]:
    """The communication counters of a metrics row: totals, and per level of the hierarchy."""
    row = {"bytes_sent": stats.bytes_sent, "sync_rounds": stats.sync_rounds}
    for level in hierarchy.level_names():
        row[f"{level}_bytes_sent"] = stats.bytes_by_level.get(level, 0)
        row[f"{level}_sync_rounds"] = stats.rounds_by_level.get(level, 0)
    return row


def traffic_summary(stats: CommStats, hierarchy: Hierarchy, unit: str) -> str:
    """``N sync rounds, X sent per rank``, and per level when ranks form workers or levels."""
    text = f"{stats.sync_rounds} sync rounds, {human_bytes(stats.bytes_sent)} sent per {unit}"
    if hierarchy.is_flat:
        return text
    parts = [
        f"{level} {stats.rounds_by_level.get(level, 0)} rounds, {human_bytes(stats.bytes_by_level.get(level, 0))}"
        for level in reversed(hierarchy.level_names())
    ]
    return f"{text} ({'; '.join(parts)})"


def open_metrics(
    cfg: RunConfig, workers: Workers, opt: Optimization, resume_after_step: int | None = None
) -> MetricsWriter:
    """The run's ``metrics.h5`` with its header; ``resume_after_step`` continues an existing file."""
    world = {**workers.world, "threads_per_rank": torch.get_num_threads(), "host": platform.node()}
    attrs: dict[str, Any] = {
        "config": config_to_yaml(cfg),
        "world": world,
        "versions": software_versions(),
        "method": describe_method(cfg),
        "steps_per_epoch": workers.steps_per_epoch,
        TOTAL_STEPS_ATTR: opt.total_steps,
        "global_batch": opt.global_batch,
    }
    if workers.language is not None:
        attrs[LANGUAGE_ATTR] = workers.language
    link = emulated_link_rate()
    if link is not None:  # started by launcher/slownet.py: its step times are a measurement on that link
        attrs[EMULATED_LINK_ATTR] = link
    return MetricsWriter(
        Path(cfg.output.run_dir) / METRICS_FILE,
        attrs,
        cfg.output.metrics_flush_seconds,
        locking=cfg.output.hdf5_file_locking,
        resume_after_step=resume_after_step,
        levels=opt.engine.hierarchy.level_names(),
    )


def corpus_summary(language: dict[str, Any] | None) -> str:
    """`` (source, size, unigram entropy)`` of a language run's corpus for the start-up line: the loss a
    model that learned only token frequencies would reach, against which the validation loss reads."""
    if language is None:
        return ""
    corpus = language["corpus"]
    entropy = corpus.get("unigram_entropy")
    return f" ({corpus['source']}, {human_bytes(corpus['bytes'])}" + (
        f", unigram entropy {entropy:.3f} nats/token)" if entropy is not None else ")"
    )


def start_line(cfg: RunConfig, workers: Workers, opt: Optimization) -> str:
    beside = ""
    if opt.engine.uses_sync_thread:
        beside = ", sync thread beside the step"
    elif cfg.comm.sync_thread is True:  # asked for, and not possible here: say why
        beside = f", no sync thread ({opt.engine.no_sync_thread_because})"
    return (
        f"hpc-localsgd: {describe_method(cfg)}{beside} | {workers.description}, {cfg.train.precision} | "
        f"{cfg.model.name} on {cfg.data.name}{corpus_summary(workers.language)} | "
        f"global batch {opt.global_batch}, {INNER_NAMES[cfg.optim.name]} at peak lr {opt.lr_schedule.peak:.4g} | "
        f"{opt.total_steps} steps "
        f"({workers.steps_per_epoch}/epoch) | run dir {cfg.output.run_dir}"
    )


def run_training(
    cfg: RunConfig,
    workers: Workers,
    opt: Optimization,
    progress: Progress,
    metrics: MetricsWriter | None,
    say: Callable[[str], None],
    after_step: AfterStep | None = None,
) -> TrainResult:
    """Train from ``progress.step`` to the end (or until ``after_step`` says stop), then evaluate and
    summarise. Closes ``metrics`` and the engine's hooks, also on error."""
    engine = opt.engine
    progress.started, first_step = time.perf_counter(), progress.step
    try:
        evals, stopped = _step_loop(cfg, workers, opt, progress, metrics, say, after_step)
        workers.comm.note_phase(END_OF_RUN, progress.step)
        engine.drain()  # a delayed sync whose step never came: started by every rank, so completed by every rank
    finally:
        if metrics is not None:
            metrics.close()
        engine.close()
    wall = time.perf_counter() - progress.started
    result = TrainResult(
        model=workers.model,
        engine=engine,
        steps=progress.step,
        wall_seconds=wall,
        final=None,
        stats=engine.stats,
        evals=evals,
        stopped=stopped,
    )
    if stopped:
        return result
    result.final = evals[-1] if evals else workers.evaluate(engine, progress.train_loss_sum, progress.train_loss_count)
    stats = engine.stats
    samples_per_s = (progress.step - first_step) * opt.global_batch / max(wall, 1e-9)
    say(
        f"hpc-localsgd: done | {describe_method(cfg)} | {workers.comm.size} {workers.unit}s | {progress.step} steps "
        f"in {wall:.1f} s | {final_figures(result.final, workers, samples_per_s)} | "
        f"{traffic_summary(stats, engine.hierarchy, workers.unit)} | "
        f"comm {100 * stats.comm_seconds / max(wall, 1e-9):.0f}% of time"
        + (f" | {engine.skipped_steps} fp16 step(s) skipped on overflow" if engine.scaler is not None else "")
    )
    return result


def _step_loop(
    cfg: RunConfig,
    workers: Workers,
    opt: Optimization,
    progress: Progress,
    metrics: MetricsWriter | None,
    say: Callable[[str], None],
    after_step: AfterStep | None,
) -> tuple[list[EvalResult], str | None]:
    """The steps themselves; returns the evaluations made and why the run stopped early, if it did."""
    engine, stats, total, comm = opt.engine, opt.engine.stats, opt.total_steps, workers.comm
    steps_per_epoch = workers.steps_per_epoch
    eval_interval = cfg.train.eval_every_steps or max(1, int(round(cfg.train.eval_every_epochs * steps_per_epoch)))
    evals: list[EvalResult] = []
    tokens_per_sample = None if workers.language is None else int(workers.language["tokens_per_sample"])
    window, watch = ProgressWindow(tokens_per_sample=tokens_per_sample), DivergenceWatch(workers.comm, workers.unit)
    first_epoch = progress.step // steps_per_epoch
    workers.model.train()
    for epoch in range(first_epoch, math.ceil(total / steps_per_epoch)):
        # Step time runs from the end of the previous step, so data loading counts as compute.
        step_start = time.perf_counter()
        first_batch = progress.step % steps_per_epoch if epoch == first_epoch else 0
        comm.note_phase(DATA_LOADING, progress.step)
        for x, y in workers.batches(epoch, first_batch):
            if progress.step >= total:
                break
            comm.note_phase(TRAINING_STEP, progress.step)
            comm_before = stats.comm_seconds
            lr = opt.lr_schedule.at(progress.step)
            done = engine.train_step(progress.step, lr, functools.partial(workers.forward, x, y))
            progress.step += 1
            loss, correct, samples = workers.step_figures(done.outputs, done.loss, y)
            progress.train_loss_sum += loss
            progress.train_loss_count += 1
            if metrics is not None:
                elapsed = time.perf_counter() - step_start
                comm_seconds = stats.comm_seconds - comm_before
                metrics.log_step(
                    step=progress.step,
                    epoch=progress.step / steps_per_epoch,
                    lr=lr,
                    loss=loss,
                    accuracy=correct / samples,
                    samples_per_s=opt.global_batch / elapsed,
                    comm_seconds=comm_seconds,
                    compute_seconds=elapsed - comm_seconds,
                    synced=int(done.synced),
                    **counters(stats, engine.hierarchy),
                )
                if done.synced and engine.last_sync is not None:
                    metrics.log_sync(step=progress.step, **engine.last_sync.as_row())
                window.add(elapsed, comm_seconds, loss, correct, samples, opt.global_batch)
                if progress.step % cfg.train.log_every_steps == 0 or progress.step == total:
                    say(
                        f"step {progress.step}/{total} | epoch {progress.step / steps_per_epoch:.2f} | lr {lr:.4g} | "
                        f"{window.summary()}"
                    )
                    window = ProgressWindow(tokens_per_sample=tokens_per_sample)
            watch.check(engine, progress.step, done, loss, metrics)  # before evaluating or checkpointing it
            if progress.step % eval_interval == 0 or progress.step == total:
                evals.append(_evaluate(workers, engine, progress, metrics, say))
            comm.note_phase(JOB_CONTROL, progress.step)
            stop = after_step(progress.step) if after_step is not None else None
            if done.synced and progress.step < total and not stop:  # replacements join at a global sync
                admit_replacements(workers.comm, engine, progress.step)
            _record_membership_changes(workers, progress.step, metrics, say)
            comm.note_phase(DATA_LOADING, progress.step)  # the next batch's, unless the run ends here
            engine.faults.reached("step", progress.step)
            if stop and progress.step < total:
                return evals, stop
            step_start = time.perf_counter()
        if progress.step >= total:
            break
    return evals, None


def _record_membership_changes(
    workers: Workers, step: int, metrics: MetricsWriter | None, say: Callable[[str], None]
) -> None:
    """Record in metrics.h5 and print (rank 0) each membership change the communicator agreed on during this
    step (comm/elastic.py)."""
    membership = workers.comm.membership
    if membership is None or not membership.changes:
        return
    for change in membership.changes:
        description = change.description()
        if metrics is not None:
            metrics.log_membership(
                step=step,
                workers_before=change.workers_before,
                workers_after=change.workers_after,
                left=len(change.left_workers),
                joined=len(change.joined_workers),
                recovery_seconds=change.recovery_seconds,
                description=description,
            )
        say(membership_line(step, change.workers_before, change.workers_after, change.recovery_seconds, description))
    membership.changes.clear()


def _evaluate(
    workers: Workers,
    engine: AveragingEngine,
    progress: Progress,
    metrics: MetricsWriter | None,
    say: Callable[[str], None],
) -> EvalResult:
    workers.comm.note_phase(EVALUATION, progress.step)
    result = workers.evaluate(engine, progress.train_loss_sum, progress.train_loss_count)
    progress.train_loss_sum, progress.train_loss_count = 0.0, 0
    step, epoch, stats = progress.step, progress.step / workers.steps_per_epoch, engine.stats
    if metrics is not None:
        metrics.log_eval(
            step=step,
            epoch=epoch,
            train_loss=result.train_loss,
            test_loss=result.test_loss,
            test_accuracy=result.test_accuracy,
            wall_seconds=progress.wall_seconds(),
            comm_seconds=stats.comm_seconds,
            **counters(stats, engine.hierarchy),
        )
    say(
        f"eval step {step} | epoch {epoch:.2f} | train loss {result.train_loss:.4f} | "
        f"{eval_figures(result, workers.language)}"
    )
    return result
