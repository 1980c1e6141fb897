"""Half-precision gradient buckets (``comm.gradient_compression``): each rank's gradients travel as
bf16 or fp16 and are summed in fp32 in rank order, bit for bit the independent reference's average
(tests/compression_reference.py), with half the bytes counted. W workers as threads in one process
(a faked communicator, as the house rules allow for unit tests); among three the exchange is the
two-phase one, whose average is re-encoded once more."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hpc_localsgd.algorithms.accounting import GLOBAL, CommStats
from hpc_localsgd.algorithms.compression import encoded_bytes
from hpc_localsgd.algorithms.gradients import GradientAllreduce
from hpc_localsgd.comm.threads import ThreadGroup
from tests.compression_reference import compressed_average


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("codec", ["bf16", "fp16"])
@pytest.mark.parametrize("workers", [2, 3])
def test_gradients_travel_in_half_precision_and_are_summed_in_fp32(codec: str, workers: int) -> None:
    def worker(comm):  # type: ignore[no-untyped-def]
        model = make_model()
        plain = copy.deepcopy(model)  # this rank's own gradients, before any averaging
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + comm.rank))
        stats = CommStats()
        # 64-byte buckets: several of them, started while backward runs, as in training.
        buckets = GradientAllreduce(list(model.parameters()), comm, 64, stats, compression=codec)
        buckets.start_step(comm, GLOBAL)
        model(x).square().sum().backward()
        buckets.finish()
        plain(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()], [p.grad.clone() for p in plain.parameters()], stats

    results = ThreadGroup(workers).run(worker)
    fp32_bytes = sum(p.numel() * 4 for p in make_model().parameters())
    for index in range(len(results[0][0])):
        own = [rank_result[1][index].numpy().ravel() for rank_result in results]
        want = compressed_average(codec, own, None)[0]
        exact = sum(own[1:], own[0].copy()) / np.float32(workers)
        assert not np.array_equal(want, exact)  # the compression changes the average: the check can fail
        for rank_result in results:
            np.testing.assert_array_equal(rank_result[0][index].numpy().ravel(), want)
    for _, _, stats in results:
        assert (
            stats.bytes_sent
            == fp32_bytes // 2
            == sum(encoded_bytes(codec, p.numel()) for p in make_model().parameters())
        )
        assert stats.rounds_by_level == {GLOBAL: 1}


def test_gradients_inside_a_worker_stay_fp32() -> None:
    def worker(comm):  # type: ignore[no-untyped-def]
        model = make_model()
        plain = copy.deepcopy(model)
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + comm.rank))
        stats = CommStats()
        buckets = GradientAllreduce(list(model.parameters()), comm, 64, stats, compression="bf16")
        buckets.start_step(comm, "worker")
        model(x).square().sum().backward()
        buckets.finish()
        plain(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()], [p.grad.clone() for p in plain.parameters()], stats

    first, second = ThreadGroup(2).run(worker)
    fp32_bytes = sum(p.numel() * 4 for p in make_model().parameters())
    assert first[2].bytes_by_level == {"worker": fp32_bytes}
    for got_first, got_second, own_first, own_second in zip(first[0], second[0], first[1], second[1], strict=True):
        assert torch.equal(got_first, (own_first + own_second) / 2)  # the fp32 average, not a half-precision one
        assert torch.equal(got_second, got_first)


def test_bf16_keeps_the_overflow_a_loss_scaler_must_see() -> None:
    """train.precision=fp16 scales the loss; an overflowing gradient must reach the scaler as inf or NaN
    after the average. bf16 keeps them (fp16, which saturates, is refused with fp16 precision)."""

    def worker(comm):  # type: ignore[no-untyped-def]
        weight = torch.nn.Parameter(torch.ones(3))
        buckets = GradientAllreduce([weight], comm, 64, CommStats(), compression="bf16")
        buckets.start_step(comm, GLOBAL)
        scale = torch.tensor([3e38, 1.0, 1.0]) if comm.rank == 0 else torch.tensor([3e38, float("nan"), 1.0])
        (weight * scale).sum().backward()
        buckets.finish()
        return weight.grad.clone()

    for grad in ThreadGroup(2).run(worker):
        assert torch.isinf(grad[0]) and torch.isnan(grad[1]) and grad[2] == 1.0
