"""Every algorithm on real MPI ranks (``mpirun -np 2``), on every backend: the ranks agree, the
backends agree, the result matches the independent reference, and the counters are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_localsgd.algorithms.codecs import encoded_bytes
from tests.mpi.cases import (
    ALL_CASES,
    BASE,
    CASES,
    ENDS_BETWEEN_FRAGMENT_SYNCS,
    REFERENCE_TOLERANCE,
    STEPS,
    SYNC_THREAD_CASES,
    load_counters,
    load_state,
    reference_run,
    run_cases,
)

BACKENDS = ["mpi", "horovod", "torch"]
RANKS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_cases(RANKS, BACKENDS, tmp_path_factory.mktemp("algorithms"))


def reference_states(case: str, ranks: int = RANKS) -> tuple[list[dict[str, np.ndarray]], torch.nn.Module]:
    """The same problem (data shards, initial model, LR) trained by tests/reference.py."""
    return reference_run(BASE + ALL_CASES[case], ranks)


def param_names(case: str) -> list[str]:
    _, model = reference_states(case)
    return [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_ranks_agree(runs: dict[str, Path], backend: str, case: str) -> None:
    expected, model = reference_states(case)
    for rank in range(RANKS):
        got = load_state(runs, backend, case, rank)
        for key, want in expected[rank].items():
            np.testing.assert_allclose(
                got[key], want, **REFERENCE_TOLERANCE, err_msg=f"{backend} {case} rank {rank} {key}"
            )
    # Every case ends on a sync (or never lets replicas drift): the parameters are identical.
    if case in ENDS_BETWEEN_FRAGMENT_SYNCS:
        return
    rank0, rank1 = load_state(runs, backend, case, 0), load_state(runs, backend, case, 1)
    for name, _ in model.named_parameters():
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=f"{backend} {case} {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_backends_agree(runs: dict[str, Path], case: str) -> None:
    base = load_state(runs, BACKENDS[0], case, 0)
    for backend in BACKENDS[1:]:
        other = load_state(runs, backend, case, 0)
        for key in base:
            # float32 through the same kernels: bit-identical under five CPU settings (docs/testing.md); the
            # tolerance leaves a backend free to sum in another order.
            np.testing.assert_allclose(other[key], base[key], rtol=1e-5, atol=1e-6, err_msg=f"{backend} {case} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_sgd_period_1_equals_synchronous_sgd(runs: dict[str, Path], backend: str) -> None:
    # Equal in exact arithmetic; in float32 the two orders of summation (average the gradients, then
    # step; step, then average the models) drift apart by rounding over the 12 steps: 3e-6 at most
    # on this machine's CPU, and machine-dependent. The reference comparison's tolerance applies.
    sync, local = load_state(runs, backend, "allreduce", 0), load_state(runs, backend, "local_H1", 0)
    for name in param_names("allreduce"):
        np.testing.assert_allclose(local[name], sync[name], **REFERENCE_TOLERANCE, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case,same_as",
    [
        ("slowmo_a1_b0_H4", "local_H4"),  # SlowMo with α = 1, β = 0 is local SGD, bit for bit
        ("local_H4_evaluated", "local_H4"),  # evaluation never changes the training trajectory
    ],
)
def test_bit_identical_to(runs: dict[str, Path], backend: str, case: str, same_as: str) -> None:
    for rank in range(RANKS):
        want, got = load_state(runs, backend, same_as, rank), load_state(runs, backend, case, rank)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"rank {rank} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_communication_counters(runs: dict[str, Path], backend: str) -> None:
    _, model = reference_states("allreduce")
    p = sum(t.numel() * t.element_size() for t in model.parameters())
    bn = sum(t.numel() * t.element_size() for t in model.buffers() if t.is_floating_point())
    expected = {  # case: (rounds, bytes)
        "allreduce": (STEPS, STEPS * p),
        "local_H1": (STEPS, STEPS * p),
        "local_H4": (STEPS // 4, STEPS // 4 * (p + bn)),
        "local_H3_avg_momentum": (STEPS // 3, STEPS // 3 * (2 * p + bn)),
        "post_local_H3": (6 + 2, 6 * p + 2 * (p + bn)),
        "slowmo_a1_b0_H4": (STEPS // 4, STEPS // 4 * (p + bn)),
        "slowmo_H4": (STEPS // 4, STEPS // 4 * (p + bn)),
        "nesterov_H4": (STEPS // 4, STEPS // 4 * (p + bn)),
        "local_H4_evaluated": (STEPS // 4, STEPS // 4 * (p + bn)),  # evaluation traffic is counted apart
        "delay2_H4": (STEPS // 4, STEPS // 4 * (p + bn)),
        # int8: one byte an element and a float32 scale per block of 256; BN statistics in fp32.
        "int8_slowmo_H4": (STEPS // 4, STEPS // 4 * (encoded_bytes("int8", p // 4) + bn)),
        # τ = H = 2: the first Δ, taken after step 2, is applied at step 4; the last, taken after step 12
        # where the run ends, is applied at once: syncs at 4, 6, 8, 10, 12 and 12 again.
        "delay2_H2": (STEPS // 2, STEPS // 2 * (p + bn)),
        # Half-precision gradients: 2 bytes an element in the synchronous steps; the model averages in fp32.
        "allreduce_bf16_gradients": (STEPS, STEPS * p // 2),
        "post_local_H3_fp16_gradients": (6 + 2, 6 * p // 2 + 2 * (p + bn)),
    }
    for case, (rounds, nbytes) in expected.items():
        for rank in range(RANKS):
            c = load_counters(runs, backend, case, rank)
            assert (c["steps"], c["sync_rounds"], c["bytes_sent"]) == (STEPS, rounds, nbytes), (case, rank, c)
            assert c["comm_seconds"] > 0


@pytest.fixture(scope="module")
def thread_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_cases(RANKS, BACKENDS, tmp_path_factory.mktemp("sync-thread"), list(SYNC_THREAD_CASES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", ["int8_delay1_H2", "delay2_H2"])
def test_the_sync_thread_trains_to_the_bits_of_the_step_thread(
    thread_runs: dict[str, Path], backend: str, codec: str
) -> None:
    """comm.sync_thread: the encoding, the wait (each backend's wait_beside) and the decoding on a thread
    beside the step give the parameters and counters of the step's own thread, bit for bit, and the
    reference's."""
    reference, _ = reference_states(f"{codec}_sync_thread")
    for rank in range(RANKS):
        beside = load_state(thread_runs, backend, f"{codec}_sync_thread", rank)
        inline = load_state(thread_runs, backend, f"{codec}_step_thread", rank)
        for key in inline:
            np.testing.assert_array_equal(beside[key], inline[key], err_msg=f"{backend} rank {rank} {key}")
            # The reference's tolerance of every case: its float order differs from the engine's in the last
            # bit, which int8 can turn into one quantum of an update (7e-6 once on an AMD EPYC).
            np.testing.assert_allclose(beside[key], reference[rank][key], **REFERENCE_TOLERANCE, err_msg=key)
        on, off = (load_counters(thread_runs, backend, f"{codec}_{way}_thread", rank) for way in ("sync", "step"))
        assert (on["sync_thread"], off["sync_thread"]) == (True, False)
        assert on["sync_rounds"] == off["sync_rounds"] == STEPS // 2
        assert on["bytes_sent"] == off["bytes_sent"]
