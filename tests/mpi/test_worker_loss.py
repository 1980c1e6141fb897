"""Going on without a lost worker (``comm.on_worker_loss: continue``) with real processes on the torch backend.

Each run starts 3 or 4 processes with torchrun's variables (a launcher that does not end the job when one
of them dies, as ``srun --kill-on-bad-exit=0`` or separate launches do) and kills one with the fault
harness, between two syncs or inside a sync. The survivors must finish, each with the same model, equal (in
float64, to rounding) to tests/reference.py's run in which that worker leaves at that sync; the process
killed ends with SIGKILL and a partner of a lost rank with the documented status 6. Every run is bounded.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hpc_localsgd.io.metrics import METRICS_FILE, read_membership
from tests.helpers import REPO_ROOT, run_mpi
from tests.mpi.cases import BASE, reference_run

DRIVER = REPO_ROOT / "tests" / "mpi" / "elastic_driver.py"
STEPS = 16  # within one epoch at 3 and at 4 ranks of batches of 8 (512 samples), as the reference reads them
RUN = [
    *BASE,
    f"train.max_steps={STEPS}",
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.outer=nesterov",  # DiLoCo's outer step: its state must go on unchanged among the survivors
    "comm.backend=torch",
    "comm.on_worker_loss=continue",
    "comm.worker_timeout_seconds=2",
]
# float64 on both sides: only the order of the sums differs.
EXACT = {"rtol": 1e-9, "atol": 1e-11}


@dataclass
class Process:
    rank: int
    returncode: int
    output: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_elastic(
    tmp_path: Path,
    ranks: int,
    overrides: list[str],
    fault: str = "",
    timeout: float = 120,
    stopped: tuple[int, ...] = (),
    replacements: int = 0,
    options: tuple[str, ...] = (),
) -> list[Process]:
    """``ranks`` processes of tests/mpi/elastic_driver.py, each in its own session; every one still running at
    ``timeout`` is killed and the test fails with what they printed. ``stopped``: ranks the fault stops, killed
    once the others have ended. ``replacements``: spares started beside them with ``--rejoin`` (outside the
    launcher's world: no RANK or WORLD_SIZE), last in the list returned. ``options``: the driver's
    (``--resume=auto``, ``--stop-at-step=N``)."""
    out = tmp_path / "models"
    out.mkdir(exist_ok=True)
    port = _free_port()
    args = [*overrides, f"output.run_dir={tmp_path / 'run'}", *options]
    procs = []
    for rank in range(ranks + replacements):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "HPC_LOCALSGD_INJECT_FAULT": fault,
        }
        launcher = {"RANK": rank, "WORLD_SIZE": ranks, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": ranks}
        for name in launcher:
            env.pop(name, None)
        if rank < ranks:
            env.update({name: str(value) for name, value in launcher.items()})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(DRIVER), str(out), *args, *(["--rejoin"] if rank >= ranks else [])],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    results, timed_out = [], False
    order = [r for r in range(ranks + replacements) if r not in stopped] + list(stopped)
    for rank in order:
        proc = procs[rank]
        if rank in stopped and not timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        results.append(Process(rank, proc.returncode, output))
    results.sort(key=lambda p: p.rank)
    if timed_out:
        pytest.fail("an elastic run did not end in time:\n" + "\n".join(f"[{p.rank}] {p.output}" for p in results))
    return results


def _empty_config(tmp_path: Path) -> Path:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return config


def _model(tmp_path: Path, rank: int) -> dict[str, np.ndarray]:
    with np.load(tmp_path / "models" / f"rank{rank}.npz") as saved:
        return dict(saved)


def _check_survivors(
    tmp_path: Path,
    results: list[Process],
    survivors: list[int],
    overrides: list[str],
    departures: dict[int, int],
    returns: dict[int, tuple[int, int]] | None = None,
    ranks: int | None = None,
) -> None:
    for p in results:
        if p.rank in survivors:
            assert p.returncode == 0, p.output
            assert "Traceback" not in p.output, p.output
    ranks = len(results) if ranks is None else ranks
    expected, model = reference_run(overrides, ranks, departures=departures, steps=STEPS, returns=returns)
    params = [name for name, _ in model.named_parameters()]
    first = _model(tmp_path, survivors[0])
    for rank in survivors:
        got = _model(tmp_path, rank)
        for name in params:
            np.testing.assert_array_equal(got[name], first[name], err_msg=f"survivors disagree: rank {rank} {name}")
        for key, want in expected[rank].items():
            np.testing.assert_allclose(got[key], want, **EXACT, err_msg=f"rank {rank} {key}")


def _change_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("hpc-localsgd: step ") and " go" in line]


@pytest.fixture(autouse=True)
def _float64_reference() -> None:
    """tests/reference.py trains in the default dtype: float64 as the ranks."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_workers_killed_between_syncs_and_inside_a_sync_are_dropped_and_the_survivors_match_the_reference(
    tmp_path: Path,
) -> None:
    # Rank 3 dies after step 6, between two syncs: the sync at step 8 finds it gone. Rank 2 dies inside the
    # sync after step 12, once its part has begun: that sync is rolled back and redone among ranks 0 and 1.
    results = run_elastic(tmp_path, 4, RUN, fault="kill:3:6,kill:2:12:sync")
    assert [p.returncode for p in results[2:]] == [-signal.SIGKILL] * 2
    first, second = _change_lines(results[0].output)
    assert first.startswith("hpc-localsgd: step 8: worker 3 (rank 3) lost: ") and "3 of 4 workers go on" in first
    assert second.startswith("hpc-localsgd: step 12: worker 2 (rank 2) lost: ") and "2 of 3 workers go on" in second
    assert not _change_lines(results[1].output)  # rank 0 prints
    _check_survivors(tmp_path, results, [0, 1], RUN, departures={3: 8, 2: 12})
    changes = read_membership(tmp_path / "run" / METRICS_FILE)
    assert changes is not None
    assert changes["step"].tolist() == [8, 12]
    assert changes["workers_before"].tolist() == [4, 3] and changes["workers_after"].tolist() == [3, 2]
    assert changes["left"].tolist() == [1, 1] and changes["joined"].tolist() == [0, 0]
    assert all(0 < seconds < 30 for seconds in changes["recovery_seconds"])
    assert changes["description"][0].startswith("worker 3 (rank 3) lost: ")


