"""Stall detection on every process backend: a heartbeat per rank and a watchdog thread per process.

A rank that stalls (a hung mount, a stuck driver, SIGSTOP) leaves the others waiting in their next
collective, silently. :class:`WatchedCommunicator` wraps any process communicator: it numbers the
collectives this process starts (one count over the world and its groups: by the interface's contract every
rank starts the same sequence) and notes, per thread, which one it is waiting for and since when. The
:class:`Heartbeat` holds what this rank is doing (its step and phase: data loading, the global sync, a
checkpoint write, ...), set by the training loop and the engine with one attribute assignment.

The :class:`Watchdog` thread writes both to ``RUN_DIR/heartbeats/rank-<N>.json`` every ``min(5 s, warn / 4)``
(a few hundred bytes, replaced atomically; wall-clock times, since ranks sit on different hosts), and
checks the waits in progress. Once one has lasted ``stall_warn_seconds`` it reads the others' heartbeats:
the late ranks are those that have not started the collective this rank waits for (a stopped rank's
heartbeat is simply stale; a busy one's is fresh and says what it does). The lowest rank that waits there
prints one warning. After ``stall_timeout_seconds`` every waiting rank ends with exit status 5
(:class:`~hpc_localsgd.errors.RankStalled`): the watchdog calls ``os._exit``, since the main thread is
blocked inside the collective; the reporting rank first prints the error line and runs the callbacks the
training loop registered (mark metrics.h5, requeue the Slurm job). Each heartbeat carries a token the ranks
agree on at start, so that the files of an earlier attempt in the same run directory are ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RankStalled, one_line, print_line
from .agree import broadcast_text
from .base import Communicator, Handle

HEARTBEATS = "heartbeats"  # the directory of the run directory the heartbeats are written to
BACKENDS_WATCHED = ("mpi", "horovod", "torch")  # one process a rank; threads, simulated, single need none
# A warning names this many late ranks, then counts the rest: thousands of ranks must not make a page.
MAX_NAMED_RANKS = 8
# A rank that is not the reporter leaves it this long to print, mark metrics.h5 and requeue before exiting:
# the launcher ends the job when the first rank exits.
REPORTER_GRACE_SECONDS = 10.0
# The callbacks (metrics.h5 on a hung mount, scontrol) may hang themselves: the exit does not wait longer.
CALLBACK_SECONDS = 90.0

# The phases a rank reports, and how each reads after "in the allreduce of" (step: completed steps).
START_UP = "start-up"
DATA_LOADING = "data loading"
TRAINING_STEP = "training step"
GRADIENT_ALLREDUCE = "gradient allreduce"
GLOBAL_SYNC = "global sync"
GROUP_AVERAGE = "group average"
JOB_CONTROL = "job control"
EVALUATION = "evaluation"
CHECKPOINT_WRITE = "checkpoint write"
END_OF_RUN = "end of run"
_CONTEXTS = {
    START_UP: "the start-up",
    DATA_LOADING: "data loading after step {step}",
    TRAINING_STEP: "training step {next}",
    GRADIENT_ALLREDUCE: "the gradients of step {next}",
    GLOBAL_SYNC: "the global sync after step {step}",
    GROUP_AVERAGE: "the group average after step {step}",
    JOB_CONTROL: "the signal and checkpoint poll after step {step}",
    EVALUATION: "the evaluation after step {step}",
    CHECKPOINT_WRITE: "the checkpoint write after step {step}",
    END_OF_RUN: "the end of the run after step {step}",
}

PHASES = tuple(_CONTEXTS)


def describe_phase(phase: str, step: int) -> str:
    """``phase`` at ``step`` completed steps as a user reads it: "the global sync after step 40"."""
    return _CONTEXTS.get(phase, phase + " after step {step}").format(step=step, next=step + 1)


class Heartbeat:
    """What this rank is doing: its phase and completed steps, and since when (wall clock). Set from the
    main thread by one assignment of a tuple, which the watchdog thread reads whole."""

    def __init__(self) -> None:
        self.state: tuple[str, int, float] = (START_UP, 0, time.time())

    def set(self, phase: str, step: int) -> None:
        if self.state[:2] != (phase, step):
            self.state = (phase, step, time.time())


@dataclass(frozen=True)
class Wait:
    """A collective a thread of this process waits for: its number among the collectives started, what it is,
    where it was started (``describe_phase``) and since when (wall clock)."""

    seq: int
    operation: str
    context: str
    since: float


def heartbeat_record(
    token: str, rank: int, heartbeat: Heartbeat, started: int, wait: Wait | None, now: float
) -> dict[str, Any]:
    """What a rank's heartbeat file holds."""
    phase, step, since = heartbeat.state
    return {
        "token": token,
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": step,
        "phase": phase,
        "phase_since": since,
        "collectives": started,
        "wait": None if wait is None else asdict(wait),
        "written": now,
    }


