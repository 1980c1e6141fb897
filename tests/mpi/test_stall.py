"""A stalled rank on real ranks (issue 32): rank 1 stops itself (SIGSTOP, ``HPC_LOCALSGD_INJECT_FAULT``) and
rank 0, waiting in a collective for it, says so within ``comm.stall_warn_seconds``; with
``comm.stall_timeout_seconds`` it stops with exit status 5 and one error line, the checkpoint before the stall
stays the latest, and ``--resume auto`` finishes the run. On the mpi and horovod backends under ``mpirun`` and
on the torch backend under ``torchrun``, two ranks each.

Each rank is wrapped in a shell that records its exit status; every test ends by killing whatever it
started (a stopped process included), so that nothing hangs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest

from hpc_localsgd.comm.watchdog import PHASES
from hpc_localsgd.io.checkpoint import LATEST, Checkpoint
from hpc_localsgd.io.metrics import METRICS_FILE, metrics_file_status
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, kill_session, mpirun_available
from tests.mpi.cases import BASE

WARN_SECONDS = 2
STOPPED_AT = 24  # rank 1 stops after this step: after the checkpoint and the global sync due there
WAITS_AT = STOPPED_AT + 4  # rank 0 runs on to the next global sync and waits there
# Local SGD with H = 4, polls and checkpoints at the syncs.
RUN = [
    *BASE,
    "optim.warmup_epochs=0",
    "train.eval_every_epochs=100",
    "train.max_steps=32",
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "checkpoint.poll_every_steps=4",
    "checkpoint.every_steps=4",
    f"comm.stall_warn_seconds={WARN_SECONDS}",
]
BACKENDS = ["mpi", "horovod", "torch"]
STARTED_WITHIN = 120  # seconds for two ranks to import torch and reach the stall on a loaded machine


def _horovod_missing() -> str | None:
    try:
        import horovod.torch  # noqa: F401
    except Exception as error:
        return str(error)
    return None


def _require(backend: str) -> None:
    """The test command installs Open MPI and Horovod: their absence is a broken set-up, said, never skipped."""
    if backend in ("mpi", "horovod") and not mpirun_available():
        pytest.fail("mpirun is not installed (run ./scripts/test.sh, which installs it)")
    if backend == "horovod" and (reason := _horovod_missing()) is not None:
        pytest.fail(f"horovod.torch cannot be imported: {reason} (./scripts/test.sh builds it)")


class Job:
    """Two ranks started by ``mpirun`` (mpi, horovod) or ``torchrun`` (torch), each in a shell that writes its
    exit status to ``status_dir/rc.<rank>``; stdout and stderr read as they come."""

    def __init__(
        self,
        backend: str,
        status_dir: Path,
        args: list[str],
        fault: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.status_dir = status_dir
        train = shlex.join([sys.executable, "-m", "hpc_localsgd", *args])
        rank = "${OMPI_COMM_WORLD_RANK:-$RANK}"  # mpirun's variable, else torchrun's
        script = f"{train}; rc=$?; echo $rc > {shlex.quote(str(status_dir))}/rc.{rank}; exit $rc"
        if backend == "torch":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            command = [*launcher, "--no-python", "sh", "-c", script]
        else:
            command = ["mpirun", "-np", "2", "--oversubscribe", "sh", "-c", script]
        env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("HPC_LOCALSGD_INJECT_FAULT", None)
        env.update(extra_env or {})
        if fault is not None:
            env["HPC_LOCALSGD_INJECT_FAULT"] = fault
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(["--- stdout ---", *self.stdout, "--- stderr ---", *self.stderr])

    def wait_for(self, what: str, found: Callable[[], object], timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := found():
                return value
            if self.process.poll() is not None and not (value := found()):
                pytest.fail(f"the job ended before {what}\n{self.output()}", pytrace=False)
            time.sleep(0.05)
        pytest.fail(f"no {what} within {timeout:.0f} s\n{self.output()}", pytrace=False)

    def line(self, stream: list[str], pattern: str) -> Callable[[], re.Match[str] | None]:
        return lambda: next((m for line in list(stream) if (m := re.fullmatch(pattern, line))), None)

    def finish(self, timeout: float = 120) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not finish within {timeout:.0f} s\n{self.output()}", pytrace=False)
        for reader in self._readers:
            reader.join(timeout=10)
        return self.process.returncode

    def status(self, rank: int) -> int | None:
        path = self.status_dir / f"rc.{rank}"
        return int(path.read_text()) if path.is_file() and path.read_text().strip() else None

    def kill(self) -> None:
        """SIGCONT and SIGKILL to whatever the job started, stopped ranks included."""
        for pid in _session_members(self.process.pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        kill_session(self.process.pid)


def _session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _train_args(tmp_path: Path, run_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return ["train", str(config), "--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)], *extra]


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    try:
        return int(json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _stopped(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "T"


def _wait_until_rank_1_stops(job: Job, run_dir: Path, rank: int = 1) -> tuple[int, float]:
    """Rank 1's (``rank``'s) pid, from its heartbeat, once it has stopped itself, and when that was seen."""
    pid = job.wait_for(f"rank {rank}'s heartbeat", lambda: _rank_pid(run_dir, rank), STARTED_WITHIN)
    assert isinstance(pid, int)
    job.wait_for(f"rank {rank} stopped", lambda: _stopped(pid), STARTED_WITHIN)
    return pid, time.monotonic()


WARNING = (
    rf"hpc-localsgd: warning: rank 0 has waited (\d+) s in the allreduce of the global sync after step {WAITS_AT} "
    r"for rank 1 \(last heard (\d+) s ago: step (\d+), ([a-z -]+)\)"
)


def _no_rank_traceback(backend: str, job: Job) -> None:
    """No rank ended with a traceback. torchrun reports a worker's non-zero exit with a traceback of its own
    (ChildFailedError), through torch's frames only."""
    if backend != "torch":
        assert "Traceback" not in job.output(), job.output()
    assert not any(re.match(r'\s*File ".*hpc_localsgd', line) for line in job.stderr), job.output()