def test_a_worker_of_two_ranks_that_loses_one_is_dropped_whole(tmp_path: Path) -> None:
    overrides = [*RUN, "algorithm.ranks_per_worker=2"]
    results = run_elastic(tmp_path, 4, overrides, fault="kill:3:6")
    assert results[3].returncode == -signal.SIGKILL
    # Rank 3's partner leaves with its own status and one line.
    assert results[2].returncode == 6, results[2].output
    errors = [line for line in results[2].output.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1 and "rank 2 left the run" in errors[0], results[2].output
    assert "Traceback" not in results[2].output
    (line,) = _change_lines(results[0].output)
    assert line.startswith("hpc-localsgd: step 8: worker 1 (ranks 2, 3) lost: ") and "1 of 2 workers" in line, line
    _check_survivors(tmp_path, results, [0, 1], overrides, departures={2: 8, 3: 8})


@pytest.fixture(scope="module")
def stopped_worker_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Process]]:
    """Rank 2 of 3 stops (SIGSTOP) after step 6 and never answers again: dropped at the sync of step 8."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    return tmp_path, run_elastic(tmp_path, 3, RUN, fault="stop:2:6", stopped=(2,))


def test_a_stopped_worker_times_out_and_is_dropped(stopped_worker_run: tuple[Path, list[Process]]) -> None:
    tmp_path, results = stopped_worker_run
    (line,) = _change_lines(results[0].output)
    assert line.startswith("hpc-localsgd: step 8: worker 2 (rank 2) lost: no heartbeat from rank 2"), line
    _check_survivors(tmp_path, results, [0, 1], RUN, departures={2: 8})


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        # horovod is refused by the same check as mpi (tests/unit/test_config.py has both texts)
        ("mpi", "continue needs comm.backend=torch: the mpi backend cannot go on without a rank"),
        ("auto", "continue needs the torch backend, and this launcher (openmpi) gets horovod"),
    ],
)
def test_continue_on_mpi_or_horovod_ends_every_rank_with_one_line(tmp_path: Path, backend: str, message: str) -> None:
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    overrides = [*RUN, f"comm.backend={backend}"]
    train = shlex.join(
        [
            sys.executable,
            "-m",
            "hpc_localsgd",
            "train",
            str(_empty_config(tmp_path)),
            "--run-dir",
            str(tmp_path / "run"),
            *[arg for o in overrides for arg in ("--set", o)],
        ]
    )
    record = f"rc=$?; echo $rc > {status_dir}/rc.$OMPI_COMM_WORLD_RANK; exit $rc"
    proc = run_mpi(2, ["sh", "-c", f"{train}; {record}"], timeout=120)
    assert [int((status_dir / f"rc.{rank}").read_text()) for rank in range(2)] == [2, 2], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1 and f"comm.on_worker_loss: {message}" in errors[0], proc.stderr


def test_continue_with_a_world_of_one_worker_ends_every_rank_with_one_line(tmp_path: Path) -> None:
    results = run_elastic(tmp_path, 2, [*RUN, "algorithm.ranks_per_worker=2"])
    assert [p.returncode for p in results] == [2, 2], results
    lines = [line for p in results for line in p.output.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert lines == [
        "hpc-localsgd: error: comm.on_worker_loss: continue needs at least 2 workers to go on without one; "
        "this run has 1"
    ], results


def test_a_replacement_rejoins_at_a_sync_with_rank_0s_state_and_the_run_matches_the_reference(
    tmp_path: Path,
) -> None:
    # A spare waits from the start (train --rejoin); rank 2 dies after step 6 and is dropped at the sync of step
    # 8; the spare takes rank 2's place (its data shard) at the first sync it is ready for, as a copy of rank 0.
    results = run_elastic(tmp_path, 3, RUN, fault="kill:2:6", replacements=1)
    spare = results[-1]
    assert spare.returncode == 0 and "Traceback" not in spare.output, spare.output
    assert "hpc-localsgd: replacing rank 2 of the running job" in spare.output
    changes = read_membership(tmp_path / "run" / METRICS_FILE)
    assert changes is not None and changes["left"].tolist() == [1, 0] and changes["joined"].tolist() == [0, 1]
    left_at, joined_at = changes["step"].tolist()
    assert left_at == 8 and joined_at in (8, 12), changes
    assert changes["workers_after"].tolist() == [2, 3]
    assert f"hpc-localsgd: rank 2 joined at step {joined_at} with rank 0's" in spare.output
    lines = _change_lines(results[0].output)
    assert lines[1].startswith(f"hpc-localsgd: step {joined_at}: worker 2 (rank 2) joined with rank 0's state; ")
    _check_survivors(tmp_path, results[:2], [0, 1], RUN, departures={2: 8}, returns={2: (joined_at, 0)}, ranks=3)
    expected, _ = reference_run(RUN, 3, departures={2: 8}, steps=STEPS, returns={2: (joined_at, 0)})
    got = dict(np.load(tmp_path / "models" / "replacement.npz"))
    for key, want in expected[2].items():
        np.testing.assert_allclose(got[key], want, **EXACT, err_msg=f"replacement {key}")


def test_a_run_that_lost_a_worker_resumes_bit_exactly_with_the_survivors(
    tmp_path: Path, stopped_worker_run: tuple[Path, list[Process]]
) -> None:
    # Stopped (as by a time limit) at step 12, after losing rank 2 at the sync of step 8; resumed with the two
    # survivors, which read on the data shards they had, with the LR of the world the run started with. The
    # run that went through without stopping lost its rank 2 at the same sync (stopped rather than killed).
    first = run_elastic(tmp_path, 3, RUN, fault="kill:2:6", options=("--stop-at-step=12",))
    assert [p.returncode for p in first] == [0, 0, -signal.SIGKILL], first
    resumed = run_elastic(tmp_path, 2, RUN, options=("--resume=auto",))
    assert "resuming from" in resumed[0].output and "at step 12" in resumed[0].output, resumed[0].output
    assert [p.returncode for p in resumed] == [0, 0], resumed
    whole, _ = stopped_worker_run
    for rank in (0, 1):
        got, want = _model(tmp_path, rank), _model(whole, rank)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"rank {rank} {key}")


def test_a_worker_lost_in_the_synchronous_phase_is_dropped_from_that_steps_gradient_average(tmp_path: Path) -> None:
    # Post-local SGD averages gradients at every step until step 8: rank 2 dies after step 3, so step 4's
    # gradient average fails; the survivors average their own gradients of that step again among themselves
    # (no step is taken twice) and go on, then switch to local steps.
    overrides = [*RUN, "algorithm.method=post_local_sgd", "algorithm.switch_step=8"]
    results = run_elastic(tmp_path, 3, overrides, fault="kill:2:3")
    assert results[2].returncode == -signal.SIGKILL
    (line,) = _change_lines(results[0].output)
    assert line.startswith("hpc-localsgd: step 4: worker 2 (rank 2) lost: "), line
    _check_survivors(tmp_path, results, [0, 1], overrides, departures={2: 4})


def test_losing_rank_0_which_holds_the_store_ends_every_survivor_with_one_line(tmp_path: Path) -> None:
    results = run_elastic(tmp_path, 3, RUN, fault="kill:0:6")
    assert results[0].returncode == -signal.SIGKILL
    for p in results[1:]:
        assert p.returncode == 6, p.output
        assert "Traceback" not in p.output, p.output
        errors = [line for line in p.output.splitlines() if line.startswith("hpc-localsgd: error:")]
        assert len(errors) == 1 and "rank 0 was lost, and with it the store" in errors[0], p.output
