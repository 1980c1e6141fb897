"""hpc-localsgd on a real (private, single-node) Slurm: sbatch, preemption with requeue, sweeps,
and a dying rank."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpc_localsgd.config import config_to_yaml, load_config
from hpc_localsgd.io.checkpoint import Checkpoint, list_checkpoints
from hpc_localsgd.io.metrics import read_metrics
from tests.helpers import REPO_ROOT
from tests.mpi.cases import BASE
from tests.slurm.conftest import SlurmCluster

TRAIN = REPO_ROOT / "slurm" / "train.sbatch"


def write_config(path: Path, overrides: list[str]) -> Path:
    """The resolved config of these overrides, as a YAML file."""
    path.write_text(config_to_yaml(load_config(None, overrides)))
    return path


def submit_training(cluster: SlurmCluster, tmp_path: Path, name: str, config: Path, *extra: str) -> str:
    return cluster.sbatch(
        [
            f"--job-name={name}",
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--output={tmp_path}/%x-%j.out",
            *extra,
            TRAIN,
            config,
        ],
        cwd=REPO_ROOT,
    )


def output_of(tmp_path: Path, name: str, job: str) -> str:
    return (tmp_path / f"{name}-{job}.out").read_text()


def test_train_sbatch_runs_two_ranks_to_completion(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [*BASE, "train.max_steps=12"])
    job = submit_training(slurm_cluster, tmp_path, "plain", config, f"--export=ALL,RUN_ROOT={tmp_path}/runs")
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", output_of(tmp_path, "plain", job)
    run_dir = tmp_path / "runs" / f"plain-{job}"
    metrics = read_metrics(run_dir / "metrics.h5")
    assert metrics["steps"]["step"][-1] == 12
    out = output_of(tmp_path, "plain", job)
    assert "2 rank(s)" in out and "hpc-localsgd: done" in out and "Traceback" not in out


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    overrides = [
        *BASE,
        "train.max_steps=1500",
        "train.epochs=100",
        "train.eval_every_epochs=10",
        "checkpoint.poll_every_steps=5",
        "output.metrics_flush_seconds=0.2",
    ]
    config = write_config(tmp_path / "c.yaml", overrides)
    env = f"--export=ALL,RUN_ROOT={tmp_path}/runs"
    job = submit_training(slurm_cluster, tmp_path, "preempted", config, env)
    slurm_cluster.wait(job, timeout=60, states=["RUNNING"])
    metrics = tmp_path / "runs" / f"preempted-{job}" / "metrics.h5"
    deadline = time.monotonic() + 60
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    # As the issue and Slurm's docs have it: the signal goes to the job's steps, i.e. the srun'd ranks.
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    assert slurm_cluster.wait(job, timeout=240) == "COMPLETED", output_of(tmp_path, "preempted", job)
    out = output_of(tmp_path, "preempted", job)
    assert slurm_cluster.job(job)["Restarts"] == "1", out
    assert "(SIGUSR1)" in out and "requeueing Slurm job" in out and "restart 1" in out, out
    stopped_at = int(out.split("stopped at step ")[1].split("/")[0])
    assert 0 < stopped_at < 1500 and stopped_at % 5 == 0
    assert f"at step {stopped_at}" in out.split("restart 1")[1]  # the second run resumed there

    reference = submit_training(slurm_cluster, tmp_path, "reference", config, env)
    assert slurm_cluster.wait(reference, timeout=240) == "COMPLETED", output_of(tmp_path, "reference", reference)
    final = Checkpoint(list_checkpoints(tmp_path / "runs" / f"preempted-{job}" / "checkpoints")[0])
    expected = Checkpoint(list_checkpoints(tmp_path / "runs" / f"reference-{reference}" / "checkpoints")[0])
    assert final.meta.step == expected.meta.step == 1500
    for rank in range(2):
        got, want = final.rank_state(rank).tensors, expected.rank_state(rank).tensors
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=f"rank {rank} {name}")
    losses = read_metrics(tmp_path / "runs" / f"preempted-{job}" / "metrics.h5")["steps"]
    assert list(losses["step"]) == list(range(1, 1501))


def test_sweep_submits_an_array_whose_tasks_use_their_own_configs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    base = write_config(tmp_path / "base.yaml", [*BASE, "train.max_steps=6"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: mini\nbase: {base}\nvariants:\n  - {{algorithm.method: local_sgd, "
        "algorithm.sync_period: [2, 3]}\nslurm: {nodes: [1], ntasks_per_node: 2, throttle: 1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "sweep", str(grid), "--submit", "--out", str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (array_job,) = json.loads((tmp_path / "sweep" / "submitted.json").read_text()).values()
    assert slurm_cluster.wait(array_job, timeout=240) == "COMPLETED"
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())["runs"]
    assert [run["overrides"]["algorithm.sync_period"] for run in manifest] == [2, 3]
    for run in manifest:
        metrics = read_metrics(Path(run["run_dir"]) / "metrics.h5")
        period = run["overrides"]["algorithm.sync_period"]
        assert list(metrics["steps"]["synced"]) == [int(s % period == 0) for s in range(1, 7)]


def test_a_dying_rank_ends_the_job_within_seconds(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", [*BASE, "train.max_steps=100000", "train.epochs=10000", "train.eval_every_epochs=10000"]
    )
    job = submit_training(slurm_cluster, tmp_path, "dying", config, f"--export=ALL,RUN_ROOT={tmp_path}/runs")
    slurm_cluster.wait(job, timeout=60, states=["RUNNING"])
    metrics = tmp_path / "runs" / f"dying-{job}" / "metrics.h5"
    deadline = time.monotonic() + 60
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # The ranks are python processes; srun's own command line names the same program.
    ranks = subprocess.run(
        ["pgrep", "-f", f"^\\S*python\\S* \\S*hpc-localsgd train .*dying-{job}"], capture_output=True, text=True
    ).stdout.split()
    assert len(ranks) == 2, ranks
    killed = time.monotonic()
    subprocess.run(["kill", "-9", ranks[-1]], check=True)
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert time.monotonic() - killed < 15
