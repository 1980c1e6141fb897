"""``optim.clip_grad_norm``: the gradient is clipped after it is averaged (the synchronous phase: the
average over all ranks; a local step: each rank's own, or its worker's), before the inner step. The
engine on thread ranks against the reference, which clips each worker with PyTorch's own
``clip_grad_norm_``; the simulated backend clips each worker's row by that worker's norm."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.simulated import SimulatedCommunicator
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig
from hpc_localsgd.train.models import SmallCNN
from hpc_localsgd.train.replicas import ReplicatedModel
from tests.reference import ReferenceAlgorithm, simulate
from tests.unit.test_adamw import adamw, make_model
from tests.unit.test_engine import CASES, MOMENTUM, WEIGHT_DECAY, logits_and_loss, lr_at, make_batches, state

CLIP = 0.3  # below most steps' gradient norms here, so that clipping acts (the second test checks it does)


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def run_engine(cfg: AlgorithmConfig, local_start, batches, make_optimizer, clip: float | None):
    initial = make_model()

    def worker(comm):
        model = copy.deepcopy(initial)
        schedule = SyncSchedule(cfg.sync_period, local_start)
        engine = AveragingEngine(model, make_optimizer(model), comm, cfg, schedule, clip_grad_norm=clip)
        engine.broadcast_initial_state()
        for step, (x, y) in enumerate(batches[comm.rank]):
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        engine.close()
        return model

    return ThreadGroup(len(batches)).run(worker)


def reference(cfg: AlgorithmConfig, local_start, batches, make_optimizer, clip: float | None):
    ref = ReferenceAlgorithm.from_config(cfg, local_start)
    return simulate(make_model(), ref, batches, lr_at, 0.0, 0.0, make_optimizer=make_optimizer, clip_grad_norm=clip)


@pytest.mark.parametrize("optimizer", [sgd, adamw], ids=["sgd", "adamw"])
@pytest.mark.parametrize("name", ["allreduce", "local_sgd_H4", "post_local_switch5_H3", "nesterov_H3"])
def test_clipped_steps_match_the_reference(name: str, optimizer) -> None:
    cfg, local_start = CASES[name]
    batches = make_batches()
    got = run_engine(cfg, local_start, batches, optimizer, CLIP)
    want = reference(cfg, local_start, batches, optimizer, CLIP)
    for rank, (model, ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = state(model), state(ref_model)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=f"{name}: rank {rank} {key}")


def test_clipping_acts_here() -> None:
    cfg, local_start = CASES["local_sgd_H4"]
    batches = make_batches()
    clipped = state(reference(cfg, local_start, batches, sgd, CLIP)[0])
    free = state(reference(cfg, local_start, batches, sgd, None)[0])
    assert not torch.equal(clipped["0.weight"], free["0.weight"])


def test_the_simulated_backend_clips_each_worker_by_its_own_norm() -> None:
    workers = 3
    torch.manual_seed(0)
    base = SmallCNN((1, 8, 8), 4, 4)
    stacked = ReplicatedModel(base, workers)
    engine = AveragingEngine(
        stacked,
        torch.optim.SGD(stacked.parameters(), lr=0.1),
        SimulatedCommunicator(workers),
        AlgorithmConfig(method="local_sgd"),
        SyncSchedule(4, 0),
        clip_grad_norm=CLIP,
    )
    params = list(stacked.parameters())
    for index, p in enumerate(params):
        p.grad = torch.randn_like(p) * (1 + index)
        p.grad[1] *= 1e-3  # worker 1's norm is below the limit: left as it is
    singles = [[p.grad[w].clone() for p in params] for w in range(workers)]
    engine._clip_gradients()
    for w, grads in enumerate(singles):
        holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]  # one worker's model, as a rank's
        for holder, g in zip(holders, grads, strict=True):
            holder.grad = g
        norm = torch.nn.utils.clip_grad_norm_(holders, CLIP)  # the norm before clipping
        assert (norm.item() < CLIP) == (w == 1)
        for p, holder in zip(params, holders, strict=True):
            torch.testing.assert_close(p.grad[w], holder.grad, rtol=1e-6, atol=0)


def test_fp16_clips_the_unscaled_gradient(monkeypatch) -> None:
    """With fp16's loss scaling the gradient is unscaled before it is clipped (else the limit would apply
    to a gradient 2¹⁶ times too large, and nothing would be clipped)."""
    cfg, local_start = CASES["local_sgd_H4"]
    batches = make_batches(workers=2, steps=4)
    seen: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm):
        norm = clip(params, max_norm)  # the norm before clipping
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append(float(norm))
        assert float(after) <= max_norm * (1 + 1e-6)
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    initial = make_model()

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = AveragingEngine(
            model, sgd(model), comm, cfg, SyncSchedule(4, local_start), precision="fp16", clip_grad_norm=CLIP
        )
        skipped = [
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y)).skipped
            for step, (x, y) in enumerate(batches[comm.rank])
        ]
        engine.close()
        return skipped

    assert ThreadGroup(2).run(worker) == [[False] * 4] * 2
    # Unscaled gradients of this model are of order 1 (their scaled size would be about 2¹⁶ times that).
    assert len(seen) == 8 and all(CLIP < norm < 100 for norm in seen), seen
