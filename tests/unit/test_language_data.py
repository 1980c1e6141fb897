"""Language-model data: token files and byte-level text cut into windows, sharded and resumed like any
other samples, the corpus record, and ``hpc-localsgd tokens``, the converter from one to the other."""

from __future__ import annotations

import hashlib
import math
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_localsgd.cli import main
from hpc_localsgd.config.schema import DataConfig
from hpc_localsgd.errors import UserError
from hpc_localsgd.train.data import Datasets, IndexedBatches, ShardedBatches, build_datasets, eval_batches
from hpc_localsgd.train.language_data import TokenWindows

CORPUS_KEYS = {
    "source",
    "files",
    "bytes",
    "digest",
    "train_tokens",
    "val_tokens",
    "bytes_per_token",
    "unigram_entropy",
}


def _write_tokens(folder: Path, train: np.ndarray, val: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    return folder


def _tokens(folder: Path, seq_len: int, dtype: str = "uint16") -> Datasets:
    cfg = DataConfig(name="tokens", path=str(folder))
    cfg.tokens.dtype = dtype  # type: ignore[assignment]
    return build_datasets(cfg, seed=0, seq_len=seq_len)


def _text(path: Path | None, seq_len: int, val_fraction: float = 0.05, max_bytes: int | None = None) -> Datasets:
    cfg = DataConfig(name="text", path=None if path is None else str(path))
    cfg.text.val_fraction, cfg.text.max_bytes = val_fraction, max_bytes
    return build_datasets(cfg, seed=0, seq_len=seq_len)


def _numbered(count: int, seq_len: int) -> TokenWindows:
    """Token i is i, so a window's first input token names the window: x[:, 0] // seq_len."""
    return TokenWindows(np.arange(count, dtype=np.uint32), seq_len)


def _window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    return (x[:, 0] // seq_len).tolist()


def _batches_equal(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def _entropy(tokens: bytes | list[int]) -> float:
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


# ---------------------------------------------------------------------------------------------
# windows


def test_windows_are_cut_at_stride_seq_len_and_targets_are_the_inputs_shifted(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(0, 1000, size=1001, dtype=np.uint16)
    data = _tokens(_write_tokens(tmp_path, raw, raw[:50]), seq_len=8)
    assert isinstance(data.train, TokenWindows) and isinstance(data.train, IndexedBatches)
    assert len(data.train) == (1001 - 1) // 8 == 125 and len(data.test) == 49 // 8
    assert data.input_shape == (8,) and data.num_classes == int(raw.max()) + 1
    indices = torch.tensor([0, 124, 7, 7, 63])
    x, y = data.train.batch(indices)
    assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row, window in enumerate(indices.tolist()):
        start = window * 8
        assert x[row].tolist() == raw[start : start + 8].tolist()
        assert y[row].tolist() == raw[start + 1 : start + 9].tolist()
    # The last window ends on the last token: every token but the first is a target once.
    assert y[1, -1].item() == raw[-1]
    one_x, one_y = data.train[7]
    assert torch.equal(one_x, x[2]) and torch.equal(one_y, y[2])


def test_training_windows_depend_only_on_seed_rank_epoch_and_batch() -> None:
    windows = _numbered(4001, 10)
    loader = ShardedBatches(windows, 8, rank=2, size=4, seed=5)
    full = list(loader.epoch(3))
    torch.manual_seed(123)  # the global RNG must not matter
    np.random.seed(123)
    assert _batches_equal(full, list(loader.epoch(3)))
    # A restarted process (a fresh object over a fresh array) gives the same windows.
    assert _batches_equal(full, list(ShardedBatches(_numbered(4001, 10), 8, rank=2, size=4, seed=5).epoch(3)))
    assert not _batches_equal(full, list(ShardedBatches(windows, 8, rank=2, size=4, seed=6).epoch(3)))
    assert not _batches_equal(full, list(loader.epoch(4)))


def test_ranks_get_disjoint_windows_and_the_same_number_of_batches() -> None:
    seq_len, size, batch = 4, 4, 3
    windows = _numbered(401, seq_len)  # 100 windows: 25 per rank, 8 batches, 1 window of each shard unused
    loaders = [ShardedBatches(windows, batch, rank, size, seed=1) for rank in range(size)]
    assert {loader.steps_per_epoch for loader in loaders} == {8}
    epochs = [list(loader.epoch(0)) for loader in loaders]
    assert {len(batches) for batches in epochs} == {8}
    seen: list[int] = []
    for step in range(8):
        at_step = [_window_ids(epochs[rank][step][0], seq_len) for rank in range(size)]
        flat = [window for ids in at_step for window in ids]
        assert len(set(flat)) == len(flat) == size * batch
        seen += flat
    assert len(set(seen)) == len(seen)  # nor across steps of an epoch


def test_resuming_mid_epoch_needs_no_saved_sampler() -> None:
    windows = _numbered(2001, 16)
    full = list(ShardedBatches(windows, 4, rank=1, size=3, seed=9).epoch(2))
    assert len(full) == 10  # 125 windows // 3 ranks = 41 → 10 batches of 4
    for start in (1, 6, 10):
        resumed = ShardedBatches(windows, 4, rank=1, size=3, seed=9)
        assert _batches_equal(full[start:], list(resumed.epoch(2, start_batch=start)))


def test_windows_have_no_augmentation() -> None:
    with pytest.raises(ValueError, match="TokenWindows has no augmentation"):
        ShardedBatches(_numbered(101, 4), 2, 0, 1, seed=0, augment=lambda x, g: x)
    plain = list(ShardedBatches(_numbered(101, 4), 2, 0, 1, seed=0, augment=True).epoch(0))
    assert _batches_equal(plain, list(ShardedBatches(_numbered(101, 4), 2, 0, 1, seed=0, augment=False).epoch(0)))


def test_eval_samples_keeps_the_first_windows_then_splits_them_across_ranks() -> None:
    seq_len, windows = 5, _numbered(5 * 40 + 1, 5)
    for rank in range(3):
        limited = [_window_ids(x, seq_len) for x, _ in eval_batches(windows, 4, rank, 3, limit=10)]
        assert [w for ids in limited for w in ids] == list(range(10))[rank::3]
        whole = [_window_ids(x, seq_len) for x, _ in eval_batches(windows, 4, rank, 3)]
        assert [w for ids in whole for w in ids] == list(range(40))[rank::3]
        beyond = [_window_ids(x, seq_len) for x, _ in eval_batches(windows, 4, rank, 3, limit=1000)]
        assert beyond == whole


def test_language_data_needs_the_context_length(tmp_path: Path) -> None:
    _write_tokens(tmp_path, np.arange(20, dtype=np.uint16), np.arange(20, dtype=np.uint16))
    with pytest.raises(ValueError, match="seq_len"):
        build_datasets(DataConfig(name="tokens", path=str(tmp_path)), seed=0)
    assert build_datasets(DataConfig(name="synthetic"), 0).corpus is None


# ---------------------------------------------------------------------------------------------
# data.name: tokens


@pytest.mark.parametrize(("dtype", "largest"), [("uint16", 65535), ("uint32", 70_000_001)])
def test_token_files_read_back_exactly(tmp_path: Path, dtype: str, largest: int) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 1000, size=301).astype(dtype)
    val = rng.integers(0, 1000, size=41).astype(dtype)
    val[17] = largest  # the largest id only in val.bin: the vocabulary spans both files
    data = _tokens(_write_tokens(tmp_path, train, val), seq_len=4, dtype=dtype)
    assert data.num_classes == largest + 1
    x, y = data.test.batch(torch.arange(len(data.test)))
    assert largest in y.flatten().tolist()
    # Windows overlap by one token: the first input, then every target, is the whole file.
    assert torch.equal(torch.cat([x[0, :1], y.flatten()]), torch.from_numpy(val.astype(np.int64)))
    corpus = data.corpus
    assert corpus is not None and set(corpus) == CORPUS_KEYS
    assert corpus["source"] == str(tmp_path) and corpus["files"] == 2
    assert corpus["digest"] == hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
    assert corpus["bytes"] == train.nbytes + val.nbytes
    assert (corpus["train_tokens"], corpus["val_tokens"], corpus["bytes_per_token"]) == (301, 41, None)
    assert corpus["unigram_entropy"] == pytest.approx(_entropy(train.tolist()), rel=1e-12)


def _bad_token_folder(folder: Path, case: str) -> None:
    """A ``data.name: tokens`` folder broken in the way ``case`` names."""
    enough, short = np.arange(100, dtype=np.uint16), np.arange(8, dtype=np.uint16)  # seq_len 8 needs 9
    if case == "a-file":
        folder.write_text("x")
    elif case == "empty-val":
        _write_tokens(folder, enough, np.zeros(0, np.uint16))
    elif case == "short-val":
        _write_tokens(folder, enough, short)
    elif case == "short-train":
        _write_tokens(folder, short, enough)
    elif case == "odd-size":
        _write_tokens(folder, enough, enough)
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\0")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-folder", "does not exist"),
        ("a-file", "is not a folder"),
        ("empty-val", "val.bin' holds 0 tokens, fewer than one window of model.gpt.seq_len + 1 = 9"),
        ("short-val", "val.bin' holds 8 tokens, fewer than one window of model.gpt.seq_len + 1 = 9"),
        ("short-train", "train.bin' holds 8 tokens, fewer than one window"),
        ("odd-size", "train.bin' is 201 bytes, not a whole number of 2-byte ids (data.tokens.dtype: uint16)"),
    ],
)
def test_bad_token_folders_end_with_one_line(tmp_path: Path, case: str, expected: str) -> None:
    folder = tmp_path / "tokens"
    _bad_token_folder(folder, case)
    with pytest.raises(UserError) as caught:
        _tokens(folder, seq_len=8)
    message = str(caught.value)
    assert message.startswith("data.path: ") and "\n" not in message and expected in message


