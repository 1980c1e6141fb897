"""The ``slurm_cluster`` fixture: a private single-node Slurm cluster for the whole test session.

``scripts/slurm-cluster.sh start`` runs slurmctld and slurmd with all their state in a temporary
folder; the fixture stops them at the end of the session, whatever happened. A cluster that does not
come up fails every test that uses it, with the daemons' log tails: Slurm is installed by
scripts/install.sh, so a missing or broken Slurm is a failure, never a skip.

There is no slurmdbd, so no ``sacct``: job states come from ``scontrol show job -o``, which keeps a
finished job for MinJobAge (300 s in that slurm.conf).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import MPI_TEST_ENV, REPO_ROOT

CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm-cluster.sh"

# A job in one of these states will not run again by itself. PENDING, REQUEUED, RUNNING, COMPLETING,
# SUSPENDED, REQUEUE_HOLD, SPECIAL_EXIT, RESV_DEL_HOLD and friends are not final.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
)

# Variables that make the Slurm client commands talk to another cluster, or that tell sbatch and srun
# they are inside some job: present when the test session itself runs in a job of a real cluster.
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")

# A key of `scontrol show job -o`: Word=, with '/', ':' allowed (CPUs/Task=, ReqB:S:C:T=).
_FIELD = re.compile(r"(?:^| )([A-Za-z][\w/:]*)=")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` of one ``scontrol show ... -o`` line. Values may contain spaces
    (JobName, Command with arguments): a value runs to the next `` Key=``."""
    matches = list(_FIELD.finditer(line.strip()))
    record = {}
    for here, after in zip(matches, matches[1:] + [None], strict=True):
        end = after.start() if after else len(line.strip())
        record[here.group(1)] = line.strip()[here.end() : end]
    return record


def _state_of(record: dict[str, str]) -> str:
    return record.get("JobState", "UNKNOWN")


@dataclass
class SlurmCluster:
    """Handle on the running cluster. ``env`` is what every Slurm command and job needs: this
    session's environment without foreign Slurm variables, plus SLURM_CONF, this interpreter's
    folder first on PATH (so a job's ``python``/``hpc-localsgd`` is the project's), the repository on
    PYTHONPATH and the Open MPI settings for root and containers (jobs inherit them from sbatch)."""

    dir: Path
    env: dict[str, str]

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def run(
        self, argv: Sequence[str], cwd: str | Path | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) against this cluster; a failure fails the test
        with its output and the daemons' log tails."""
        proc = subprocess.run(
            list(argv), check=False, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(map(str, argv))} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}"
                f"\n--- stderr ---\n{proc.stderr}\n{self.log_tail()}",
                pytrace=False,
            )
        return proc

    def sbatch(self, args: Sequence[str | Path], cwd: str | Path) -> str:
        """Submit; returns the job id (for an array, the array's id: its tasks are ``<id>_<index>``)."""
        proc = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd)
        return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of ``scontrol show job -o <id>``: one for a job or an array task, one per task
        for an array id. Empty once Slurm has forgotten the job."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            pytest.fail(f"scontrol show job {job_id}: {proc.stderr}\n{self.log_tail()}", pytrace=False)
        return [parse_scontrol_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        """The one record of a job (or array task): JobState, Restarts, ExitCode, Reason, ..."""
        records = self.jobs(job_id)
        if len(records) != 1:
            pytest.fail(f"expected one record for job {job_id}, got {len(records)}: {records}", pytrace=False)
        return records[0]

    def state(self, job_id: str) -> str:
        """JobState of a job; for an array id, the state of the whole array: the first state that is
        not final if any task is still going, else COMPLETED when all completed, else the first
        task's final state that is not COMPLETED."""
        states = [_state_of(r) for r in self.jobs(job_id)]
        if not states:
            return "UNKNOWN"
        unfinished = [s for s in states if s not in FINAL_STATES]
        if unfinished:
            return unfinished[0]
        return next((s for s in states if s != "COMPLETED"), "COMPLETED")

    def wait(self, job_id: str, timeout: float = 60, states: Sequence[str] | None = None, poll: float = 0.2) -> str:
        """Poll until the job (or whole array) is in one of ``states`` (default: a final state) and
        return that state; fail the test after ``timeout`` seconds with the job record and logs.
        A requeued job passes through PENDING/REQUEUED and RUNNING again: not final."""
        wanted = {states} if isinstance(states, str) else set(states) if states else FINAL_STATES
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in wanted:
                return state
            time.sleep(poll)
        pytest.fail(
            f"job {job_id} still {state} after {timeout:.0f} s (waiting for {sorted(wanted)})\n"
            f"{self.jobs(job_id)}\n{self.log_tail()}",
            pytrace=False,
        )

    def squeue(self) -> list[dict[str, str]]:
        """Jobs Slurm still queues or runs: job_id, state, name, reason."""
        proc = self.run(["squeue", "-h", "-o", "%i|%T|%r|%j"])
        rows = []
        for line in proc.stdout.splitlines():
            job_id, state, reason, name = line.split("|", 3)
            rows.append({"job_id": job_id, "state": state, "reason": reason, "name": name})
        return rows

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.dir / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- tail {path} ---\n" + "\n".join(tail))
        return "\n".join(parts)


def cluster_env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    env.update(MPI_TEST_ENV)
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def cluster_command(action: str, directory: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action, str(directory)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    directory = tmp_path_factory.mktemp("slurm")
    if len(str(directory)) > 60:  # step sockets live in DIR/spool, and a socket path must fit in 108 bytes
        directory = Path(tempfile.mkdtemp(prefix="slurm-"))
    try:
        started = cluster_command("start", directory)
        if started.returncode != 0:
            pytest.fail(
                f"scripts/slurm-cluster.sh start {directory} failed ({started.returncode}); is Slurm "
                f"installed (scripts/install.sh)?\n--- stdout ---\n{started.stdout}\n--- stderr ---\n"
                f"{started.stderr}",
                pytrace=False,
            )
        yield SlurmCluster(dir=directory, env=cluster_env(directory / "slurm.conf"))
    finally:
        stopped = cluster_command("stop", directory)
        if stopped.returncode != 0:
            pytest.fail(f"scripts/slurm-cluster.sh stop {directory} failed:\n{stopped.stderr}", pytrace=False)
