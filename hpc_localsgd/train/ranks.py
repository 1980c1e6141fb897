"""An MPI rank as one local-SGD worker: its model, its shard of the data, and evaluation across ranks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..algorithms.engine import AveragingEngine
from ..algorithms.hierarchy import Hierarchy, hierarchy_from_config
from ..comm import ElasticSettings
from ..comm.base import Communicator
from ..comm.membership import run_agreed
from ..config.schema import RunConfig
from ..errors import ConfigError, UserError
from ..launcher.env import LaunchEnvironment, WorldLayout, host_id, ranks_per_node, threads_for_rank
from ..launcher.faults import FaultPlan
from .data import ShardedBatches, build_datasets, eval_batches
from .device import check_precision, compiled_forward, loader_workers, to_device, use_channels_last
from .models import build_model
from .run import Batch, EvalResult, correct_predictions, cross_entropy, language_of, seed_everything


@dataclass(frozen=True)
class DataShard:
    """The part of the training data a rank reads: ``index`` of ``of`` equal shards. ``of`` also sets the global
    batch the LR is scaled to: the starting world's, whoever is left."""

    index: int
    of: int


def data_shard_of(attrs: Mapping[str, Any], rank: int) -> DataShard | None:
    """The shard rank ``rank`` of a resumed run reads, from its checkpoint's attributes (``DATA_SHARDS_ATTR``),
    where workers left or joined before it was written; None where the membership was the starting one."""
    saved = attrs.get(DATA_SHARDS_ATTR)
    if saved is None:
        return None
    shards = json.loads(saved) if isinstance(saved, str) else saved
    return DataShard(int(shards["ids"][rank]), int(shards["of"]))


# A checkpoint attribute (JSON): {"ids": [the shard each rank reads, by rank], "of": the starting world's size},
# written once the members changed (comm/elastic.py), so that a resumed run reads what the survivors read.
DATA_SHARDS_ATTR = "data_shards"


