"""Every inner optimizer the registry knows keeps all its state through a checkpoint: each tensor of
``optimizer.state_dict()`` is written to a real HDF5 checkpoint and read back bit for bit. An optimizer
whose state is not fully registered fails here instead of silently losing state; one that is not
registered at all is refused when the engine is built."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.muon import MuonWithAdamW
from hpc_localsgd.algorithms.optimizer_state import OPTIMIZER_STATES, make_inner_optimizer
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm import SingleCommunicator
from hpc_localsgd.config.schema import AlgorithmConfig, OptimConfig
from hpc_localsgd.io.checkpoint import Checkpoint, CheckpointWriter, RankState
from hpc_localsgd.train.resume import restore
from hpc_localsgd.train.run import hidden_matrices

# How the test builds each registered optimizer, with every setting that makes it keep state. A new entry in
# OPTIMIZER_STATES needs one here (the first test says so).
BUILD: dict[type[torch.optim.Optimizer], Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    torch.optim.SGD: lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    torch.optim.AdamW: lambda model: torch.optim.AdamW(
        model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1
    ),
    MuonWithAdamW: lambda model: make_inner_optimizer(
        model.parameters(), OptimConfig(name="muon"), 1e-2, hidden_matrices(model)
    ),
}
STEPS = 3


def test_every_registered_optimizer_is_tested() -> None:
    assert set(BUILD) == set(OPTIMIZER_STATES)


def make(kind: type[torch.optim.Optimizer], cfg: AlgorithmConfig) -> tuple[torch.nn.Module, AveragingEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    engine = AveragingEngine(model, BUILD[kind](model), SingleCommunicator(), cfg, SyncSchedule(4, 0))
    return model, engine


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor (and number) of ``optimizer.state_dict()``'s per-parameter state, by parameter and key."""
    found = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            found[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return found


@pytest.mark.parametrize("kind", list(OPTIMIZER_STATES), ids=lambda kind: kind.__name__)
def test_all_optimizer_state_reaches_a_checkpoint_and_comes_back(tmp_path: Path, kind) -> None:
    cfg = AlgorithmConfig(method="local_sgd", sync_period=4)
    model, engine = make(kind, cfg)
    g = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        engine.train_step(step, 0.1, functools.partial(lambda x, y: (out := model(x), F.cross_entropy(out, y)), x, y))
    want = state_tensors(engine.optimizer)
    assert want, "the optimizer kept no state: the test would prove nothing"
    stats = {"sync_rounds": 0, "bytes_sent": 0, "comm_seconds": 0.0}
    state = RankState(engine.rank_state(), engine.int_buffers(), stats, 0.0, 0)
    CheckpointWriter(tmp_path, SingleCommunicator(), keep=1).write(
        STEPS, 1.0, {"config": "{}"}, engine.shared_state(), state
    )

    fresh_model, fresh = make(kind, cfg)
    restore(Checkpoint(tmp_path / f"step-{STEPS:09d}.h5"), fresh, fresh_model, 0, None)
    got = state_tensors(fresh.optimizer)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_an_unregistered_optimizer_is_refused_in_one_line() -> None:
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(
        ValueError, match=r"^inner optimizer Adam has no registered state \(known: AdamW, MuonWithAdamW, SGD\)"
    ) as error:
        AveragingEngine(model, adam, SingleCommunicator(), AlgorithmConfig(), SyncSchedule(4, 0))
    assert "\n" not in str(error.value)


def test_sgd_with_dampening_is_refused() -> None:
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="flat momentum buffers require dampening == 0"):
        AveragingEngine(model, sgd, SingleCommunicator(), AlgorithmConfig(), SyncSchedule(4, 0))


def test_the_former_momentum_buffers_key_is_accepted_with_a_notice(tmp_path: Path) -> None:
    from hpc_localsgd.config import load_config
    from hpc_localsgd.errors import ConfigError

    notices: list[str] = []
    cfg = load_config(None, ["algorithm.momentum_buffers=average"], notices)
    assert cfg.algorithm.optimizer_state == "average"
    assert notices == ["algorithm.momentum_buffers is now called algorithm.optimizer_state; the old name still works"]
    with pytest.raises(ConfigError, match="algorithm.momentum_buffers: the former name of algorithm.optimizer_state"):
        load_config(None, ["algorithm.momentum_buffers=average", "algorithm.optimizer_state=reset"])


def test_a_checkpoint_naming_the_former_key_resumes(tmp_path: Path) -> None:
    """A checkpoint written before the rename holds algorithm.momentum_buffers: the same algorithm; one of
    another inner optimizer is refused in one line."""
    import yaml

    from hpc_localsgd.config import load_config
    from hpc_localsgd.config.load import config_to_dict
    from hpc_localsgd.io.checkpoint import CheckpointError
    from hpc_localsgd.train.resume import check_compatible

    cfg = load_config(None, ["algorithm.optimizer_state=average"])
    saved = config_to_dict(cfg)
    saved["algorithm"]["momentum_buffers"] = saved["algorithm"].pop("optimizer_state")
    del saved["optim"]["name"]  # written before optim.name existed
    state = RankState({"x": torch.zeros(2)}, {}, {"sync_rounds": 0, "bytes_sent": 0, "comm_seconds": 0.0}, 0.0, 0)
    CheckpointWriter(tmp_path, SingleCommunicator(), keep=1).write(1, 0.1, {"config": yaml.safe_dump(saved)}, {}, state)
    checkpoint = Checkpoint(tmp_path / "step-000000001.h5")
    check_compatible(checkpoint, cfg, 1, None)
    adamw = load_config(None, ["algorithm.optimizer_state=average", "optim.name=adamw"])
    with pytest.raises(CheckpointError, match="inner optimizer 'sgd', this run uses 'adamw'"):
        check_compatible(checkpoint, adamw, 1, None)


def test_every_inner_optimizer_name_builds_and_is_named_on_the_start_line() -> None:
    import typing

    from hpc_localsgd.config.schema import InnerOptimizerName
    from hpc_localsgd.train.run import INNER_NAMES

    names = typing.get_args(InnerOptimizerName)
    assert set(INNER_NAMES) == set(names)
    for name in names:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        optimizer = make_inner_optimizer(model.parameters(), OptimConfig(name=name), 0.1, hidden_matrices(model))
        assert type(optimizer) in OPTIMIZER_STATES, name
