"""The drift measurements on real MPI ranks (``mpirun -np 2``, tests/mpi/drift_driver.py): consensus
distance and the outer update against their definitions, exactly zero for identical ranks, and a
training run with ``outer_every`` against the independent reference and against the same run
simulated in one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_localsgd.config import load_config
from hpc_localsgd.io.metrics import SYNC_FIELDS, read_metrics
from hpc_localsgd.train.loop import train
from tests.helpers import run_mpi
from tests.mpi.cases import BASE, REFERENCE_TOLERANCE, reference_run
from tests.mpi.drift_driver import DRIFT_CASES, KNOWN
from tests.unit.test_consensus import assert_rows_close, expected_two_syncs

RANKS = 2


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("drift")
    proc = run_mpi(RANKS, ["python", "tests/mpi/drift_driver.py", "--out", str(folder)], timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("OK rank") == RANKS, proc.stdout + proc.stderr
    return folder


def test_measurements_match_the_definitions_on_mpi_ranks(out: Path) -> None:
    saved = [np.load(out / "known" / f"rank{rank}.npz") for rank in range(RANKS)]
    before = [[torch.from_numpy(s[f"before{r}"]) for s in saved] for r in range(2)]
    want = expected_two_syncs(before, torch.from_numpy(saved[0]["x0"]), KNOWN)
    assert want[0]["consensus_distance"] > 1e-6 and not math.isnan(want[1]["outer_update_cosine"])
    for rank in range(RANKS):
        got = json.loads((out / "known" / f"rank{rank}.json").read_text())
        assert_rows_close(got, want, rtol=1e-9, what=f"rank {rank}")


def test_identical_ranks_measure_exactly_zero(out: Path) -> None:
    for rank in range(RANKS):
        rows = json.loads((out / "identical" / f"rank{rank}.json").read_text())
        assert [row["synced"] for row in rows] == [True] * 4
        assert [row["consensus_distance"] for row in rows] == [0.0] * 4


@pytest.mark.parametrize("case", list(DRIFT_CASES))
def test_outer_every_run_matches_the_reference_and_the_simulation(out: Path, case: str, tmp_path: Path) -> None:
    overrides = BASE + DRIFT_CASES[case]
    expected, _ = reference_run(overrides, RANKS)
    for rank in range(RANKS):
        with np.load(out / case / f"rank{rank}.npz") as got:
            for key, want in expected[rank].items():
                np.testing.assert_allclose(got[key], want, **REFERENCE_TOLERANCE, err_msg=f"rank {rank} {key}")
    ranks = read_metrics(out / case / "metrics.h5")["syncs"]
    simulated_cfg = load_config(
        None, [*overrides, f"output.run_dir={tmp_path / 'sim'}", "comm.backend=simulated", "comm.simulated_workers=2"]
    )
    train(simulated_cfg, print_fn=lambda _line: None)
    simulated = read_metrics(tmp_path / "sim" / "metrics.h5")["syncs"]
    assert set(ranks) == set(SYNC_FIELDS)
    assert list(ranks["step"]) == list(simulated["step"]) == [2, 4, 6, 8, 10, 12]
    assert list(ranks["outer_step"]) == list(simulated["outer_step"]) == [0, 1, 0, 1, 0, 1]
    assert np.all(ranks["consensus_distance"] > 0)
    assert np.isnan(ranks["outer_update_norm"][::2]).all() and np.isnan(ranks["outer_update_cosine"][:3]).all()
    # The same numbers to float32 rounding: the simulation's batched forward rounds differently from
    # a rank's, and a float32 x̄ bounds the identity's precision near 1e-7/sqrt(parameters) of ‖x̄‖².
    for name in ("consensus_distance", "model_norm", "outer_update_norm", "outer_update_cosine"):
        np.testing.assert_allclose(ranks[name], simulated[name], rtol=1e-3, atol=1e-8, err_msg=name)
