"""Training on MPI ranks: what only ranks have, around the run every worker kind shares (``run.py``).

Every rank calls :func:`train`; rank 0 alone prints and writes metrics.h5. Beyond the shared run
this adds the run directory's protection, resume (``resume.py``), checkpoints and the job's
signals (``checkpointer.py``), the Slurm requeue after a SIGUSR1 stop, and the stall watchdog around the
collectives (``comm/watchdog.py``), whose stop marks metrics.h5 and requeues the job the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..algorithms.engine import AveragingEngine
from ..comm import make_communicator
from ..comm.agree import broadcast_text
from ..comm.base import Communicator, PeerLost
from ..comm.membership import RunCannotGoOn
from ..comm.watchdog import HEARTBEATS, Watchdog, watch_collectives
from ..config.load import config_to_yaml
from ..config.schema import RunConfig
from ..errors import UserError
from ..io.checkpoint import LATEST, Checkpoint, CheckpointError, list_checkpoints
from ..io.metrics import STALLED, MetricsWriter
from ..io.rundir import prepare_run_dir, write_text_atomically
from ..launcher.env import LaunchEnvironment, detect_launch, select_device, threads_for_rank
from .checkpointer import Checkpointer
from .control import requeue_slurm_job
from .data import derive_seed
from .ranks import DATA_SHARDS_ATTR, DataShard, RankWorkers, data_shard_of, elastic_settings, planned_groups
from .rejoin import join_run
from .resume import ChosenCheckpoint, choose_checkpoint, restore
from .run import (
    EvalResult,
    Optimization,
    Progress,
    TrainResult,
    build_optimization,
    describe_method,
    open_metrics,
    run_training,
    seed_everything,
    start_line,
)

__all__ = ["EvalResult", "TrainResult", "describe_method", "horovod_cycle_time_ms", "train"]


def _print_now(line: str) -> None:
    # Flushed at once: under srun or mpirun stdout is a pipe, and a job that is requeued or killed
    # must not lose its last lines in a buffer.
    print(line, flush=True)


def horovod_cycle_time_ms(cfg: RunConfig) -> float | None:
    """The configured cycle time, else None: the user's HOROVOD_CYCLE_TIME or Horovod's default, for
    every method. (Local methods once ran with 10 ms, when Horovod's idle polling took the local steps'
    CPU; since the backends let Open MPI yield on full nodes, the default is as fast for ResNet-50 at
    H = 16 and far faster for small models: docs/BENCHMARKS.md.)"""
    return cfg.comm.horovod_cycle_time_ms


def train(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    reshard: str | None = None,
    stop_at_step: int | None = None,
    launch: LaunchEnvironment | None = None,
    comm: Communicator | None = None,
    print_fn: Callable[[str], None] = _print_now,
    notices: Sequence[str] = (),
    rejoin: bool = False,
) -> TrainResult:
    """Run one training job on this rank. Every rank calls this with the same arguments (but ``rejoin``).

    ``resume``: "auto" (the newest valid checkpoint of the run dir, or a fresh start) or a
    checkpoint path. ``reshard``: "average" or "reset" to accept a checkpoint of another world
    size or algorithm. ``stop_at_step``: checkpoint and stop there, as a preempted job would. ``rejoin``:
    this process replaces a lost worker of the job running at MASTER_ADDR:MASTER_PORT (train/rejoin.py).
    """
    launch = launch or detect_launch()
    if launch.layout.rank == 0:
        for notice in notices:  # about the config (a key's former name): once per job
            print_fn(f"hpc-localsgd: note: {notice}")
    if cfg.comm.backend == "simulated":
        if resume is not None or reshard is not None or stop_at_step is not None:
            raise UserError(
                "comm.backend=simulated writes no checkpoints: --resume, --reshard and --stop-at-step do not apply"
            )
        from .simulate import simulate

        return simulate(cfg, launch, overwrite=overwrite, print_fn=print_fn)
    torch.set_num_threads(threads_for_rank(cfg.train.threads, launch.layout))
    device = select_device(cfg.train.device, launch.layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if comm is not None:
        return _train(cfg, comm, launch, device, overwrite, resume, reshard, stop_at_step, print_fn)
    if rejoin and (resume is not None or overwrite):
        raise UserError("--rejoin joins a running job, which has its run dir: drop --resume and --overwrite")
    own = make_communicator(
        cfg.comm.backend,
        launch,
        device,
        horovod_cycle_time_ms(cfg),
        **planned_groups(cfg, launch.layout),
        mpi_polling=cfg.comm.mpi_polling_choice,
        elastic=elastic_settings(cfg, launch.layout, rejoin),
        stall_warn_seconds=cfg.comm.stall_warn_seconds,
        stall_timeout_seconds=cfg.comm.stall_timeout_seconds,
    )
    if rejoin:
        result = _join_running_job(cfg, own, launch, device, stop_at_step, print_fn)
    else:
        result = _train(cfg, own, launch, device, overwrite, resume, reshard, stop_at_step, print_fn)
    # Closed on success only: after an error the other ranks may not reach the closing collective.
    own.close()
    return result


def _train(
    cfg: RunConfig,
    comm: Communicator,
    launch: LaunchEnvironment,
    device: torch.device,
    overwrite: bool,
    resume: str | None,
    reshard: str | None,
    stop_at_step: int | None,
    print_fn: Callable[[str], None],
) -> TrainResult:
    run_dir = Path(cfg.output.run_dir)
    prepare_run_dir(comm, run_dir, overwrite, resuming=resume is not None)
    watched = watch_collectives(
        comm, run_dir / HEARTBEATS, cfg.comm.stall_warn_seconds, cfg.comm.stall_timeout_seconds, print_fn
    )
    if watched is None:
        return _train_watched(cfg, comm, None, launch, device, resume, reshard, stop_at_step, print_fn)
    try:
        return _train_watched(cfg, watched, watched.watchdog, launch, device, resume, reshard, stop_at_step, print_fn)
    finally:
        watched.watchdog.stop()


def _train_watched(
    cfg: RunConfig,
    comm: Communicator,
    watchdog: Watchdog | None,
    launch: LaunchEnvironment,
    device: torch.device,
    resume: str | None,
    reshard: str | None,
    stop_at_step: int | None,
    print_fn: Callable[[str], None],
) -> TrainResult:
    """The run on ``comm``, which ``watchdog`` watches (None: a backend nothing watches)."""
    say = print_fn if comm.is_root else (lambda _line: None)
    run_dir = Path(cfg.output.run_dir)
    shard = _saved_data_shard(comm, resume, run_dir / "checkpoints", cfg) if comm.membership is not None else None
    workers = RankWorkers(cfg, comm, launch, device, shard)
    opt = _optimization(cfg, comm, workers)
    chosen = None
    if resume is not None:
        # The engine exists first so that the checkpoint is read straight into its live memory.
        chosen = choose_checkpoint(
            comm,
            resume,
            run_dir / "checkpoints",
            cfg.output.hdf5_file_locking,
            lambda line: say(f"hpc-localsgd: warning: {line}"),
            cfg,
            reshard,
            into=(opt.engine.rank_state(), opt.engine.shared_state()),
        )
    if comm.is_root:
        write_text_atomically(run_dir / "config.yaml", config_to_yaml(cfg))
    # From here on each rank draws its own random numbers (dropout, say): same seed, other stream.
    seed_everything(derive_seed(cfg.seed, "rank", comm.rank))
    progress = _restored_progress(chosen, opt.engine, workers.model, comm.rank, reshard)
    metrics = (
        _open_rank_metrics(cfg, workers, opt, progress.step if resume is not None else None) if comm.is_root else None
    )
    say(start_line(cfg, workers, opt))
    if metrics is not None and metrics.set_aside is not None:
        moved, reason = metrics.set_aside
        say(f"hpc-localsgd: warning: {metrics.path} is damaged ({reason}); moved to {moved}, a fresh one continues")
    if chosen is not None:
        say(
            f"hpc-localsgd: resuming from {chosen.checkpoint.path} at step {progress.step}"
            + (f" (re-shard: {reshard})" if reshard else "")
        )
    if chosen is not None and reshard is None and data_shard_of(chosen.checkpoint.meta.attrs, comm.rank) != shard:
        raise UserError(
            f"checkpoint '{chosen.checkpoint.path}' was written by other members than the newest one, whose data "
            "shards this run took; resume from it by its path (--resume PATH)"
        )
    del chosen  # the state read while choosing is in the engine now: let it go
    return _run_with_checkpoints(cfg, comm, workers, opt, progress, metrics, say, stop_at_step, watchdog, print_fn)


def _join_running_job(
    cfg: RunConfig,
    comm: Communicator,
    launch: LaunchEnvironment,
    device: torch.device,
    stop_at_step: int | None,
    print_fn: Callable[[str], None],
) -> TrainResult:
    """``--rejoin``: build this process's part as the lost rank whose id it was given (its data shard, the
    run's LR schedule), take rank 0's state at a global sync (train/rejoin.py), and train on as a member. The
    run directory, its config and metrics.h5 belong to the running job: nothing of them is touched."""
    workers = RankWorkers(cfg, comm, launch, device)  # of rank 0's shard until it knows whose place it takes
    opt = _optimization(cfg, comm, workers, broadcast_initial=False)
    membership = comm.membership
    assert membership is not None  # --rejoin makes an elastic communicator
    print_fn("hpc-localsgd: ready to replace a lost worker of the running job; waiting as a spare")
    identity = membership.become_spare()
    workers.read_shard(DataShard(identity, workers.data_shard.of))
    print_fn(f"hpc-localsgd: replacing rank {identity} of the running job; joining at its next global sync")
    step = join_run(comm, opt.engine, workers.model)
    seed_everything(derive_seed(cfg.seed, "rank", identity))
    print_fn(
        f"hpc-localsgd: rank {identity} joined at step {step} with rank 0's model, optimizer state and step; "
        f"{comm.size} workers train on"
    )
    # Rank 0 prints the run's progress; this process only what concerns it (its lines above, its errors).
    quiet: Callable[[str], None] = lambda _line: None  # noqa: E731
    return _run_with_checkpoints(cfg, comm, workers, opt, Progress(step=step), None, quiet, stop_at_step)


def _optimization(
    cfg: RunConfig, comm: Communicator, workers: RankWorkers, broadcast_initial: bool = True
) -> Optimization:
    """This rank's optimizer and engine, the LR scaled to the world the run started with (``broadcast_initial``:
    false for a replacement, which receives its state from the members)."""
    return build_optimization(
        cfg,
        workers.model,
        comm,
        workers.steps_per_epoch,
        workers.hierarchy,
        workers.faults,
        broadcast_initial=broadcast_initial,
        starting_ranks=workers.data_shard.of,
    )


def _run_with_checkpoints(
    cfg: RunConfig,
    comm: Communicator,
    workers: RankWorkers,
    opt: Optimization,
    progress: Progress,
    metrics: MetricsWriter | None,
    say: Callable[[str], None],
    stop_at_step: int | None,
    watchdog: Watchdog | None = None,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """The training loop with this rank's checkpoints and the job's signals, from ``progress`` to the end;
    ``watchdog`` (None: none watches this run) stops it on a stall, marking metrics.h5 and requeueing the job
    (``print_fn``: where the reporting rank says so)."""
    checkpointer = Checkpointer(
        cfg, comm, opt, progress, metrics, workers.steps_per_epoch, stop_at_step, workers.data_shard
    )
    if watchdog is not None:
        run_dir = Path(cfg.output.run_dir)
        watchdog.resume_hint = lambda: _resume_hint(run_dir / "checkpoints")
        watchdog.on_stall.append(lambda line: _on_stall(cfg, metrics, progress, line, print_fn))
    try:
        result = run_training(cfg, workers, opt, progress, metrics, say, checkpointer.after_step)
    except PeerLost as lost:
        raise _lost_outside_agreement(comm, lost, progress.step) from None
    finally:
        checkpointer.close()
    result.checkpoint = checkpointer.last
    if result.stopped:
        say(
            f"hpc-localsgd: stopped at step {result.steps}/{opt.total_steps} ({result.stopped}); checkpoint "
            f"{checkpointer.last}; continue with --resume auto"
        )
        if comm.is_root and result.stopped == "SIGUSR1" and cfg.checkpoint.requeue_on_usr1:
            requeue_slurm_job(say)
    return result


def _saved_data_shard(comm: Communicator, resume: str | None, directory: Path, cfg: RunConfig) -> DataShard | None:
    """Where members may leave: the data shard this rank reads on resuming from a checkpoint written after they
    changed (the newest one for ``auto``), so that the survivors read on what they read; None elsewhere, also
    where that checkpoint has another world size (a re-shard gives every rank a fresh shard of the new world)."""
    if resume is None:
        return None

    def saved() -> str:
        path = Path(resume) if resume != "auto" else next(iter(list_checkpoints(directory)), None)
        try:
            value = Checkpoint(path, cfg.output.hdf5_file_locking).meta.attrs.get(DATA_SHARDS_ATTR) if path else None
        except (CheckpointError, OSError):
            return ""  # choosing the checkpoint says what is wrong with it
        return value if isinstance(value, str) else json.dumps(value) if value is not None else ""

    text = broadcast_text(comm, saved() if comm.is_root else None)
    if not text or len(json.loads(text)["ids"]) != comm.size:
        return None
    return data_shard_of({DATA_SHARDS_ATTR: text}, comm.rank)


def _lost_outside_agreement(comm: Communicator, lost: PeerLost, step: int) -> UserError:
    """A member was lost in a collective that is not redone among the survivors (the sync, the job's poll,
    evaluation, checkpoints and gradient averages are; what is left is rare: the start, a divergence's report):
    this process learns with the survivors whether its worker is dropped (``WorkerDropped``); if it is not, the
    run cannot go on here, and every survivor says so alike."""
    membership = comm.membership
    assert membership is not None  # only elastic communicators lose members
    membership.recover(lost)  # raises WorkerDropped where this rank's worker lost a rank
    error = RunCannotGoOn(
        f"a worker was lost at step {step} in a collective the survivors cannot redo ({lost}); resume from the "
        "latest checkpoint"
    )
    error.same_on_every_rank = True  # every survivor stops alike: rank 0, which always survives, says it
    return error


def _resume_hint(directory: Path) -> str:
    """The end of the stall's error line: which checkpoint stays the latest, and how to go on from it."""
    latest = directory / LATEST
    if latest.is_file():
        return f"; {latest.read_text().strip()} stays the latest checkpoint: continue with --resume auto"
    return "; there is no checkpoint yet: --resume auto starts the run afresh"


def _on_stall(
    cfg: RunConfig, metrics: MetricsWriter | None, progress: Progress, line: str, say: Callable[[str], None]
) -> None:
    """What the rank that reports a stall does before every rank exits (the stall watchdog's thread runs it,
    while this rank's main thread waits in the collective): rank 0 marks metrics.h5 stopped, and the job is
    requeued as after a SIGUSR1, to resume from the latest checkpoint."""
    if metrics is not None:
        metrics.mark_stopped(STALLED, progress.step, line)
    if cfg.checkpoint.requeue_on_usr1 and os.environ.get("SLURM_JOB_ID"):
        requeue_slurm_job(say)


def _open_rank_metrics(
    cfg: RunConfig, workers: RankWorkers, opt: Optimization, resume_after_step: int | None
) -> MetricsWriter:
    """Rank 0's metrics.h5. Resuming without a checkpoint (stopped before the first one) starts it
    afresh. A failed append does not stop rank 0 alone (the others would wait for it in their next
    collective): the checkpointer's poll stops every rank on it."""
    metrics = open_metrics(cfg, workers, opt, resume_after_step=resume_after_step)
    metrics.defer_failures = True
    return metrics


def _restored_progress(
    chosen: ChosenCheckpoint | None, engine: AveragingEngine, model: torch.nn.Module, rank: int, reshard: str | None
) -> Progress:
    """Load the chosen checkpoint (if any) into the engine and the model; where training stands then."""
    if chosen is None:
        return Progress()
    checkpoint = chosen.checkpoint
    saved_stats, loss_sum, loss_count = restore(chosen, engine, model, rank, reshard)
    engine.stats.load(saved_stats)
    return Progress(
        step=checkpoint.meta.step,
        train_loss_sum=loss_sum,
        train_loss_count=loss_count,
        wall_offset=float(checkpoint.meta.attrs.get("wall_seconds", 0.0)),
    )
