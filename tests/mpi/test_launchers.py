"""Launch paths other than plain mpirun, and metrics.h5 read while a run is still going."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py

from tests.helpers import MPI_TEST_ENV, REPO_ROOT, kill_session
from tests.mpi.cases import BASE


def test_horovodrun_gloo_launch(tmp_path: Path) -> None:
    """horovodrun's Gloo controller sets HOROVOD_RANK/SIZE (no MPI variables): the layout comes from those."""
    horovodrun = Path(sys.executable).parent / "horovodrun"
    assert horovodrun.exists(), "horovodrun is installed with Horovod (scripts/install.sh)"
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{horovodrun.parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [
            str(horovodrun),
            "--gloo",
            "-np",
            "2",
            "-H",
            "localhost:2",
            sys.executable,
            "-m",
            "hpc_localsgd",
            "train",
            str(REPO_ROOT / "configs" / "demo.yaml"),
            "--run-dir",
            str(run_dir),
            "--set",
            "train.max_steps=8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(run_dir / "metrics.h5") as f:
        world = json.loads(f.attrs["world"])
        assert (world["launcher"], world["backend"], world["size"]) == ("horovodrun", "horovod", 2)
        assert f["steps/sync_rounds"][-1] == 2  # H = 4, 8 steps


def test_metrics_readable_while_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *BASE,
        "train.max_steps=100000",
        "train.epochs=1000",
        "train.eval_every_epochs=0.5",
        "output.metrics_flush_seconds=0.2",
        "algorithm.method=local_sgd",
    ]
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    command = [
        "mpirun",
        "-np",
        "2",
        "--oversubscribe",
        sys.executable,
        "-m",
        "hpc_localsgd",
        "train",
        str(config),
        "--run-dir",
        str(run_dir),
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT), "HDF5_USE_FILE_LOCKING": "FALSE"}
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        lengths = []
        deadline = time.monotonic() + 120
        while len(lengths) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read() if proc.stderr else ''}"
            time.sleep(0.5)
            try:
                with h5py.File(run_dir / "metrics.h5", "r") as f:
                    n_steps, n_evals = f["steps/step"].shape[0], f["evals/step"].shape[0]
            except (OSError, KeyError):
                continue  # not created yet, or caught between open and close of a flush
            if n_evals and (not lengths or n_steps > lengths[-1]):
                lengths.append(n_steps)
        assert len(lengths) == 2 and lengths[1] > lengths[0], lengths  # read twice, growing, mid-run
        assert proc.poll() is None
        # scripts/install.sh installs h5dump (hdf5-tools): a missing one is a failure, not a skip.
        assert shutil.which("h5dump"), (
            "h5dump is not installed (apt-get install hdf5-tools, as scripts/install.sh does)"
        )
        for _ in range(20):
            dump = subprocess.run(
                ["h5dump", "-d", "/evals/test_accuracy", str(run_dir / "metrics.h5")],
                capture_output=True,
                text=True,
                env=env,
            )
            if dump.returncode == 0:
                break
            time.sleep(0.2)
        assert dump.returncode == 0 and "test_accuracy" in dump.stdout, dump.stderr
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)
