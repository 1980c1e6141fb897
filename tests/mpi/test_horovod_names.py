"""The horovod backend names its operations stably (Horovod's response cache needs it), under ``mpirun -np 2``:
the names of twelve training steps are those of the first one, every rank uses the same names, a name is
never in flight twice, and the trained model is still the reference's (tests/reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.helpers import run_mpi
from tests.mpi.cases import BASE, CASES, REFERENCE_TOLERANCE, reference_run
from tests.mpi.horovod_names_driver import EVERY_STEP, NAMED_CASES

RANKS = 2


def test_operation_names_are_reused_across_steps(tmp_path: Path) -> None:
    proc = run_mpi(RANKS, ["python", "tests/mpi/horovod_names_driver.py", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK horovod") == RANKS, proc.stdout
    seen = [json.loads((tmp_path / f"names{rank}.json").read_text()) for rank in range(RANKS)]
    assert seen[0] == seen[1]  # Horovod matches operations across ranks by name

    first, again = seen[0]["in_flight"]
    assert len(set(first)) == 3, first  # three buffers of one shape in flight: three names
    assert again == first  # ... which return once completed

    for case in NAMED_CASES:
        one, full = seen[0][f"{case}.one"], seen[0][f"{case}.full"]
        assert len(full) > len(one), case  # more steps, more operations ...
        assert set(full) == set(one), case  # ... under the same names
        references, _ = reference_run(BASE + CASES[case] + EVERY_STEP, RANKS)
        for rank in range(RANKS):
            with np.load(tmp_path / case / "full" / f"rank{rank}.npz") as got:
                for key, want in references[rank].items():
                    np.testing.assert_allclose(got[key], want, **REFERENCE_TOLERANCE, err_msg=f"{case} {rank} {key}")
