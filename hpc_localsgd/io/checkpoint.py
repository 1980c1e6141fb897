"""Checkpoints: one HDF5 file per checkpoint in ``RUN_DIR/checkpoints/``, no pickle anywhere.

Layout of ``step-000001200.h5``::

    /                           attrs: format, format_version, complete, step, epoch, world_size,
                                       method, config (YAML), world and versions (JSON), wall_seconds, created
    /shared/<name>              identical on every rank (the outer optimizer's x_prev and momentum)
    /ranks/<r>/state/<name>     rank r's parameters, BN statistics and momentum buffers (flat segments);
                                a soft link to rank 0's dataset when the bytes are equal (after a sync)
    /ranks/<r>/int_buffers/<dtype>  integer module buffers (BatchNorm's num_batches_tracked), one dataset
                                per dtype holding them back to back; attrs ``names`` and ``shapes`` (JSON)
    /ranks/<r>/rng/...          torch, numpy, python (and CUDA) random states
    /ranks/<r>                  attrs: comm_stats (JSON), train_loss_sum, train_loss_count

Every dataset carries ``xxh3_64``, a 64-bit digest of its bytes checked when it is read (format
version 1 files carry ``blake2b`` instead, still read), and ``torch_dtype``; bfloat16 is stored
losslessly as its 16-bit pattern. xxh3 hashes at memory bandwidth (about 30 GB/s here against
blake2b's 1 GB/s), so the integrity check costs a small fraction of the write or read.

Writing is collective and crash-safe. Rank 0 creates a temporary file beside the final one;
then each rank in turn appends its own group (so no rank ever holds another rank's state, and
the file must sit on a filesystem every rank sees); rank 0 marks the file complete, fsyncs it,
renames it into place, and replaces the ``latest`` pointer by another rename. A crash at any
instant leaves the previous checkpoint untouched and loadable; leftovers are ``.tmp`` files.
A write that fails (disk full, I/O error, permission) on any rank fails on every rank alike
(:class:`CheckpointWriteError`, one line): rank 0 removes the temporary file, and the previous
checkpoint and ``latest`` stay as they were. Free space is checked before the first byte, since
HDF5 does not recover cleanly from a write that runs out of space midway.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
import xxhash

from ..comm.agree import agree_on_failure
from ..comm.base import Communicator
from ..errors import UserError, WriteFailed, one_line
from .hdf5 import check_free_space, failed_writes_reported_once, open_error_reason

FORMAT = "hpc-localsgd/checkpoint"
FORMAT_VERSION = 2
# The digest attribute of each format version (version 1 used blake2b).
_DIGEST_ATTR = {1: "blake2b", 2: "xxh3_64"}
_NAME = re.compile(r"^step-(\d{9})\.h5$")
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong."""


class CheckpointWriteError(CheckpointError, WriteFailed):
    """A checkpoint that could not be written; the previous one and ``latest`` are intact."""


# What a failed HDF5 write raises: OSError from the OS, RuntimeError or ValueError when h5py fails
# to flush or free an object whose data it could not write.
_WRITE_ERRORS = (OSError, RuntimeError, ValueError)


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.h5"


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits
        t = t.view(torch.int16)
    return t.numpy()


def bytes_of(array: np.ndarray) -> memoryview:
    """The array's memory as bytes, without a copy when it is contiguous (what the digests read)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _digest(array: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(bytes_of(array))


def _legacy_digest(array: np.ndarray) -> str:
    return hashlib.blake2b(bytes_of(array), digest_size=8).hexdigest()


def _write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor, digest: str | None = None) -> None:
    """``digest``: the tensor's digest when the caller has computed it already (hashing once)."""
    array = to_numpy(tensor)
    dataset = group.create_dataset(name, data=array)
    dataset.attrs["torch_dtype"] = str(tensor.dtype).removeprefix("torch.")
    dataset.attrs["xxh3_64"] = digest if digest is not None else _digest(array)


def _digest_matches(dataset: h5py.Dataset, array: np.ndarray) -> bool:
    if "xxh3_64" in dataset.attrs:
        return _digest(array) == dataset.attrs["xxh3_64"]
    return _legacy_digest(array) == dataset.attrs.get("blake2b")


