"""Checkpoint files written by W thread ranks (a faked communicator) and read back."""

from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.optimizer_state import make_inner_optimizer
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.algorithms.streaming import StreamingSync
from hpc_localsgd.comm import SingleCommunicator, ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig, OptimConfig
from hpc_localsgd.io.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, RankState, list_checkpoints
from hpc_localsgd.train.resume import restore


def rank_state(rank: int) -> RankState:
    return RankState(
        tensors={
            "same": torch.arange(6, dtype=torch.float32),
            "own": torch.full((3,), float(rank)),
            "half": (torch.arange(4) / 3 + rank).to(torch.bfloat16),
        },
        int_buffers={"bn.num_batches_tracked": torch.tensor(7 + rank)},
        comm_stats={"sync_rounds": 3, "bytes_sent": 120, "comm_seconds": 0.5 + rank},
        train_loss_sum=1.5 * rank,
        train_loss_count=4,
    )


def write(directory: Path, steps: list[int], keep: int = 3) -> None:
    shared = {"anchor0": (torch.arange(5) / 7).to(torch.bfloat16), "outer_momentum0": torch.ones(5)}

    def each(comm):
        writer = CheckpointWriter(directory, comm, keep=keep)
        for step in steps:
            writer.write(step, step / 10, {"config": "{}", "method": "test"}, shared, rank_state(comm.rank))

    ThreadGroup(2).run(each)


def test_round_trip_is_lossless_and_deduplicated(tmp_path: Path) -> None:
    write(tmp_path, [4])
    ckpt = Checkpoint(tmp_path / "step-000000004.h5")
    ckpt.verify()
    assert (ckpt.meta.step, ckpt.meta.world_size, ckpt.meta.epoch) == (4, 2, 0.4)
    for rank in range(2):
        got, want = ckpt.rank_state(rank), rank_state(rank)
        for name, tensor in want.tensors.items():
            assert got.tensors[name].dtype == tensor.dtype and torch.equal(got.tensors[name], tensor), name
        assert torch.equal(got.int_buffers["bn.num_batches_tracked"], want.int_buffers["bn.num_batches_tracked"])
        assert (got.comm_stats, got.train_loss_sum, got.train_loss_count) == (
            want.comm_stats,
            want.train_loss_sum,
            want.train_loss_count,
        )
    shared = ckpt.shared()
    assert shared["anchor0"].dtype == torch.bfloat16
    assert torch.equal(shared["anchor0"], (torch.arange(5) / 7).to(torch.bfloat16))
    with h5py.File(ckpt.path) as f:
        assert isinstance(f.get("ranks/1/state/same", getlink=True), h5py.SoftLink)
        assert isinstance(f.get("ranks/1/state/own", getlink=True), h5py.HardLink)


def test_read_goes_into_matching_live_tensors(tmp_path: Path) -> None:
    """A resume reads straight into the engine's memory where the saved tensor matches it (host,
    contiguous, same shape and dtype), and into fresh tensors otherwise; either way verified."""
    write(tmp_path, [4])
    path = tmp_path / "step-000000004.h5"
    live = {"same": torch.zeros(6), "half": torch.zeros(4, dtype=torch.bfloat16), "own": torch.zeros(3, 2)[:, 0]}
    live_shared = {
        "anchor0": torch.zeros(5, dtype=torch.bfloat16),
        "outer_momentum0": torch.zeros(5, dtype=torch.float64),
    }
    state, shared = Checkpoint(path).read(1, into=(live, live_shared))
    want = rank_state(1).tensors
    for name in ("same", "half"):  # a soft link to rank 0's dataset too
        assert state.tensors[name] is live[name] and torch.equal(live[name], want[name]), name
    assert state.tensors["own"] is not live["own"] and torch.equal(state.tensors["own"], want["own"])
    assert not live["own"].any()  # a strided view: not read into
    assert shared["anchor0"] is live_shared["anchor0"]
    assert torch.equal(shared["anchor0"], (torch.arange(5) / 7).to(torch.bfloat16))
    assert shared["outer_momentum0"].dtype == torch.float32 and not live_shared["outer_momentum0"].any()
    with h5py.File(path, "a") as f:
        f["ranks/1/state/half"][0] = 1234  # bfloat16 bits, the digest left as it was
    with pytest.raises(CheckpointError, match="half does not match its checksum"):
        Checkpoint(path).read(1, into=(live, live_shared))


