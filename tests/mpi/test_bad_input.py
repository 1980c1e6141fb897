"""Bad input and bad surroundings through the command line: numbers out of range end with one line and
exit status 2 (said once under mpirun, every rank exiting 2); a reader that closes stdout ends every verb
quietly (exit status 141); a failed start leaves its run directory free for the retry, while a real run
stays protected; every file a run writes follows the umask."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_localsgd.cli import EXIT_BROKEN_PIPE
from tests.helpers import REPO_ROOT, run_mpi
from tests.mpi.cases import BASE

TINY = [*BASE, "train.max_steps=3", "checkpoint.every_steps=2"]
DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def cli(*args: str, umask: int | None = None, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m hpc_localsgd ARGS`` outside any launcher (one rank, backend single)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def assert_refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"hpc-localsgd: error: {message}\n"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.weight_decay=1e308", "optim.weight_decay: must be in [0, 1], got 1e+308"),
        ("train.epochs=1e308", "train.epochs: must be <= 1e6, got 1e+308"),
        ("train.eval_every_epochs=.inf", "train.eval_every_epochs: must be <= 1e6, got inf"),
        ("train.epochs=nan", "train.epochs: expected a number, got 'nan'"),
    ],
)
def test_numbers_out_of_range_end_with_one_line(tmp_path: Path, override: str, message: str) -> None:
    assert_refused(cli("train", DEMO, "--run-dir", str(tmp_path / "run"), "--set", override), message)
    assert not (tmp_path / "run").exists()


def test_non_finite_numbers_in_a_yaml_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  weight_decay: 1e-4\n  warmup_epochs: .nan\n")
    assert_refused(cli("train", str(config)), "optim.warmup_epochs: must be >= 0, got nan")


def test_out_of_range_under_mpirun_every_rank_exits_2(tmp_path: Path) -> None:
    command = " ".join(
        [sys.executable, "-m", "hpc_localsgd", "train", DEMO, "--run-dir", str(tmp_path / "run")]
        + ["--set", "algorithm.slow_lr=1e308"]
    )
    # Each rank reports its own exit status, since mpirun passes on only one.
    proc = run_mpi(2, ["sh", "-c", f'{command}; echo "rank exit $?"'], timeout=120)
    assert proc.stdout.splitlines().count("rank exit 2") == 2, proc.stdout + proc.stderr
    assert proc.stderr == "hpc-localsgd: error: algorithm.slow_lr: must be <= 100, got 1e+308\n"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A run of three steps with two checkpoints under each umask, and the sweep folder and report written under it."""
    runs = {}
    for umask in (0o022, 0o027):
        folder = tmp_path_factory.mktemp(f"umask{umask:03o}")
        proc = cli("train", DEMO, *sets(TINY), "--run-dir", str(folder / "run"), umask=umask)
        assert proc.returncode == 0, proc.stderr
        (folder / "grid.yaml").write_text(f"base: {DEMO}\ngrid: {{optim.weight_decay: [1e-4, 5e-4]}}\n")
        proc = cli("sweep", str(folder / "grid.yaml"), "--out", str(folder / "sweep"), umask=umask)
        assert proc.returncode == 0, proc.stderr
        proc = cli("report", str(folder / "run"), "--out", str(folder / "report"), umask=umask)
        assert proc.returncode == 0, proc.stderr
        runs[umask] = folder
    return runs


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_follows_the_umask(tiny_runs: dict[int, Path], umask: int) -> None:
    folder = tiny_runs[umask]
    files = [path for path in folder.rglob("*") if path.is_file()]
    names = {path.relative_to(folder).as_posix() for path in files}
    assert {"run/config.yaml", "run/metrics.h5", "run/checkpoints/latest", "sweep/manifest.json"} <= names
    assert {"report/results.csv", "report/results.md", "report/accuracy_vs_H.png"} <= names
    assert any(name.startswith("run/checkpoints/step-") for name in names), names
    modes = {path.relative_to(folder).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in files}
    assert {name: mode for name, mode in modes.items() if name != "grid.yaml"} == {
        name: 0o666 & ~umask for name in modes if name != "grid.yaml"
    }
    folders = [path for name in ("run", "sweep", "report") for path in [folder / name, *(folder / name).rglob("*")]]
    assert {path: stat.S_IMODE(path.stat().st_mode) for path in folders if path.is_dir()} == {
        path: 0o777 & ~umask for path in folders if path.is_dir()
    }


def closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """The verb with a stdout whose reader has gone before anything was written."""
    read, write = os.pipe()
    os.close(read)
    try:
        return cli(*args, stdout=write)
    finally:
        os.close(write)


def test_every_verb_ends_quietly_when_its_reader_goes(tiny_runs: dict[int, Path], tmp_path: Path) -> None:
    run = tiny_runs[0o022] / "run"
    checkpoint = next((run / "checkpoints").glob("step-*.h5"))
    for args in (
        ["inspect", str(run / "metrics.h5")],
        ["inspect", "--json", str(checkpoint)],
        ["report", str(run), "--out", str(tmp_path / "report")],
        ["sweep", str(tiny_runs[0o022] / "grid.yaml"), "--dry-run"],
        ["train", DEMO, *sets(TINY), "--run-dir", str(tmp_path / "run")],
        ["train", "--help-config"],
    ):
        proc = closed_stdout(*args)
        assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, ""), args
    # bench measures nothing here; its help goes through the same main.
    assert closed_stdout("bench", "--help").stderr == ""


def test_a_pipe_into_head_is_quiet(tiny_runs: dict[int, Path]) -> None:
    metrics = tiny_runs[0o022] / "run" / "metrics.h5"
    command = f"{sys.executable} -m hpc_localsgd inspect --json {metrics} | head -c 1"
    proc = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "{", "")


def test_a_failed_start_leaves_the_run_directory_free(tmp_path: Path, tiny_runs: dict[int, Path]) -> None:
    run_dir = tmp_path / "run"
    failed = cli("train", DEMO, "--run-dir", str(run_dir), *sets(["data.name=cifar10", "data.path=/nonexistent"]))
    assert_refused(failed, "data.path: folder '/nonexistent' does not exist")
    retry = cli("train", DEMO, "--run-dir", str(run_dir), *sets(TINY))
    assert retry.returncode == 0, retry.stderr
    assert (run_dir / "metrics.h5").is_file() and (run_dir / "checkpoints").is_dir()
    # A directory that holds a real run is still refused, and left as it was.
    real = tiny_runs[0o022] / "run"
    before = {path: path.read_bytes() for path in real.rglob("*") if path.is_file()}
    again = cli("train", DEMO, "--run-dir", str(real), *sets(TINY))
    assert_refused(
        again,
        f"output.run_dir '{real}' already holds a run (metrics.h5, config.yaml, checkpoints); "
        "pass --resume auto to continue it, --overwrite to replace it, or choose another output.run_dir",
    )
    assert {path: path.read_bytes() for path in real.rglob("*") if path.is_file()} == before
    # So is one whose run stopped before its first checkpoint: metrics.h5 alone marks it.
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "config.yaml").unlink()
    assert_refused(
        cli("train", DEMO, "--run-dir", str(run_dir), *sets(TINY)),
        f"output.run_dir '{run_dir}' already holds a run (metrics.h5); "
        "pass --resume auto to continue it, --overwrite to replace it, or choose another output.run_dir",
    )