def _backend_overrides(backend: str) -> list[str]:
    return [*RUN, f"comm.backend={backend}"]


def _check_rank_1_named(match: re.Match[str]) -> None:
    waited, heard, step, phase = int(match[1]), int(match[2]), int(match[3]), match[4]
    assert waited >= WARN_SECONDS and heard >= WARN_SECONDS - 1, match[0]
    # What rank 1's heartbeat last said: written every 0.5 s here, so at or a little before its stop.
    assert step <= STOPPED_AT and phase in PHASES, match[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_rank_is_named_in_one_warning_and_the_run_goes_on_after_sigcont(backend: str, tmp_path: Path) -> None:
    _require(backend)
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    job = Job(backend, status_dir, _train_args(tmp_path, run_dir, _backend_overrides(backend)), f"stop:1:{STOPPED_AT}")
    try:
        pid, stopped_at = _wait_until_rank_1_stops(job, run_dir)
        match = job.wait_for("stall warning", job.line(job.stdout, WARNING), WARN_SECONDS + 10)
        assert isinstance(match, re.Match)
        warned_after = time.monotonic() - stopped_at
        assert warned_after <= WARN_SECONDS + 5, warned_after
        _check_rank_1_named(match)
        time.sleep(WARN_SECONDS)  # once per wait, not once a tick (every WARN_SECONDS / 4 here)
        os.kill(pid, signal.SIGCONT)
        assert job.finish() == 0, job.output()
    finally:
        job.kill()
    assert [job.status(0), job.status(1)] == [0, 0], job.output()
    warnings = [line for line in job.stdout if line.startswith("hpc-localsgd: warning:")]
    assert len(warnings) == 1, job.output()
    assert any(line.startswith("hpc-localsgd: done |") for line in job.stdout), job.output()
    _no_rank_traceback(backend, job)


ERROR = (
    rf"hpc-localsgd: error: rank 0 has waited (\d+) s in the allreduce of the global sync after step {WAITS_AT} "
    r"for rank 1 \(last heard (\d+) s ago: step (\d+), ([a-z -]+)\); stopping \(comm.stall_timeout_seconds=5\): "
    rf"no checkpoint of this state was written; step-{STOPPED_AT:09d}.h5 stays the latest checkpoint: "
    r"continue with --resume auto"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stall_past_the_timeout_ends_with_status_5_and_the_run_resumes(backend: str, tmp_path: Path) -> None:
    _require(backend)
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    overrides = [*_backend_overrides(backend), "comm.stall_timeout_seconds=5"]
    # A Slurm job: the stall requeues it, as a SIGUSR1 would (a fake scontrol records the request).
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    job = Job(backend, status_dir, _train_args(tmp_path, run_dir, overrides), f"stop:1:{STOPPED_AT}", slurm)
    try:
        pid, _ = _wait_until_rank_1_stops(job, run_dir)
        job.wait_for("rank 0's exit", lambda: job.status(0) is not None, 30)
        os.kill(pid, signal.SIGKILL)  # what the launcher does by itself; torchrun only after a while
        job.finish()
    finally:
        job.kill()
    assert job.status(0) == 5, job.output()
    assert job.status(1) != 0, job.output()  # killed by the launcher, or here
    _no_rank_traceback(backend, job)
    errors = [line for line in job.stderr if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1, job.output()
    match = re.fullmatch(ERROR, errors[0])
    assert match, errors[0]
    _check_rank_1_named(match)
    # The checkpoint written before the stall stays the latest, intact; metrics.h5 says why the run stopped.
    directory = run_dir / "checkpoints"
    assert (directory / LATEST).read_text().strip() == f"step-{STOPPED_AT:09d}.h5"
    Checkpoint(directory / f"step-{STOPPED_AT:09d}.h5").verify()
    with h5py.File(run_dir / METRICS_FILE) as f:
        # The last completed step: rank 0 stopped inside the step that ends with the sync it waited in.
        assert f.attrs["stopped"] == "stalled" and int(f.attrs["stopped_step"]) == WAITS_AT - 1
        assert f.attrs["stopped_reason"] == errors[0].removeprefix("hpc-localsgd: error: ")
    assert metrics_file_status(run_dir / METRICS_FILE) == "unfinished"  # resumable, not an outcome
    assert requeued.read_text() == "requeue 4242\n", job.output()
    assert "hpc-localsgd: requeueing Slurm job 4242; it resumes from the checkpoint when it starts again" in job.stdout
    if backend != "mpi":
        return  # resuming is the same on every backend: once is enough for the suite's time

    resumed = Job(backend, status_dir, _train_args(tmp_path, run_dir, overrides, "--resume", "auto"))
    try:
        assert resumed.finish() == 0, resumed.output()
    finally:
        resumed.kill()
    assert [resumed.status(0), resumed.status(1)] == [0, 0], resumed.output()
    assert any("resuming from" in line and f"step-{STOPPED_AT:09d}.h5" in line for line in resumed.stdout), (
        resumed.output()
    )
    assert any(line.startswith("hpc-localsgd: done |") for line in resumed.stdout), resumed.output()
    assert metrics_file_status(run_dir / METRICS_FILE) == "finished"


def test_a_stalled_rank_0_is_reported_by_rank_1_where_horovods_own_check_is_blind(tmp_path: Path) -> None:
    """Horovod's coordinator is rank 0: stopped, it checks nothing. Rank 1's watchdog reports and stops; rank 0's
    metrics.h5 cannot be marked (its process is the stalled one), and the checkpoint before the stall stays."""
    _require("horovod")
    run_dir, status_dir = tmp_path / "run", tmp_path / "status"
    status_dir.mkdir()
    overrides = [*_backend_overrides("horovod"), "comm.stall_timeout_seconds=5"]
    job = Job("horovod", status_dir, _train_args(tmp_path, run_dir, overrides), f"stop:0:{STOPPED_AT}")
    try:
        pid, _ = _wait_until_rank_1_stops(job, run_dir, rank=0)
        job.wait_for("rank 1's exit", lambda: job.status(1) is not None, 30)
        os.kill(pid, signal.SIGKILL)
        job.finish()
    finally:
        job.kill()
    assert job.status(1) == 5 and job.status(0) != 0, job.output()
    _no_rank_traceback("horovod", job)
    errors = [line for line in job.stderr if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1, job.output()
    assert re.fullmatch(
        rf"hpc-localsgd: error: rank 1 has waited \d+ s in the allreduce of the global sync after step {WAITS_AT} "
        rf"for rank 0 \(last heard \d+ s ago: step \d+, [a-z -]+\); stopping .*; step-{STOPPED_AT:09d}.h5 stays "
        r"the latest checkpoint: continue with --resume auto",
        errors[0],
    ), errors[0]
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == f"step-{STOPPED_AT:09d}.h5"
    with h5py.File(run_dir / METRICS_FILE) as f:
        assert "stopped" not in f.attrs
