"""The engine's two global syncs against one protocol: the blocking average and the streaming sync (Δ,
delayed, fragmented or compressed) each implement ``GlobalSync``, count what they send the same way, carry
their state through a checkpoint bit for bit, and follow one BatchNorm rule (averaged over all ranks:
inside each worker, then between workers by shards). Ranks are threads with a faked communicator."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from hpc_localsgd.algorithms.engine import AveragingEngine
from hpc_localsgd.algorithms.global_sync import BlockingAverage, GlobalSync, SyncParts
from hpc_localsgd.algorithms.hierarchy import hierarchy_from_config
from hpc_localsgd.algorithms.schedule import SyncSchedule
from hpc_localsgd.algorithms.streaming import StreamingSync
from hpc_localsgd.comm.threads import ThreadGroup
from hpc_localsgd.config.schema import AlgorithmConfig, SyncCompression
from tests.unit.test_streaming import MOMENTUM, WEIGHT_DECAY, logits_and_loss, lr_at, make_batches, make_model

STEPS = 8  # two periods of H = 4


def build(model, comm, cfg: AlgorithmConfig, codec: SyncCompression = "none", streaming: bool = False):
    """The engine for ``cfg``; ``streaming``: its blocking average replaced, before any step, by the streaming
    sync of the same period without delay, fragments or compression (x̄ = x_prev − avg Δ)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = SyncSchedule(cfg.sync_period, 0)
    hierarchy = hierarchy_from_config(cfg, comm.size, None)
    engine = AveragingEngine(
        model, opt, comm, cfg, schedule, hierarchy=hierarchy, compression=codec, error_feedback=codec == "int8"
    )
    if streaming:
        assert isinstance(engine.global_sync, BlockingAverage)
        parts = SyncParts(
            engine.groups,
            engine.sync_spans,
            engine.averaged_kinds,
            engine.exchange,
            cfg,
            schedule,
            engine.outer,
            engine.stats,
        )
        engine.global_sync = StreamingSync(parts, "none", False)
    engine.broadcast_initial_state()
    return engine


def train(engine: AveragingEngine, model, batches, steps: range) -> None:
    for step in steps:
        x, y = batches[step]
        engine.train_step(step, lr_at(step), functools.partial(logits_and_loss, model, x, y))


def local(**settings) -> AlgorithmConfig:
    return AlgorithmConfig(**{"method": "local_sgd", "sync_period": 4, **settings})


SYNCS = {
    "blocking": (local(), "none"),
    "delayed": (local(sync_delay=1), "none"),
    "fragments": (local(fragments=2), "none"),
    "int8": (local(), "int8"),
    "slowmo_delayed": (local(sync_delay=2, outer="slowmo", slow_momentum=0.5), "none"),
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_each_sync_keeps_the_protocol(name: str) -> None:
    """Either sync: the protocol's type; one GLOBAL round's bytes per sync of each part, and per sync of the
    whole model ``bytes_per_sync``; after a sync, what it says every rank agrees on is identical on every
    rank; ``settle`` twice changes nothing."""
    cfg, codec = SYNCS[name]
    dtype = torch.float64 if codec == "none" else torch.float32  # the codecs encode float32
    batches = make_batches(dtype, steps=STEPS, workers=2)
    initial = make_model(dtype)

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = build(model, comm, cfg, codec)
        assert isinstance(engine.global_sync, GlobalSync)
        assert isinstance(engine.global_sync, StreamingSync) == (name != "blocking")
        train(engine, model, batches[comm.rank], range(STEPS))
        engine.drain()
        engine.drain()
        agreed = [t.clone() for t in engine.global_sync.agreed_after_sync()]
        engine.close()
        return engine, agreed

    got = ThreadGroup(2).run(worker)
    for engine, agreed in got:
        traffic = engine.traffic()
        assert traffic.bytes_per_sync == engine.bytes_per_sync > 0
        # Two periods: every part of the model synced twice, so twice a whole model's bytes.
        assert engine.stats.bytes_by_level == {"global": 2 * traffic.bytes_per_sync}, name
        assert engine.stats.rounds_by_level == {"global": 2 * len(traffic.fragment_elements)}, name
        for mine, theirs in zip(agreed, got[0][1], strict=True):
            assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_each_sync_resumes_bit_exactly_from_its_state(name: str) -> None:
    """rank_state and shared_state taken mid-run (an average may be in flight) and loaded into a fresh engine:
    the rest of the run is the same bits."""
    cfg, codec = SYNCS[name]
    dtype = torch.float64 if codec == "none" else torch.float32  # the codecs encode float32
    batches = make_batches(dtype, steps=STEPS, workers=2)
    initial = make_model(dtype)

    def worker(comm):
        model = copy.deepcopy(initial)
        engine = build(model, comm, cfg, codec)
        train(engine, model, batches[comm.rank], range(3))
        rank_state = {k: v.clone() for k, v in engine.rank_state().items()}
        shared_state = {k: v.clone() for k, v in engine.shared_state().items()}
        int_buffers = {k: v.clone() for k, v in engine.int_buffers().items()}  # as a checkpoint keeps them
        train(engine, model, batches[comm.rank], range(3, STEPS))
        engine.drain()
        resumed_model = copy.deepcopy(initial)
        resumed = build(resumed_model, comm, cfg, codec)
        resumed.load_state(rank_state, shared_state, 3)
        for key, value in resumed.int_buffers().items():
            value.copy_(int_buffers[key])
        train(resumed, resumed_model, batches[comm.rank], range(3, STEPS))
        resumed.drain()
        engine.close()
        resumed.close()
        return model.state_dict(), resumed_model.state_dict()

    for want, got in ThreadGroup(2).run(worker):
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{name}: {key}"


def test_both_syncs_average_to_the_same_model_with_one_bn_rule() -> None:
    """Workers of 2 ranks, 2 workers, BN statistics and momentum averaged: the blocking average of x and the
    streaming sync's x_prev − avg Δ give the same parameters, BN statistics and momentum (float64 rounding),
    the last two averaged by the same exchange (inside the worker, then by shards between workers).
    Together the ranks send the same bytes at each level."""
    cfg = local(ranks_per_worker=2, optimizer_state="average")
    batches = make_batches(torch.float64, steps=STEPS, workers=4)
    initial = make_model(torch.float64)

    def worker(comm):
        results = []
        for streaming in (False, True):
            model = copy.deepcopy(initial)
            engine = build(model, comm, cfg, streaming=streaming)
            train(engine, model, batches[comm.rank], range(STEPS))
            engine.close()
            momentum = [engine.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
            results.append((model.state_dict(), momentum, dict(engine.stats.bytes_by_level)))
        return results

    got = ThreadGroup(4).run(worker)
    # x̄ formed two ways differs in the last bits, and the steps after the first sync carry that on.
    close = {"rtol": 1e-12, "atol": 1e-14}
    for (blocking, blocking_momentum, _), (streaming, streaming_momentum, _) in got:
        for key, tensor in blocking.items():
            if tensor.is_floating_point():
                torch.testing.assert_close(streaming[key], tensor, **close, msg=key)
        for mine, theirs in zip(streaming_momentum, blocking_momentum, strict=True):
            torch.testing.assert_close(mine, theirs, **close)
    for level in ("global", "worker"):
        assert sum(r[0][2][level] for r in got) == sum(r[1][2][level] for r in got), level