class RankWorkers:
    """This rank's part of a run (the :class:`~.run.Workers` of MPI ranks)."""

    unit = "rank"

    def __init__(
        self,
        cfg: RunConfig,
        comm: Communicator,
        launch: LaunchEnvironment,
        device: torch.device,
        shard: DataShard | None = None,
    ) -> None:
        """``shard``: which part of the training data this rank reads, of how many (default: its rank, of the
        world's size). A run that lost workers and resumes keeps each survivor on the shard it had, out of the
        starting world's (``data_shard_of``)."""
        self.cfg, self.comm, self.device = cfg, comm, device
        self.data_shard = shard or DataShard(comm.rank, comm.size)
        check_precision(cfg.train.precision, device)
        self.faults = FaultPlan.from_env(launch.layout.rank)  # read first: a bad plan is bad input
        # Same seed on every rank: identical initial models (broadcast anyway by the engine).
        seed_everything(cfg.seed)
        self.datasets = build_datasets(cfg.data, cfg.seed, seq_len=cfg.model.gpt.seq_len)
        self.language = language_of(self.datasets)
        self.devices = comm.size if device.type == "cuda" else 1
        self.model = build_model(cfg.model, self.datasets.num_classes, self.datasets.input_shape).to(device)
        # Compiled lazily, at the first step: after the engine has moved the weights into its flat buffer.
        self.forward_model = compiled_forward(self.model, device) if cfg.train.compile else self.model
        self.channels_last = use_channels_last(cfg, self.model, device)
        self.loader_workers = loader_workers(cfg, threads_for_rank(cfg.train.threads, launch.layout))
        self.read_shard(self.data_shard)
        self.steps_per_epoch = self.shard.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise UserError(
                f"data: {self.shard.num_samples} training samples are too few for {comm.size} ranks "
                f"× data.batch_size {cfg.data.batch_size}"
            )
        layout = launch.layout
        self.hierarchy = agreed_hierarchy(cfg, comm)
        layouts = ["channels-last"] * self.channels_last + ["compiled"] * cfg.train.compile
        self.description = (
            f"{comm.size} rank(s) on {layout.num_nodes} node(s), {comm.name} backend "
            f"({comm.collective_path(device)}), {', '.join([str(device), *layouts])}"
        )
        self.world: dict[str, Any] = {
            "size": comm.size,
            "nodes": layout.num_nodes,
            "ranks_per_node": layout.local_size,
            "launcher": launch.launcher,
            "backend": comm.name,
            "device": str(device),
            "collectives": comm.collective_path(device),
        }

    def read_shard(self, shard: DataShard) -> None:
        """Read ``shard`` of the training data from now on (a replacement takes the shard of the rank it
        replaces once it knows which; every shard has the same number of batches)."""
        self.data_shard = shard
        self.shard = ShardedBatches(
            self.datasets.train,
            self.cfg.data.batch_size,
            shard.index,
            shard.of,
            self.cfg.seed,
            num_workers=self.loader_workers,
            augment=self.cfg.data.augment,
            pin_memory=self.device.type == "cuda",
        )

    def batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        for x, y in self.shard.epoch(epoch, start_batch=start_batch):
            yield to_device(x, self.device, self.channels_last), to_device(y, self.device, False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_model(x)
        return out, cross_entropy(out, y)

    def step_figures(self, outputs: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        return loss.item(), correct_predictions(outputs, y), y.numel()

    def evaluate(self, engine: AveragingEngine, train_loss_sum: float, train_loss_count: int) -> EvalResult:
        """Loss and accuracy of the globally averaged model on the whole test set (each rank takes
        a disjoint part), plus the mean training loss of all ranks since the last evaluation. Where members
        may leave, one lost meanwhile makes the survivors evaluate again among themselves."""
        return run_agreed(self.comm, lambda: self._evaluate(engine, train_loss_sum, train_loss_count), lambda: None)

    def _evaluate(self, engine: AveragingEngine, train_loss_sum: float, train_loss_count: int) -> EvalResult:
        comm, device = self.comm, self.device
        sums = torch.zeros(5, dtype=torch.float64)
        with engine.averaged_model() as model:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                for x, y in eval_batches(
                    self.datasets.test,
                    self.cfg.data.eval_batch_size,
                    comm.rank,
                    comm.size,
                    self.loader_workers,
                    pin_memory=device.type == "cuda",
                    limit=self.cfg.data.eval_samples,
                ):
                    x, y = to_device(x, device, self.channels_last), to_device(y, device, False)
                    out = model(x)
                    sums[0] += cross_entropy(out, y, reduction="sum").item()
                    sums[1] += correct_predictions(out, y)
                    sums[2] += y.numel()
            model.train(was_training)
        sums[3], sums[4] = train_loss_sum, train_loss_count
        if comm.size > 1:
            with engine.eval_stats.timed():
                comm.allreduce_(sums, average=False)
            engine.eval_stats.bytes_sent += sums.numel() * sums.element_size()
        test_count = max(sums[2].item(), 1.0)
        return EvalResult(
            test_loss=sums[0].item() / test_count,
            test_accuracy=sums[1].item() / test_count,
            train_loss=sums[3].item() / max(sums[4].item(), 1.0),
        )


def _uses_node(cfg: RunConfig) -> bool:
    a = cfg.algorithm
    return "node" in [a.ranks_per_worker, *(level.ranks for level in a.levels)]


def agreed_hierarchy(cfg: RunConfig, comm: Communicator) -> Hierarchy:
    """The worker groups and levels of ``cfg.algorithm`` in this world, the same on every rank.

    ``node`` is found from where the ranks really run: every rank contributes its host's id to one
    small allreduce, so every rank sees the same placement and takes the same decision (a bad
    placement ends every rank with the same line).
    """
    if not _uses_node(cfg):
        return hierarchy_from_config(cfg.algorithm, comm.size, None)
    hosts = torch.zeros(comm.size, dtype=torch.int64)
    hosts[comm.rank] = host_id()
    comm.allreduce_(hosts, average=False)
    try:
        nodes = ranks_per_node(hosts.tolist())
    except UserError as error:
        raise ConfigError(f"algorithm.ranks_per_worker: 'node': {error}") from None
    return hierarchy_from_config(cfg.algorithm, comm.size, nodes)


def planned_groups(cfg: RunConfig, layout: WorldLayout) -> dict[str, list[int]]:
    """The communicators this run's hierarchy splits the world into, as ``make_communicator``'s
    ``group_sizes`` (blocks of consecutive ranks: workers, levels) and ``across_sizes`` (rank j of
    every worker, for the sharded global average), for backends that must know them before they
    start (Horovod registers its process sets at init). Empty when the hierarchy is not valid here:
    the run then stops with the reason, on every rank, once the communicator exists."""
    try:
        # The launcher's count of ranks on this node; agreed_hierarchy checks it once ranks can talk.
        hierarchy = hierarchy_from_config(cfg.algorithm, layout.size, layout.local_size if _uses_node(cfg) else None)
    except UserError:
        return {"group_sizes": [], "across_sizes": []}
    workers = hierarchy.ranks_per_worker
    blocks = {workers, *(level.ranks for level in hierarchy.levels)} - {1, layout.size}
    return {"group_sizes": sorted(blocks), "across_sizes": [workers] if 1 < workers < layout.size else []}


def elastic_settings(cfg: RunConfig, layout: WorldLayout, rejoin: bool = False) -> ElasticSettings | None:
    """What an elastic communicator needs (``comm.on_worker_loss: continue``), or None (``stop``). ``rejoin``:
    this process replaces a lost worker of a running job."""
    if cfg.comm.on_worker_loss != "continue":
        if rejoin:
            raise ConfigError("comm.on_worker_loss: --rejoin needs continue (the running job's setting)")
        return None
    try:
        workers = hierarchy_from_config(cfg.algorithm, layout.size, layout.local_size).ranks_per_worker
    except UserError:
        workers = 1  # the hierarchy's own check says what is wrong, once ranks can talk
    return ElasticSettings(cfg.comm.worker_timeout_seconds, workers, rejoin)


def merged_groups(plans: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """The communicators several runs on one communicator need (test drivers run many cases)."""
    return {key: sorted({size for plan in plans for size in plan[key]}) for key in ("group_sizes", "across_sizes")}
