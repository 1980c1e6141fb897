"""The private cluster is a real Slurm: batch jobs, steps, arrays, requeue, signals, MPI.

These pin down the Slurm behaviour that slurm/train.sbatch and the sweep command rely on, each in a
few seconds: if one of them fails, the cluster (or Slurm) changed, not the package.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import SlurmCluster, cluster_command


def wait_for_file(path: Path, timeout: float = 30, lines: int = 1) -> list[str]:
    """The first ``lines`` lines of a file a job writes, once they are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            content = path.read_text().splitlines()
            if len(content) >= lines:
                return content
        time.sleep(0.1)
    pytest.fail(
        f"{path} did not get {lines} line(s) within {timeout:.0f} s: "
        f"{path.read_text() if path.exists() else 'missing'}",
        pytrace=False,
    )


def test_cluster_status_and_idempotent_start(slurm_cluster: SlurmCluster) -> None:
    pid_before = (slurm_cluster.dir / "run" / "slurmctld.pid").read_text()
    again = cluster_command("start", slurm_cluster.dir)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"export SLURM_CONF={slurm_cluster.conf}"
    assert (slurm_cluster.dir / "run" / "slurmctld.pid").read_text() == pid_before, "start restarted the daemons"
    status = cluster_command("status", slurm_cluster.dir)
    assert status.returncode == 0, status.stderr
    assert "idle" in status.stdout or "mix" in status.stdout or "alloc" in status.stdout


