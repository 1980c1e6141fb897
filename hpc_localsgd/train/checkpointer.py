"""When MPI ranks checkpoint, and what goes in: the one owner of the "save now?" decision.

After every step the :class:`Checkpointer` combines the job's requests (signals, the checkpoint
clock; ``control.py``), the configured cadence (``checkpoint.every_steps``, ``at_end``) and
``--stop-at-step``, and writes one checkpoint when any of them asks; it never writes a model that is
NaN or inf (a replica can break between two syncs), and stops every rank when rank 0's metrics.h5
could not be appended. What a checkpoint holds is
asked of the components that own it (the engine's flat state and counters, the run's progress),
so the training loop and the benchmark never assemble it by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..algorithms.engine import AveragingEngine
from ..comm.base import Communicator
from ..comm.membership import run_agreed
from ..comm.watchdog import CHECKPOINT_WRITE
from ..config.load import config_to_yaml
from ..config.schema import RunConfig
from ..errors import TrainingDiverged, WriteFailed
from ..io.checkpoint import CheckpointWriter, RankState
from ..io.metrics import DIVERGED, MetricsWriter
from ..launcher.env import software_versions
from .control import JobControl
from .ranks import DATA_SHARDS_ATTR, DataShard
from .run import Optimization, Progress, describe_method


def rank_state(engine: AveragingEngine, progress: Progress | None = None) -> RankState:
    """This rank's resumable state: the engine's flat state, the model's integer buffers (BatchNorm's
    batch counters), the communication counters and the training-loss accumulators."""
    progress = progress or Progress()
    return RankState(
        tensors=engine.rank_state(),
        int_buffers=engine.int_buffers(),
        comm_stats=engine.stats.as_dict(),
        train_loss_sum=progress.train_loss_sum,
        train_loss_count=progress.train_loss_count,
    )


class Checkpointer:
    def __init__(
        self,
        cfg: RunConfig,
        comm: Communicator,
        opt: Optimization,
        progress: Progress,
        metrics: MetricsWriter | None,
        steps_per_epoch: int,
        stop_at_step: int | None,
        data_shard: DataShard | None = None,
    ) -> None:
        """``data_shard``: the part of the data this rank reads; where members may leave, every checkpoint records
        each rank's, so that a resumed run reads what the survivors read."""
        self.cfg, self.comm, self.opt, self.progress, self.metrics = cfg, comm, opt, progress, metrics
        self.data_shard = data_shard
        self.steps_per_epoch = steps_per_epoch
        self.stop_at_step = stop_at_step
        self.writer = CheckpointWriter(
            Path(cfg.output.run_dir) / "checkpoints", comm, cfg.checkpoint.keep, cfg.output.hdf5_file_locking
        )
        self.control = JobControl(comm, cfg.checkpoint.poll_every_steps, cfg.checkpoint.every_minutes)
        self.last: Path | None = None  # the newest checkpoint this run wrote

    def after_step(self, step: int) -> str | None:
        """Checkpoint if anything asks for one after ``step`` completed steps; say why to stop, if so.
        Every rank calls it after every step (it may run a collective)."""
        decision = self.control.poll(step, self.metrics.failure if self.metrics is not None else None)
        if decision.write_failure is not None:
            raise WriteFailed(decision.write_failure)
        policy = self.cfg.checkpoint
        stop_reason = (decision.stop_signal or "a signal on another rank") if decision.stop else None
        if step == self.stop_at_step:
            stop_reason = stop_reason or f"--stop-at-step {self.stop_at_step}"
        if (
            decision.checkpoint
            or stop_reason
            or (policy.every_steps and step % policy.every_steps == 0)
            or (step == self.opt.total_steps and policy.at_end)
        ):
            self.last = self.save(step)
        return stop_reason

    def save(self, step: int) -> Path:
        self.comm.note_phase(CHECKPOINT_WRITE, step)
        if self.metrics is not None:
            self.metrics.flush()  # rows up to this step must survive a crash that follows
        # Where members may leave, a checkpoint that a lost member left unfinished is written again by the
        # survivors, for the world they now form (its file is rewritten from the start).
        path = run_agreed(self.comm, lambda: self._write(step), lambda: None)
        self.control.checkpoint_written()
        return path

    def _write(self, step: int) -> Path:
        self._refuse_non_finite(step)
        cfg, engine = self.cfg, self.opt.engine
        attrs: dict[str, Any] = {
            "config": config_to_yaml(cfg),
            "method": describe_method(cfg),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.opt.total_steps,
            "wall_seconds": self.progress.wall_seconds(),
            "world": {"size": self.comm.size, "nodes": self.comm.layout.num_nodes, "backend": self.comm.name},
            "versions": software_versions(),
        }
        if self.comm.membership is not None and self.data_shard is not None:
            attrs[DATA_SHARDS_ATTR] = {"ids": self._shard_ids(), "of": self.data_shard.of}
        return self.writer.write(
            step, step / self.steps_per_epoch, attrs, engine.shared_state(), rank_state(engine, self.progress)
        )

    def _shard_ids(self) -> list[int]:
        """Every rank's data shard, by rank (one small allreduce)."""
        assert self.data_shard is not None
        ids = torch.zeros(self.comm.size, dtype=torch.int64)
        ids[self.comm.rank] = self.data_shard.index
        self.comm.allreduce_(ids, average=False)
        return [int(i) for i in ids.tolist()]

    def _refuse_non_finite(self, step: int) -> None:
        """Stop every rank, writing nothing, when any rank's state is NaN or inf. Between two syncs a
        replica can break unseen (the run's own check waits for the next sync, where every rank sees
        the same model), so each rank checks its own state here and the ranks compare (one small
        allreduce per checkpoint)."""
        finite = all(
            bool(torch.isfinite(t.sum(dtype=torch.float64)).item())
            for t in self.opt.engine.rank_state().values()
            if t.is_floating_point()
        )
        broken = torch.zeros(self.comm.size, dtype=torch.int64)
        broken[self.comm.rank] = int(not finite)
        if self.comm.size > 1:
            self.comm.allreduce_(broken, average=False)
        if not broken.any():
            return
        ranks = broken.nonzero().flatten().tolist()
        named = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(str(r) for r in ranks)}"
        line = (
            f"training diverged by step {step}: the model of {named} is NaN or inf; its checkpoint was not "
            "written (lower the learning rate, or resume from an earlier checkpoint)"
        )
        if self.metrics is not None:
            self.metrics.mark_stopped(DIVERGED, step, line)
        raise TrainingDiverged(line)

    def close(self) -> None:
        self.control.close()
