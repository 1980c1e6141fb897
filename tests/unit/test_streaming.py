"""Delayed, fragmented and compressed global syncs (algorithms/streaming.py) against the independent
reference (tests/reference.py, compression from tests/compression_reference.py), with W workers as
threads in one process; the defaults leave today's sync untouched; bytes are counted exactly; a run
resumed while a delayed sync is in flight continues bit for bit."""

from __future__ import annotations

import copy
import functools
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.algorithms import streaming
from hpc_localsgd.algorithms.codecs import encoded_bytes
from hpc_localsgd.algorithms.compression import CompressedAverageHandle
from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.flat import contiguous_part
from hpc_localsgd.algorithms.global_sync import BlockingAverage
from hpc_localsgd.algorithms.hierarchy import hierarchy_from_config
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.algorithms.streaming import InlineWork, StreamingSync
from hpc_localsgd.comm.base import DoneHandle
from hpc_localsgd.comm.single import SingleCommunicator
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig, LevelConfig, SyncCompression
from tests.reference import ReferenceAlgorithm, simulate

WORKERS, STEPS, BATCH = 3, 16, 8
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-3


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model.to(dtype)


def make_batches(
    dtype: torch.dtype, steps: int = STEPS, workers: int = WORKERS
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    return [
        [
            (torch.randn(BATCH, 6, generator=g).to(dtype), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(steps)
        ]
        for _ in range(workers)
    ]


def lr_at(step: int) -> float:
    return 0.05 * (1.0 + 0.5 * (step % 3))


def logits_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out, F.cross_entropy(out, y)


def make_engine(
    model, comm, cfg: AlgorithmConfig, local_start, codec: SyncCompression, feedback: bool, last_step=None, thread=True
):
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = SyncSchedule(cfg.sync_period, local_start, cfg.outer_every, last_step)
    hierarchy = hierarchy_from_config(cfg, comm.size, None)
    engine = AveragingEngine(
        model,
        opt,
        comm,
        cfg,
        schedule,
        hierarchy=hierarchy,
        compression=codec,
        error_feedback=feedback,
        sync_thread=thread,
    )
    engine.broadcast_initial_state()
    return engine


def run_engine(
    cfg,
    local_start,
    batches,
    dtype,
    codec: SyncCompression = "none",
    feedback: bool = False,
    last_step=None,
    thread: bool = True,
):
    """Each worker's model and engine after ``batches``; with ``last_step`` (the run's end), nothing may be
    in flight after it."""
    initial = make_model(dtype)
    workers = len(batches)

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = make_engine(model, comm, cfg, local_start, codec, feedback, last_step, thread)
        for step, (x, y) in enumerate(batches[comm.rank]):
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        if last_step is not None:
            assert isinstance(engine.global_sync, StreamingSync) and not engine.global_sync.in_flight, (
                "an update sent past the end"
            )
        engine.drain()
        engine.close()
        return model, engine

    return ThreadGroup(workers).run(worker)


def reference(cfg, local_start, batches, dtype, codec: str = "none", feedback: bool = False, last_step=None):
    hierarchy = hierarchy_from_config(cfg, len(batches), None)
    levels = tuple((level.ranks, level.sync_period) for level in hierarchy.levels)
    algo = ReferenceAlgorithm.from_config(cfg, local_start, hierarchy.ranks_per_worker, levels)
    algo.compression, algo.error_feedback, algo.last_step = codec, feedback, last_step
    return simulate(make_model(dtype), algo, batches, lr_at, MOMENTUM, WEIGHT_DECAY)


def local(**kwargs) -> AlgorithmConfig:
    return AlgorithmConfig(method=kwargs.pop("method", "local_sgd"), **kwargs)


# name: (config, local_start, compression, error feedback)
CASES = {
    "delay1_H4": (local(sync_period=4, sync_delay=1), 0, "none", False),
    "delay3_H4_mix": (local(sync_period=4, sync_delay=3, sync_mix=0.5), 0, "none", False),
    "fragments2_H4": (local(sync_period=4, fragments=2), 0, "none", False),
    "fragments4_H4_delay": (local(sync_period=4, fragments=4, sync_delay=0), 0, "none", False),
    "fragments2_delay1_slowmo": (
        local(sync_period=4, fragments=2, sync_delay=1, outer="slowmo", slow_momentum=0.6),
        0,
        "none",
        False,
    ),
    "delay2_nesterov_reset": (
        local(sync_period=3, sync_delay=2, outer="nesterov", optimizer_state="reset"),
        0,
        "none",
        False,
    ),
    "post_local_delay1_avg_momentum": (
        local(method="post_local_sgd", switch_step=5, sync_period=3, sync_delay=1, optimizer_state="average"),
        5,
        "none",
        False,
    ),
    "slowmo_every2_fragments2": (
        local(sync_period=2, fragments=2, outer="slowmo", slow_momentum=0.5, outer_every=2),
        0,
        "none",
        False,
    ),
    # τ = H/F, the most: at τ = H the next Δ is taken at the sync step, before the sync is applied.
    "delay4_H4": (local(sync_period=4, sync_delay=4), 0, "none", False),
    "delay2_H2_mix_slowmo": (
        local(sync_period=2, sync_delay=2, sync_mix=0.5, outer="slowmo", slow_momentum=0.5),
        0,
        "none",
        False,
    ),
    "post_local_delay3_H3_nesterov_every2": (
        local(method="post_local_sgd", switch_step=5, sync_period=3, sync_delay=3, outer="nesterov", outer_every=2),
        5,
        "none",
        False,
    ),
    "fragments2_delay2_H4": (local(sync_period=4, fragments=2, sync_delay=2), 0, "none", False),
    "int8_feedback_H1_delay1": (local(sync_period=1, sync_delay=1), 0, "int8", True),
    "int8_feedback_H2": (local(sync_period=2), 0, "int8", True),
    "int8_no_feedback_H2": (local(sync_period=2), 0, "int8", False),
    "bf16_H4_slowmo": (local(sync_period=4, outer="slowmo", slow_momentum=0.5), 0, "bf16", False),
    "fp16_feedback_delay1_fragments2": (local(sync_period=4, sync_delay=1, fragments=2), 0, "fp16", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_matches_the_reference(name: str) -> None:
    cfg, local_start, codec, feedback = CASES[name]
    assert_matches_the_reference(name, cfg, local_start, codec, feedback, make_batches(torch.float64), None)


# The run's end: below τ = H no update is sent for a sync after it; at τ = H the update taken at the last
# sync step is applied at once. Runs ending on a sync step, one step after it and one before it.
END_CASES = [
    ("delay4_H4", 16),
    ("delay4_H4", 14),
    ("delay2_H2_mix_slowmo", 15),
    ("post_local_delay3_H3_nesterov_every2", 16),
    ("post_local_delay3_H3_nesterov_every2", 13),
    ("fragments2_delay2_H4", 15),
    ("delay3_H4_mix", 15),
    ("int8_feedback_H1_delay1", 16),
]


@pytest.mark.parametrize(("name", "last_step"), END_CASES)
def test_streaming_matches_the_reference_at_the_end_of_the_run(name: str, last_step: int) -> None:
    cfg, local_start, codec, feedback = CASES[name]
    batches = [steps[:last_step] for steps in make_batches(torch.float64)]
    assert_matches_the_reference(name, cfg, local_start, codec, feedback, batches, last_step)


# float64 (uncompressed): the same kernels, another order of sums. float32 through the codecs: at most 3 % of
# it used under five CPU settings (docs/testing.md).
REFERENCE_TOLERANCE = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-6}}


def assert_matches_the_reference(name, cfg, local_start, codec, feedback, batches, last_step) -> None:
    dtype = torch.float64 if codec == "none" else torch.float32  # compression encodes float32
    batches = [[(x.to(dtype), y) for x, y in steps] for steps in batches]
    got = run_engine(cfg, local_start, batches, dtype, codec, feedback, last_step)
    want = reference(cfg, local_start, batches, dtype, codec, feedback, last_step)
    tolerance = REFERENCE_TOLERANCE[dtype]
    for rank, ((model, _), ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = model.state_dict(), ref_model.state_dict()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], **tolerance, msg=f"{name}: rank {rank} {key}")


# Compression and overlap act between workers: 4 ranks in workers of 2 (rank j of each worker averages
# shard j of Δ), or a level of 2 between the rank and the world.
GROUP_CASES = {
    "workers2_delay1_fragments2": (local(sync_period=4, sync_delay=1, fragments=2, ranks_per_worker=2), "none", False),
    "workers2_int8_feedback_delay1_slowmo": (
        local(sync_period=4, sync_delay=1, ranks_per_worker=2, outer="slowmo", slow_momentum=0.5),
        "int8",
        True,
    ),
    "workers2_bf16_fragments2_mix": (
        local(sync_period=4, fragments=2, sync_delay=1, sync_mix=0.5, ranks_per_worker=2),
        "bf16",
        False,
    ),
    "level2_int8_delay1_nesterov": (
        local(sync_period=4, sync_delay=1, outer="nesterov", levels=[LevelConfig(ranks=2, sync_period=2)]),
        "int8",
        True,
    ),
    "workers2_int8_feedback_delay2_H2": (local(sync_period=2, sync_delay=2, ranks_per_worker=2), "int8", True),
    "level2_delay4_H4": (
        local(sync_period=4, sync_delay=4, levels=[LevelConfig(ranks=2, sync_period=2)]),
        "none",
        False,
    ),
    "level2_fragments2": (
        local(sync_period=4, fragments=2, levels=[LevelConfig(ranks=2, sync_period=2)]),
        "none",
        False,
    ),
}


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_streaming_between_workers_matches_the_reference(name: str) -> None:
    assert_workers_match_the_reference(name, None)


# τ = H between workers at the run's end: the update applied at once is assembled inside each worker too.
@pytest.mark.parametrize(("name", "last_step"), [("workers2_int8_feedback_delay2_H2", 16), ("level2_delay4_H4", 14)])
def test_streaming_between_workers_matches_the_reference_at_the_end_of_the_run(name: str, last_step: int) -> None:
    assert_workers_match_the_reference(name, last_step)


def assert_workers_match_the_reference(name: str, last_step: int | None) -> None:
    cfg, codec, feedback = GROUP_CASES[name]
    dtype = torch.float64 if codec == "none" else torch.float32
    batches = [steps[: last_step or STEPS] for steps in make_batches(dtype, workers=4)]
    got = run_engine(cfg, 0, batches, dtype, codec, feedback, last_step)
    want = reference(cfg, 0, batches, dtype, codec, feedback, last_step)
    tolerance = REFERENCE_TOLERANCE[dtype]
    for rank, ((model, _), ref_model) in enumerate(zip(got, want, strict=True)):
        ours, theirs = model.state_dict(), ref_model.state_dict()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], **tolerance, msg=f"{name}: rank {rank} {key}")
    # With a delay the sync thread works on each rank's shard; the worker's assembly stays on the step's.
    assert all(engine.uses_sync_thread == (cfg.sync_delay > 0) for _, engine in got), name
    if cfg.ranks_per_worker == 2:  # the ranks of a worker hold the same parameters, bit for bit
        for first, second in ((0, 1), (2, 3)):
            for (key, mine), theirs in zip(got[first][0].named_parameters(), got[second][0].parameters(), strict=True):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.parametrize(
    ("name", "cfg", "codec", "workers"),
    [
        ("delay2_H4", local(sync_period=4, sync_delay=2), "none", 3),
        ("fragments2_delay1_slowmo", local(sync_period=4, fragments=2, sync_delay=1, outer="slowmo"), "none", 3),
        ("workers2_delay1", local(sync_period=4, sync_delay=1, ranks_per_worker=2), "none", 4),
        ("int8_feedback_delay1", local(sync_period=4, sync_delay=1), "int8", 3),
    ],
)
def test_streaming_syncs_measure_the_consensus_distance(name: str, cfg: AlgorithmConfig, codec, workers: int) -> None:
    """Ξ²/‖x̄‖² of the synced fragment, of x as its Δ was taken: from mean‖Δᵢ‖² (averaged beside Δ)
    and the average Δ, against the definition over the workers' x (float64 model: exact but for
    rounding; int8: the decoded average stands for the exact mean, so only close)."""
    dtype = torch.float64 if codec == "none" else torch.float32
    batches = make_batches(dtype, workers=workers)
    initial = make_model(dtype)

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = make_engine(model, comm, cfg, 0, codec, codec == "int8")
        measured = []
        for step, (x, y) in enumerate(batches[comm.rank]):
            if engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y)).synced:
                measured.append((step + 1, engine.last_sync))
        engine.drain()
        return measured

    got = ThreadGroup(workers).run(worker)
    record: list[dict[str, float]] = []
    hierarchy = hierarchy_from_config(cfg, workers, None)
    algo = ReferenceAlgorithm.from_config(cfg, 0, hierarchy.ranks_per_worker)
    algo.compression, algo.error_feedback = codec, codec == "int8"
    simulate(make_model(dtype), algo, batches, lr_at, MOMENTUM, WEIGHT_DECAY, record=record)
    assert [step for step, _ in got[0]] == [int(entry["step"]) for entry in record] and record
    rtol = 1e-7 if codec == "none" else 0.05
    for rank_measured in got:
        for (_, measurement), entry in zip(rank_measured, record, strict=True):
            assert measurement.consensus_distance == pytest.approx(entry["consensus_distance"], rel=rtol), name
            assert measurement.model_norm == pytest.approx(entry["model_norm"], rel=1e-3 if codec == "int8" else 1e-9)
            assert measurement.consensus_distance > 0


