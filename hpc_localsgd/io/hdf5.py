"""Small HDF5 helpers shared by the checkpoint, metrics, inspect and report code.

Torch-free on purpose (h5py only): ``hpc-localsgd report`` reads metrics files on a login node or a
laptop, and must not pay for, or depend on, importing torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

# HDF5 metadata (object headers, B-trees, the superblock) that an append or a new file adds beside
# its data: what a free-space check adds to the data's size.
METADATA_MARGIN_BYTES = 1 << 20


def open_error_reason(exc: BaseException) -> str:
    """HDF5's reason, e.g. 'truncated file: eof = 19408, ...', without h5py's wrapping."""
    text = " ".join(str(exc).split())
    return text.rsplit("(", 1)[-1].rstrip(")") if "(" in text else text


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` starts with an HDF5 signature; False also when it cannot be opened."""
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def attr_text(attrs: Mapping[str, Any], key: str) -> str:
    """A string attribute as ``str`` ("" when absent); h5py returns bytes for some string types."""
    value = attrs.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def free_bytes(directory: str | Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem (quotas aside)."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise OSError (ENOSPC) when ``directory`` lacks ``needed`` bytes plus the metadata margin.

    Checked before HDF5 writes: HDF5 does not roll back a write that runs out of space midway
    (h5py then prints a traceback per object it frees, and the file may be left inconsistent), so
    a full disk is refused before the first byte, and the file as it was stays intact.
    """
    free = free_bytes(directory)
    if free < needed + METADATA_MARGIN_BYTES:
        raise OSError(
            28, f"No space left on device: {what} needs about {_mb(needed + METADATA_MARGIN_BYTES)}, {_mb(free)} free"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def failed_writes_reported_once() -> Iterator[None]:
    """Silence h5py's "Exception ignored in ObjectID.__dealloc__" reports while a write runs: when a
    write fails, h5py reports it again for every object it frees, and the caller reports it once."""
    # Cython prints such an error through sys.excepthook, then reports it through sys.unraisablehook.
    previous = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda *_args: None
    sys.unraisablehook = lambda _report: None
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = previous
