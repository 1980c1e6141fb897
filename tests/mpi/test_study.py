"""A mini study end to end, as docs/RESULTS.md runs the real one: a sweep of two simulated runs
and one run on real MPI ranks, executed on this machine by ``sweep --run-here``, then ``report``
over its folder. The table must hold exactly what the runs' metrics files say."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py

from hpc_localsgd.io.metrics import read_metrics
from tests.helpers import MPI_TEST_ENV, REPO_ROOT

GRID = """
name: mini-study
base: {base}
set:
  train.epochs: 2
  train.eval_every_epochs: 1
  optim.warmup_epochs: 0.5
  optim.decay_epochs: [1.5]
  comm.simulated_workers: 2
variants:
  - {{algorithm.method: allreduce}}
  - {{algorithm.method: local_sgd, algorithm.sync_period: 4}}
  - {{algorithm.method: local_sgd, algorithm.sync_period: 4, comm.backend: mpi, comm.simulated_workers: 0}}
slurm:
  ntasks_per_node: 2
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_sweep_run_here_then_report(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(base=REPO_ROOT / "configs" / "study" / "digits_smallcnn.yaml"))
    out = tmp_path / "sweep"
    done = cli("sweep", str(grid), "--out", str(out), "--run-here", "--jobs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 of 3 runs to go" in done.stdout and "3 runs done, 0 skipped, 0 failed" in done.stdout

    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3
    finals = {}
    for run in runs:
        metrics = read_metrics(run / "metrics.h5")
        evals = metrics["evals"]
        assert list(evals["step"]) == [len(metrics["steps"]["step"]) // 2, len(metrics["steps"]["step"])]
        finals[run.name] = (float(evals["test_accuracy"][-1]), int(evals["sync_rounds"][-1]))
    simulated_local, mpi_local = finals[runs[1].name], finals[runs[2].name]
    # Same method, seed and shards: two simulated workers and two MPI ranks end alike (parameters
    # to float rounding, so at most one of the 300 test images may fall the other way).
    assert simulated_local[1] == mpi_local[1] == len(read_metrics(runs[1] / "metrics.h5")["steps"]["step"]) // 4
    assert abs(simulated_local[0] - mpi_local[0]) <= 1 / 300 + 1e-12

    again = cli("sweep", str(grid), "--out", str(out), "--run-here", cwd=tmp_path)
    assert again.returncode == 0 and "0 of 3 runs to go (3 already finished)" in again.stdout, again.stdout

    report = cli("report", str(out / "runs"), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    with open(tmp_path / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"all-reduce", "local SGD"}
    local = by_method["local SGD"]
    # The simulated and the MPI run of local SGD are two runs of one group (same method, H, workers, seed).
    assert (local["H"], local["workers"], local["seeds"]) == ("4", "2", "2")
    assert float(local["test_accuracy_mean"]) == (simulated_local[0] + mpi_local[0]) / 2
    assert float(local["sync_rounds_mean"]) == simulated_local[1]
    assert float(by_method["all-reduce"]["test_accuracy_mean"]) == finals[runs[0].name][0]
    assert by_method["all-reduce"]["test_accuracy_std"] == ""  # one seed
    assert (tmp_path / "report" / "results.md").is_file()
    assert any(p.suffix == ".png" for p in (tmp_path / "report").iterdir())


def test_a_point_that_fails_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    """One point asks for more workers than digits has samples: one FAILED line naming the reason,
    exit status 1, the other point done; running again retries only the failed point."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
name: failing
base: {REPO_ROOT / "configs" / "study" / "digits_smallcnn.yaml"}
set: {{train.epochs: 1, optim.warmup_epochs: 0, optim.decay_epochs: [0.5], train.threads: 0}}
variants:
  - {{comm.simulated_workers: [2, 400]}}
""")
    out = tmp_path / "sweep"
    done = cli("sweep", str(grid), "--out", str(out), "--run-here", "--jobs", "2", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1, done.stdout
    assert "simulated_workers-400" in failed[0] and "× 400 ranks needs more than the 1497 training samples" in failed[0]
    assert "1 runs done, 0 skipped, 1 failed" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    # train.threads 0: the two pool processes share the cores instead of each taking all of them.
    finished = next(p for p in (out / "runs").iterdir() if "simulated_workers-2_" in p.name)
    with h5py.File(finished / "metrics.h5", "r") as f:
        assert json.loads(f.attrs["world"])["threads_per_rank"] == max(1, (os.cpu_count() or 1) // 2)
    again = cli("sweep", str(grid), "--out", str(out), "--run-here", cwd=tmp_path)
    assert again.returncode == 1 and "1 of 2 runs to go (1 already finished)" in again.stdout, again.stdout


LM_GRID = """
name: mini-lm-study
base: {base}
set:
  comm.simulated_workers: 2
  train.max_steps: 32
  train.eval_every_steps: 16
  optim.warmup_steps: 4
  data.text.max_bytes: 200000
  data.eval_samples: 64
variants:
  - {{algorithm.method: allreduce}}
  - {{algorithm.method: local_sgd, algorithm.outer: nesterov, algorithm.sync_period: 8}}
"""


def test_a_language_study_runs_here_and_reports_its_loss(tmp_path: Path) -> None:
    """configs/lm/study.yaml's shape at a few steps: each point ends with its validation loss, and the report
    gives each group's loss and bits per byte exactly as the metrics files hold them."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(LM_GRID.format(base=REPO_ROOT / "configs" / "lm" / "study.yaml"))
    out = tmp_path / "sweep"
    done = cli("sweep", str(grid), "--out", str(out), "--run-here", "--jobs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = {}
    for run in sorted((out / "runs").iterdir()):
        evals = read_metrics(run / "metrics.h5")["evals"]
        assert list(evals["step"]) == [16, 32]
        losses[run.name] = float(evals["test_loss"][-1])
        assert f"{run.name}: val loss {losses[run.name]:.4f}" in done.stdout
    report = cli("report", str(out / "runs"), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    with open(tmp_path / "report" / "results.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"all-reduce", "local SGD + outer Nesterov"}
    by_name = dict(zip(["all-reduce", "local SGD + outer Nesterov"], losses.values(), strict=True))
    for method, loss in by_name.items():
        assert float(rows[method]["val_loss_nats_per_token_mean"]) == loss
        assert float(rows[method]["bits_per_byte_mean"]) == loss / math.log(2)
    assert (tmp_path / "report" / "loss_vs_H.png").is_file()