def test_wrap_job_completes_with_its_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(["--output=out-%j.txt", "--wrap", "echo hello from $SLURM_JOB_ID"], cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED"
    assert (tmp_path / f"out-{job}.txt").read_text() == f"hello from {job}\n"
    record = slurm_cluster.job(job)
    assert (record["ExitCode"], record["Restarts"]) == ("0:0", "0")


def test_two_task_srun_in_a_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(
        ["--ntasks=2", "--output=out.txt", "--wrap", 'srun bash -c "echo rank=\\$SLURM_PROCID of=\\$SLURM_NTASKS"'],
        cwd=tmp_path,
    )
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", (tmp_path / "out.txt").read_text()
    assert sorted((tmp_path / "out.txt").read_text().splitlines()) == ["rank=0 of=2", "rank=1 of=2"]


def test_job_array_tasks_see_their_index(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(
        [
            "--array=0-2",
            "--output=out-%A_%a.txt",
            "--wrap",
            "echo $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT > task-$SLURM_ARRAY_TASK_ID.txt",
        ],
        cwd=tmp_path,
    )
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED"
    assert [(tmp_path / f"task-{i}.txt").read_text() for i in range(3)] == ["0 3\n", "1 3\n", "2 3\n"]
    assert sorted(r["ArrayTaskId"] for r in slurm_cluster.jobs(job)) == ["0", "1", "2"]
    assert slurm_cluster.state(f"{job}_1") == "COMPLETED"


def test_requeue_runs_the_job_again_within_seconds(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """AuthInfo=cred_expire=5 and a 1 s scheduler pass: a requeued job starts again after ~5-8 s
    (Slurm's default, 120 s, would make every requeue take minutes). SLURM_RESTART_COUNT is unset on
    the first run, 1 after the first requeue; the job id stays the same."""
    job = slurm_cluster.sbatch(
        [
            "--output=out.txt",
            "--open-mode=append",
            "--wrap",
            'echo "restart=${SLURM_RESTART_COUNT-unset} job=$SLURM_JOB_ID" >> runs.txt; sleep 120',
        ],
        cwd=tmp_path,
    )
    assert wait_for_file(tmp_path / "runs.txt") == [f"restart=unset job={job}"]
    requeued_at = time.monotonic()
    slurm_cluster.run(["scontrol", "requeue", job])
    runs = wait_for_file(tmp_path / "runs.txt", timeout=60, lines=2)
    latency = time.monotonic() - requeued_at
    print(f"requeue to restart: {latency:.1f} s")
    assert runs == [f"restart=unset job={job}", f"restart=1 job={job}"]
    assert latency < 20, f"the requeued job took {latency:.0f} s to start again"
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert slurm_cluster.state(job) == "RUNNING"
    slurm_cluster.run(["scancel", job])
    assert slurm_cluster.wait(job, timeout=30) == "CANCELLED"


SIGNAL_SCRIPT = """#!/bin/bash
trap 'echo batch >> got' USR1
bash -c 'trap "echo batch-child >> got" USR1; echo > ready-child; sleep 60 & wait' &
srun --ntasks=1 bash -c 'trap "echo step >> got" USR1; echo > ready-step; sleep 60 & wait' &
echo > ready-batch
for i in $(seq 120); do sleep 0.5; done
"""


@pytest.mark.parametrize(
    "scope, receivers",
    [
        ((), {"step"}),  # plain: every srun step, never the batch step
        (("--batch",), {"batch"}),  # the batch shell only, not its children
        (("--full",), {"batch", "batch-child", "step"}),  # every process of the batch step, and the steps
    ],
    ids=["steps", "batch", "full"],
)
def test_scancel_signal_reaches(slurm_cluster: SlurmCluster, tmp_path: Path, scope: tuple, receivers: set) -> None:
    """What `scancel --signal=USR1 [--batch|--full]` reaches. sbatch --signal=B:USR1@T behaves like
    --batch (plain --signal=USR1@T like no option). With --full, a child that does not trap USR1
    (the `sleep` here, or an mpirun's ranks) is killed by it, USR1's default action."""
    (tmp_path / "job.sh").write_text(SIGNAL_SCRIPT)
    job = slurm_cluster.sbatch(["--ntasks=1", "--output=out.txt", "job.sh"], cwd=tmp_path)
    for marker in ("ready-batch", "ready-child", "ready-step"):
        wait_for_file(tmp_path / marker)
    slurm_cluster.run(["scancel", "--signal=USR1", *scope, job])
    got = tmp_path / "got"
    wait_for_file(got, lines=len(receivers))
    time.sleep(1)  # room for a signal that should not arrive
    assert set(got.read_text().split()) == receivers
    assert len(got.read_text().split()) == len(receivers)
    slurm_cluster.run(["scancel", job])
    assert slurm_cluster.wait(job, timeout=30) == "CANCELLED"


def test_kill_on_bad_exit_fails_the_job_promptly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    task = "if [ $SLURM_PROCID = 1 ]; then exit 3; fi; sleep 60; echo survived"
    job = slurm_cluster.sbatch(
        ["--ntasks=2", "--output=out.txt", "--wrap", f"srun --kill-on-bad-exit=1 bash -c '{task}'"], cwd=tmp_path
    )
    submitted = time.monotonic()
    assert slurm_cluster.wait(job, timeout=30) == "FAILED"
    elapsed = time.monotonic() - submitted
    output = (tmp_path / "out.txt").read_text()
    assert elapsed < 15, f"took {elapsed:.0f} s\n{output}"
    assert "survived" not in output
    assert "task 1: Exited with exit code 3" in output
    assert slurm_cluster.job(job)["Reason"] == "NonZeroExitCode"


# One write per line: print() writes its pieces separately, and two ranks sharing one output file
# could interleave them.
MPI_PROGRAM = (
    "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
    'os.write(1, f"{c.Get_rank()} {c.Get_size()} {c.allreduce(c.Get_rank() + 1)}\\n".encode())'
)


@pytest.mark.parametrize(
    "launch", ["srun --mpi=pmix", "mpirun -np $SLURM_NTASKS --bind-to none"], ids=["srun-pmix", "mpirun"]
)
def test_mpi_ranks_in_a_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path, launch: str) -> None:
    """Debian's Open MPI 4.1 (mpi4py) under srun needs --mpi=pmix (pmi2 and none fail in MPI_Init);
    mpirun inside the allocation takes the node list from Slurm. Sum over ranks of rank+1 = 3."""
    job = slurm_cluster.sbatch(
        ["--ntasks=2", "--output=out.txt", "--wrap", f"{launch} {sys.executable} -c '{MPI_PROGRAM}'"], cwd=tmp_path
    )
    state = slurm_cluster.wait(job, timeout=60)
    output = (tmp_path / "out.txt").read_text()
    assert state == "COMPLETED", output
    assert sorted(output.splitlines()) == ["0 2 3", "1 2 3"], output