def test_a_missing_val_file_is_named(tmp_path: Path) -> None:
    tmp_path.joinpath("train.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    with pytest.raises(UserError, match=r"^data\.path: .* has no val\.bin") as caught:
        _tokens(tmp_path, seq_len=8)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# data.name: text


def _text_folder(root: Path) -> bytes:
    """Files created out of order, in nested folders; returns their bytes in sorted path order."""
    files = {
        "b/z.txt": b"zeta " * 300,
        "a.txt": "alpha é\n".encode() * 200,
        "b/a.md": b"# beta\n" * 250,
        "b/c/empty.txt": b"",
        "c.txt": bytes(range(256)) * 4,
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return b"".join(files[name] for name in sorted(files))


def test_a_text_folder_is_read_in_sorted_order_and_its_tail_held_out(tmp_path: Path) -> None:
    expected = _text_folder(tmp_path)
    data = _text(tmp_path, seq_len=16, val_fraction=0.1)
    assert isinstance(data.train, TokenWindows) and isinstance(data.test, TokenWindows)
    held_out = round(len(expected) * 0.1)
    assert data.train.tokens.tobytes() == expected[:-held_out] and data.test.tokens.tobytes() == expected[-held_out:]
    assert data.num_classes == 256 and data.input_shape == (16,)
    corpus = data.corpus
    assert corpus is not None and set(corpus) == CORPUS_KEYS
    assert corpus == {
        **corpus,
        "source": str(tmp_path),
        "files": 5,
        "bytes": len(expected),
        "digest": hashlib.sha256(expected).hexdigest(),
        "train_tokens": len(expected) - held_out,
        "val_tokens": held_out,
        "bytes_per_token": 1,
    }
    assert corpus["unigram_entropy"] == pytest.approx(_entropy(expected[:-held_out]), rel=1e-12)


def test_max_bytes_cuts_the_text_where_it_reaches_the_limit(tmp_path: Path) -> None:
    expected = _text_folder(tmp_path)
    data = _text(tmp_path, seq_len=16, max_bytes=2000)
    corpus = data.corpus
    assert corpus is not None and corpus["bytes"] == 2000
    assert corpus["files"] == 2  # a.txt (1800 bytes) whole, and the first 200 of b/a.md
    assert corpus["digest"] == hashlib.sha256(expected[:2000]).hexdigest()
    single = tmp_path / "a.txt"
    assert _text(single, seq_len=16).corpus == {**_text(single, seq_len=16).corpus, "files": 1, "bytes": 1800}


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), (b"", "holds no text"), (b"x" * 100, "the validation text of")],
    ids=["missing", "empty", "too-short"],
)
def test_bad_texts_end_with_one_line(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        _text(path, seq_len=8)
    message = str(caught.value)
    assert message.startswith("data.path: ") and "\n" not in message and expected in message


def test_the_built_in_corpus_is_the_standard_librarys_source() -> None:
    first = _text(None, seq_len=64, max_bytes=200_000)
    again = _text(None, seq_len=64, max_bytes=200_000)
    corpus = first.corpus
    assert corpus is not None and again.corpus == corpus
    assert corpus["source"] == f"python-stdlib {platform.python_version()}"
    assert corpus["files"] > 0 and corpus["bytes"] == 200_000
    assert corpus["train_tokens"] + corpus["val_tokens"] == 200_000
    x, _ = first.train.batch(torch.arange(4))
    assert bytes(x[0].tolist()).isascii()  # Python source, not bytecode
    assert 2.0 < corpus["unigram_entropy"] < 5.0


# ---------------------------------------------------------------------------------------------
# hpc-localsgd tokens


def test_the_tokens_verb_writes_the_split_that_text_trains_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "text", tmp_path / "out"
    expected = _text_folder(source)
    assert main(["tokens", str(source), str(out), "--val-fraction", "0.1", "--max-bytes", "none"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and hashlib.sha256(expected).hexdigest() in line
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # no temporary file left
    assert np.fromfile(out / "train.bin", dtype="<u2").dtype == np.uint16

    text = _text(source, seq_len=16, val_fraction=0.1)
    tokens = _tokens(out, seq_len=16)
    for split in ("train", "test"):
        a, b = getattr(text, split), getattr(tokens, split)
        assert np.array_equal(a.tokens, b.tokens) and len(a) == len(b)
    batches = [list(ShardedBatches(d, 4, rank=1, size=2, seed=3).epoch(0)) for d in (text, tokens)]
    assert _batches_equal(*batches)

    before = (out / "train.bin").read_bytes()
    assert main(["tokens", str(source), str(out), "--max-bytes", "2000"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exist; pass --overwrite" in error
    assert (out / "train.bin").read_bytes() == before
    assert main(["tokens", str(source), str(out), "--max-bytes", "2000", "--overwrite"]) == 0
    assert len(np.fromfile(out / "train.bin", dtype="<u2")) == 1900


def test_the_tokens_verb_checks_its_flags_as_the_config_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokens", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "SOURCE: " in capsys.readouterr().err
    assert main(["tokens", "stdlib", str(tmp_path / "out"), "--val-fraction", "0.7"]) == 2
    assert "--val-fraction: must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
