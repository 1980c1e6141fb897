"""The averaging engine against the independent reference, with W workers as threads in one process
(a faked communicator, as the house rules allow for unit tests). float64 keeps rounding out of the way."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.hierarchy import GroupLevel, Hierarchy
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig
from tests.reference import ReferenceAlgorithm, simulate

WORKERS, STEPS, BATCH = 3, 12, 8
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-3


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model.double()


def make_batches(workers: int = WORKERS, steps: int = STEPS) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    return [
        [
            (torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(steps)
        ]
        for _ in range(workers)
    ]


def lr_at(step: int) -> float:
    return 0.05 * (1.0 + 0.5 * (step % 3))  # varies between syncs, so SlowMo's 1/γ factor matters


def logits_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out, F.cross_entropy(out, y)


def run_engine(cfg: AlgorithmConfig, local_start, batches, bucket_bytes: int = 1 << 20, hierarchy=None):
    """Each worker thread runs the package's one training step (``AveragingEngine.train_step``)."""
    initial = make_model()

    def worker(comm):
        model = copy.deepcopy(initial)
        opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        engine = AveragingEngine(
            model,
            opt,
            comm,
            cfg,
            SyncSchedule(cfg.sync_period, local_start),
            bucket_bytes=bucket_bytes,
            hierarchy=hierarchy,
        )
        engine.broadcast_initial_state()
        for step, (x, y) in enumerate(batches[comm.rank]):
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        engine.close()
        return model, engine

    return ThreadGroup(len(batches)).run(worker)


def reference(cfg: AlgorithmConfig, local_start, batches, hierarchy=None):
    ref = ReferenceAlgorithm.from_config(
        cfg,
        local_start,
        ranks_per_worker=hierarchy.ranks_per_worker if hierarchy else 1,
        levels=tuple((level.ranks, level.sync_period) for level in hierarchy.levels) if hierarchy else (),
    )
    return simulate(make_model(), ref, batches, lr_at, MOMENTUM, WEIGHT_DECAY)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    "allreduce": (AlgorithmConfig(method="allreduce"), None),
    "local_sgd_H4": (AlgorithmConfig(method="local_sgd", sync_period=4), 0),
    "local_sgd_H3_avg_momentum": (AlgorithmConfig(method="local_sgd", sync_period=3, optimizer_state="average"), 0),
    "local_sgd_H4_reset_momentum_local_bn": (
        AlgorithmConfig(method="local_sgd", sync_period=4, optimizer_state="reset", average_bn_buffers=False),
        0,
    ),
    "post_local_switch5_H3": (AlgorithmConfig(method="post_local_sgd", sync_period=3, switch_step=5), 5),
    "slowmo_H4": (
        AlgorithmConfig(method="local_sgd", sync_period=4, outer="slowmo", slow_lr=1.0, slow_momentum=0.6),
        0,
    ),
    "slowmo_alpha_lt1_H2": (
        AlgorithmConfig(method="local_sgd", sync_period=2, outer="slowmo", slow_lr=0.8, slow_momentum=0.5),
        0,
    ),
    "post_local_slowmo": (
        AlgorithmConfig(method="post_local_sgd", sync_period=2, switch_step=4, outer="slowmo", slow_momentum=0.5),
        4,
    ),
    "nesterov_H3": (AlgorithmConfig(method="local_sgd", sync_period=3, outer="nesterov"), 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_reference(name: str) -> None:
    cfg, local_start = CASES[name]
    batches = make_batches()
    got = run_engine(cfg, local_start, batches, bucket_bytes=200)  # several gradient buckets
    want = reference(cfg, local_start, batches)
    for rank, ((model, _), ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = state(model), state(ref_model)
        for key in theirs:
            where = f"{name}: rank {rank} {key}"
            torch.testing.assert_close(
                ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=functools.partial("{}: {}".format, where)
            )


@pytest.mark.parametrize("name", ["allreduce", "local_sgd_H4", "slowmo_H4", "post_local_switch6_H3"])
def test_replicas_agree_after_a_sync(name: str) -> None:
    cfg, local_start = (
        CASES[name] if name in CASES else (AlgorithmConfig(method="post_local_sgd", sync_period=3, switch_step=6), 6)
    )
    got = run_engine(cfg, local_start, make_batches())  # 12 steps: the last step is a sync in every case
    first = dict(got[0][0].named_parameters())
    for model, _ in got[1:]:
        for key, p in model.named_parameters():
            assert torch.equal(p, first[key]), key


def test_local_sgd_with_period_1_equals_synchronous_sgd() -> None:
    batches = make_batches()
    sync = run_engine(AlgorithmConfig(method="allreduce"), None, batches)
    local = run_engine(AlgorithmConfig(method="local_sgd", sync_period=1, average_bn_buffers=False), 0, batches)
    for (m_sync, _), (m_local, _) in zip(sync, local, strict=True):
        for (key, a), b in zip(m_sync.named_parameters(), m_local.parameters(), strict=True):
            # Same computation up to the order of floating-point operations.
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13, msg=key)


def test_slowmo_alpha1_beta0_is_exactly_local_sgd() -> None:
    batches = make_batches()
    plain = run_engine(AlgorithmConfig(method="local_sgd", sync_period=4), 0, batches)
    slowmo = run_engine(
        AlgorithmConfig(method="local_sgd", sync_period=4, outer="slowmo", slow_lr=1.0, slow_momentum=0.0), 0, batches
    )
    for (a, _), (b, _) in zip(plain, slowmo, strict=True):
        for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), key