def late_ranks(heartbeats: Mapping[int, Mapping[str, Any] | None], size: int, rank: int, seq: int) -> list[int]:
    """The ranks that have not started collective ``seq`` (1-based), which ``rank`` waits for: those whose
    heartbeat counts fewer collectives started, or that have no heartbeat of this run."""
    late = []
    for other in range(size):
        if other == rank:
            continue
        record = heartbeats.get(other)
        if record is None or int(record["collectives"]) < seq:
            late.append(other)
    return late


def waits_at(record: Mapping[str, Any] | None, seq: int, now: float, fresh_seconds: float) -> bool:
    """Whether a heartbeat says its rank is alive and waiting for collective ``seq``."""
    return (
        record is not None
        and now - float(record["written"]) <= fresh_seconds
        and record["wait"] is not None
        and int(record["wait"]["seq"]) == seq
    )


def reporter(
    heartbeat_of: Callable[[int], Mapping[str, Any] | None], rank: int, seq: int, now: float, fresh_seconds: float
) -> int:
    """The rank that speaks for a stall at collective ``seq``: the lowest rank alive and waiting there (this
    rank, or a lower one whose fresh heartbeat shows it waiting at the same collective). ``heartbeat_of``
    gives a rank's heartbeat; it is asked for the ranks below ``rank`` in order, up to the first waiting one."""
    for other in range(rank):
        if waits_at(heartbeat_of(other), seq, now, fresh_seconds):
            return other
    return rank


def describe_rank(rank: int, record: Mapping[str, Any] | None, now: float, fresh_seconds: float) -> str:
    """``rank 1 (last heard 58 s ago: step 40, data loading)``; a rank whose heartbeat is fresh is alive and
    busy, and the text says with what and for how long, so that an expected wait does not read as a stall."""
    if record is None:
        return f"rank {rank} (no heartbeat from it in this run)"
    age = now - float(record["written"])
    step, phase = int(record["step"]), str(record["phase"])
    if age > fresh_seconds:
        return f"rank {rank} (last heard {age:.0f} s ago: step {step}, {phase})"
    wait = record["wait"]
    if wait is not None:
        waited = now - float(wait["since"])
        return f"rank {rank} (alive, waiting {waited:.0f} s in the {wait['operation']} of {wait['context']})"
    return f"rank {rank} (alive, in {describe_phase(phase, step)} for {now - float(record['phase_since']):.0f} s)"


def describe_ranks(
    ranks: list[int], heartbeats: Mapping[int, Mapping[str, Any] | None], now: float, fresh_seconds: float
) -> str:
    """The late ranks, each described, the first ``MAX_NAMED_RANKS`` of them and a count of the rest."""
    named = [describe_rank(r, heartbeats.get(r), now, fresh_seconds) for r in ranks[:MAX_NAMED_RANKS]]
    rest = len(ranks) - len(named)
    text = ", ".join(named) if len(named) < 2 or rest else ", ".join(named[:-1]) + " and " + named[-1]
    return text + (f" and {rest} more rank{'s' if rest > 1 else ''}" if rest else "")


def stall_text(
    rank: int, wait: Wait, late: list[int], heartbeats: Mapping[int, Mapping[str, Any] | None], now: float, fresh: float
) -> str:
    """``rank 0 has waited 61 s in the allreduce of the global sync after step 40 for rank 1 (...)``."""
    who = describe_ranks(late, heartbeats, now, fresh) if late else "ranks that have started it (none is late)"
    return f"rank {rank} has waited {now - wait.since:.0f} s in the {wait.operation} of {wait.context} for {who}"


_FIELDS = frozenset({"token", "step", "phase", "phase_since", "collectives", "wait", "written"})  # read back


