"""Language-model data: windows of token ids, from token files (``data.name: tokens``) or from the bytes
of a text (``data.name: text``), and the converter from the second format to the first.

A stream of N tokens is cut into windows of ``seq_len + 1`` tokens at stride ``seq_len``: window i
starts at token i·seq_len, its first ``seq_len`` tokens are the input and its last ``seq_len`` the
targets (the input shifted by one). Windows overlap by one token, so every token after the first is a
target exactly once per pass, and there are (N − 1) // seq_len of them (a tail too short for a window
is not trained on).

A window is a sample like any other: :class:`~hpc_localsgd.train.data.ShardedBatches` permutes the
training windows from (seed, epoch), gives rank r its contiguous slice of that permutation and batch
b of the slice. A rank's windows at a step therefore depend only on (seed, rank, epoch, batch): ranks
never share a window within an epoch, the same config gives the same windows, and a run resumed
mid-epoch needs no saved sampler. Evaluation takes the validation windows in order (the first
``data.eval_samples`` of them, when set), split ``r::size`` across ranks.

Token files (nanoGPT's format) are ``train.bin`` and ``val.bin``: flat little-endian arrays of uint16
or uint32 ids, memory-mapped, so a rank reads only the pages its windows touch. Text is byte-level:
each byte a token, vocabulary 256. The files of a folder are read in sorted order of their relative
paths and concatenated as they are, with nothing between them, so the corpus's digest is the sha256
of exactly those bytes; ``data.text.max_bytes`` cuts the concatenation. The last ``val_fraction`` of
it is the validation text (a held-out tail: no window crosses the boundary, and no training window
overlaps a validation one). ``hpc-localsgd tokens`` writes the same split as uint16 token files, so
``data.name: tokens`` on its output trains on the very windows that ``data.name: text`` would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config.schema import DataConfig
from ..errors import UserError, one_line

TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
# Stored ids are little-endian whatever the machine, as numpy's tofile writes them on x86 and ARM.
TOKEN_DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
BYTE_VOCAB = 256
# Tokens per chunk of a scan over a token file: the max and the hash need no copy, np.bincount casts a
# chunk to int64 (32 MiB at this size), so memory stays flat however large the file.
SCAN_CHUNK = 1 << 22
# Token counts are kept for ids below this (512 MiB of int64 counts); a file with larger ids has no
# unigram entropy (no model embeds such a vocabulary anyway).
MAX_COUNTED_VOCAB = 1 << 26
# The built-in corpus skips installed packages and bytecode: only the standard library's own source.
STDLIB_SKIPPED = frozenset({"site-packages", "dist-packages", "__pycache__"})
# SOURCE of ``hpc-localsgd tokens`` that names the built-in corpus (data.path null).
STDLIB_SOURCE = "stdlib"

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenWindows(Dataset):
    """A 1-D array of token ids (a memmap of a file, or an array in memory) as windows of ``seq_len + 1``
    tokens at stride ``seq_len``; ``batch`` gathers whole batches in one fancy index (see the module
    docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self._span = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def starts(self, indices: torch.Tensor) -> np.ndarray:
        """The offset in the token array of each window in ``indices``."""
        return indices.numpy().astype(np.int64) * self.seq_len

    def batch(self, indices: torch.Tensor) -> Batch:
        """Inputs and targets ``[B, seq_len]`` (int64) of the windows ``indices``: y is x shifted by one."""
        windows = np.asarray(self.tokens[self.starts(indices)[:, None] + self._span])
        tokens = torch.from_numpy(windows.astype(np.int64))
        # Contiguous, as a model's reshape of its input expects; copying 2 × B × seq_len ids is cheap.
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __getitem__(self, index: int) -> Batch:
        x, y = self.batch(torch.tensor([index]))
        return x[0], y[0]


@dataclass
class LanguageData:
    """What :func:`~hpc_localsgd.train.data.build_datasets` makes a ``Datasets`` of."""

    train: TokenWindows
    test: TokenWindows
    vocab: int  # ids the data needs: largest id + 1 for token files, 256 for text
    corpus: dict[str, Any]  # what was read (see describe_tokens)


def build_language_data(cfg: DataConfig, seq_len: int) -> LanguageData:
    """Training and validation windows of ``data.name`` tokens or text. Raises UserError for missing,
    malformed or too short inputs."""
    if cfg.name == "tokens":
        return _token_files(cfg, seq_len)
    if cfg.name == "text":
        return _text(cfg, seq_len)
    raise ValueError(f"{cfg.name!r} is not language data")


# ---------------------------------------------------------------------------------------------
# data.name: tokens


def _token_files(cfg: DataConfig, seq_len: int) -> LanguageData:
    if cfg.path is None:
        raise UserError("data.path: is required for dataset 'tokens' (a folder holding train.bin and val.bin)")
    folder = os.path.expanduser(cfg.path)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UserError(f"data.path: '{folder}' {what} (data.name tokens reads train.bin and val.bin in it)")
    dtype = TOKEN_DTYPES[cfg.tokens.dtype]
    train = _token_file(folder, TRAIN_FILE, dtype, cfg.tokens.dtype, seq_len)
    val = _token_file(folder, VAL_FILE, dtype, cfg.tokens.dtype, seq_len)
    corpus, vocab = describe_tokens(folder, 2, train, val, bytes_per_token=None)
    return LanguageData(TokenWindows(train, seq_len), TokenWindows(val, seq_len), vocab, corpus)


def _token_file(folder: str, name: str, dtype: np.dtype[Any], dtype_name: str, seq_len: int) -> np.ndarray:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise UserError(f"data.path: '{folder}' has no {name} (data.name tokens reads train.bin and val.bin)")
    size = os.path.getsize(file)
    if size % dtype.itemsize:
        raise UserError(
            f"data.path: '{file}' is {size} bytes, not a whole number of {dtype.itemsize}-byte ids "
            f"(data.tokens.dtype: {dtype_name})"
        )
    tokens = size // dtype.itemsize
    if tokens < seq_len + 1:
        raise UserError(
            f"data.path: '{file}' holds {tokens} tokens, fewer than one window of model.gpt.seq_len + 1 = {seq_len + 1}"
        )
    return np.memmap(file, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------
# data.name: text


@dataclass(frozen=True)
class TextCorpus:
    """The bytes of a text as read, the concatenation of ``files`` files of ``source``."""

    data: bytes
    source: str
    files: int


def _text(cfg: DataConfig, seq_len: int) -> LanguageData:
    corpus = read_text(cfg.path, cfg.text.max_bytes)
    train, val = split_text(corpus.data, cfg.text.val_fraction)
    for split, tokens in (("training", train), ("validation", val)):
        if len(tokens) < seq_len + 1:
            raise UserError(
                f"data.path: the {split} text of {corpus.source} is {len(tokens)} bytes (of {len(corpus.data)}, "
                f"data.text.val_fraction {cfg.text.val_fraction}), fewer than one window of model.gpt.seq_len + 1 "
                f"= {seq_len + 1}"
            )
    described, _ = describe_tokens(corpus.source, corpus.files, train, val, bytes_per_token=1)
    return LanguageData(TokenWindows(train, seq_len), TokenWindows(val, seq_len), BYTE_VOCAB, described)


def read_text(path: str | None, max_bytes: int | None, key: str = "data.path") -> TextCorpus:
    """The bytes of a text file, of a folder's regular files (recursively, in sorted order of their
    relative paths) or, for ``path`` None, of the Python standard library's ``*.py`` files, concatenated
    and cut at ``max_bytes`` (None: all). ``key`` names the setting in error messages."""
    if path is None:
        root = sysconfig.get_paths()["stdlib"]
        files = _walk_sorted(root, STDLIB_SKIPPED, ".py")
        source = f"python-stdlib {platform.python_version()}"
    else:
        root = os.path.expanduser(path)
        if os.path.isfile(root):
            files = [root]
        elif os.path.isdir(root):
            files = _walk_sorted(root, frozenset(), None)
        else:
            raise UserError(f"{key}: '{root}' does not exist")
        source = root
    parts: list[bytes] = []
    total = 0
    for file in files:
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            with open(file, "rb") as f:
                part = f.read() if max_bytes is None else f.read(max_bytes - total)
        except OSError as exc:
            raise UserError(f"{key}: cannot read '{file}': {one_line(exc)}") from exc
        parts.append(part)
        total += len(part)
    if total == 0:
        raise UserError(f"{key}: '{root}' holds no text ({len(files)} files, all empty)")
    return TextCorpus(b"".join(parts), source, len(parts))


def _walk_sorted(root: str, skipped: frozenset[str], suffix: str | None) -> list[str]:
    """The regular files below ``root`` (ending with ``suffix``, when given), ordered by relative path
    with ``/`` separators, so that the order is the same on every machine; folders named in ``skipped``
    are not entered."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skipped]
        for name in names:
            file = os.path.join(folder, name)
            if (suffix is None or name.endswith(suffix)) and os.path.isfile(file):
                found.append(os.path.relpath(file, root).replace(os.sep, "/"))
    return [os.path.join(root, relative) for relative in sorted(found)]


def split_text(data: bytes, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation bytes as uint8 token arrays: the last ``val_fraction`` is held out."""
    tokens = np.frombuffer(data, dtype=np.uint8)
    held_out = round(len(tokens) * val_fraction)
    return tokens[: len(tokens) - held_out], tokens[len(tokens) - held_out :]


# ---------------------------------------------------------------------------------------------
# What was read


def describe_tokens(
    source: str, files: int, train: np.ndarray, val: np.ndarray, bytes_per_token: int | None
) -> tuple[dict[str, Any], int]:
    """The corpus record of a training and a validation array, and the vocabulary they need (largest
    id + 1). One chunked pass over each array: sha256 of their bytes (train then val), the largest id,
    and the id counts of the training array for its unigram entropy."""
    digest = hashlib.sha256()
    largest = 0
    counts: np.ndarray | None = np.zeros(0, dtype=np.int64)
    for index, tokens in enumerate((train, val)):
        for start in range(0, len(tokens), SCAN_CHUNK):
            chunk = np.ascontiguousarray(tokens[start : start + SCAN_CHUNK])
            digest.update(chunk.data)  # the array's bytes, not a copy
            top = int(chunk.max())
            largest = max(largest, top)
            if index == 0 and counts is not None:
                counts = None if top >= MAX_COUNTED_VOCAB else _add_counts(counts, np.bincount(chunk))
    corpus = {
        "source": source,
        "files": files,
        "bytes": int(train.nbytes + val.nbytes),
        "digest": digest.hexdigest(),
        "train_tokens": len(train),
        "val_tokens": len(val),
        "bytes_per_token": bytes_per_token,
        "unigram_entropy": None if counts is None else unigram_entropy(counts),
    }
    return corpus, largest + 1


def _add_counts(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if len(counts) > len(total):
        total = np.concatenate([total, np.zeros(len(counts) - len(total), dtype=np.int64)])
    total[: len(counts)] += counts
    return total


def unigram_entropy(counts: np.ndarray) -> float:
    """−Σ p ln p of token frequencies, in nats per token: the loss of a model that learned only how often
    each token occurs, the bar any language model must get below."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# hpc-localsgd tokens


def write_token_files(
    source: str, out_dir: str, val_fraction: float, max_bytes: int | None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the byte-level split of ``source`` (a text file, a folder, or ``stdlib``: the built-in
    corpus) as uint16 ``train.bin`` and ``val.bin`` in ``out_dir``, read and split as ``data.name: text``
    reads them. Each file is written to a temporary name and renamed, so a reader never sees half of one.
    Returns the text's corpus record."""
    corpus = read_text(None if source == STDLIB_SOURCE else source, max_bytes, key="SOURCE")
    train, val = split_text(corpus.data, val_fraction)
    if min(len(train), len(val)) < 2:
        raise UserError(
            f"SOURCE: {corpus.source} gives {len(train)} training and {len(val)} validation bytes "
            f"(--val-fraction {val_fraction}); each needs at least 2 for one window"
        )
    out = os.path.expanduser(out_dir)
    targets = [os.path.join(out, name) for name in (TRAIN_FILE, VAL_FILE)]
    present = [target for target in targets if os.path.exists(target)]
    if present and not overwrite:
        verb = "exists" if len(present) == 1 else "exist"
        raise UserError(f"OUT_DIR: {' and '.join(present)} already {verb}; pass --overwrite to replace")
    try:
        os.makedirs(out, exist_ok=True)
        for target, tokens in zip(targets, (train, val), strict=True):
            _write_atomically(target, tokens.astype(TOKEN_DTYPES["uint16"]))
    except OSError as exc:
        raise UserError(f"OUT_DIR: cannot write to '{out}': {one_line(exc)}") from exc
    described, _ = describe_tokens(corpus.source, corpus.files, train, val, bytes_per_token=1)
    return described


def _write_atomically(target: str, tokens: np.ndarray) -> None:
    # Created as open() creates files (0666 less the umask, unlike mkstemp's 0600), so that others who
    # may read the target may read its replacement; the process id keeps concurrent writers apart.
    temporary = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            tokens.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
