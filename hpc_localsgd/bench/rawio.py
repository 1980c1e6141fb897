"""The checkpoint phase's floor: the same bytes written and read with plain h5py, the way the
checkpoint writer orders its turns, without its metadata, checksums and agreement collectives."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..comm.base import Communicator
from ..io.checkpoint import fsync_path


def raw_write(comm: Communicator, path: Path, shared: dict[str, np.ndarray], mine: dict[str, np.ndarray]) -> None:
    """Rank 0 creates the file, each rank appends its group in turn and fsyncs, rank 0 fsyncs and
    renames; a barrier per turn stands in for the writer's agreement collectives."""
    tmp = path.with_name(f".{path.name}.tmp")
    if comm.is_root:
        with h5py.File(tmp, "w", locking=False) as f:
            group = f.create_group("shared")
            for name, array in shared.items():
                group.create_dataset(name, data=array)
            f.create_group("ranks")
    comm.barrier()
    for turn in range(comm.size):
        if comm.rank == turn:
            with h5py.File(tmp, "a", locking=False) as f:
                group = f.create_group(f"ranks/{comm.rank}")
                for name, array in mine.items():
                    group.create_dataset(name, data=array)
            fsync_path(tmp)
        comm.barrier()
    if comm.is_root:
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    comm.barrier()


def raw_read(comm: Communicator, path: Path) -> int:
    """Bytes read: this rank's group, and on rank 0 the shared one too (as a resume reads)."""
    nbytes = 0
    with h5py.File(path, "r", locking=False) as f:
        groups = [f[f"ranks/{comm.rank}"]] + ([f["shared"]] if comm.is_root else [])
        for group in groups:
            for name in group:
                nbytes += np.asarray(group[name][()]).nbytes
    return nbytes
