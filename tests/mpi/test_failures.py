"""Bad states on real ranks (issue 15): a diverged run, a checkpoint that cannot be written (a full
disk, also when SIGUSR1 asked for it before a time limit), a damaged metrics.h5 on resume.

Every run here checks each rank's own exit status (a shell around each rank writes it to a file),
that the run ended with exactly one ``hpc-localsgd:`` error line and no traceback, and that nothing
written before was lost or overwritten.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from hpc_localsgd.io.checkpoint import LATEST, Checkpoint, list_checkpoints
from hpc_localsgd.io.metrics import METRICS_FILE, metrics_file_status, read_metrics
from tests.failures import fill_disk, mounted_tmpfs
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, kill_session, run_mpi
from tests.mpi.cases import BASE

RUN = [*BASE, "comm.backend=mpi", "optim.warmup_epochs=0", "train.eval_every_epochs=100"]
# Local SGD H = 4 at a learning rate that overflows within a few steps (finite, so the config accepts it).
DIVERGING = [
    *RUN,
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "optim.lr_per_256=3000.0",
    "algorithm.average_bn_buffers=false",  # BN statistics overflow before the loss does: leave them out
    "train.max_steps=40",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _rank_command(status_dir: Path, args: list[str]) -> list[str]:
    """Each rank runs ``hpc-localsgd ARGS`` and records its own exit status in status_dir/rc.<rank>."""
    train = shlex.join([sys.executable, "-m", "hpc_localsgd", *args])
    record = f"rc=$?; echo $rc > {shlex.quote(str(status_dir))}/rc.$OMPI_COMM_WORLD_RANK; exit $rc"
    return ["sh", "-c", f"{train}; {record}"]


def _train_args(tmp_path: Path, run_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return ["train", str(config), "--run-dir", str(run_dir), *_sets(overrides), *extra]


def _statuses(status_dir: Path) -> list[int]:
    return [int((status_dir / f"rc.{rank}").read_text()) for rank in range(2)]


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_diverged_run_stops_every_rank_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    overrides = [*DIVERGING, "checkpoint.every_steps=4"]  # at the syncs, where every rank agrees
    proc = run_mpi(2, _rank_command(status_dir, _train_args(tmp_path, run_dir, overrides)), timeout=180)
    assert _statuses(status_dir) == [3, 3] and proc.returncode == 3, proc.stdout + proc.stderr
    line = _one_error(proc)
    # Found at a sync (every rank sees the averaged model; the line names the ranks whose loss was not
    # finite), or before a checkpoint between syncs (each rank checks its own state; it names the ranks).
    at_sync = re.fullmatch(
        r"hpc-localsgd: error: training diverged at step (\d+): the model is NaN or inf \((.*)\); .*", line
    )
    at_checkpoint = re.fullmatch(
        r"hpc-localsgd: error: training diverged by step (\d+): the model of ranks? ([01](, [01])?) is NaN or inf; "
        r"its checkpoint was not written .*",
        line,
    )
    assert at_sync or at_checkpoint, line
    if at_sync:
        assert int(at_sync.group(1)) % 4 == 0, line  # within one sync of the first NaN
        assert re.fullmatch(
            r"non-finite loss on (rank [01] at step \d+(, )?)+|every worker's loss was finite", at_sync.group(2)
        )
    step = int((at_sync or at_checkpoint).group(1))  # type: ignore[union-attr]
    # The last good checkpoint stays and `latest` names it; nothing of the diverged state was written.
    directory = run_dir / "checkpoints"
    steps = [Checkpoint(p).meta.step for p in list_checkpoints(directory)]
    assert steps and max(steps) < step, steps
    latest = Checkpoint(directory / (directory / LATEST).read_text().strip())
    assert latest.meta.step == max(steps)
    latest.verify()
    for rank in range(2):
        assert all(bool(np.isfinite(t.numpy()).all()) for t in latest.rank_state(rank).tensors.values())
    # metrics.h5 records the stop; the sweep (and the report, through the same contract) see "diverged".
    with h5py.File(run_dir / METRICS_FILE) as f:
        assert f.attrs["stopped"] == "diverged" and int(f.attrs["stopped_step"]) == step
        assert f.attrs["stopped_reason"] == line.removeprefix("hpc-localsgd: error: ")
    assert int(read_metrics(run_dir / METRICS_FILE)["steps"]["step"][-1]) == step  # rows up to the stop
    assert metrics_file_status(run_dir / METRICS_FILE) == "diverged"


def test_simulated_divergence_names_the_workers(tmp_path: Path) -> None:
    overrides = [
        *[o for o in DIVERGING if not o.startswith("comm.")],
        "comm.backend=simulated",
        "comm.simulated_workers=2",
        "checkpoint.at_end=false",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", *_train_args(tmp_path, tmp_path / "sim", overrides)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    line = _one_error(proc)
    assert re.fullmatch(
        r"hpc-localsgd: error: training diverged at step \d+: the model is NaN or inf "
        r"\(non-finite loss on (simulated worker [01] at step \d+(, )?)+\); .*",
        line,
    ), line
    assert metrics_file_status(tmp_path / "sim" / METRICS_FILE) == "diverged"


def _checkpoint_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "filler")


def test_checkpoint_on_a_full_disk_fails_every_rank_and_keeps_the_previous_one(tmp_path: Path) -> None:
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    directory = run_dir / "checkpoints"
    # Only the checkpoints on the small disk: metrics.h5 stays writable, so the checkpoint alone fails.
    with mounted_tmpfs(directory, size_kb=2048):
        first = run_mpi(
            2,
            _rank_command(status_dir, _train_args(tmp_path, run_dir, RUN, "--resume", "auto", "--stop-at-step", "4")),
        )
        assert _statuses(status_dir) == [0, 0], first.stdout + first.stderr
        assert _checkpoint_files(directory) == [LATEST, "step-000000004.h5"]
        before = (directory / "step-000000004.h5").read_bytes()
        fill_disk(directory)

        # A periodic checkpoint that cannot be written stops the run (exit 4) with one line.
        periodic = run_mpi(
            2,
            _rank_command(
                status_dir, _train_args(tmp_path, run_dir, [*RUN, "checkpoint.every_steps=2"], "--resume", "auto")
            ),
        )
        assert _statuses(status_dir) == [4, 4] and periodic.returncode == 4, periodic.stdout + periodic.stderr
        line = _one_error(periodic)
        assert line.startswith("hpc-localsgd: error: the checkpoint of step 6 could not be written (") and (
            "No space left on device" in line and line.endswith(f"'{directory / LATEST}' still names step-000000004.h5")
        ), line
        assert _checkpoint_files(directory) == [LATEST, "step-000000004.h5"]  # no temporary file left
        assert (directory / "step-000000004.h5").read_bytes() == before
        Checkpoint(directory / "step-000000004.h5").verify()

        # SIGUSR1 before a time limit: the checkpoint it asks for cannot be written, so the job exits
        # non-zero and is not requeued (a fake scontrol would record a requeue).
        _signal_stop_cannot_checkpoint(tmp_path, run_dir, status_dir)
        assert _checkpoint_files(directory) == [LATEST, "step-000000004.h5"]
        assert (directory / "step-000000004.h5").read_bytes() == before


def _signal_stop_cannot_checkpoint(tmp_path: Path, run_dir: Path, status_dir: Path) -> None:
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    overrides = [*RUN, "train.max_steps=100000", "train.epochs=10000", "checkpoint.poll_every_steps=1"]
    env = {
        **os.environ,
        **MPI_TEST_ENV,
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
    }
    command = [
        "mpirun",
        "-np",
        "2",
        "--oversubscribe",
        *_rank_command(status_dir, _train_args(tmp_path, run_dir, overrides, "--resume", "auto")),
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("hpc-localsgd: resuming from"):
                break
            assert time.monotonic() < deadline, "".join(lines)
        time.sleep(1.0)  # a few steps into training
        os.kill(proc.pid, signal.SIGUSR1)  # mpirun forwards it to every rank
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    stdout = "".join(lines) + stdout
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert _statuses(status_dir) == [4, 4], stdout + stderr
    line = _one_error(done)
    assert re.match(r"hpc-localsgd: error: the checkpoint of step \d+ could not be written \(", line), line
    assert not requeued.exists() and "requeueing" not in stdout, stdout


def test_damaged_metrics_file_is_set_aside_on_resume(tmp_path: Path) -> None:
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    first = run_mpi(2, _rank_command(status_dir, _train_args(tmp_path, run_dir, RUN, "--stop-at-step", "6")))
    assert _statuses(status_dir) == [0, 0], first.stdout + first.stderr
    metrics = run_dir / METRICS_FILE
    damaged_bytes = metrics.read_bytes()[: metrics.stat().st_size // 2]  # truncated, as by a full disk or a crash
    metrics.write_bytes(damaged_bytes)

    resumed = run_mpi(2, _rank_command(status_dir, _train_args(tmp_path, run_dir, RUN, "--resume", "auto")))
    assert _statuses(status_dir) == [0, 0], resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stdout + resumed.stderr
    warnings = [line for line in resumed.stdout.splitlines() if "metrics.h5 is damaged" in line]
    assert len(warnings) == 1 and warnings[0].startswith("hpc-localsgd: warning: "), resumed.stdout
    aside = [p for p in run_dir.iterdir() if p.name.startswith(f"{METRICS_FILE}.damaged-")]
    assert len(aside) == 1 and str(aside[0]) in warnings[0]
    assert aside[0].read_bytes() == damaged_bytes  # kept as it was
    # A fresh file that starts at the checkpoint's step and runs to the end.
    with h5py.File(metrics) as f:
        assert int(f.attrs["first_step"]) == 6
    series = read_metrics(metrics)
    assert series["steps"]["step"].tolist() == list(range(7, 13))
    assert series["evals"]["step"].tolist() == [12]
    assert metrics_file_status(metrics) == "finished"
