"""The command line on real ranks: bad input ends every rank with one line and a non-zero exit,
never a traceback or a hang; an existing run is never overwritten; the demo learns."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from hpc_localsgd.io.metrics import read_metrics
from tests.helpers import REPO_ROOT, run_mpi
from tests.mpi.cases import BASE

TINY = [*BASE, "train.max_steps=4"]


def cli(*args: str) -> list[str]:
    return ["python", "-m", "hpc_localsgd", *args]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def empty_config(tmp_path: Path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("# every value comes from --set\n")
    return str(path)


def assert_one_clean_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert lines == [f"hpc-localsgd: error: {message}"], proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algorithm.sync_period=0"], "algorithm.sync_period: must be >= 1, got 0"),
        (["optim.lr_per_256=0"], "optim.lr_per_256: must be > 0, got 0.0"),
        (["algorithm.slow_momentum=1.5"], "algorithm.slow_momentum: must be in [0, 1), got 1.5"),
        (["algorithm.sync_perod=4"], "algorithm.sync_perod: unknown key; did you mean 'sync_period'?"),
        (
            ["data.name=cifar10", "data.path=/nonexistent/cifar"],
            "data.path: folder '/nonexistent/cifar' does not exist",
        ),
        (["comm.backend=single"], "launcher"),
    ],
)
def test_bad_input_under_mpirun(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = run_mpi(
        2,
        cli("train", *sets(TINY + overrides), "--run-dir", str(tmp_path / "run"), empty_config(tmp_path)),
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert errors and all(message in line for line in errors), proc.stderr
    if message != "launcher":  # seen alike by every rank: said once
        assert len(errors) == 1, proc.stderr


def test_unavailable_backend(tmp_path: Path) -> None:
    # A horovod that fails to import, as on a machine where it was never built.
    fake = tmp_path / "fake"
    (fake / "horovod").mkdir(parents=True)
    (fake / "horovod" / "__init__.py").write_text("raise ImportError('simulated: horovod not built')\n")
    proc = run_mpi(
        2,
        cli(
            "train", *sets(TINY + ["comm.backend=horovod"]), "--run-dir", str(tmp_path / "run"), empty_config(tmp_path)
        ),
        env={"PYTHONPATH": f"{REPO_ROOT}:{fake}"},
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "comm.backend is 'horovod' but horovod.torch cannot be imported" in proc.stderr


def test_single_process_bad_input(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("algorithm:\n  sync_period: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "train", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hpc-localsgd: error: algorithm.sync_period: must be >= 1, got -1"
    missing = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "train", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = cli("train", *sets(TINY), "--run-dir", str(run_dir), empty_config(tmp_path))
    first = run_mpi(2, args, timeout=120)
    assert first.returncode == 0, first.stderr
    before = {name: digest(run_dir / name) for name in ("metrics.h5", "config.yaml")}
    again = run_mpi(2, args, timeout=120)
    assert_one_clean_error(
        again,
        f"output.run_dir '{run_dir}' already holds a run "
        "(metrics.h5, config.yaml, checkpoints); "
        "pass --resume auto to continue it, --overwrite to replace it, "
        "or choose another output.run_dir",
    )
    assert {name: digest(run_dir / name) for name in before} == before
    forced = run_mpi(2, [*args, "--overwrite"], timeout=120)
    assert forced.returncode == 0, forced.stderr


def test_demo_learns_and_writes_readable_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    proc = run_mpi(2, cli("train", str(REPO_ROOT / "configs" / "demo.yaml"), "--run-dir", str(run_dir)), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = [line for line in proc.stdout.splitlines() if line.startswith("hpc-localsgd: done")]
    assert len(summary) == 1, proc.stdout  # rank 0 alone prints
    metrics = read_metrics(run_dir / "metrics.h5")
    final_accuracy = metrics["evals"]["test_accuracy"][-1]
    assert final_accuracy > 0.9, final_accuracy  # 10 classes: chance is 0.1
    steps = metrics["steps"]
    assert list(steps["step"]) == list(range(1, len(steps["step"]) + 1))
    # local SGD H = 4: one sync every fourth step, counted as such.
    assert list(steps["synced"]) == [int(s % 4 == 0) for s in steps["step"]]
    assert steps["sync_rounds"][-1] == len(steps["step"]) // 4
    with h5py.File(run_dir / "metrics.h5") as f:
        assert f.attrs["format"] == "hpc-localsgd/metrics"
        assert "slowmo" in f.attrs["config"] and '"size": 2' in f.attrs["world"]
    # scripts/install.sh installs h5dump (hdf5-tools): a missing one is a failure, not a skip.
    assert shutil.which("h5dump"), "h5dump is not installed (apt-get install hdf5-tools, as scripts/install.sh does)"
    dump = subprocess.run(["h5dump", "-H", str(run_dir / "metrics.h5")], capture_output=True, text=True)
    assert dump.returncode == 0 and "test_accuracy" in dump.stdout, dump.stderr


def test_demo_learns_in_bf16_and_the_ranks_agree(tmp_path: Path) -> None:
    """bf16 autocast on CPUs (what GPU users pick): the demo reaches the same accuracy bar as in fp32."""
    run_dir = tmp_path / "demo-bf16"
    argv = cli(
        "train", str(REPO_ROOT / "configs" / "demo.yaml"), "--run-dir", str(run_dir), *sets(["train.precision=bf16"])
    )
    proc = run_mpi(2, argv, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ", bf16 |" in proc.stdout.splitlines()[0], proc.stdout  # the start-up line names the precision
    final_accuracy = read_metrics(run_dir / "metrics.h5")["evals"]["test_accuracy"][-1]
    assert final_accuracy > 0.9, final_accuracy
