"""The simulated backend's parts, each against a plain computation: its collectives against sums
written out, the stacked model against one model per worker, and its refusals."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.simulated import SimulatedCommunicator
from hpc_localsgd.config import load_config
from hpc_localsgd.config.schema import AlgorithmConfig
from hpc_localsgd.errors import ConfigError, UserError
from hpc_localsgd.io.metrics import read_metrics
from hpc_localsgd.launcher.env import LaunchEnvironment, WorldLayout
from hpc_localsgd.train.loop import train
from hpc_localsgd.train.models import SmallCNN
from hpc_localsgd.train.replicas import ReplicatedModel
from tests.mpi.cases import BASE, CASES


def test_allreduce_averages_and_sums_each_column_over_the_workers() -> None:
    comm = SimulatedCommunicator(3)
    storage = torch.arange(3 * 5, dtype=torch.float64).reshape(3, 5)
    rows = storage[:, 1:4]  # not contiguous, as the engine's views into its [workers, n] storage
    comm.allreduce_(rows, average=True)
    expected = torch.tensor([1 + 6 + 11, 2 + 7 + 12, 3 + 8 + 13], dtype=torch.float64) / 3
    assert torch.equal(rows, expected.expand(3, 3))
    assert torch.equal(storage[:, 0], torch.tensor([0.0, 5.0, 10.0], dtype=torch.float64))  # outside untouched
    counts = torch.tensor([[1, 2], [3, 4], [5, 7]])
    comm.allreduce_(counts, average=False)
    assert torch.equal(counts, torch.tensor([[9, 13]]).expand(3, 2))


def test_half_precision_is_summed_in_float32() -> None:
    comm = SimulatedCommunicator(4)
    values = torch.tensor([[2048.0], [1.0], [1.0], [2.0]], dtype=torch.float16)
    comm.allreduce_(values, average=False)
    # float16 summed in order would give 2048 + 1 = 2048 (rounding), + 1 = 2048, + 2 = 2050.
    assert values[0].item() == 2052.0 and torch.equal(values, values[:1].expand(4, 1))


def test_broadcast_copies_the_root_row_and_shapes_are_checked() -> None:
    comm = SimulatedCommunicator(3)
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    comm.broadcast_(rows, root=2)
    assert torch.equal(rows, torch.tensor([[5.0, 6.0]]).expand(3, 2))
    with pytest.raises(ValueError, match="stacked over its 3 workers"):
        comm.allreduce_(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="root 3"):
        comm.broadcast_(rows, root=3)


def _models(workers: int) -> tuple[ReplicatedModel, list[torch.nn.Module]]:
    """A stacked model whose workers differ (as between syncs) and the same workers as plain models."""
    torch.manual_seed(0)
    base = SmallCNN((1, 8, 8), 4, 4)
    stacked = ReplicatedModel(base, workers)
    with torch.no_grad():
        for p in stacked.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    singles = []
    for worker in range(workers):
        single = copy.deepcopy(base)
        single.load_state_dict(stacked.worker_state(worker))
        singles.append(single)
    return stacked, singles


def test_stacked_model_computes_each_workers_forward_gradient_and_bn_statistics() -> None:
    workers = 3
    stacked, singles = _models(workers)
    # The engine's flat storage makes every parameter and buffer a non-contiguous view: the BN
    # statistics must still be updated in place (vmap alone loses those updates).
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    engine = AveragingEngine(
        stacked, optimizer, SimulatedCommunicator(workers), AlgorithmConfig(method="local_sgd"), SyncSchedule(4, 0)
    )
    assert not next(iter(stacked.stacked.buffers())).is_contiguous()
    x = torch.randn(workers, 5, 1, 8, 8)
    y = torch.randint(0, 4, (workers, 5))
    out = stacked(x)
    (F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / 5).backward()
    for worker, single in enumerate(singles):
        single_out = single(x[worker])
        F.cross_entropy(single_out, y[worker]).backward()
        # float32, one step of batched (vmap) kernels against one model's: at most 6 % of these tolerances
        # used under five CPU settings (docs/testing.md).
        torch.testing.assert_close(out[worker], single_out, rtol=1e-5, atol=1e-6)
        state = stacked.worker_state(worker)
        for name, p in single.named_parameters():
            grad = stacked.stacked._parameters[name.replace(".", "__")].grad[worker]
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
        for name, buffer in single.named_buffers():
            torch.testing.assert_close(state[name], buffer, rtol=1e-5, atol=1e-6)
    engine.close()


def _config(tmp_path: Path, name: str, workers: int, extra: tuple[str, ...] = ()):
    return load_config(
        None,
        BASE
        + CASES[name]
        + [f"output.run_dir={tmp_path / name}", "comm.backend=simulated", f"comm.simulated_workers={workers}", *extra],
    )


def test_same_config_and_seed_give_the_same_numbers(tmp_path: Path) -> None:
    first = train(_config(tmp_path / "a", "slowmo_H4", 3), print_fn=lambda _line: None)
    second = train(_config(tmp_path / "b", "slowmo_H4", 3), print_fn=lambda _line: None)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    a, b = (read_metrics(tmp_path / run / "slowmo_H4" / "metrics.h5") for run in ("a", "b"))
    assert torch.equal(torch.from_numpy(a["evals"]["test_accuracy"]), torch.from_numpy(b["evals"]["test_accuracy"]))
    assert list(a["steps"]["sync_rounds"]) == list(b["steps"]["sync_rounds"]) == [s // 4 for s in range(1, 13)]


def test_the_run_directory_is_protected_like_any_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "local_H4", 2)
    train(cfg, print_fn=lambda _line: None)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, print_fn=lambda _line: None)
    train(cfg, overwrite=True, print_fn=lambda _line: None)


def test_bad_simulation_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="comm.simulated_workers: must be >= 1"):
        load_config(None, ["comm.backend=simulated"])
    with pytest.raises(ConfigError, match="comm.simulated_workers: is only used with comm.backend=simulated"):
        load_config(None, ["comm.backend=mpi", "comm.simulated_workers=4"])
    with pytest.raises(ConfigError, match="writes no checkpoints"):
        load_config(None, ["comm.backend=simulated", "comm.simulated_workers=4", "checkpoint.every_steps=10"])
    cfg = _config(tmp_path, "local_H4", 2)
    with pytest.raises(UserError, match="--resume"):
        train(cfg, resume="auto", print_fn=lambda _line: None)
    two_ranks = LaunchEnvironment(launcher="openmpi", layout=WorldLayout(0, 2, 0, 2, 0, 1))
    with pytest.raises(UserError, match="start it without mpirun"):
        train(cfg, launch=two_ranks, print_fn=lambda _line: None)


def test_a_simulation_prints_the_progress_lines_of_a_run_on_ranks(tmp_path: Path) -> None:
    """Both kinds of run go through one run loop: the same line for every step window, evaluation and
    summary (windowed loss and accuracy, throughput and communication share, not the last step's)."""
    from hpc_localsgd.comm import SingleCommunicator
    from hpc_localsgd.launcher.env import detect_launch

    extra = ("train.log_every_steps=5",)
    simulated: list[str] = []
    train(_config(tmp_path / "sim", "local_H4", 2, extra), print_fn=simulated.append)
    on_rank: list[str] = []
    cfg = load_config(None, BASE + CASES["local_H4"] + [f"output.run_dir={tmp_path / 'rank'}", *extra])
    train(cfg, launch=detect_launch({}), comm=SingleCommunicator(), print_fn=on_rank.append)

    number = r"[0-9.e+-]+"
    step_line = (
        rf"step \d+/\d+ \| epoch {number} \| lr {number} \| loss {number} \| acc {number} \| "
        rf"\d+ samples/s \| comm \d+%"
    )
    eval_line = rf"eval step \d+ \| epoch {number} \| train loss {number} \| test loss {number} \| test acc {number}"
    done_line = (
        rf"hpc-localsgd: done \| .+ \| \d+ (ranks|simulated workers) \| \d+ steps in {number} s \| "
        rf"test acc {number} \| \d+ sync rounds, .+ sent per (rank|simulated worker) \| comm \d+% of time"
    )
    for lines in (simulated, on_rank):
        kinds = [
            next(
                kind
                for kind, pattern in (
                    ("step", step_line),
                    ("eval", eval_line),
                    ("done", done_line),
                    ("start", r"hpc-localsgd: .+ \| run dir .+"),
                )
                if re.fullmatch(pattern, line)
            )
            for line in lines
        ]
        assert kinds[0] == "start" and kinds[-1] == "done" and "step" in kinds and "eval" in kinds, lines
    # Same steps, so the same step windows and evaluations, in the same order.
    assert [line.split(" |")[0] for line in simulated[1:-1]] == [line.split(" |")[0] for line in on_rank[1:-1]]
    assert "2 simulated workers" in simulated[-1] and "1 ranks" in on_rank[-1]


def test_fp16_is_refused_in_a_simulation_and_bf16_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a loss scaler per rank"):
        load_config(None, ["comm.backend=simulated", "comm.simulated_workers=2", "train.precision=fp16"])
    result = train(_config(tmp_path, "local_H4", 2, ("train.precision=bf16",)), print_fn=lambda _line: None)
    assert result.steps == 12 and result.final is not None and result.final.test_accuracy > 0
