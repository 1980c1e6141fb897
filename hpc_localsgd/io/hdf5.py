"""Small HDF5 helpers shared by the checkpoint, metrics, inspect and report code.

Torch-free on purpose (h5py only): ``hpc-localsgd report`` reads metrics files on a login node or a
laptop, and must not pay for, or depend on, importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py


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