def test_a_worker_sends_its_shard_between_workers() -> None:
    """int8 between workers of 2: rank j sends the encoded shard j of each fragment (and shard j of the BN
    statistics, fp32, with fragment 0, as the blocking sync does), and assembles the fragment inside its
    worker (fp32, zeros elsewhere); the BN statistics are averaged inside the worker first, then assembled."""
    cfg = local(sync_period=4, fragments=2, ranks_per_worker=2)
    got = run_engine(cfg, 0, make_batches(torch.float32, workers=4), torch.float32, "int8", True)
    _, engine = got[0]
    group = engine.groups[0]
    params = group.slice("params").shape[-1]
    bn = 4 * 2 * 16  # running mean and variance of BatchNorm1d(16), fp32
    for rank, (_, engine) in enumerate(got):
        fragments = [contiguous_part(0, params, 2, f) for f in range(2)]
        shards = [contiguous_part(a, b, 2, rank % 2) for a, b in fragments]
        syncs = STEPS // 4  # per fragment: fragment 1 at steps 2, 6, 10, 14; fragment 0 at 4, 8, 12, 16
        bn_shard = 4 * (lambda a, b: b - a)(*contiguous_part(0, bn // 4, 2, rank % 2))
        between = syncs * sum(encoded_bytes("int8", b - a) for a, b in shards) + syncs * bn_shard
        # Inside the worker: every step's gradients, and each fragment's assembly once per period, in fp32;
        # with fragment 0 the BN statistics' average inside the worker and their assembly.
        inside = STEPS * 4 * params + syncs * 4 * params + syncs * 2 * bn
        assert engine.stats.bytes_by_level == {"global": between, "worker": inside}, rank
        assert engine.stats.rounds_by_level == {"global": 2 * syncs, "worker": STEPS + 2 * syncs}, rank


def test_defaults_keep_the_blocking_sync() -> None:
    """sync_delay 0, fragments 1, compression none: the engine's own sync, unchanged (bit for bit today's)."""
    (model, engine), *_ = run_engine(local(sync_period=4), 0, make_batches(torch.float64), torch.float64)
    assert isinstance(engine.global_sync, BlockingAverage)


@pytest.mark.parametrize("last_step", [None, 8])
def test_delay_of_one_at_period_one_is_delayed_gradient_descent(last_step: int | None) -> None:
    """H = 1, τ = 1, one worker, plain SGD at a constant LR on least squares: by the definition (Δ taken at
    each sync step before the sync is applied, the first one followed by x ← x_prev), the model after c
    steps is y_c of delayed gradient descent, y_0 = y_1 = x_0, y_(c+1) = y_c − η∇f(y_(c−1)), written out
    here in closed form, independently of the reference. A run that ends after step E applies its Δ taken
    at E at once, after the sync due: it ends at y_(E+1), every gradient it computed applied."""
    g = torch.Generator().manual_seed(3)
    inputs, targets = (
        torch.randn(32, 5, generator=g, dtype=torch.float64),
        torch.randn(32, 1, generator=g, dtype=torch.float64),
    )
    lr = 0.1
    model = torch.nn.Linear(5, 1, bias=False).double()
    start = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cfg = local(sync_period=1, sync_delay=1)
    engine = AveragingEngine(model, opt, SingleCommunicator(), cfg, SyncSchedule(1, 0, last_step=last_step))

    def gradient(w: torch.Tensor) -> torch.Tensor:  # of the mean squared error, (2/N)·Xᵀ(Xw − y)
        return (2 / len(inputs)) * ((inputs @ w.T - targets).T @ inputs)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs)
        return out, F.mse_loss(out, targets)

    expected = [start, start]
    for step in range(8):
        engine.train_step(step, lr, forward)
        completed = step + 1
        if completed >= 2:
            expected.append(expected[-1] - lr * gradient(expected[-2]))
        last = completed == last_step
        want = expected[-1] - lr * gradient(expected[-2]) if last else expected[completed]
        torch.testing.assert_close(model.weight.detach(), want, rtol=1e-12, atol=1e-14)
    assert isinstance(engine.global_sync, StreamingSync)
    assert (not engine.global_sync.in_flight) == (last_step is not None)
    engine.drain()
    engine.close()


@pytest.mark.parametrize(("period", "last_step", "resumed_to"), [(1, 8, None), (3, 10, None), (2, 7, 12), (3, 9, 17)])
def test_a_run_overlapped_by_its_period_ends_with_every_gradient_applied(
    period: int, last_step: int, resumed_to: int | None
) -> None:
    """τ = H, one worker, plain SGD (no momentum): each gradient reaches the global model one sync late, the
    last ones through the update applied at once at the last sync step, so the final model is x_0 − η·Σ
    of every gradient computed, exactly once. Also for a run resumed from its end with more steps
    (``train.epochs`` raised), whose first sync has no update in flight and is skipped."""
    g = torch.Generator().manual_seed(5)
    inputs = torch.randn(16, 4, generator=g, dtype=torch.float64)
    targets = torch.randn(16, 1, generator=g, dtype=torch.float64)
    lr, cfg = 0.05, local(sync_period=period, sync_delay=period)
    model = torch.nn.Linear(4, 1, bias=False).double()
    start = model.weight.detach().clone()

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs)
        return out, F.mse_loss(out, targets)

    def engine_to(end: int) -> AveragingEngine:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        return AveragingEngine(model, opt, SingleCommunicator(), cfg, SyncSchedule(period, 0, last_step=end))

    gradients = []
    engine = engine_to(last_step)
    for step in range(last_step):
        engine.train_step(step, lr, forward)
        gradients.append(model.weight.grad.detach().clone())
    if resumed_to is not None:
        rank_state = {name: t.clone() for name, t in engine.rank_state().items()}
        shared_state = {name: t.clone() for name, t in engine.shared_state().items()}
        engine.close()
        engine = engine_to(resumed_to)
        engine.load_state(rank_state, shared_state, last_step)
        for step in range(last_step, resumed_to):
            engine.train_step(step, lr, forward)
            gradients.append(model.weight.grad.detach().clone())
    assert isinstance(engine.global_sync, StreamingSync) and not engine.global_sync.in_flight
    torch.testing.assert_close(model.weight.detach(), start - lr * sum(gradients), rtol=1e-12, atol=1e-14)
    engine.close()


