"""The simulated backend against real MPI ranks: W workers in one process give the parameters,
BN statistics and counters that ``mpirun -np W`` gives, for every algorithm (W = 2) and for the
study's methods at W = 4 (more workers than this machine has cores: --oversubscribe).

Both sides run in float64 where the case allows (``cases.equivalence_dtype``): the batched
convolutions and one batch per rank take different kernels on each CPU, and in float32 their
last-bit differences grow past any tolerance that would still catch a bug. The ranks take the
kernels of the baseline instruction set (``cases.BASELINE_KERNELS``), so the two sides compute
through different kernels on every CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpc_localsgd.config import load_config
from hpc_localsgd.train.loop import train
from tests.mpi.cases import (
    BASE,
    BASELINE_KERNELS,
    CASES,
    assert_equivalent,
    default_dtype,
    equivalence_dtype,
    run_cases,
)

FOUR_RANK_CASES = [
    "allreduce",
    "local_H4",
    "post_local_H3",
    "slowmo_H4",
    "nesterov_H4",
    "local_H3_avg_momentum",
    "allreduce_bf16_gradients",  # the two-phase exchange of the gradients
]
# Muon orthogonalises in bfloat16 matrix products, whose rounding depends on the CPU's kernels: the ranks
# here run the baseline kernels (BASELINE_KERNELS), the simulation the CPU's best, so even in float64 the two
# differ by a bf16 rounding (about 1e-3 of an update). That the simulation's stacked matrices step exactly as
# each worker's own is tested in tests/unit/test_muon.py; Muon on ranks against PyTorch's in test_algorithms.py.
BF16_KERNEL_CASES = {"muon_mlp_reset_H3"}
CASES_BY_RANKS = {2: [case for case in CASES if case not in BF16_KERNEL_CASES], 4: FOUR_RANK_CASES}


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return {
        ranks: run_cases(
            ranks, ["mpi"], tmp_path_factory.mktemp(f"mpi{ranks}"), cases, float64=True, env=BASELINE_KERNELS
        )["mpi"]
        for ranks, cases in CASES_BY_RANKS.items()
    }


@pytest.mark.parametrize("ranks,case", [(r, c) for r, cases in CASES_BY_RANKS.items() for c in cases])
def test_simulated_workers_match_mpi_ranks(mpi_runs: dict[int, Path], tmp_path: Path, ranks: int, case: str) -> None:
    cfg = load_config(
        None,
        BASE
        + CASES[case]
        + [f"output.run_dir={tmp_path / case}", "comm.backend=simulated", f"comm.simulated_workers={ranks}"],
    )
    dtype = equivalence_dtype(case)
    with default_dtype(dtype):
        result = train(cfg, print_fn=lambda _line: None)
    for rank in range(ranks):
        with np.load(mpi_runs[ranks] / case / f"rank{rank}.npz") as saved:
            expected = dict(saved)
        simulated = result.model.worker_state(rank)
        assert set(simulated) == set(expected)
        for name, value in expected.items():
            assert simulated[name].numpy().dtype == value.dtype, name  # both ran in the case's dtype
            assert_equivalent(simulated[name].numpy(), value, dtype, f"{case}, worker {rank}: {name}")
        counters = json.loads((mpi_runs[ranks] / case / f"rank{rank}.json").read_text())
        assert counters["cpu_capability"] == "DEFAULT"  # the ranks took other kernels than this process
        assert result.stats.sync_rounds == counters["sync_rounds"]
        assert result.stats.bytes_sent == counters["bytes_sent"]
        assert result.engine.bytes_per_sync == counters["bytes_per_sync"]
        assert result.steps == counters["steps"]
        assert result.final is not None and result.final.test_accuracy == pytest.approx(counters["test_accuracy"])
