"""The run directory: created by rank 0, never silently reused, holding the resolved config.

A directory holds a run once training has left a trace in it: metrics.h5 (opened before the first
step) or checkpoints/. A config.yaml alone is what a start that failed before training (a missing
dataset, a bad device) leaves; the next start replaces it instead of refusing the directory.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from pathlib import Path

from ..comm.agree import decide_on_root
from ..comm.base import Communicator
from ..errors import UserError
from .metrics import METRICS_FILE

# What a run writes. Anything else in the directory (a README, a job script) is left alone.
RUN_FILES = (METRICS_FILE, "config.yaml", "checkpoints")
# What marks a directory as holding a run: written only once training has really started.
TRAINED_FILES = (METRICS_FILE, "checkpoints")


def _prepare(run_dir: Path, overwrite: bool, resuming: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.run_dir '{run_dir}' exists and is not a directory")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    holds_run = any(name in existing for name in TRAINED_FILES)
    if holds_run and not (overwrite or resuming):
        raise UserError(
            f"output.run_dir '{run_dir}' already holds a run ({', '.join(existing)}); "
            "pass --resume auto to continue it, --overwrite to replace it, "
            "or choose another output.run_dir"
        )
    if overwrite:
        for name in existing:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output.run_dir '{run_dir}' cannot be created: {exc.strerror}") from None


def prepare_run_dir(comm: Communicator, run_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """Rank 0 checks and creates the directory; every rank learns the outcome."""
    decide_on_root(comm, functools.partial(_prepare, run_dir, overwrite, resuming))


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The temporary file is created with mode 0666 less the umask, as ``open`` creates any file
    (``mkstemp`` would make it 0600, and the rename would keep that): colleagues who may read
    the run's other files may read its config too.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # another writer's name, drawn again
            continue
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