@pytest.mark.parametrize("period", [1, 2])
def test_a_sync_overlapped_by_one_step_has_its_second_phase_behind_the_backward(period: int) -> None:
    """int8 among 3 workers (two-phase) with τ = 1: sent at the end of one step and applied at the end of
    the next, the average goes on to its second phase before that step's backward, not at its end where
    it is waited for. Seen from a gradient hook: during the backward of each step that ends in a sync,
    every average due then has started its second phase; during the forward it had not."""
    cfg = local(sync_period=period, sync_delay=1)
    batches = make_batches(torch.float32)
    initial = make_model(torch.float32)

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = make_engine(model, comm, cfg, 0, "int8", True)
        seen: list[tuple[int, str, bool]] = []
        current = {"step": 0}

        def phases(when: str) -> None:
            pending = engine.global_sync.in_flight.get(0) if isinstance(engine.global_sync, StreamingSync) else None
            if pending is not None and pending.sync_step == current["step"] + 1:
                first = [h.before_second_phase for h in pending.handles if isinstance(h, CompressedAverageHandle)]
                seen.append((current["step"], when, all(first) and bool(first)))

        model[0].weight.register_hook(lambda grad: phases("backward"))

        def forward(x, y):
            phases("forward")
            return logits_and_loss(model, x, y)

        for step, (x, y) in enumerate(batches[comm.rank]):
            current["step"] = step
            engine.train_step(step, lr_at(step), functools.partial(forward, x, y))
        engine.drain()
        return seen

    for seen in ThreadGroup(WORKERS).run(worker):
        syncs = [step for step in range(STEPS) if (step + 1) % period == 0 and step + 1 > 1]
        assert seen == [(step, when, when == "forward") for step in syncs for when in ("forward", "backward")]


