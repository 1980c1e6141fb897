"""Datasets, per-rank training shards and evaluation splits.

Invariants the training loop relies on:

* Every rank draws the same permutation of the training set for an epoch (seeded from
  ``(seed, epoch)``) and takes its own contiguous slice of ``N // size`` samples, so shards are
  disjoint and equal in size; the ``N % size`` leftover samples of that permutation are skipped.
  Every rank runs the same number of batches (the last partial batch is dropped), so no rank
  ever waits in a collective for a rank that ran out of data.
* The batches of ``(seed, rank, epoch)`` never depend on history: the permutation, and every
  random augmentation, is derived from the seed, the epoch and a batch or sample index. A run
  resumed at batch ``k`` of an epoch sees exactly the batches a run that never stopped would,
  and the number of DataLoader workers does not change the data.
* Evaluation splits the test set ``r::size`` without dropping anything, so the correct counts
  summed over ranks cover the whole test set (or its first ``data.eval_samples`` samples, the same
  ones at every evaluation).

In-memory datasets (digits, synthetic, mnist1d, cifar10, and the windows of language data) gather a
whole batch at once (:class:`IndexedBatches`): for small samples this is far faster than a
DataLoader, which pays per-sample Python overhead. Language data (tokens, text) is built in
:mod:`.language_data`: its samples are windows of a token stream, sharded, batched and resumed by the
same rules as images.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config.schema import LANGUAGE_DATA, DataConfig, Mnist1dConfig, SyntheticConfig
from ..errors import UserError
from .language_data import build_language_data
from .mnist1d import NUM_CLASSES as MNIST1D_CLASSES
from .mnist1d import SEQUENCE_LENGTH as MNIST1D_LENGTH
from .mnist1d import mnist1d_tensors

if TYPE_CHECKING:  # torchvision is imported only when an image folder is read
    from torchvision.datasets import ImageFolder

Batch = tuple[torch.Tensor, torch.Tensor]
# A random augmentation of a whole batch of stored samples, drawing only from the generator given.
BatchAugment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

# The digits train/test split is a property of the dataset, not of a run: runs with different
# seeds must be evaluated on the same 300 images to be comparable.
DIGITS_SPLIT_SEED = 1797
DIGITS_TEST_SAMPLES = 300


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts``.

    A hash rather than arithmetic such as ``seed * 1000 + epoch`` so that nearby inputs
    (seed 1 epoch 0, seed 0 epoch 1000) never collide and streams stay independent.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class NormalizeUint8Images:
    """uint8 images (B, C, H, W) → float32, scaled to [0, 1], then per-channel standardised.

    CIFAR-10 is kept as uint8 (150 MB instead of 600 MB of float32 per rank) and converted
    batch by batch; augmentation runs before this, in pixel space, as torchvision's does.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class RandomCropFlip:
    """Random crop to the input size after zero-padding each side, plus a horizontal flip with
    probability 1/2: the standard CIFAR augmentation, applied to a whole batch in one gather."""

    padding: int = 4

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, channels, height, width = images.shape
        padded = torch.nn.functional.pad(images, (self.padding,) * 4)
        top = torch.randint(0, 2 * self.padding + 1, (batch,), generator=generator)
        left = torch.randint(0, 2 * self.padding + 1, (batch,), generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.5
        rows = top[:, None] + torch.arange(height)
        cols = left[:, None] + torch.arange(width)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        return padded[
            torch.arange(batch)[:, None, None, None],
            torch.arange(channels)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]


@runtime_checkable
class IndexedBatches(Protocol):
    """A dataset held in memory that gathers a whole batch of samples in one indexing operation
    (:class:`TensorSamples`, :class:`~.language_data.TokenWindows`): no DataLoader needed."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Batch:
        """Inputs and targets of the samples ``indices`` (a 1-D int64 tensor)."""
        ...


class TensorSamples(Dataset):
    """A dataset held in memory as one tensor of stored samples and one of labels.

    ``to_input`` turns stored samples (e.g. uint8 pixels) into model inputs; it is applied per
    batch, after any augmentation. ``augment`` is the random augmentation of training batches
    that :class:`ShardedBatches` applies (indexing the dataset directly never augments).
    """

    def __init__(
        self,
        stored: torch.Tensor,
        labels: torch.Tensor,
        to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        if len(stored) != len(labels):
            raise ValueError(f"{len(stored)} samples but {len(labels)} labels")
        self.stored = stored
        self.labels = labels
        self.to_input = to_input
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, stored: torch.Tensor) -> torch.Tensor:
        return stored if self.to_input is None else self.to_input(stored)

    def batch(self, indices: torch.Tensor) -> Batch:
        return self.inputs(self.stored[indices]), self.labels[indices]

    def __getitem__(self, index: int) -> Batch:
        x, y = self.batch(torch.tensor([index]))
        return x[0], y[0]


class SeededTransforms(Dataset):
    """Wraps a file-backed dataset whose transforms draw from torch's global RNG (torchvision's).

    A key ``(seed, epoch, index)`` seeds that RNG from the three before loading sample ``index``,
    so a sample's crop and flip do not depend on which worker loads it or on what was loaded
    before; the caller's RNG state is restored afterwards. A plain ``index`` loads without
    seeding (for deterministic evaluation transforms).
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int, int]) -> Any:
        if isinstance(key, tuple):
            seed, epoch, index = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "sample", epoch, index))
                return self.base[index]
        return self.base[key]


