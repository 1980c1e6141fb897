"""Datasets, sharding and resume: each loader on a tiny fixture in its real on-disk format."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_localsgd.config.schema import DataConfig, SyntheticConfig
from hpc_localsgd.errors import UserError
from hpc_localsgd.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Datasets,
    RandomCropFlip,
    ShardedBatches,
    TensorSamples,
    build_datasets,
    eval_batches,
    shard_indices,
)

# ---------------------------------------------------------------------------------------------
# Fixtures in the real formats


def _write_cifar_batch(file: Path, images: np.ndarray, labels: list[int]) -> None:
    """The official python batch: a Python-2 pickle with bytes keys, rows of 3072 uint8 (R, G, B planes)."""
    entry = {
        b"batch_label": b"fixture",
        b"labels": labels,
        b"data": images.reshape(len(labels), 3 * 32 * 32),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    with open(file, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _make_cifar(root: Path, per_batch: int = 4, test: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches and a test batch of random images; returns all training images and labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    all_images, all_labels = [], []
    for i in range(1, 6):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _write_cifar_batch(root / f"data_batch_{i}", images, labels)
        all_images.append(images)
        all_labels += labels
    _write_cifar_batch(
        root / "test_batch",
        rng.integers(0, 256, size=(test, 3, 32, 32), dtype=np.uint8),
        [int(v) for v in rng.integers(0, 10, size=test)],
    )
    return np.concatenate(all_images), np.array(all_labels)


def _make_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog"), train_per_class: int = 4, val_per_class: int = 2
) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                # Both formats ImageNet users meet: JPEG (the real set) and PNG.
                suffix = "JPEG" if i % 2 else "png"
                Image.fromarray(pixels).save(folder / f"{label}_{i}.{suffix}")


def _batches_equal(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def _indexed_samples(n: int) -> TensorSamples:
    """Samples whose label is their index, so batches reveal which samples a rank received."""
    return TensorSamples(
        torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n)
    )


# ---------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_split_is_fixed_and_normalized() -> None:
    a = build_datasets(DataConfig(name="digits"), seed=0)
    b = build_datasets(DataConfig(name="digits"), seed=123)
    assert (len(a.train), len(a.test)) == (1497, 300)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert a.train.stored.shape == (1497, 1, 8, 8) and a.train.stored.dtype == torch.float32
    # The split and the data do not depend on the run seed.
    assert torch.equal(a.train.stored, b.train.stored) and torch.equal(a.test.labels, b.test.labels)
    assert abs(a.train.stored.mean().item()) < 1e-4 and abs(a.train.stored.std().item() - 1) < 1e-3
    assert set(a.train.labels.tolist()) == set(range(10)) and set(a.test.labels.tolist()) == set(range(10))


def test_digits_without_scikit_learn_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install scikit-learn"):
        build_datasets(DataConfig(name="digits"), seed=0)


def _synthetic(seed: int = 0, **overrides: object) -> Datasets:
    settings = dict(train_samples=2000, test_samples=500, shape=[2, 4, 4], num_classes=4, label_noise=0.0)
    settings.update(overrides)
    return build_datasets(DataConfig(name="synthetic", synthetic=SyntheticConfig(**settings)), seed)


def test_synthetic_is_learnable_by_a_linear_fit() -> None:
    data = _synthetic()
    assert data.input_shape == (2, 4, 4) and data.num_classes == 4
    x, y = data.train.stored.flatten(1), data.train.labels
    # Least squares onto one-hot targets: a linear teacher should be recovered far above chance (25 %).
    weights = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 4).float()).solution
    accuracy = ((data.test.stored.flatten(1) @ weights).argmax(1) == data.test.labels).float().mean().item()
    assert accuracy > 0.7


def test_synthetic_depends_on_seed_only_and_noise_touches_training_labels() -> None:
    a, b, other = _synthetic(seed=5), _synthetic(seed=5), _synthetic(seed=6)
    assert torch.equal(a.train.stored, b.train.stored) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.stored, other.train.stored)

    noisy = _synthetic(seed=5, label_noise=0.3)
    assert torch.equal(noisy.train.stored, a.train.stored)
    assert torch.equal(noisy.test.labels, a.test.labels)
    # 600 labels are redrawn uniformly, so 3/4 of them are expected to change: 450 ± a few dozen.
    changed = (noisy.train.labels != a.train.labels).sum().item()
    assert 390 <= changed <= 510


def test_synthetic_flat_shape() -> None:
    data = _synthetic(shape=[7])
    assert data.input_shape == (7,) and data.train.stored.shape == (2000, 7)


# ---------------------------------------------------------------------------------------------
# cifar10


def test_cifar10_reads_official_batches(tmp_path: Path) -> None:
    images, labels = _make_cifar(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the batches folder or its parent
        data = build_datasets(DataConfig(name="cifar10", path=str(path)), seed=0)
        assert (len(data.train), len(data.test)) == (20, 3)
        assert data.input_shape == (3, 32, 32) and data.num_classes == 10
        x, y = data.train[7]
        expected = (
            torch.from_numpy(images[7]).float() / 255 - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        ) / torch.tensor(CIFAR10_STD).view(3, 1, 1)
        torch.testing.assert_close(x, expected)
        assert y.item() == labels[7]


def test_cifar10_channel_planes(tmp_path: Path) -> None:
    """Row layout: 1024 red bytes, then green, then blue, each image row-major."""
    _make_cifar(tmp_path)
    image = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    image[0, 0] = 255  # pure red
    image[0, 2, 0, 5] = 255  # one blue pixel in the first row, sixth column
    _write_cifar_batch(tmp_path / "test_batch", image, [3])
    x, y = build_datasets(DataConfig(name="cifar10", path=str(tmp_path)), seed=0).test[0]
    red = (1 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]
    assert torch.allclose(x[0], torch.full((32, 32), red))
    blue_on = (1 - CIFAR10_MEAN[2]) / CIFAR10_STD[2]
    assert x[2, 0, 5].item() == pytest.approx(blue_on) and (x[2] > 0).sum().item() == 1
    assert y.item() == 3


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^data\.path: folder '.*nowhere' does not exist$"):
        build_datasets(DataConfig(name="cifar10", path=str(tmp_path / "nowhere")), seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no CIFAR-10 python batches \(data_batch_1\.\.5, test_batch\) in '.*empty'"):
        build_datasets(DataConfig(name="cifar10", path=str(empty)), seed=0)
    partial = tmp_path / "partial"
    _make_cifar(partial)
    os.remove(partial / "data_batch_3")
    with pytest.raises(UserError, match="missing in .*: data_batch_3$"):
        build_datasets(DataConfig(name="cifar10", path=str(partial)), seed=0)
    broken = tmp_path / "broken"
    _make_cifar(broken)
    (broken / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test_batch' is not a CIFAR-10 python batch"):
        build_datasets(DataConfig(name="cifar10", path=str(broken)), seed=0)
    with open(broken / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(UserError, match=r"expected uint8 of shape \(N, 3072\)"):
        build_datasets(DataConfig(name="cifar10", path=str(broken)), seed=0)


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image() -> None:
    images = torch.randint(1, 256, (16, 3, 6, 5), dtype=torch.uint8)  # no zero pixels: padding is recognisable
    out = RandomCropFlip(padding=2)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen_flip = seen_shift = False
    for sample, result in zip(padded, out, strict=True):
        windows = [
            (top, left, flip)
            for top in range(5)
            for left in range(5)
            for flip in (False, True)
            if torch.equal(result, (lambda w: w.flip(-1) if flip else w)(sample[:, top : top + 6, left : left + 5]))
        ]
        assert len(windows) == 1
        seen_flip |= windows[0][2]
        seen_shift |= windows[0][:2] != (2, 2)
    assert seen_flip and seen_shift


# ---------------------------------------------------------------------------------------------
# sharding, determinism and resume


def test_shards_are_disjoint_equal_and_cover_all_but_the_tail() -> None:
    n, size = 103, 4
    shards = [shard_indices(n, rank, size, epoch=2, seed=7) for rank in range(size)]
    assert all(len(s) == n // size for s in shards)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union) == n - n % size
    assert all(torch.equal(s, shard_indices(n, r, size, epoch=2, seed=7)) for r, s in enumerate(shards))
    assert not torch.equal(shards[0], shard_indices(n, 0, size, epoch=3, seed=7))
    assert not torch.equal(shards[0], shard_indices(n, 0, size, epoch=2, seed=8))


def test_sharded_batches_cover_each_shard_once_with_equal_step_counts() -> None:
    samples, size, batch = _indexed_samples(50), 3, 4
    loaders = [ShardedBatches(samples, batch, rank, size, seed=1) for rank in range(size)]
    assert {loader.steps_per_epoch for loader in loaders} == {4}  # 50 // 3 = 16 samples → 4 batches
    seen = []
    for rank, loader in enumerate(loaders):
        labels = torch.cat([y for _, y in loader.epoch(0)])
        assert torch.equal(labels, shard_indices(50, rank, size, 0, seed=1)[:16])
        seen += labels.tolist()
    assert len(set(seen)) == len(seen) == 48


@pytest.mark.parametrize("augment", [None, RandomCropFlip(padding=1)])
def test_epochs_are_deterministic_and_resume_mid_epoch(augment: RandomCropFlip | None) -> None:
    samples = TensorSamples(torch.randn(64, 3, 4, 4), torch.arange(64), augment=augment)
    loader = ShardedBatches(samples, 5, rank=1, size=2, seed=3)
    full = list(loader.epoch(4))
    assert len(full) == loader.steps_per_epoch == 6
    torch.manual_seed(999)  # the global RNG must not matter
    assert _batches_equal(full, list(loader.epoch(4)))
    assert _batches_equal(full[2:], list(loader.epoch(4, start_batch=2)))
    assert list(loader.epoch(4, start_batch=6)) == []
    # A fresh object (a restarted process) gives the same batches.
    again = ShardedBatches(samples, 5, rank=1, size=2, seed=3)
    assert _batches_equal(full[3:], list(again.epoch(4, start_batch=3)))
    assert not _batches_equal(full, list(loader.epoch(5)))
    if augment is not None:
        # Augmented batches differ from the stored samples, but hold the same samples.
        plain = list(ShardedBatches(samples, 5, rank=1, size=2, seed=3, augment=False).epoch(4))
        assert not _batches_equal(full, plain)
        assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(full, plain, strict=True))


def test_cifar10_augmentation_follows_the_config(tmp_path: Path) -> None:
    _make_cifar(tmp_path)
    augmented = build_datasets(DataConfig(name="cifar10", path=str(tmp_path), augment=True), seed=0)
    plain = build_datasets(DataConfig(name="cifar10", path=str(tmp_path), augment=False), seed=0)
    assert isinstance(augmented.train.augment, RandomCropFlip) and plain.train.augment is None
    loader = ShardedBatches(augmented.train, 4, rank=0, size=1, seed=0, augment=True)
    full = list(loader.epoch(0))
    assert _batches_equal(full[1:], list(loader.epoch(0, start_batch=1)))
    unaugmented = list(ShardedBatches(plain, 4, rank=0, size=1, seed=0, augment=True).epoch(0))
    assert not _batches_equal(full, unaugmented)
    switched_off = ShardedBatches(augmented, 4, rank=0, size=1, seed=0, augment=False)
    assert _batches_equal(unaugmented, list(switched_off.epoch(0)))
    assert full[0][0].dtype == torch.float32 and full[0][0].shape == (4, 3, 32, 32)


def test_batch_larger_than_shard_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"^data\.batch_size: 32 per rank × 4 ranks"):
        ShardedBatches(_indexed_samples(100), 32, rank=0, size=4, seed=0)


def test_eval_batches_split_the_whole_test_set() -> None:
    samples = _indexed_samples(23)
    seen = []
    for rank in range(4):
        labels = [y for _, y in eval_batches(samples, 4, rank, 4)]
        assert all(len(y) <= 4 for y in labels)
        seen += torch.cat(labels).tolist()
    assert sorted(seen) == list(range(23))
    assert list(eval_batches(_indexed_samples(2), 4, rank=3, size=4)) == []


# ---------------------------------------------------------------------------------------------
# imagenet (ImageFolder)


def test_imagenet_image_folders(tmp_path: Path) -> None:
    _make_image_folder(tmp_path)
    data = build_datasets(DataConfig(name="imagenet", path=str(tmp_path), image_size=16), seed=0)
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.test)) == (8, 4)
    test = list(eval_batches(data, 3, rank=0, size=1))
    assert [x.shape for x, _ in test] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.cat([y for _, y in test]).tolist() == [0, 0, 1, 1]


def test_imagenet_augmentation_is_seeded_per_sample(tmp_path: Path) -> None:
    _make_image_folder(tmp_path)
    data = build_datasets(DataConfig(name="imagenet", path=str(tmp_path), image_size=16, augment=True), seed=0)
    loader = ShardedBatches(data, 2, rank=0, size=1, seed=4)
    rng_before = torch.get_rng_state()
    full = list(loader.epoch(1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading leaves the caller's RNG alone
    assert len(full) == 4 and full[0][0].shape == (2, 3, 16, 16)
    torch.manual_seed(12345)
    assert _batches_equal(full, list(loader.epoch(1)))
    assert _batches_equal(full[1:], list(loader.epoch(1, start_batch=1)))
    workers = ShardedBatches(data, 2, rank=0, size=1, seed=4, num_workers=2)
    assert _batches_equal(full, list(workers.epoch(1)))
    # Random crops: a different epoch sees the same images cropped differently.
    assert not _batches_equal(full, list(loader.epoch(2)))


def test_imagenet_errors(tmp_path: Path) -> None:
    def build(path: Path) -> Datasets:
        return build_datasets(DataConfig(name="imagenet", path=str(path), image_size=16), seed=0)

    with pytest.raises(UserError, match=r"^data\.path: folder '.*missing' does not exist$"):
        build(tmp_path / "missing")
    (tmp_path / "no_train" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^data\.path: folder '.*no_train/train' does not exist$"):
        build(tmp_path / "no_train")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "image.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"^data\.path: '.*flat/train' holds no class folders of images$"):
        build(tmp_path / "flat")
    (tmp_path / "no_images" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"'.*no_images/train' holds no class folders of images$"):
        build(tmp_path / "no_images")
    _make_image_folder(tmp_path / "mismatch", train_per_class=1, val_per_class=1)
    (tmp_path / "mismatch" / "val" / "dog").rename(tmp_path / "mismatch" / "val" / "wolf")
    with pytest.raises(UserError, match="class folders of '.*mismatch/val' .* differ"):
        build(tmp_path / "mismatch")