def test_the_second_phase_counts_as_the_syncs_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a two-phase average's second phase waits for the first and sums and re-encodes this rank's
    chunk: the sync's cost, so it is in ``comm_seconds``. Each start is made to take at least 50 ms here."""
    original = CompressedAverageHandle.advance
    started: list[int] = []

    def slow_advance(handle: CompressedAverageHandle) -> None:
        if handle.before_second_phase:
            started.append(1)
            time.sleep(0.05)
        original(handle)

    monkeypatch.setattr(CompressedAverageHandle, "advance", slow_advance)
    got = run_engine(local(sync_period=2, sync_delay=1), 0, make_batches(torch.float32), torch.float32, "int8", True)
    per_rank = len(started) // WORKERS
    assert per_rank == STEPS // 2  # syncs after 2, 4, ..., 16
    for _, engine in got:
        assert engine.stats.comm_seconds >= 0.05 * per_rank


def test_replicas_hold_the_global_model_after_a_delayed_sync() -> None:
    got = run_engine(local(sync_period=4, sync_delay=2), 0, make_batches(torch.float64), torch.float64)  # 16: a sync
    first = dict(got[0][0].named_parameters())
    for model, _ in got[1:]:
        for key, p in model.named_parameters():
            assert torch.equal(p, first[key]), key