@dataclass
class Datasets:
    train: Dataset
    test: Dataset
    num_classes: int  # for language data: the vocabulary the data needs (largest id + 1)
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8); (seq_len,) for language data
    # What a language dataset was read from (see language_data.describe_tokens); None for other data.
    corpus: dict[str, Any] | None = None


def build_datasets(cfg: DataConfig, seed: int, seq_len: int | None = None) -> Datasets:
    """Load or generate the configured dataset. Raises UserError for missing or malformed inputs.

    ``seq_len`` is the model's context length, which language data (tokens, text) is cut into
    windows of; other data ignores it."""
    if cfg.name in LANGUAGE_DATA:
        if seq_len is None:
            raise ValueError(f"data.name {cfg.name!r} is language data: build_datasets needs its seq_len")
        data = build_language_data(cfg, seq_len)
        return Datasets(data.train, data.test, data.vocab, (seq_len,), data.corpus)
    if cfg.name == "digits":
        return _digits()
    if cfg.name == "synthetic":
        return _synthetic(cfg.synthetic, seed)
    if cfg.name == "mnist1d":
        return _mnist1d(cfg.mnist1d)
    if cfg.name == "cifar10":
        return _cifar10(_require_path(cfg), cfg.augment)
    if cfg.name == "imagenet":
        return _imagenet(_require_path(cfg), cfg.image_size, cfg.augment)
    raise UserError(
        f"data.name: unknown dataset {cfg.name!r}; choose digits, synthetic, mnist1d, cifar10, imagenet, tokens or text"
    )


def _require_path(cfg: DataConfig) -> str:
    if cfg.path is None:
        raise UserError(f"data.path: is required for dataset {cfg.name!r}")
    return _require_folder(os.path.expanduser(cfg.path))


def _require_folder(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"data.path: folder '{path}' does not exist")
    if not os.path.isdir(path):
        raise UserError(f"data.path: '{path}' is not a folder")
    return path