def test_random_states_are_restored(tmp_path: Path) -> None:
    # One rank in this thread: torch's, numpy's and python's generators are process-wide.
    torch.manual_seed(100)
    np.random.seed(101)
    random.seed(102)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    CheckpointWriter(tmp_path, SingleCommunicator(), keep=1).write(1, 0.1, {"config": "{}"}, {}, rank_state(0))
    expected = (torch.rand(3), np.random.randn(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    Checkpoint(tmp_path / "step-000000001.h5").restore_rng(0)
    got = (torch.rand(3), np.random.randn(3), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_keep_prunes_old_checkpoints_and_points_to_latest(tmp_path: Path) -> None:
    write(tmp_path, [2, 4, 6, 8], keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000008.h5", "step-000000006.h5"]
    assert (tmp_path / "latest").read_text().strip() == "step-000000008.h5"
    assert not list(tmp_path.glob(".*tmp"))


def make_engine(cfg: AlgorithmConfig, inner: str = "sgd") -> tuple[torch.nn.Module, AveragingEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = make_inner_optimizer(model.parameters(), OptimConfig(name=inner), 0.1, [model[0].weight])
    return model, AveragingEngine(model, opt, SingleCommunicator(), cfg, SyncSchedule(cfg.sync_period, 0))


@pytest.mark.parametrize("inner", ["sgd", "adamw", "muon"])
@pytest.mark.parametrize("mode", ["average", "reset"])
def test_reshard_takes_the_mean_of_the_saved_ranks(tmp_path: Path, mode: str, inner: str) -> None:
    """Every state tensor of every inner optimizer (SGD's momentum; AdamW's moments and step counts; Muon's
    momentum and its AdamW part's state) comes back as the mean over the saved ranks, or, with ``reset``,
    the optimizer's state starts afresh: moments at zero and step counts at 0 (so that Adam's bias
    correction matches its zeroed moments)."""
    cfg = AlgorithmConfig(method="local_sgd", sync_period=4)
    model, engine = make_engine(cfg, inner)
    saved = {}

    def each(comm):
        # Step counts are whole numbers (kept as float32 by PyTorch): their mean over two ranks is exact there.
        mine = {
            name: t.clone() + (comm.rank + 1) * torch.arange(t.numel()).float() / (1 if "step" in name else 10)
            for name, t in engine.rank_state().items()
        }
        saved[comm.rank] = mine
        CheckpointWriter(tmp_path, comm, keep=1).write(
            8,
            1.0,
            {"config": "{}"},
            {},
            RankState(mine, {}, {"sync_rounds": 2, "bytes_sent": 8, "comm_seconds": 0.1}, 0.0, 0),
        )

    ThreadGroup(2).run(each)
    _, fresh = make_engine(cfg, inner)
    stats, loss_sum, loss_count = restore(Checkpoint(tmp_path / "step-000000008.h5"), fresh, model, 0, mode)
    live_state = fresh.rank_state()
    kinds = {name.rpartition(".")[2] for name in live_state}
    assert {"sgd": {"momentum"}, "adamw": {"exp_avg", "exp_avg_sq", "step"}}.get(
        inner, {"momentum", "exp_avg", "exp_avg_sq", "step"}
    ) <= kinds, kinds
    for name, live in live_state.items():
        mean = ((saved[0][name].double() + saved[1][name].double()) / 2).to(live.dtype)
        if fresh.is_optimizer_state(name) and mode == "reset":
            assert torch.count_nonzero(live) == 0, name
        else:
            assert torch.equal(live, mean), name
    assert stats["sync_rounds"] == 2 and (loss_sum, loss_count) == (0.0, 0)


def test_reshard_starts_error_feedback_at_zero(tmp_path: Path) -> None:
    """Error-feedback residuals are one rank's (of its shard, with worker groups: of unequal sizes): a
    re-shard neither averages them nor fails on their sizes; it starts them at zero."""
    cfg = AlgorithmConfig(method="local_sgd", sync_period=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = AveragingEngine(
        model, opt, SingleCommunicator(), cfg, SyncSchedule(4, 0), compression="int8", error_feedback=True
    )
    assert isinstance(engine.global_sync, StreamingSync) and set(engine.global_sync.rank_state()) == {"error0.0"}
    before = {name: t.clone() for name, t in engine.rank_state().items()}

    def each(comm):
        mine = {name: t.clone() + 1 for name, t in engine.rank_state().items()}
        mine["error0.0"] = torch.ones(5 + comm.rank)  # shards of unequal length
        CheckpointWriter(tmp_path, comm, keep=1).write(
            8,
            1.0,
            {"config": "{}"},
            {},
            RankState(mine, {}, {"sync_rounds": 0, "bytes_sent": 0, "comm_seconds": 0}, 0.0, 0),
        )

    ThreadGroup(2).run(each)
    restore(Checkpoint(tmp_path / "step-000000008.h5"), engine, model, 0, "average")
    live = engine.rank_state()
    assert torch.count_nonzero(live["error0.0"]) == 0
    assert torch.equal(live["flat0.params"], before["flat0.params"] + 1)  # the rest is the mean, as before


def test_format_version_1_files_with_blake2b_digests_are_still_read(tmp_path: Path) -> None:
    """Checkpoints written before the move to xxh3 (format version 1) load and are verified."""
    import hashlib

    write(tmp_path, [4])
    path = tmp_path / "step-000000004.h5"
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1
        datasets: list[h5py.Dataset] = []
        f.visititems(lambda _n, item: datasets.append(item) if isinstance(item, h5py.Dataset) else None)
        for dataset in datasets:
            raw = np.ascontiguousarray(dataset[()]).reshape(-1).view(np.uint8)
            del dataset.attrs["xxh3_64"]
            dataset.attrs["blake2b"] = hashlib.blake2b(raw, digest_size=8).hexdigest()
    ckpt = Checkpoint(path)
    ckpt.verify()
    assert torch.equal(ckpt.rank_state(1).tensors["own"], torch.full((3,), 1.0))
    with h5py.File(path, "a") as f:
        f["ranks/1/state/own"].attrs["blake2b"] = "0" * 16
    with pytest.raises(CheckpointError, match="own does not match its checksum"):
        Checkpoint(path).verify()