@pytest.mark.parametrize("codec", ["none", "bf16", "fp16", "int8"])
def test_bytes_are_counted_exactly(codec: SyncCompression) -> None:
    cfg = local(sync_period=4, fragments=2, average_bn_buffers=True)
    got = run_engine(cfg, 0, make_batches(torch.float32), torch.float32, codec, codec == "int8")
    model = make_model(torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    bn_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    first, second = numel - numel // 2, numel // 2  # the first fragment takes the odd element
    # 16 steps, H 4, 2 fragments: fragment 0 at 4, 8, 12, 16 (with the BN statistics), fragment 1 at 2, 6, 10, 14.
    expected = 4 * (encoded_bytes(codec, first) + bn_bytes) + 4 * encoded_bytes(codec, second)
    for _, engine in got:
        assert engine.stats.sync_rounds == 8
        assert engine.stats.bytes_sent == expected
    if codec in ("bf16", "fp16"):
        assert encoded_bytes(codec, numel) * 2 == encoded_bytes("none", numel)
    if codec == "int8":
        assert encoded_bytes(codec, numel) <= 0.27 * encoded_bytes("none", numel) + 4  # one block's scale


@pytest.mark.parametrize(
    ("sync_period", "sync_delay", "stop"),
    [
        (4, 3, 6),  # fragment 0's sync of step 8, started after step 5, in flight
        (2, 2, 4),  # τ = H: the sync of step 4 applied and that of step 6 started at the same step
        (2, 2, 5),  # τ = H: the sync of step 6 in flight, one step before its own step starts the next
    ],
)
# 3 workers: the two-phase exchange; 2: gathered. With the sync thread and without.
@pytest.mark.parametrize("workers", [3, 2])
@pytest.mark.parametrize("thread", [True, False], ids=["sync_thread", "step_thread"])
def test_resume_with_a_delayed_sync_in_flight_is_bit_exact(
    sync_period: int, sync_delay: int, stop: int, workers: int, thread: bool
) -> None:
    """Stop after ``stop`` steps with a delayed int8 sync in flight, save what a checkpoint saves, restore it
    into fresh engines and go on: the same parameters as never stopping."""
    cfg = local(sync_period=sync_period, sync_delay=sync_delay, outer="slowmo", slow_momentum=0.5)
    codec: SyncCompression = "int8"
    batches = make_batches(torch.float32, workers=workers)
    uninterrupted = run_engine(cfg, 0, batches, torch.float32, codec, True, thread=thread)
    initial = make_model(torch.float32)

    def first_half(comm):
        model = copy.deepcopy(initial)
        engine = make_engine(model, comm, cfg, 0, codec, True, thread=thread)
        for step, (x, y) in enumerate(batches[comm.rank][:stop]):
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        assert isinstance(engine.global_sync, StreamingSync) and 0 in engine.global_sync.in_flight  # mid-delay
        assert engine.uses_sync_thread == thread
        saved = (
            {k: v.clone() for k, v in engine.rank_state().items()},
            {k: v.clone() for k, v in engine.shared_state().items()},
            {k: v.clone() for k, v in engine.int_buffers().items()},  # BN's batch counters, checkpointed too
        )
        engine.close()
        return saved

    saved = ThreadGroup(workers).run(first_half)

    def second_half(comm):
        model = copy.deepcopy(initial)
        engine = make_engine(model, comm, cfg, 0, codec, True, thread=thread)
        rank_state, shared, counters = saved[comm.rank]
        engine.load_state(rank_state, shared, stop)
        for name, live in engine.int_buffers().items():
            live.copy_(counters[name])
        for step in range(stop, STEPS):
            x, y = batches[comm.rank][step]
            engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
        engine.drain()
        engine.close()
        return model

    resumed = ThreadGroup(workers).run(second_half)
    for (want, _), got in zip(uninterrupted, resumed, strict=True):
        for (key, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
            assert torch.equal(a, b), key


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sync_period": 4, "fragments": 3}, "algorithm.fragments: must divide sync_period (4)"),
        ({"sync_period": 4, "sync_delay": 5}, "algorithm.sync_delay: must be at most sync_period / fragments (4)"),
        ({"sync_period": 4, "fragments": 2, "sync_delay": 3}, "at most sync_period / fragments (2)"),
        ({"sync_period": 4, "sync_mix": 0.5}, "algorithm.sync_mix: applies with sync_delay > 0"),
        ({"method": "allreduce", "sync_delay": 0, "fragments": 2, "sync_period": 2}, "method 'allreduce'"),
    ],
)
def test_bad_streaming_settings_are_refused_in_one_line(overrides: dict, message: str) -> None:
    from hpc_localsgd.config import load_config
    from hpc_localsgd.errors import ConfigError

    sets = [f"algorithm.{k}={v}" for k, v in {"method": "local_sgd", **overrides}.items()]
    with pytest.raises(ConfigError) as error:
        load_config(None, sets)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_compression_is_refused_where_it_cannot_apply() -> None:
    from hpc_localsgd.config import load_config
    from hpc_localsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="comm.sync_compression: compresses model averages"):
        load_config(None, ["algorithm.method=allreduce", "comm.sync_compression=int8"])
    cfg = load_config(None, ["algorithm.method=local_sgd", "comm.sync_compression=int8"])
    assert cfg.comm.uses_error_feedback  # auto: on for int8
    cfg = load_config(None, ["algorithm.method=local_sgd", "comm.sync_compression=bf16"])
    assert not cfg.comm.uses_error_feedback  # auto: off for bf16
    with pytest.raises(ConfigError, match="comm.gradient_compression: compresses the gradients of synchronous steps"):
        load_config(None, ["algorithm.method=local_sgd", "comm.gradient_compression=bf16"])
    with pytest.raises(ConfigError, match="comm.gradient_compression"):
        load_config(None, ["comm.gradient_compression=int8"])  # half precision only
    for method in ("allreduce", "post_local_sgd"):
        assert load_config(None, [f"algorithm.method={method}", "comm.gradient_compression=fp16"])
    with pytest.raises(ConfigError, match="hides an overflow from train.precision=fp16's loss scaler; use bf16"):
        load_config(None, ["algorithm.method=allreduce", "comm.gradient_compression=fp16", "train.precision=fp16"])
    assert load_config(None, ["algorithm.method=allreduce", "comm.gradient_compression=bf16", "train.precision=fp16"])


