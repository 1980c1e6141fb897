"""MNIST-1D (Greydanus & Kobak, ICML 2024), generated offline by the ``mnist1d`` package.

The ten digit templates of the package are padded, sheared, scaled, translated and noised into
1-D sequences of 40 values: small enough for a 2-core machine, hard enough that model and
method matter (on the package's default 4,000/1,000 split: logistic regression 32 %, MLP 68 %,
CNN 94 %). Only :func:`mnist1d.data.make_dataset` is used: ``get_dataset`` goes to the network.

The data is a pure function of ``(train_samples, test_samples, seed)``. ``seed`` is the data's
own (``data.mnist1d.seed``), not the run's: like digits' train/test split it is a property of the
dataset, so runs of different seeds are evaluated on the same test set and stay comparable.

``make_dataset`` reseeds Python's ``random`` and numpy's global generator; both are saved before
and restored after, so generating the data changes nothing else a process draws.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from ..errors import UserError

SEQUENCE_LENGTH = 40  # the package's final_seq_length
NUM_CLASSES = 10


@functools.lru_cache(maxsize=2)
def mnist1d_arrays(train_samples: int, test_samples: int, seed: int) -> tuple[np.ndarray, ...]:
    """Training sequences (N, 40), training labels, test sequences, test labels: float32 / int64.

    Cached: the simulated backend, tests and a process's ranks ask for the same data again, and
    50,000 sequences take about ten seconds to generate. The package's own split is the first
    ``train_split`` share of one shuffled, standardised set; here the split is taken by count
    (``train_split`` as a float could round one sample to the wrong side), so the default
    4,000/1,000 split is the package's exactly.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset  # type: ignore[import-untyped]
    except ImportError as exc:
        raise UserError("data.name: dataset 'mnist1d' needs the mnist1d package; `pip install mnist1d`") from exc
    args = get_dataset_args()
    # make_dataset generates num_samples // 10 samples of every class.
    args.num_samples = -(-(train_samples + test_samples) // NUM_CLASSES) * NUM_CLASSES
    args.train_split = 1.0
    args.seed = seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    x = np.asarray(generated["x"], dtype=np.float32)
    y = np.asarray(generated["y"], dtype=np.int64)
    end = train_samples + test_samples
    arrays = (x[:train_samples], y[:train_samples], x[train_samples:end], y[train_samples:end])
    for array in arrays:
        array.setflags(write=False)  # shared by every caller of the cache
    return arrays


def mnist1d_tensors(train_samples: int, test_samples: int, seed: int) -> tuple[torch.Tensor, ...]:
    """:func:`mnist1d_arrays` as tensors, sequences shaped (N, 1, 40) for Conv1d models (one channel)."""
    train_x, train_y, test_x, test_y = mnist1d_arrays(train_samples, test_samples, seed)
    return (
        torch.tensor(train_x).view(-1, 1, SEQUENCE_LENGTH),
        torch.tensor(train_y),
        torch.tensor(test_x).view(-1, 1, SEQUENCE_LENGTH),
        torch.tensor(test_y),
    )
