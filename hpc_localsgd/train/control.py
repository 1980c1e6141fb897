"""Requests that reach a running job from outside: signals and the checkpoint clock.

A signal only sets a flag on the rank that received it. Every ``poll_every_steps`` steps the
ranks combine their flags (and rank 0's "a timed checkpoint is due") in one tiny allreduce,
so all of them take the same decision at the same step and none is left waiting in a
collective. SIGUSR2 asks for a checkpoint; SIGUSR1 and SIGTERM (what Slurm sends before a
time limit or preemption) ask for a checkpoint and a clean stop. The same allreduce carries
rank 0's "metrics.h5 could not be appended", so that every rank stops together on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch

from ..comm.agree import agree_on_failure
from ..comm.base import Communicator
from ..comm.membership import run_agreed

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
CHECKPOINT_SIGNALS = (signal.SIGUSR2,)


@dataclass
class Decision:
    checkpoint: bool = False
    stop: bool = False
    stop_signal: str | None = None
    write_failure: str | None = None  # a rank's failed write (rank 0's metrics), the same on every rank


class JobControl:
    def __init__(self, comm: Communicator, poll_every_steps: int, checkpoint_every_minutes: float) -> None:
        self.comm = comm
        self.poll_every_steps = poll_every_steps
        self.checkpoint_seconds = checkpoint_every_minutes * 60.0
        self.last_checkpoint = time.monotonic()
        self._stop_signal: int | None = None
        self._checkpoint_requested = False
        self._previous: dict[int, object] = {}
        # Python runs signal handlers in the main thread only; in-process simulations run elsewhere.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS + CHECKPOINT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in CHECKPOINT_SIGNALS:
            self._checkpoint_requested = True
        else:
            self._stop_signal = signum

    def checkpoint_written(self) -> None:
        self.last_checkpoint = time.monotonic()
        self._checkpoint_requested = False

    def poll(self, completed_steps: int, write_failure: str | None = None) -> Decision:
        """Collective every ``poll_every_steps`` steps (all ranks call it at every step).
        ``write_failure``: this rank's failed write, if any (its text travels only when one failed)."""
        if completed_steps % self.poll_every_steps != 0:
            return Decision()
        timed = (
            self.comm.is_root
            and self.checkpoint_seconds > 0
            and time.monotonic() - self.last_checkpoint >= self.checkpoint_seconds
        )
        flags = torch.tensor(
            [
                int(self._checkpoint_requested or timed),
                int(self._stop_signal is not None),
                int(write_failure is not None),
            ],
            dtype=torch.int64,
        )
        if self.comm.size > 1:
            mine = flags.clone()

            def combine() -> None:
                flags.copy_(mine)
                self.comm.allreduce_(flags, average=False)

            run_agreed(self.comm, combine, lambda: None)  # among the survivors, where members may leave
        if flags[2].item():
            return Decision(write_failure=agree_on_failure(self.comm, write_failure))
        stop = bool(flags[1].item())
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else None
        return Decision(checkpoint=bool(flags[0].item()) or stop, stop=stop, stop_signal=name)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def requeue_slurm_job(say: Callable[[str], None]) -> None:
    """Ask Slurm to run this job again (it will resume from the checkpoint), saying so first: a
    successful requeue cancels this job step at once, often before a line printed after it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        say("hpc-localsgd: not a Slurm job: nothing to requeue")
        return
    say(f"hpc-localsgd: requeueing Slurm job {job}; it resumes from the checkpoint when it starts again")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"hpc-localsgd: warning: scontrol requeue {job} failed: {exc}")
        return
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).split())
        say(f"hpc-localsgd: warning: scontrol requeue {job} failed: {reason} (is the job submitted with --requeue?)")