def test_one_rank_sends_nothing() -> None:
    """As the engine's own sync: a world of one rank counts no round and no byte, and still takes its outer step."""
    cfg = local(sync_period=2, sync_delay=1, outer="slowmo", slow_momentum=0.5)
    model = make_model(torch.float32)
    engine = make_engine(model, SingleCommunicator(), cfg, 0, "int8", True)
    for step, (x, y) in enumerate(make_batches(torch.float32)[0][:6]):
        engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))
    assert (engine.stats.sync_rounds, engine.stats.bytes_sent) == (0, 0)
    assert engine.last_sync is not None and engine.last_sync.outer_step


# The sync thread (comm.sync_thread). Between 2 workers a compressed average is one gather: its encoding, wait
# and decoding run beside the step. Among 3 it is two-phase: encoded on the step's thread, the all-to-all's
# wait, the chunk's sum and re-encoding and the gather's wait and decoding beside it. The results are the
# bits of the step's own thread.
THREAD_CASES = {
    "int8_feedback_H1_delay1": (local(sync_period=1, sync_delay=1), "int8", True, 2),
    "int8_feedback_H2_delay2_slowmo": (
        local(sync_period=2, sync_delay=2, outer="slowmo", slow_momentum=0.5),
        "int8",
        True,
        2,
    ),
    "bf16_fragments2_delay1_mix": (local(sync_period=4, fragments=2, sync_delay=1, sync_mix=0.5), "bf16", False, 2),
    "none_delay3_H4_nesterov": (local(sync_period=4, sync_delay=3, outer="nesterov"), "none", False, 2),
    "two_phase_int8_feedback_H1_delay1": (local(sync_period=1, sync_delay=1), "int8", True, 3),
    "two_phase_int8_feedback_H2_delay2": (local(sync_period=2, sync_delay=2), "int8", True, 3),
    "two_phase_bf16_fragments2_delay2": (local(sync_period=4, fragments=2, sync_delay=2), "bf16", False, 3),
}