def _as_tensor(dataset: h5py.Dataset, array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(array)  # a fresh array that nothing else references: no copy needed
    if str(dataset.attrs.get("torch_dtype", "")) == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _corrupted(path: Path, dataset_name: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}': {dataset_name} does not match its checksum (corrupted file)")


def _read_tensor(path: Path, dataset: h5py.Dataset) -> torch.Tensor:
    array = np.asarray(dataset[()])
    if not _digest_matches(dataset, array):
        raise _corrupted(path, dataset.name)
    return _as_tensor(dataset, array)


# xxhash releases the GIL: digests of one dataset are computed while h5py reads the next.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpc-localsgd-digest")


_Key = TypeVar("_Key", bound=Hashable)


def _destination(dataset: h5py.Dataset, tensor: torch.Tensor | None) -> np.ndarray | None:
    """``tensor``'s memory as the array ``dataset`` reads into, where it can take the bytes as they
    are (host memory, contiguous, the same shape and dtype); None otherwise."""
    if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    array = to_numpy(tensor)  # shares the tensor's memory (bfloat16 as its int16 bits)
    same = array.shape == dataset.shape and array.dtype == dataset.dtype
    return array if same and str(tensor.dtype).removeprefix("torch.") == dataset.attrs.get("torch_dtype") else None


def _read_tensors(
    path: Path,
    datasets: dict[_Key, h5py.Dataset],
    keep: bool = True,
    into: Mapping[_Key, torch.Tensor] | None = None,
) -> dict[_Key, torch.Tensor]:
    """Read and verify several datasets, hashing each one while the next is read; ``keep=False``
    (verification only) holds at most two datasets in memory. Largest first: the one digest that no
    read hides is then a small dataset's. A dataset with a matching tensor in ``into`` is read into
    that tensor's memory and returned as it: no fresh memory to fault in, no later copy. On an error
    such tensors hold part of the file."""
    tensors: dict[_Key, torch.Tensor] = {}
    pending: tuple[h5py.Dataset, str, Future[str]] | None = None

    def settle() -> None:
        if pending is not None and pending[2].result() != pending[1]:
            raise _corrupted(path, pending[0].name)

    for name, dataset in sorted(datasets.items(), key=lambda item: -item[1].nbytes):
        target = None if into is None else into.get(name)
        array = _destination(dataset, target)
        in_place = array is not None
        if array is None:
            array = np.asarray(dataset[()])
        elif array.size:
            dataset.read_direct(array)
        digest = dataset.attrs.get("xxh3_64")
        settle()
        pending = None
        if digest is not None:
            pending = (dataset, digest, _HASHER.submit(_digest, array))
        elif not _digest_matches(dataset, array):
            raise _corrupted(path, dataset.name)
        if keep:
            tensors[name] = target if target is not None and in_place else _as_tensor(dataset, array)
    settle()
    return {name: tensors[name] for name in datasets} if keep else tensors


def _write_int_buffers(group: h5py.Group, buffers: dict[str, torch.Tensor]) -> None:
    """All integer buffers of one dtype in one dataset: a ResNet-50 has 53 scalar counters, and a
    dataset each would cost more to write and read than its parameters' digests."""
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in buffers.items():
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    for dtype, members in by_dtype.items():
        packed = torch.cat([t.detach().cpu().reshape(-1) for _, t in members])
        _write_tensor(group, str(dtype).removeprefix("torch."), packed)
        group[str(dtype).removeprefix("torch.")].attrs.update(
            {"names": json.dumps([n for n, _ in members]), "shapes": json.dumps([list(t.shape) for _, t in members])}
        )


def _read_int_buffers(path: Path, group: h5py.Group) -> dict[str, torch.Tensor]:
    buffers: dict[str, torch.Tensor] = {}
    for key, dataset in group.items():
        tensor = _read_tensor(path, dataset)
        if "names" not in dataset.attrs:  # format version 1: one dataset per buffer
            buffers[key] = tensor
            continue
        offset = 0
        for name, shape in zip(json.loads(dataset.attrs["names"]), json.loads(dataset.attrs["shapes"]), strict=True):
            count = int(np.prod(shape, dtype=np.int64))
            buffers[name] = tensor[offset : offset + count].reshape(shape).clone()
            offset += count
    return buffers


# --- random states ------------------------------------------------------------------------------
def _write_rng(group: h5py.Group) -> None:
    _write_tensor(group, "torch", torch.get_rng_state())
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            _write_tensor(group, f"cuda{index}", state)
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy form: (name, keys, pos, has_gauss, cached)
    _write_tensor(group, "numpy_keys", torch.from_numpy(keys.astype(np.int64)))
    group["numpy_keys"].attrs.update({"kind": kind, "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached})
    version, internal, gauss_next = random.getstate()
    _write_tensor(group, "python", torch.tensor(internal, dtype=torch.int64))
    group["python"].attrs.update({"version": version, "gauss_next": np.nan if gauss_next is None else gauss_next})


def _restore_rng(path: Path, group: h5py.Group) -> None:
    torch.set_rng_state(_read_tensor(path, group["torch"]))
    if torch.cuda.is_available():
        states = [_read_tensor(path, group[name]) for name in sorted(group) if name.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    keys = group["numpy_keys"]
    np.random.set_state(
        (
            str(keys.attrs["kind"]),
            _read_tensor(path, keys).numpy().astype(np.uint32),
            int(keys.attrs["pos"]),
            int(keys.attrs["has_gauss"]),
            float(keys.attrs["cached_gaussian"]),
        )
    )
    python = group["python"]
    gauss = float(python.attrs["gauss_next"])
    random.setstate(
        (
            int(python.attrs["version"]),
            tuple(int(v) for v in _read_tensor(path, python).tolist()),
            None if np.isnan(gauss) else gauss,
        )
    )


# --- what one rank contributes --------------------------------------------------------------------
@dataclass
class RankState:
    """Everything of one rank that a resume needs, as live tensors and small values."""

    tensors: dict[str, torch.Tensor]  # may differ between ranks (flat segments)
    int_buffers: dict[str, torch.Tensor]
    comm_stats: dict[str, float]
    train_loss_sum: float
    train_loss_count: int


@dataclass
class CheckpointMeta:
    step: int
    epoch: float
    world_size: int
    config: str
    attrs: dict[str, Any]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes checkpoints of one run; every rank holds one and calls ``write`` together."""

    def __init__(self, directory: Path, comm: Communicator, keep: int, locking: bool = False) -> None:
        self.directory = directory
        self.comm = comm
        self.keep = keep
        self.locking = locking
        if comm.is_root:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(".step-*.tmp"):
                stale.unlink()  # left by a writer that crashed; never a complete checkpoint

    def _agree(self, failure: str | None, step: int, tmp: Path) -> None:
        """Every rank learns whether any rank failed, so that none waits for another, and every rank
        reports the same cause: the lowest failing rank's. On failure rank 0 removes the temporary
        file (every rank is past its last use of it here)."""
        message = agree_on_failure(self.comm, failure)
        if message is None:
            return
        if self.comm.is_root:
            for leftover in (tmp, self.directory / f".{LATEST}.tmp"):
                leftover.unlink(missing_ok=True)
        latest = self.directory / LATEST
        kept = f"'{latest}' still names {latest.read_text().strip()}" if latest.is_file() else "no earlier checkpoint"
        raise CheckpointWriteError(f"the checkpoint of step {step} could not be written ({message}); {kept}")

    def write(
        self, step: int, epoch: float, attrs: dict[str, Any], shared: dict[str, torch.Tensor], rank_state: RankState
    ) -> Path:
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f".{final.name}.tmp"
        names = sorted(rank_state.tensors)
        digests = [_digest(to_numpy(rank_state.tensors[n])) for n in names]
        # Rank 0's digests let the others store a link instead of bytes equal to rank 0's.
        root_digests = torch.tensor([int(d, 16) - 2**63 for d in digests], dtype=torch.int64)
        self.comm.broadcast_(root_digests, root=0)
        same_as_root = [int(d, 16) - 2**63 == int(r) for d, r in zip(digests, root_digests.tolist(), strict=True)]

        failure: str | None = None
        if self.comm.is_root:
            try:
                # At most every rank's state in full (links make it less), and the shared state.
                size = self.comm.size * sum(t.numel() * t.element_size() for t in rank_state.tensors.values())
                check_free_space(
                    self.directory, size + sum(t.numel() * t.element_size() for t in shared.values()), tmp.name
                )
                with failed_writes_reported_once(), h5py.File(tmp, "w", locking=self.locking) as f:
                    f.attrs.update(
                        {
                            "format": FORMAT,
                            "format_version": FORMAT_VERSION,
                            "complete": 0,
                            "step": step,
                            "epoch": epoch,
                            "world_size": self.comm.size,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        }
                    )
                    for key, value in attrs.items():
                        f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
                    shared_group = f.create_group("shared")
                    for name, tensor in shared.items():
                        _write_tensor(shared_group, name, tensor)
                    f.create_group("ranks")
            except _WRITE_ERRORS as exc:
                failure = f"{tmp}: {one_line(exc)}"
        self._agree(failure, step, tmp)
        for turn in range(self.comm.size):
            failure = None
            if self.comm.rank == turn:
                try:
                    with failed_writes_reported_once():
                        self._append_rank(tmp, rank_state, names, digests, same_as_root)
                except _WRITE_ERRORS as exc:
                    failure = f"{tmp} (rank {turn}): {one_line(exc)}"
            self._agree(failure, step, tmp)
        failure = None
        if self.comm.is_root:
            try:
                self._complete(tmp, final)
            except _WRITE_ERRORS as exc:
                failure = f"{final}: {one_line(exc)}"
        self._agree(failure, step, tmp)
        if self.comm.is_root:
            self._prune()
        return final

    def _complete(self, tmp: Path, final: Path) -> None:
        """Mark ``tmp`` complete, rename it to ``final`` and point ``latest`` at it; on failure undo the
        rename, so that the previous checkpoint stays the newest and ``latest`` names it."""
        with failed_writes_reported_once(), h5py.File(tmp, "a", locking=self.locking) as f:
            f.attrs["complete"] = 1
        fsync_path(tmp)
        os.replace(tmp, final)
        try:
            fsync_path(self.directory)
            pointer = self.directory / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            fsync_path(pointer)
            os.replace(pointer, self.directory / LATEST)
        except OSError:
            final.unlink(missing_ok=True)
            raise

    def _append_rank(
        self, tmp: Path, state: RankState, names: list[str], digests: list[str], same_as_root: list[bool]
    ) -> None:
        if not tmp.exists():
            raise OSError(
                f"rank {self.comm.rank} cannot see {tmp}: is output.run_dir on a filesystem shared by every node?"
            )
        rank = self.comm.rank
        with h5py.File(tmp, "a", locking=self.locking) as f:
            group = f.create_group(f"ranks/{rank}")
            tensors = group.create_group("state")
            for name, digest, same in zip(names, digests, same_as_root, strict=True):
                if same and rank != 0:
                    tensors[name] = h5py.SoftLink(f"/ranks/0/state/{name}")
                else:
                    _write_tensor(tensors, name, state.tensors[name], digest)
            _write_int_buffers(group.create_group("int_buffers"), state.int_buffers)
            _write_rng(group.create_group("rng"))
            group.attrs.update(
                {
                    "comm_stats": json.dumps(state.comm_stats),
                    "train_loss_sum": state.train_loss_sum,
                    "train_loss_count": state.train_loss_count,
                }
            )
        fsync_path(tmp)

    def _prune(self) -> None:
        """Delete the checkpoints beyond the newest ``keep``; one that cannot be deleted stays (it is
        complete and valid: nothing is lost)."""
        complete = sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))
        for old in complete[: -self.keep]:
            try:
                old.unlink()
            except OSError:
                pass


# --- reading --------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint file opened for reading, its header checked. Reading never executes file content."""

    def __init__(self, path: Path, locking: bool = False) -> None:
        self.path = Path(path)
        self.locking = locking
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint '{self.path}' does not exist")
        try:
            with h5py.File(self.path, "r", locking=locking) as f:
                attrs = dict(f.attrs)
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint '{self.path}' is not a readable HDF5 file ({open_error_reason(exc)})"
            ) from None
        if attrs.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint '{self.path}' is not an hpc-localsgd checkpoint (format attribute {attrs.get('format')!r})"
            )
        if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint '{self.path}' has format version {attrs.get('format_version')}, "
                f"newer than this package reads ({FORMAT_VERSION})"
            )
        if int(attrs.get("complete", 0)) != 1:
            raise CheckpointError(f"checkpoint '{self.path}' is incomplete (its writer stopped before the end)")
        self.meta = CheckpointMeta(
            step=int(attrs["step"]),
            epoch=float(attrs["epoch"]),
            world_size=int(attrs["world_size"]),
            config=str(attrs.get("config", "")),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()},
        )

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r", locking=self.locking)

    def _guard(self, read: Callable[[h5py.File], Any]) -> Any:
        try:
            with self._open() as f:
                return read(f)
        except (OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint '{self.path}' is damaged: {' '.join(str(exc).split())}") from None

    def verify(self) -> None:
        """Read every dataset and check its digest (the whole file)."""

        def check(f: h5py.File) -> None:
            datasets: dict[str, h5py.Dataset] = {}
            f.visititems(lambda name, item: datasets.update({name: item}) if isinstance(item, h5py.Dataset) else None)
            _read_tensors(self.path, datasets, keep=False)
            for rank in range(self.meta.world_size):
                if f"ranks/{rank}" not in f:
                    raise CheckpointError(f"checkpoint '{self.path}' lacks rank {rank}'s state")

        self._guard(check)

    def shared(self) -> dict[str, torch.Tensor]:
        return self._guard(lambda f: _read_tensors(self.path, dict(f["shared"].items())))

    def rank_state(self, rank: int) -> RankState:
        return self.read(rank, shared=False)[0]

    def read(
        self,
        rank: int,
        shared: bool = True,
        into: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[RankState, dict[str, torch.Tensor]]:
        """Rank ``rank``'s state and (``shared``) the shared state, verified, in one open of the file
        and one pass: each dataset is hashed while the next is read, across both groups. ``into``:
        (rank state, shared state) tensors by name, such as the engine's live ones, to read into
        where they match (what is returned is then those tensors); they hold part of the file if
        the read fails."""

        def read(f: h5py.File) -> tuple[RankState, dict[str, torch.Tensor]]:
            group = f[f"ranks/{rank}"]
            datasets = {("state", n): d for n, d in group["state"].items()}
            if shared:
                datasets.update({("shared", n): d for n, d in f["shared"].items()})
            targets: dict[tuple[str, str], torch.Tensor] = {}
            if into is not None:
                targets.update({("state", n): t for n, t in into[0].items()})
                targets.update({("shared", n): t for n, t in into[1].items()})
            tensors = _read_tensors(self.path, datasets, into=targets)
            state = RankState(
                tensors={n: t for (where, n), t in tensors.items() if where == "state"},
                int_buffers=_read_int_buffers(self.path, group["int_buffers"]),
                comm_stats=json.loads(group.attrs["comm_stats"]),
                train_loss_sum=float(group.attrs["train_loss_sum"]),
                train_loss_count=int(group.attrs["train_loss_count"]),
            )
            return state, {n: t for (where, n), t in tensors.items() if where == "shared"}

        return self._guard(read)

    def verify_rng(self, rank: int) -> None:
        """Check rank ``rank``'s random states against their digests without applying them."""
        self._guard(lambda f: _read_tensors(self.path, {n: d for n, d in f[f"ranks/{rank}/rng"].items()}, keep=False))

    def restore_rng(self, rank: int) -> None:
        self._guard(lambda f: _restore_rng(self.path, f[f"ranks/{rank}/rng"]))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-named checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), reverse=True)
