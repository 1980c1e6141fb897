"""``optim.name: muon``: Muon on the hidden weight matrices, AdamW on the rest, as one optimizer whose state
the registry names per group. The engine on thread ranks against the reference, whose workers step
PyTorch's own ``torch.optim.Muon`` and ``torch.optim.AdamW`` side by side; the simulated backend's stacked
matrices against one worker's; the split; a model without hidden matrices refused in one line."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.muon import MuonWithAdamW, orthogonalise
from hpc_localsgd.algorithms.optimizer_state import make_inner_optimizer
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig, OptimConfig
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.train.models import SmallCNN, hidden_matrix_names, mlp
from hpc_localsgd.train.run import hidden_matrices
from tests.reference import ReferenceAlgorithm, reference_optimizer, simulate
from tests.unit.test_adamw import make_model
from tests.unit.test_engine import CASES, logits_and_loss, lr_at, make_batches, state

OPTIM = OptimConfig(name="muon", lr_per_256=0.01, weight_decay=0.1, muon_lr_ratio=4.0)


def muon(model: torch.nn.Module) -> torch.optim.Optimizer:
    return make_inner_optimizer(model.parameters(), OPTIM, lr_at(0), hidden_matrices(model))


def reference_muon(model: torch.nn.Module) -> torch.optim.Optimizer:
    return reference_optimizer(model, OPTIM, lr_at(0), hidden_matrix_names(model))


def run_engine(cfg: AlgorithmConfig, local_start, batches):
    initial = make_model()

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = AveragingEngine(model, muon(model), comm, cfg, SyncSchedule(cfg.sync_period, local_start))
        engine.broadcast_initial_state()
        for step, (x, y) in enumerate(batches[comm.rank]):
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        engine.close()
        return model, engine

    return ThreadGroup(len(batches)).run(worker)


def test_the_split_takes_every_linear_weight_but_the_heads() -> None:
    assert hidden_matrix_names(make_model()) == ["0.weight"]
    assert hidden_matrix_names(mlp((1, 8, 8), 4, 16)) != []
    assert hidden_matrix_names(SmallCNN((1, 8, 8), 4, 4)) == []  # convolutions and its one linear head


def test_a_model_without_hidden_matrices_is_refused() -> None:
    model = SmallCNN((1, 8, 8), 4, 4)
    with pytest.raises(ConfigError, match="optim.name: muon steps hidden weight matrices .* use adamw"):
        make_inner_optimizer(model.parameters(), OPTIM, 0.1, hidden_matrices(model))


@pytest.mark.parametrize(
    "name",
    ["allreduce", "local_sgd_H4", "local_sgd_H3_avg_momentum", "local_sgd_H4_reset_momentum_local_bn", "nesterov_H3"],
)
def test_engine_with_muon_matches_pytorchs_muon_and_adamw(name: str) -> None:
    cfg, local_start = CASES[name]
    batches = make_batches()
    got = run_engine(cfg, local_start, batches)
    ref = ReferenceAlgorithm.from_config(cfg, local_start)
    want = simulate(make_model(), ref, batches, lr_at, 0.0, 0.0, make_optimizer=reference_muon)
    for rank, ((model, engine), ref_model) in enumerate(zip(got, want, strict=True)):
        assert isinstance(engine.optimizer, MuonWithAdamW)
        ours, theirs = state(model), state(ref_model)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=f"{name}: rank {rank} {key}")
        kept = engine.optimizer.state
        matrix = dict(model.named_parameters())["0.weight"]
        assert set(kept[matrix]) == {"momentum_buffer"}
        head = dict(model.named_parameters())["3.weight"]
        assert set(kept[head]) == {"exp_avg", "exp_avg_sq", "step"} and float(kept[head]["step"]) == len(batches[0])


def test_stacked_matrices_are_orthogonalised_one_worker_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    got = orthogonalise(stacked)
    for w in range(3):
        assert torch.equal(got[w], orthogonalise(stacked[w]))
    # Newton–Schulz brings every singular value near 1 (roughly 0.7 to 1.2 with these coefficients).
    singular = torch.linalg.svdvals(got.double())
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_a_simulations_stacked_step_is_each_workers_step_bit_for_bit() -> None:
    """Matrices and biases stacked over 3 workers step exactly as 3 optimizers of one worker each."""
    g = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 5, 7, generator=g, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=torch.float64))
    singles = [
        (torch.nn.Parameter(stacked[w].detach().clone()), torch.nn.Parameter(bias[w].detach().clone()))
        for w in range(3)
    ]
    settings = {"lr": 0.01, "muon_lr_ratio": 4.0, "muon_momentum": 0.95, "betas": (0.9, 0.95), "eps": 1e-8}
    together = MuonWithAdamW([stacked], [bias], weight_decay=0.1, **settings)
    alone = [MuonWithAdamW([m], [b], weight_decay=0.1, **settings) for m, b in singles]
    for _ in range(5):
        grad, bias_grad = (
            torch.randn(3, 5, 7, generator=g, dtype=torch.float64),
            torch.randn(3, 5, generator=g, dtype=torch.float64),
        )
        stacked.grad, bias.grad = grad.clone(), bias_grad.clone()
        together.step()
        for w, ((m, b), optimizer) in enumerate(zip(singles, alone, strict=True)):
            m.grad, b.grad = grad[w].clone(), bias_grad[w].clone()
            optimizer.step()
    for w, (m, b) in enumerate(singles):
        assert torch.equal(stacked[w], m) and torch.equal(bias[w], b), w