@pytest.mark.parametrize("last_step", [None, 15])
@pytest.mark.parametrize("name", list(THREAD_CASES))
def test_the_sync_thread_gives_the_bits_of_the_step_thread(name: str, last_step: int | None, monkeypatch) -> None:
    cfg, codec, feedback, workers = THREAD_CASES[name]
    dtype = torch.float64 if codec == "none" else torch.float32
    batches = [steps[: last_step or STEPS] for steps in make_batches(dtype, workers=workers)]
    # Where the encoding and the waits ran: a compressed Δ is encoded on the sync thread, an fp32 Δ (nothing
    # to encode) on the step's; the averages are waited for on the sync thread.
    encoded_on: list[str] = []
    waited_on: list[str] = []
    encode, wait_beside = StreamingSync._encode, streaming._wait_all_beside

    def encoding(self, *args):
        encoded_on.append(threading.current_thread().name)
        return encode(self, *args)

    def waiting(handles):
        waited_on.append(threading.current_thread().name)
        return wait_beside(handles)

    monkeypatch.setattr(StreamingSync, "_encode", encoding)
    monkeypatch.setattr(streaming, "_wait_all_beside", waiting)
    beside = run_engine(cfg, 0, batches, dtype, codec, feedback, last_step, thread=True)
    encoding_thread = "hpc-localsgd-sync" if codec != "none" and workers == 2 else "rank-"
    assert encoded_on and all(name.startswith(encoding_thread) for name in encoded_on)
    assert waited_on and set(waited_on) == {"hpc-localsgd-sync"}
    encoded_on.clear()
    waited_on.clear()
    inline = run_engine(cfg, 0, batches, dtype, codec, feedback, last_step, thread=False)
    assert encoded_on and all(name.startswith("rank-") for name in encoded_on) and not waited_on
    for (model, engine), (want, want_engine) in zip(beside, inline, strict=True):
        for (key, a), b in zip(want.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}: {key}"
        assert engine.stats.bytes_by_level == want_engine.stats.bytes_by_level
        assert engine.stats.rounds_by_level == want_engine.stats.rounds_by_level
    want_models = reference(cfg, 0, batches, dtype, codec, feedback, last_step)
    tolerance = REFERENCE_TOLERANCE[dtype]
    for (model, _), ref_model in zip(beside, want_models, strict=True):
        for key, theirs in ref_model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], theirs, **tolerance, msg=f"{name}: {key}")


