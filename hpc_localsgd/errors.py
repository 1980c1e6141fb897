"""Errors a user can fix. They end every rank with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

from typing import TextIO


class UserError(Exception):
    """Bad input: a config value, a path, a backend, a launcher set-up.

    The message is one line that names what is wrong; the CLI prints it as
    ``hpc-localsgd: error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2
    # Most bad input is seen identically by every rank (same config, same shared filesystem):
    # then only rank 0 prints it. Errors that only some ranks can see set this to False.
    same_on_every_rank = True


class ConfigError(UserError):
    """A config key, type or value is wrong. The message starts with the dotted key."""


class BackendUnavailable(UserError):
    """The requested communication backend cannot be used in this environment."""


class LauncherMismatch(UserError):
    """The launcher's environment and the communicator disagree about the world."""

    same_on_every_rank = False


class TrainingDiverged(UserError):
    """The loss or the averaged model became non-finite (NaN or inf): the run stopped at that step, and
    nothing of the broken state was checkpointed. A distinct exit status tells it apart from bad input."""

    exit_code = 3


class WriteFailed(UserError):
    """A checkpoint or ``metrics.h5`` could not be written (disk full, I/O error, permission): the run
    stopped, and what was written before is intact."""

    exit_code = 4


class RankStalled(UserError):
    """A collective waited longer than ``comm.stall_timeout_seconds`` for ranks that never joined it (a hung
    mount, a stuck driver, a stopped process): every waiting rank stops, nothing of that state is
    checkpointed, and the run resumes from the latest checkpoint. Its own exit status, so that a job script
    can tell a stall (worth a requeue) from bad input. The stall watchdog ends a rank blocked inside a
    collective with this status itself (``comm/watchdog.py``); the exception is for a collective that
    raises instead."""

    exit_code = 5
    same_on_every_rank = False


class RankLocalError(UserError):
    """A problem only this rank can see (its device, its node's files)."""

    same_on_every_rank = False


def one_line(error: BaseException) -> str:
    """An exception's message on one line (libraries' messages often span several), or its type's name
    when it has none, for the reason part of a ``UserError``."""
    return " ".join(str(error).split()) or type(error).__name__


def print_line(line: str, stream: TextIO) -> None:
    """Write one whole line with one call. ``print`` writes the text and its newline separately,
    and stderr passes each write straight to the file descriptor, so under mpirun the lines of
    two ranks could interleave mid-line."""
    stream.write(line + "\n")
    stream.flush()
