"""The drift measured at every global sync (consensus distance, the outer update's norm and cosine)
against a direct computation from the workers' parameters, on the threads communicator and the
simulated backend; and ``algorithm.outer_every`` against the independent reference. float64 models
keep rounding out of the way."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from hpc_localsgd.algorithms.drift import row_dot
from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.hierarchy import Hierarchy
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.comm.simulated import SimulatedCommunicator
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.io.metrics import SYNC_FIELDS
from hpc_localsgd.train.replicas import ReplicatedModel
from tests.reference import ReferenceAlgorithm, simulate
from tests.unit.test_engine import MOMENTUM, WEIGHT_DECAY, logits_and_loss, lr_at, make_batches, make_model, state

MEASURED = ("consensus_distance", "model_norm", "outer_update_norm", "outer_update_cosine")
LR = 0.1


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def direct(worker_params: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """mean_w ‖x_w − x̄‖² / ‖x̄‖² straight from the definition, and x̄."""
    mean = sum(worker_params) / len(worker_params)
    spread = sum(float(((x - mean) ** 2).sum()) for x in worker_params) / len(worker_params)
    return spread / float((mean**2).sum()), mean


def perturbation(worker: int, round_: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * round_ + worker)
    return 0.01 * (worker + 1) * torch.randn(size, generator=g, dtype=torch.float64)


def set_params(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


# --- the measurement itself: workers given known parameters, then one sync ---------------------------


def two_syncs_on_threads(cfg: AlgorithmConfig, ranks: int, hierarchy: Hierarchy | None = None):
    """Every worker starts at x0 (= x_prev), is moved to x0 + its perturbation, syncs; again from the
    synced model. Returns, per rank, (the two SyncMeasurements, each sync's pre-average parameters)."""
    initial = make_model()
    per_worker = hierarchy.ranks_per_worker if hierarchy else 1

    def worker(comm):
        model = copy.deepcopy(initial)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        engine = AveragingEngine(model, opt, comm, cfg, SyncSchedule(cfg.sync_period, 0), hierarchy=hierarchy)
        engine.broadcast_initial_state()
        if engine.outer.needs_anchor:
            engine.anchors = [g.slice("params").clone() for g in engine.groups]  # x_prev = x0, as at local_start
        measured, before = [], []
        for round_ in range(2):
            x = flat_params(model) + perturbation(comm.rank // per_worker, round_, flat_params(model).numel())
            set_params(list(model.parameters()), x)
            before.append(flat_params(model))
            engine.sync(LR)
            measured.append(engine.last_sync)
        engine.close()
        return measured, before

    return ThreadGroup(ranks).run(worker)


def expected_two_syncs(before: list[list[torch.Tensor]], x0: torch.Tensor, outer: AlgorithmConfig) -> list[dict]:
    """What the two syncs should measure, from the definitions; ``before[r][w]`` is worker w's
    parameters before sync r. The outer step's result comes from the reference's formulas."""
    expected, x_prev, u, previous_delta = [], x0, torch.zeros_like(x0), None
    for workers in before:
        distance, mean = direct(workers)
        row = {"consensus_distance": distance, "model_norm": float(mean.norm())}
        delta = x_prev - mean
        if outer.outer == "slowmo":
            u = outer.slow_momentum * u + delta / LR
            x_prev = x_prev - outer.slow_lr * LR * u
        row["outer_update_norm"] = float(delta.norm()) if outer.outer != "none" else math.nan
        cosine = math.nan
        if previous_delta is not None and outer.outer != "none":
            cosine = float(delta @ previous_delta / (delta.norm() * previous_delta.norm()))
        row["outer_update_cosine"] = cosine
        previous_delta = delta
        expected.append(row)
    return expected


def assert_rows_close(got: list[dict], want: list[dict], rtol: float, what: str) -> None:
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in MEASURED:
            np.testing.assert_allclose(g[name], w[name], rtol=rtol, atol=0, err_msg=f"{what}: sync {index} {name}")


@pytest.mark.parametrize("outer", ["none", "slowmo"])
@pytest.mark.parametrize("ranks,per_worker", [(3, 1), (4, 2)])
def test_consensus_distance_and_outer_update_match_the_definitions(outer: str, ranks: int, per_worker: int) -> None:
    cfg = AlgorithmConfig(method="local_sgd", outer=outer, slow_momentum=0.5, slow_lr=0.8)
    hierarchy = Hierarchy(ranks, per_worker) if per_worker > 1 else None
    got = two_syncs_on_threads(cfg, ranks, hierarchy)
    x0 = flat_params(make_model())
    # The workers are the units: one parameter vector per worker (its ranks hold the same one).
    before = [[got[rank][1][r] for rank in range(0, ranks, per_worker)] for r in range(2)]
    want = expected_two_syncs(before, x0, cfg)
    for rank in range(ranks):
        rows = [m.as_row() for m in got[rank][0]]
        assert_rows_close(rows, want, rtol=1e-9, what=f"rank {rank}")
        assert [m.outer_step for m in got[rank][0]] == [True, True]
    assert want[0]["consensus_distance"] > 1e-6 and (outer == "none" or not math.isnan(want[1]["outer_update_cosine"]))


def test_simulated_workers_measure_what_threads_measure() -> None:
    """The simulated backend's stacked storage gives the same numbers as W threads (or MPI ranks)."""
    cfg = AlgorithmConfig(method="local_sgd", outer="nesterov")
    workers = 3
    threads = two_syncs_on_threads(cfg, workers)
    base = make_model()
    stacked = ReplicatedModel(base, workers)
    opt = torch.optim.SGD(stacked.parameters(), lr=LR, momentum=MOMENTUM)
    engine = AveragingEngine(stacked, opt, SimulatedCommunicator(workers), cfg, SyncSchedule(1, 0))
    engine.anchors = [g.slice("params").clone() for g in engine.groups]
    params = list(stacked.parameters())
    size = sum(p[0].numel() for p in params)
    measured = []
    for round_ in range(2):
        with torch.no_grad():
            for w in range(workers):
                x = torch.cat([p[w].reshape(-1) for p in params]) + perturbation(w, round_, size)
                set_params([p[w] for p in params], x)
        engine.sync(LR)
        measured.append(engine.last_sync.as_row())
    engine.close()
    assert_rows_close(measured, [m.as_row() for m in threads[0][0]], rtol=1e-12, what="simulated vs threads")


def test_consensus_distance_is_zero_when_every_rank_is_identical() -> None:
    """H = 1 without BatchNorm, every rank on the same batches: the ranks never differ, and the
    identity mean‖xᵢ‖² − ‖x̄‖² gives exactly 0 (averaging two equal numbers is exact)."""
    torch.manual_seed(2)
    initial = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    batches = make_batches(workers=1, steps=4)[0]
    cfg = AlgorithmConfig(method="local_sgd", sync_period=1, average_bn_buffers=False)

    def worker(comm):
        model = copy.deepcopy(initial)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        engine = AveragingEngine(model, opt, comm, cfg, SyncSchedule(1, 0))
        rows = []
        for step, (x, y) in enumerate(batches):
            done = engine.train_step(step, LR, functools.partial(logits_and_loss, model, x.float(), y))
            rows.append((done.synced, engine.last_sync))
        engine.close()
        return rows

    for rows in ThreadGroup(2).run(worker):
        assert all(synced for synced, _ in rows)
        assert [m.consensus_distance for _, m in rows] == [0.0] * 4
        assert all(m.model_norm > 0 and math.isnan(m.outer_update_norm) for _, m in rows)


def test_squared_norms_are_summed_in_float64() -> None:
    x = torch.full((3, 5000), 1.0 + 2**-20, dtype=torch.float32)
    assert row_dot(x, x).dtype == torch.float64
    torch.testing.assert_close(row_dot(x, x), torch.full((3,), 5000 * (1.0 + 2**-20) ** 2, dtype=torch.float64))
    assert row_dot(x[0], x[0]).shape == ()


def test_the_measurement_names_are_the_metrics_fields() -> None:
    cfg = AlgorithmConfig(method="local_sgd")
    (measured, _), *_ = two_syncs_on_threads(cfg, 2)
    assert ("step", *measured[0].as_row()) == SYNC_FIELDS


# --- outer_every: the outer step on every k-th average only -------------------------------------------


def run_engine(cfg: AlgorithmConfig, local_start, batches, hierarchy=None, steps=None, resume=None):
    """The package's training step on threads; per rank (model, engine, per-sync rows). ``steps``
    stops early; ``resume``: per rank (rank_state, shared_state, completed steps) to start from."""
    initial = make_model()
    schedule = SyncSchedule(cfg.sync_period, local_start, cfg.outer_every)

    def worker(comm):
        model = copy.deepcopy(initial)
        opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        engine = AveragingEngine(model, opt, comm, cfg, schedule, bucket_bytes=200, hierarchy=hierarchy)
        engine.broadcast_initial_state()
        first = 0
        if resume is not None:
            rank_state, shared, first = resume[comm.rank]
            engine.load_state(rank_state, shared, first)
            for name, live in engine.int_buffers().items():  # BatchNorm's batch counters, as a resume restores
                live.copy_(rank_state[name])
        rows = []
        for step, (x, y) in enumerate(batches[comm.rank][first:steps], start=first):
            done = engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
            if done.synced:
                rows.append({"step": float(step + 1), **engine.last_sync.as_row()})
        engine.close()
        return model, engine, rows

    return ThreadGroup(len(batches)).run(worker)


OUTER_EVERY_CASES = {
    "slowmo_H2_every3": (
        AlgorithmConfig(
            method="local_sgd", sync_period=2, outer="slowmo", slow_lr=0.9, slow_momentum=0.6, outer_every=3
        ),
        0,
    ),
    "nesterov_H3_every2": (AlgorithmConfig(method="local_sgd", sync_period=3, outer="nesterov", outer_every=2), 0),
    "post_local_slowmo_every2_reset": (
        AlgorithmConfig(
            method="post_local_sgd",
            sync_period=2,
            switch_step=3,
            outer="slowmo",
            slow_momentum=0.5,
            outer_every=2,
            optimizer_state="reset",
        ),
        3,
    ),
}


@pytest.mark.parametrize("name", list(OUTER_EVERY_CASES))
def test_outer_every_matches_the_reference(name: str) -> None:
    cfg, local_start = OUTER_EVERY_CASES[name]
    batches = make_batches()
    got = run_engine(cfg, local_start, batches)
    record: list[dict[str, float]] = []
    want = simulate(
        make_model(),
        ReferenceAlgorithm.from_config(cfg, local_start),
        batches,
        lr_at,
        MOMENTUM,
        WEIGHT_DECAY,
        record=record,
    )
    for rank, ((model, _, rows), ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = state(model), state(ref_model)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank} {key}")
        assert [r["step"] for r in rows] == [r["step"] for r in record]
        assert_rows_close(rows, [{**{k: math.nan for k in MEASURED}, **r} for r in record], 1e-7, f"{name} rank {rank}")
        k = cfg.outer_every
        assert [bool(r["outer_step"]) for r in rows] == [(i + 1) % k == 0 for i in range(len(rows))]
    # The outer step is rarer than the average, and the run differs from outer_every = 1.
    every_average = run_engine(dataclasses.replace(cfg, outer_every=1), local_start, batches)
    assert not torch.equal(flat_params(every_average[0][0]), flat_params(got[0][0]))


@pytest.mark.parametrize("outer_every", [2, 3])
def test_slowmo_alpha1_beta0_is_exactly_local_sgd_with_any_outer_every(outer_every: int) -> None:
    batches = make_batches()
    plain = run_engine(AlgorithmConfig(method="local_sgd", sync_period=2), 0, batches)
    slowmo = run_engine(
        AlgorithmConfig(
            method="local_sgd", sync_period=2, outer="slowmo", slow_lr=1.0, slow_momentum=0.0, outer_every=outer_every
        ),
        0,
        batches,
    )
    for (a, _, _), (b, _, _) in zip(plain, slowmo, strict=True):
        for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), key


def test_outer_every_resumes_from_the_step_counter() -> None:
    """H = 2, k = 3: averages after steps 2, 4, ..., 12, outer steps after 6 and 12. Stopped after 9
    steps (one plain average since the last outer step) and resumed from the saved state alone: the
    same run, bit for bit, with the same measurements (the previous Δ of the cosine is saved state)."""
    cfg, local_start = OUTER_EVERY_CASES["slowmo_H2_every3"]
    batches = make_batches()
    full = run_engine(cfg, local_start, batches)
    first = run_engine(cfg, local_start, batches, steps=9)
    saved = [
        (
            {k: v.clone() for k, v in {**e.rank_state(), **e.int_buffers()}.items()},
            {k: v.clone() for k, v in e.shared_state().items()},
            9,
        )
        for _, e, _ in first
    ]
    assert any(k.startswith("outer_previous_update") for k in saved[0][1])
    second = run_engine(cfg, local_start, batches, resume=saved)
    for (a, _, rows_full), (_, _, rows_first), (c, _, rows_second) in zip(full, first, second, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
        np.testing.assert_equal(rows_first + rows_second, rows_full)
        assert [r["outer_step"] for r in rows_full] == [0, 0, 1, 0, 0, 1]


def test_outer_every_needs_an_outer_optimizer() -> None:
    with pytest.raises(ConfigError, match="algorithm.outer_every: applies to an outer optimizer"):
        AlgorithmConfig(method="local_sgd", outer_every=2).validate()
    with pytest.raises(ConfigError, match="algorithm.outer_every"):
        AlgorithmConfig(method="local_sgd", outer="slowmo", outer_every=0).validate()


def test_schedule_counts_averages_from_the_step_counter() -> None:
    schedule = SyncSchedule(3, 4, outer_every=2)  # post-local: averages after 7, 10, 13, ...
    assert [s for s in range(1, 23) if schedule.averages_after(s)] == [7, 10, 13, 16, 19, 22]
    assert [s for s in range(1, 23) if schedule.outer_step_after(s)] == [10, 16, 22]
    assert SyncSchedule(3, None, 2).outer_step_after(6) is False