@pytest.mark.parametrize(
    ("cfg", "codec", "workers"),
    [
        (local(sync_period=4, fragments=2), "int8", 2),  # no delay: the average is waited for where it starts
    ],
)
def test_the_sync_thread_stays_out_where_nothing_can_move_beside_the_step(cfg, codec, workers: int) -> None:
    got = run_engine(cfg, 0, make_batches(torch.float32, workers=workers), torch.float32, codec, codec == "int8")
    assert all(
        isinstance(engine.global_sync, StreamingSync) and isinstance(engine.global_sync.beside, InlineWork)
        for _, engine in got
    )


def test_an_error_on_the_sync_thread_stops_the_step_that_waits_for_it(monkeypatch) -> None:
    """Raised in the step's thread where it starts the average, on every rank: no rank waits for a
    collective that the others never start."""

    def broken(self, *args):
        raise RuntimeError("encoding failed")

    monkeypatch.setattr(StreamingSync, "_encode", broken)
    with pytest.raises(RuntimeError, match="encoding failed"):
        run_engine(local(sync_period=2, sync_delay=1), 0, make_batches(torch.float64, workers=2), torch.float64)


def test_a_step_that_waits_for_an_average_on_the_sync_thread_tells_the_backend(monkeypatch) -> None:
    """Where the step reaches a sync whose average the sync thread still waits for, it tells the handles
    (Handle.step_waits), so that the mpi backend's polled exchanges go at the waiting step's pace."""
    told: list[str] = []
    wait_beside = streaming._wait_all_beside

    def slow(handles):
        time.sleep(0.05)  # still waiting when the step reaches the sync
        wait_beside(handles)

    monkeypatch.setattr(streaming, "_wait_all_beside", slow)
    monkeypatch.setattr(DoneHandle, "step_waits", lambda self: told.append(threading.current_thread().name))
    run_engine(
        local(sync_period=1, sync_delay=1), 0, make_batches(torch.float32, workers=2), torch.float32, "int8", True
    )
    assert told and all(name.startswith("rank-") for name in told)


def test_the_mpi_handles_hurry_their_polled_exchange_when_the_step_waits() -> None:
    from concurrent.futures import Future

    from hpc_localsgd.comm.mpi import _GatherHandle, _ThreadedHandle

    buffer = torch.zeros(4)
    gather, reduce = threading.Event(), threading.Event()
    handles = [
        _GatherHandle(Future(), buffer, buffer, (None, None), waited=gather),  # type: ignore[arg-type]
        _ThreadedHandle(Future(), buffer, buffer, None, 1, waited=reduce),
    ]
    for handle in handles:
        handle.step_waits()
    assert gather.is_set() and reduce.is_set()
