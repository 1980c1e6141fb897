"""AdamW as the inner optimizer (``optim.name: adamw``): its moments live in flat storage and its step
counts beside it, so every method, outer optimizer and state policy behaves as with SGD. The engine on
thread ranks against the independent reference (PyTorch's own AdamW per worker, lazily started), and a
stop-and-resume from the engine's state, bit for bit."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig
from tests.reference import ReferenceAlgorithm, simulate
from tests.unit.test_engine import CASES, logits_and_loss, lr_at, make_batches, state


def make_model() -> torch.nn.Module:
    """test_engine's model without the bias in front of BatchNorm: BN cancels that bias, so its gradient is
    rounding noise, which Adam divides by a square root of that noise's size and turns into a step of up
    to lr / eps · noise: two correct computations would then differ there, and nowhere else."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model.double()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr_at(0), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def run_engine(cfg: AlgorithmConfig, local_start, batches, stop_at: int | None = None):
    """Each thread rank trains with AdamW; with ``stop_at``, it takes the engine's state after that many
    steps, builds a fresh model and engine from it and trains on (as a resumed run does)."""
    initial = make_model()

    def build(comm):
        model = copy.deepcopy(initial)
        engine = AveragingEngine(model, adamw(model), comm, cfg, SyncSchedule(cfg.sync_period, local_start))
        engine.broadcast_initial_state()
        return model, engine

    def worker(comm):
        model, engine = build(comm)
        mine = batches[comm.rank]
        for step, (x, y) in enumerate(mine):
            if step == stop_at:
                saved = [{k: v.clone() for k, v in s.items()} for s in (engine.rank_state(), engine.shared_state())]
                int_buffers = {k: v.clone() for k, v in engine.int_buffers().items()}
                engine.close()
                model, engine = build(comm)
                engine.load_state(saved[0], saved[1], step)
                for key, value in engine.int_buffers().items():
                    value.copy_(int_buffers[key])
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        engine.close()
        return model, engine

    return ThreadGroup(len(batches)).run(worker)


def reference(cfg: AlgorithmConfig, local_start, batches):
    ref = ReferenceAlgorithm.from_config(cfg, local_start)
    return simulate(make_model(), ref, batches, lr_at, 0.0, 0.0, make_optimizer=adamw)


@pytest.mark.parametrize("name", list(CASES))
def test_engine_with_adamw_matches_the_reference(name: str) -> None:
    """Every method, outer optimizer and state policy of the SGD cases, with AdamW inside: the parameters,
    BN statistics and AdamW's moments and step counts agree with the reference's."""
    cfg, local_start = CASES[name]
    batches = make_batches()
    got = run_engine(cfg, local_start, batches)
    want = reference(cfg, local_start, batches)
    for rank, ((model, engine), ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = state(model), state(ref_model)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=f"{name}: rank {rank} {key}")
        for p in model.parameters():
            kept = engine.optimizer.state[p]
            assert kept["step"].dtype == torch.float32 and float(kept["step"]) == len(batches[rank])
            assert kept["exp_avg_sq"].min() >= 0


def test_the_reference_state_policies_differ_with_adamw() -> None:
    """The three policies give three different trajectories, so the comparison above tells them apart."""
    batches = make_batches()
    finals = [
        state(reference(AlgorithmConfig(method="local_sgd", sync_period=3, optimizer_state=policy), 0, batches)[0])
        for policy in ("keep", "average", "reset")
    ]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.equal(finals[a]["0.weight"], finals[b]["0.weight"])


@pytest.mark.parametrize("name", ["local_sgd_H4", "local_sgd_H3_avg_momentum", "nesterov_H3", "post_local_switch5_H3"])
def test_a_resumed_run_with_adamw_is_bit_exact(name: str) -> None:
    """Stopped after 5 steps (mid-period) and rebuilt from the engine's state: the same bits as one run."""
    cfg, local_start = CASES[name]
    batches = make_batches()
    whole = run_engine(cfg, local_start, batches)
    resumed = run_engine(cfg, local_start, batches, stop_at=5)
    for (model, _), (again, _) in zip(whole, resumed, strict=True):
        for key, tensor in state(model).items():
            assert torch.equal(state(again)[key], tensor), f"{name}: {key}"