def read_heartbeat(path: Path, token: str) -> dict[str, Any] | None:
    """A heartbeat file of this run (``token``), or None: missing, unreadable, or an earlier attempt's."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not _FIELDS <= record.keys() or record["token"] != token:
        return None
    return record


def write_heartbeat(path: Path, record: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically: a reader sees the previous record or this one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


def _print_now(line: str) -> None:
    print(line, flush=True)


class Watchdog:
    """This process's heartbeat writer and stall check (see the module's docstring). ``on_stall``: callbacks
    the reporting rank runs with the error line before exiting; ``resume_hint``: the end of that line (which
    checkpoint stays latest, how to continue)."""

    def __init__(
        self,
        rank: int,
        size: int,
        directory: Path,
        warn_seconds: float,
        timeout_seconds: float | None,
        say: Callable[[str], None] = _print_now,
    ) -> None:
        self.rank, self.size, self.directory = rank, size, directory
        self.warn_seconds, self.timeout_seconds = warn_seconds, timeout_seconds
        self.say = say
        self.interval = min(5.0, warn_seconds / 4)  # between heartbeat writes
        self.tick = min(1.0, self.interval)  # between checks of the waits in progress
        # A heartbeat older than this is a silent rank's: a live one is rewritten every interval (give or take a tick).
        self.fresh_seconds = 2 * self.interval + self.tick
        self.heartbeat = Heartbeat()
        self.token = ""
        self.on_stall: list[Callable[[str], None]] = []
        self.resume_hint: Callable[[], str] = lambda: ""
        self._started = 0
        self._count_lock = threading.Lock()
        self._waits: dict[int, Wait] = {}  # by thread id
        self._warned: set[int] = set()  # the collectives already warned about
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"rank-{self.rank}.json"

    def begin(self, operation: str) -> Wait:
        """A collective starts on this process: its number, and where (waited for from ``since`` on)."""
        phase, step, _ = self.heartbeat.state
        with self._count_lock:
            self._started += 1
            seq = self._started
        return Wait(seq, operation, describe_phase(phase, step), 0.0)

    @contextlib.contextmanager
    def waiting(self, started: Wait) -> Iterator[None]:
        """This thread waits for the collective ``started`` (from ``begin``) until the block ends."""
        thread = threading.get_ident()
        wait = Wait(started.seq, started.operation, started.context, time.time())
        self._waits[thread] = wait
        try:
            yield
        except RuntimeError as error:
            if "timed out" not in str(error).lower():
                raise
            # The backend's own collective timeout (Gloo's, NCCL's), where it comes before the watchdog's.
            raise RankStalled(self._stall_line(wait, time.time(), error=one_line(error))) from None
        finally:
            self._waits.pop(thread, None)

    def start(self, token: str) -> None:
        """Start the thread; ``token`` is the one every rank agreed on for this run."""
        self.token = token
        with contextlib.suppress(OSError):  # then no heartbeat is written, and the other ranks say so
            self.directory.mkdir(parents=True, exist_ok=True)
        self._write(time.time())
        self._thread = threading.Thread(target=self._run, name="hpc-localsgd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _oldest_wait(self) -> Wait | None:
        waits = list(self._waits.values())
        return min(waits, key=lambda w: w.since) if waits else None

    def _write(self, now: float) -> None:
        record = heartbeat_record(self.token, self.rank, self.heartbeat, self._started, self._oldest_wait(), now)
        with contextlib.suppress(OSError):  # a full or hung disk must not end the rank: its peers will say so
            write_heartbeat(self.path, record)

    def _run(self) -> None:
        last_write = time.time()
        while not self._stopped.wait(self.tick):
            now = time.time()
            if now - last_write >= self.interval:
                self._write(now)
                last_write = now
            wait = self._oldest_wait()
            if wait is None:
                continue
            waited = now - wait.since
            if self.timeout_seconds is not None and waited >= self.timeout_seconds:
                self._give_up(wait)
            elif waited >= self.warn_seconds and wait.seq not in self._warned:
                self._warned.add(wait.seq)
                heartbeats = self._heartbeats(wait.seq, now)
                if heartbeats is not None:
                    late = self._late(heartbeats, wait)
                    text = stall_text(self.rank, wait, late, heartbeats, now, self.fresh_seconds)
                    with contextlib.suppress(OSError):  # a closed stdout must not end the watch
                        self.say(f"hpc-localsgd: warning: {text}")

    def _late(self, heartbeats: Mapping[int, Mapping[str, Any] | None], wait: Wait) -> list[int]:
        return late_ranks(heartbeats, self.size, self.rank, wait.seq)

    def _heartbeats(self, seq: int, now: float) -> dict[int, dict[str, Any] | None] | None:
        """Every other rank's heartbeat when this rank reports the stall at ``seq``, else None (a lower rank
        waits there too). The lower ranks are read first, so only the reporter reads them all."""
        heartbeats: dict[int, dict[str, Any] | None] = {}

        def heartbeat_of(other: int) -> dict[str, Any] | None:
            if other not in heartbeats:
                heartbeats[other] = read_heartbeat(self.directory / f"rank-{other}.json", self.token)
            return heartbeats[other]

        if reporter(heartbeat_of, self.rank, seq, now, self.fresh_seconds) != self.rank:
            return None
        return {other: heartbeat_of(other) for other in range(self.size) if other != self.rank}

    def _read_all(self) -> dict[int, dict[str, Any] | None]:
        return {
            other: read_heartbeat(self.directory / f"rank-{other}.json", self.token)
            for other in range(self.size)
            if other != self.rank
        }

    def _stall_line(self, wait: Wait, now: float, error: str | None = None) -> str:
        heartbeats = self._read_all()
        text = stall_text(self.rank, wait, self._late(heartbeats, wait), heartbeats, now, self.fresh_seconds)
        cause = error or f"comm.stall_timeout_seconds={self.timeout_seconds:g}"
        return f"{text}; stopping ({cause}): no checkpoint of this state was written{self.resume_hint()}"

    def _give_up(self, wait: Wait) -> None:
        """End this process with exit status 5; the reporting rank first says why and runs the callbacks."""
        try:
            now = time.time()
            if self._heartbeats(wait.seq, now) is None:  # a lower rank waits here too and speaks for the stall
                time.sleep(REPORTER_GRACE_SECONDS)
            else:
                line = self._stall_line(wait, now)
                print_line(f"hpc-localsgd: error: {line}", sys.stderr)
                callbacks = threading.Thread(target=self._run_callbacks, args=(line,), daemon=True)
                callbacks.start()
                callbacks.join(timeout=CALLBACK_SECONDS)
        finally:  # whatever failed above (a closed stderr, say), the rank must not stay blocked
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(RankStalled.exit_code)

    def _run_callbacks(self, line: str) -> None:
        for callback in self.on_stall:
            with contextlib.suppress(Exception):  # best effort: the exit status and the line are what counts
                callback(line)


class _WatchedHandle(Handle):
    def __init__(self, inner: Handle, watchdog: Watchdog, started: Wait) -> None:
        self._inner, self._watchdog, self._started = inner, watchdog, started

    def wait(self) -> None:
        with self._watchdog.waiting(self._started):
            self._inner.wait()

    def wait_beside(self) -> None:
        with self._watchdog.waiting(self._started):
            self._inner.wait_beside()

    def progress(self) -> None:
        self._inner.progress()

    def step_waits(self) -> None:
        self._inner.step_waits()


class WatchedCommunicator(Communicator):
    """``inner`` with every collective numbered and every wait noted for ``watchdog``; its groups are watched
    by the same watchdog (one count over every communicator of the process)."""

    def __init__(self, inner: Communicator, watchdog: Watchdog) -> None:
        self.inner, self.watchdog = inner, watchdog
        self.name, self.replicas = inner.name, inner.replicas
        super().__init__(inner.layout)

    @property
    def waits_beside(self) -> bool:
        return self.inner.waits_beside

    def note_phase(self, phase: str, step: int) -> None:
        self.watchdog.heartbeat.set(phase, step)

    def iallreduce_(self, buffer: torch.Tensor, average: bool = True) -> Handle:
        started = self.watchdog.begin("allreduce")
        return _WatchedHandle(self.inner.iallreduce_(buffer, average), self.watchdog, started)

    def iallgather(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        started = self.watchdog.begin("allgather")
        return _WatchedHandle(self.inner.iallgather(buffer, output), self.watchdog, started)

    def ialltoall(self, buffer: torch.Tensor, output: torch.Tensor) -> Handle:
        started = self.watchdog.begin("all-to-all")
        return _WatchedHandle(self.inner.ialltoall(buffer, output), self.watchdog, started)

    def broadcast_(self, buffer: torch.Tensor, root: int = 0) -> None:
        with self.watchdog.waiting(self.watchdog.begin("broadcast")):
            self.inner.broadcast_(buffer, root)

    def barrier(self) -> None:
        with self.watchdog.waiting(self.watchdog.begin("barrier")):
            self.inner.barrier()

    def split(self, ranks: int) -> Communicator:
        return self._watched(self.inner.split(ranks))

    def split_across(self, ranks: int) -> Communicator:
        return self._watched(self.inner.split_across(ranks))

    def _watched(self, group: Communicator) -> Communicator:
        return self if group is self.inner else WatchedCommunicator(group, self.watchdog)

    def collective_path(self, device: torch.device) -> str:
        return self.inner.collective_path(device)

    def thread_cpu_seconds(self) -> float | None:
        return self.inner.thread_cpu_seconds()

    def close(self) -> None:
        self.inner.close()


def watch_collectives(
    comm: Communicator,
    directory: Path,
    warn_seconds: float,
    timeout_seconds: float | None,
    say: Callable[[str], None] = _print_now,
) -> WatchedCommunicator | None:
    """``comm`` watched for stalls, its watchdog started with heartbeats in ``directory``; None where there is
    nothing to watch (threads, simulated workers, one process). Collective: every rank calls it at the same
    point, and the ranks agree there on the token that marks this run's heartbeats. A world whose members may
    leave (comm/elastic.py) is not watched: it tells a silent member by its own heartbeat and goes on without it."""
    if comm.name not in BACKENDS_WATCHED or comm.size == 1 or comm.replicas != 1 or comm.membership is not None:
        return None
    watchdog = Watchdog(comm.rank, comm.size, directory, warn_seconds, timeout_seconds, say)
    watched = WatchedCommunicator(comm, watchdog)
    watchdog.start(broadcast_text(watched, uuid.uuid4().hex if comm.is_root else None))
    return watched