def param_and_buffer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    return params, buffers


@pytest.mark.parametrize(
    "name,rounds,extra",
    [
        ("allreduce", STEPS, "grads"),
        ("local_sgd_H4", STEPS // 4, "params+bn"),
        ("local_sgd_H3_avg_momentum", STEPS // 3, "params+bn+momentum"),
        ("local_sgd_H4_reset_momentum_local_bn", STEPS // 4, "params"),
        ("post_local_switch5_H3", 5 + (STEPS - 5) // 3, "mixed"),
    ],
)
def test_communication_counters(name: str, rounds: int, extra: str) -> None:
    cfg, local_start = CASES[name]
    got = run_engine(cfg, local_start, make_batches())
    params, buffers = param_and_buffer_bytes(make_model())
    expected_bytes = {
        "grads": STEPS * params,
        "params+bn": rounds * (params + buffers),
        "params+bn+momentum": rounds * (2 * params + buffers),
        "params": rounds * params,
        "mixed": 5 * params + (STEPS - 5) // 3 * (params + buffers),
    }[extra]
    for _, engine in got:
        assert engine.stats.sync_rounds == rounds
        assert engine.stats.bytes_sent == expected_bytes
        assert engine.stats.comm_seconds > 0


def test_evaluation_uses_the_average_and_leaves_training_untouched() -> None:
    cfg, local_start = CASES["local_sgd_H4"]
    batches = [wb[:6] for wb in make_batches()]  # stop between syncs: replicas differ
    got = run_engine(cfg, local_start, batches)
    before = [state(m) for m, _ in got]
    expected = {k: sum(s[k] for s in before) / len(before) for k in before[0] if before[0][k].is_floating_point()}
    group = ThreadGroup(len(got))

    def evaluate(comm):
        model, engine = got[comm.rank]
        engine.comm = comm  # the trained engines' group is finished; evaluate on a fresh one
        with engine.averaged_model() as averaged:
            return state(averaged)

    seen = group.run(evaluate)
    for rank, (model, engine) in enumerate(got):
        for key, value in expected.items():
            torch.testing.assert_close(seen[rank][key], value, rtol=1e-12, atol=1e-14)
        after = state(model)
        assert all(torch.equal(after[k], before[rank][k]) for k in after)
        assert engine.eval_stats.sync_rounds == 1


def hierarchies(cfg: AlgorithmConfig) -> dict[str, Hierarchy]:
    """Worker groups of 2 in a world of 4; one intermediate level of 2 (between rank and world) at
    about half the global period; and workers as large as the world."""
    found = {"workers_of_2": Hierarchy(4, 2), "workers_of_4": Hierarchy(4, 4)}
    if cfg.method != "allreduce":
        found["level_of_2"] = Hierarchy(4, 1, (GroupLevel(2, max(1, cfg.sync_period // 2)),))
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_worker_groups_and_levels_match_the_reference(name: str) -> None:
    cfg, local_start = CASES[name]
    batches = make_batches(workers=4)
    for label, hierarchy in hierarchies(cfg).items():
        got = run_engine(cfg, local_start, batches, bucket_bytes=200, hierarchy=hierarchy)
        want = reference(cfg, local_start, batches, hierarchy)
        for rank, ((model, _), ref_model) in enumerate(zip(got, want, strict=True)):
            ours, theirs = state(model), state(ref_model)
            for key in theirs:
                where = f"{name} {label}: rank {rank} {key}"
                torch.testing.assert_close(
                    ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=functools.partial("{}: {}".format, where)
                )
        if hierarchy.ranks_per_worker > 1:
            # The ranks of a worker hold the same parameters and optimizer state at every step (here: the end).
            for first in range(0, 4, hierarchy.ranks_per_worker):
                for other in range(first + 1, first + hierarchy.ranks_per_worker):
                    for (key, a), b in zip(got[first][0].named_parameters(), got[other][0].parameters(), strict=True):
                        assert torch.equal(a, b), f"{name} {label}: ranks {first} and {other} differ in {key}"


def test_counts_per_level_are_exact() -> None:
    cfg = AlgorithmConfig(method="post_local_sgd", sync_period=4, switch_step=4)
    runs = run_engine(cfg, 4, make_batches(workers=4), hierarchy=Hierarchy(4, 2))
    model = make_model()
    gradients = 8 * sum(p.numel() for p in model.parameters())  # float64
    statistics = 8 * sum(b.numel() for b in model.buffers() if b.is_floating_point())
    span = gradients + statistics  # what a sync averages: parameters and BN statistics
    for rank, (_, engine) in enumerate(runs):
        # Rank j of a worker averages shard j of the span with rank j of the other worker.
        elements = span // 8
        shard = 8 * (elements // 2 + (1 if rank % 2 < elements % 2 else 0))
        # 4 synchronous steps (global gradients), 8 local steps (worker gradients), syncs after 8 and 12:
        # between workers one shard each; inside the worker the BN average and the gathered shards.
        assert engine.stats.rounds_by_level == {"global": 4 + 2, "worker": 8 + 2}, rank
        assert engine.stats.bytes_by_level == {
            "global": 4 * gradients + 2 * shard,
            "worker": 8 * gradients + 2 * (statistics + span),
        }, rank
        assert engine.stats.sync_rounds == 16 and engine.stats.bytes_sent == sum(engine.stats.bytes_by_level.values())


def test_workers_as_large_as_the_world_are_all_reduce_sgd() -> None:
    batches = make_batches(workers=4)
    synchronous = run_engine(AlgorithmConfig(method="allreduce"), None, batches)
    one_worker = run_engine(AlgorithmConfig(method="local_sgd", sync_period=3), 0, batches, hierarchy=Hierarchy(4, 4))
    for (a, _), (b, _) in zip(synchronous, one_worker, strict=True):
        for (key, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-12, msg=key)


def overflowing_forward(model, x, y, overflow: bool):
    out, loss = logits_and_loss(model, x, y)
    return out, loss * float("inf") if overflow else loss


@pytest.mark.parametrize("method,skipping_ranks", [("local_sgd", [1]), ("allreduce", [0, 1])])
def test_fp16_overflow_on_one_rank_keeps_the_sync_schedule_aligned(method: str, skipping_ranks: list[int]) -> None:
    """Rank 1's loss overflows at step 3, the last step before a sync (H = 4). Local SGD: rank 1 alone
    skips its optimizer step and backs off its loss scale, and both ranks still average after steps 4
    and 8 (nobody waits in a collective the other skipped). All-reduce SGD: the averaged gradients
    overflow on every rank, so every rank skips together."""
    cfg = AlgorithmConfig(method=method, sync_period=4)
    batches = make_batches(workers=2, steps=8)
    initial = make_model()

    def worker(comm):
        model = copy.deepcopy(initial)
        opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        local_start = None if method == "allreduce" else 0
        engine = AveragingEngine(model, opt, comm, cfg, SyncSchedule(4, local_start), precision="fp16")
        engine.broadcast_initial_state()
        results = []
        for step, (x, y) in enumerate(batches[comm.rank]):
            forward = functools.partial(overflowing_forward, model, x, y, comm.rank == 1 and step == 3)
            results.append(engine.train_step(step, lr_at(step), forward))
        engine.close()
        return model, engine, results

    got = ThreadGroup(2).run(worker)
    for rank, (model, engine, results) in enumerate(got):
        assert [r.skipped for r in results] == [step == 3 and rank in skipping_ranks for step in range(8)], rank
        assert engine.skipped_steps == int(rank in skipping_ranks)
        assert engine.loss_scaler_state()["loss_scaler"][0].item() == (2.0**15 if rank in skipping_ranks else 2.0**16)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    if method == "local_sgd":
        assert [[r.synced for r in results] for _, _, results in got] == [[s in (3, 7) for s in range(8)]] * 2
        assert all(engine.stats.rounds_by_level == {"global": 2} for _, engine, _ in got)
    for a, b in zip(got[0][0].parameters(), got[1][0].parameters(), strict=True):
        assert torch.equal(a, b)  # step 8 is a sync (and all-reduce keeps replicas identical)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_state() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    group = ThreadGroup(1)

    def worker(comm):
        engine = AveragingEngine(
            model, opt, comm, AlgorithmConfig(method="local_sgd"), SyncSchedule(4, 0), precision="bf16"
        )
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        done = engine.train_step(0, 0.1, functools.partial(logits_and_loss, model, x, y))
        engine.close()
        return done

    (done,) = group.run(worker)
    assert done.outputs.dtype == torch.bfloat16 and not done.skipped
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