def _digits() -> Datasets:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UserError(
            "data.name: dataset 'digits' needs scikit-learn; install it with `pip install scikit-learn`"
        ) from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, train_idx = order[:DIGITS_TEST_SAMPLES], order[DIGITS_TEST_SAMPLES:]
    # Statistics from the training images only, so that nothing about the test set leaks in.
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Datasets(
        train=TensorSamples(images[train_idx], labels[train_idx]),
        test=TensorSamples(images[test_idx], labels[test_idx]),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _teacher_labels(inputs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (inputs.flatten(1) @ teacher.T).argmax(dim=1)


def _synthetic(cfg: SyntheticConfig, seed: int) -> Datasets:
    """Gaussian inputs labelled by a random linear teacher: learnable, no files, same on every rank.

    Teacher, train set and test set each have their own generator, so changing the number of
    training samples leaves the teacher and the test set as they were. Label noise is applied to
    the training labels only: test accuracy then measures how well the teacher was recovered.
    """
    shape = tuple(cfg.shape)
    features = 1
    for side in shape:
        features *= side
    teacher = torch.randn(cfg.num_classes, features, generator=_generator(seed, "synthetic-teacher"))

    train_gen = _generator(seed, "synthetic-train")
    train_x = torch.randn((cfg.train_samples, *shape), generator=train_gen)
    train_y = _teacher_labels(train_x, teacher)
    noisy = round(cfg.label_noise * cfg.train_samples)
    if noisy:
        which = torch.randperm(cfg.train_samples, generator=train_gen)[:noisy]
        train_y[which] = torch.randint(0, cfg.num_classes, (noisy,), generator=train_gen)

    test_x = torch.randn((cfg.test_samples, *shape), generator=_generator(seed, "synthetic-test"))
    test_y = _teacher_labels(test_x, teacher)
    return Datasets(
        train=TensorSamples(train_x, train_y),
        test=TensorSamples(test_x, test_y),
        num_classes=cfg.num_classes,
        input_shape=shape,
    )


def _mnist1d(cfg: Mnist1dConfig) -> Datasets:
    """Sequences of shape (1, 40): one channel, for Conv1d models (see :mod:`.mnist1d`)."""
    train_x, train_y, test_x, test_y = mnist1d_tensors(cfg.train_samples, cfg.test_samples, cfg.seed)
    return Datasets(
        train=TensorSamples(train_x, train_y),
        test=TensorSamples(test_x, test_y),
        num_classes=MNIST1D_CLASSES,
        input_shape=(1, MNIST1D_LENGTH),
    )


def _cifar10_folder(path: str) -> str:
    """The folder holding the python batches: ``path`` itself or its ``cifar-10-batches-py``."""
    for folder in (path, os.path.join(path, "cifar-10-batches-py")):
        names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
        present = [name for name in names if os.path.isfile(os.path.join(folder, name))]
        if len(present) == len(names):
            return folder
        if present:
            missing = ", ".join(name for name in names if name not in present)
            raise UserError(f"data.path: CIFAR-10 batches missing in '{folder}': {missing}")
    raise UserError(f"data.path: no CIFAR-10 python batches (data_batch_1..5, test_batch) in '{path}'")


def _read_cifar10_batch(file: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One python batch → uint8 images (N, 3, 32, 32) and int64 labels.

    The format is a pickle (trusted input, as with the official archive): rows of 3072 bytes,
    the red plane then green then blue, each 32×32 row-major.
    """
    import numpy as np

    def malformed(why: str) -> UserError:
        return UserError(f"data.path: '{file}' is not a CIFAR-10 python batch ({why})")

    try:
        with open(file, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign file can fail in many ways inside pickle
        raise malformed(f"cannot unpickle: {type(exc).__name__}") from exc
    if not isinstance(entry, dict):
        raise malformed(f"holds a {type(entry).__name__}, not a dict")
    # Batches pickled by Python 2 have bytes keys; re-pickled ones may have str keys.
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise malformed("no 'data' or 'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise malformed(f"'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, 3072)")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise malformed(f"'labels' has shape {labels.shape}, expected {data.shape[0]} integers")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise malformed("labels outside 0..9")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _cifar10(path: str, augment: bool) -> Datasets:
    folder = _cifar10_folder(path)
    parts = [_read_cifar10_batch(os.path.join(folder, name)) for name in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar10_batch(os.path.join(folder, CIFAR10_TEST_BATCH))
    normalize = NormalizeUint8Images(CIFAR10_MEAN, CIFAR10_STD)
    return Datasets(
        train=TensorSamples(
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            normalize,
            augment=RandomCropFlip(padding=4) if augment else None,
        ),
        test=TensorSamples(test_images, test_labels, normalize),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


def _image_folder(root: str, transform: Callable[[Any], torch.Tensor]) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise UserError(f"data.path: folder '{root}' does not exist")
    try:
        return ImageFolder(root, transform=transform)
    except FileNotFoundError as exc:  # ImageFolder's way of saying: no class folders, or no images in them
        raise UserError(f"data.path: '{root}' holds no class folders of images") from exc


def _imagenet(path: str, image_size: int, augment: bool) -> Datasets:
    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    # The usual 256/224 ratio between resize and centre crop, at any crop size.
    evaluation = [transforms.Resize(image_size * 256 // 224), transforms.CenterCrop(image_size)]
    if augment:
        training = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        training = evaluation
    train_root, val_root = os.path.join(path, "train"), os.path.join(path, "val")
    train = _image_folder(train_root, transforms.Compose(training + normalize))
    test = _image_folder(val_root, transforms.Compose(evaluation + normalize))
    if test.classes != train.classes:
        raise UserError(
            f"data.path: the class folders of '{val_root}' ({len(test.classes)}) differ from "
            f"those of '{train_root}' ({len(train.classes)})"
        )
    return Datasets(
        train=SeededTransforms(train),
        test=SeededTransforms(test),
        num_classes=len(train.classes),
        input_shape=(3, image_size, image_size),
    )


def shard_indices(num_samples: int, rank: int, size: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's training indices for ``epoch``: a contiguous slice of N // size samples of a
    permutation that every rank draws identically from (seed, epoch)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of size {size}")
    permutation = torch.randperm(num_samples, generator=_generator(seed, "shuffle", epoch))
    per_rank = num_samples // size
    return permutation[rank * per_rank : (rank + 1) * per_rank]


# Batches each DataLoader worker prepares ahead (PyTorch's default is 2): enough to ride out a slow JPEG.
LOADER_PREFETCH_BATCHES = 4


class _EpochKeys(Sampler):
    """The sampler of a loader that lives across epochs: the current epoch's sample keys, set before
    each pass (a new pass reads them afresh, also in persistent workers' loaders)."""

    def __init__(self) -> None:
        self.keys: Sequence[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class ShardedBatches:
    """One rank's training batches, epoch by epoch; see the module docstring for the invariants.

    ``source`` is a :class:`Datasets` (its training set is used) or a training dataset.
    ``augment`` applies to :class:`TensorSamples`: True uses the dataset's own batch augmentation (if
    it has one), False none, a callable that one instead; it draws from a generator seeded by
    (seed, epoch, rank, batch index). Other in-memory datasets (:class:`IndexedBatches`, such as
    language windows) have no augmentation. File-backed datasets (imagenet) augment per sample with
    the transforms chosen when they were built (``data.augment``), whatever ``augment`` says.
    """

    def __init__(
        self,
        source: Datasets | Dataset,
        batch_size: int,
        rank: int,
        size: int,
        seed: int,
        num_workers: int = 0,
        augment: bool | BatchAugment = True,
        pin_memory: bool = False,
    ) -> None:
        self.dataset: Dataset = source.train if isinstance(source, Datasets) else source
        self.augment: BatchAugment | None
        if augment is True:
            self.augment = self.dataset.augment if isinstance(self.dataset, TensorSamples) else None
        elif augment is False:
            self.augment = None
        else:
            if isinstance(self.dataset, IndexedBatches) and not isinstance(self.dataset, TensorSamples):
                raise ValueError(f"{type(self.dataset).__name__} has no augmentation: only TensorSamples do")
            self.augment = augment
        self.batch_size = batch_size
        self.rank = rank
        self.size = size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._epoch_keys = _EpochKeys()
        self._loader: DataLoader | None = None
        self.num_samples = len(self.dataset)  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise UserError(
                f"data.batch_size: {batch_size} per rank × {size} ranks needs more than the "
                f"{self.num_samples} training samples; lower data.batch_size or use fewer ranks"
            )

    @property
    def steps_per_epoch(self) -> int:
        return (self.num_samples // self.size) // self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start_batch`` on (to resume mid-epoch)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        indices = shard_indices(self.num_samples, self.rank, self.size, epoch, self.seed)
        if isinstance(self.dataset, IndexedBatches):
            return self._indexed_batches(self.dataset, indices, epoch, start_batch)
        return self._loader_batches(indices, epoch, start_batch)

    def _indexed_batches(
        self, samples: IndexedBatches, indices: torch.Tensor, epoch: int, start_batch: int
    ) -> Iterator[Batch]:
        for batch in range(start_batch, self.steps_per_epoch):
            chosen = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            if self.augment is None:
                yield samples.batch(chosen)
                continue
            assert isinstance(samples, TensorSamples)  # __init__ gives only these an augmentation
            stored = self.augment(samples.stored[chosen], _generator(self.seed, "augment", epoch, self.rank, batch))
            yield samples.inputs(stored), samples.labels[chosen]

    def _loader_batches(self, indices: torch.Tensor, epoch: int, start_batch: int) -> Iterator[Batch]:
        chosen = indices[start_batch * self.batch_size : self.steps_per_epoch * self.batch_size].tolist()
        if isinstance(self.dataset, SeededTransforms):
            keys: Sequence[Any] = [(self.seed, epoch, index) for index in chosen]
        else:
            keys = chosen
        if self._loader is None:
            # One loader for the whole run: its worker processes stay alive between epochs (starting
            # them costs seconds per epoch on a large node) and prefetch ahead of the step. The data
            # never depends on the workers' seeds (every random choice is keyed by seed, epoch and
            # sample), so the loader's own generator only keeps the global RNG untouched.
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self._epoch_keys,
                drop_last=True,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                prefetch_factor=LOADER_PREFETCH_BATCHES if self.num_workers > 0 else None,
                generator=_generator(self.seed, "loader", self.rank),
            )
        self._epoch_keys.keys = keys
        yield from self._loader


def eval_indices(num_samples: int, rank: int, size: int) -> torch.Tensor:
    """Rank r evaluates samples r, r + size, ...: nothing dropped, nothing counted twice."""
    return torch.arange(num_samples)[rank::size]


def eval_batches(
    dataset: Datasets | Dataset,
    batch_size: int,
    rank: int,
    size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    limit: int | None = None,
) -> Iterator[Batch]:
    """This rank's share of the test set (``dataset`` or ``Datasets.test``), unshuffled, unaugmented;
    the last batch may be smaller, and a rank may get no batch when the test set has fewer samples
    than there are ranks. ``limit`` (``data.eval_samples``) keeps the first this many samples before
    they are split, so every evaluation sees the same ones; None keeps them all."""
    if isinstance(dataset, Datasets):
        dataset = dataset.test
    available = len(dataset)  # type: ignore[arg-type]
    indices = eval_indices(available if limit is None else min(limit, available), rank, size)
    if isinstance(dataset, IndexedBatches):
        for start in range(0, len(indices), batch_size):
            yield dataset.batch(indices[start : start + batch_size])
        return
    yield from DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices.tolist(),
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=_generator(rank, "eval-loader"),
    )
