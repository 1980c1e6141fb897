"""Failed writes on a small tmpfs (issue 15): a metrics append on a full disk loses no row; a checkpoint
whose HDF5 write runs out of space midway leaves no temporary file and the previous checkpoint and
``latest`` intact; a damaged metrics.h5 is set aside on resume, never over an existing file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hpc_localsgd.io.checkpoint as checkpoint_module
import hpc_localsgd.io.metrics as metrics_module
from hpc_localsgd.comm.single import SingleCommunicator
from hpc_localsgd.errors import WriteFailed
from hpc_localsgd.io.checkpoint import LATEST, Checkpoint, CheckpointWriteError, CheckpointWriter, RankState
from hpc_localsgd.io.metrics import METRICS_FILE, MetricsWriter, read_metrics
from tests.failures import fill_disk, mounted_tmpfs

ATTRS = {"config": "{}", "total_steps": 100}


def _row(step: int) -> dict[str, float]:
    return {
        "step": step,
        "epoch": step / 10,
        "lr": 0.1,
        "loss": 1.0 / step,
        "accuracy": 0.5,
        "samples_per_s": 1.0,
        "comm_seconds": 0.0,
        "compute_seconds": 0.1,
        "bytes_sent": 8 * step,
        "sync_rounds": step,
        "synced": 1,
        "global_bytes_sent": 8 * step,
        "global_sync_rounds": step,
    }


def test_metrics_append_on_a_full_disk_keeps_every_row(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", size_kb=2048) as disk:
        writer = MetricsWriter(disk / METRICS_FILE, ATTRS, flush_seconds=3600)
        for step in range(1, 6):
            writer.log_step(**_row(step))
        writer.flush()
        filler = fill_disk(disk)
        for step in range(6, 9):
            writer.log_step(**_row(step))
        with pytest.raises(WriteFailed) as failed:
            writer.flush()
        message = str(failed.value)
        assert "\n" not in message and "No space left on device" in message
        assert message.endswith("the rows up to step 5 are kept"), message
        assert failed.value.exit_code == 4
        assert read_metrics(disk / METRICS_FILE)["steps"]["step"].tolist() == [1, 2, 3, 4, 5]
        # Space again: the rows that failed were kept pending, and nothing is lost.
        filler.unlink()
        writer.close()
        assert read_metrics(disk / METRICS_FILE)["steps"]["step"].tolist() == list(range(1, 9))


def test_metrics_failure_deferred_for_the_ranks_to_agree(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", size_kb=2048) as disk:
        writer = MetricsWriter(disk / METRICS_FILE, ATTRS, flush_seconds=0, defer_failures=True)
        writer.log_step(**_row(1))
        fill_disk(disk)
        writer.log_step(**_row(2))  # flushes at once: the failure is kept, not raised
        assert writer.failure is not None and "rows up to step 1 are kept" in writer.failure
        with pytest.raises(WriteFailed):
            writer.close()  # the end of the run says it whatever
        assert read_metrics(disk / METRICS_FILE)["steps"]["step"].tolist() == [1]


def _state(value: float) -> RankState:
    return RankState(
        tensors={"flat0.params": torch.full((20_000,), value)},
        int_buffers={},
        comm_stats={"bytes_sent": 0},
        train_loss_sum=0.0,
        train_loss_count=0,
    )


def test_checkpoint_that_runs_out_of_space_midway_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mounted_tmpfs(tmp_path / "disk", size_kb=2048) as disk:
        directory = disk / "checkpoints"
        writer = CheckpointWriter(directory, SingleCommunicator(), keep=3)
        first = writer.write(1, 0.1, {"config": "{}"}, {}, _state(1.0))
        before = first.read_bytes()
        # The free-space check off: HDF5 itself hits ENOSPC in the middle of the file.
        monkeypatch.setattr(checkpoint_module, "check_free_space", lambda *_args: None)
        filler = fill_disk(disk)
        filler.write_bytes(b"\0" * (filler.stat().st_size - 40_000))  # room for a part of the next one
        with pytest.raises(CheckpointWriteError) as failed:
            writer.write(2, 0.2, {"config": "{}"}, {}, _state(2.0))
        message = str(failed.value)
        assert "\n" not in message and failed.value.exit_code == 4
        assert message.startswith("the checkpoint of step 2 could not be written (")
        assert message.endswith(f"'{directory / LATEST}' still names step-000000001.h5"), message
        assert sorted(p.name for p in directory.iterdir()) == [LATEST, "step-000000001.h5"]
        assert first.read_bytes() == before
        Checkpoint(first).verify()


def test_damaged_metrics_file_is_set_aside_never_over_an_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text("not HDF5 at all\n")
    stamp = "20261126T120000Z"
    monkeypatch.setattr(metrics_module.time, "strftime", lambda *_args: stamp)
    (tmp_path / f"{METRICS_FILE}.damaged-{stamp}").write_text("an earlier damaged file\n")
    writer = MetricsWriter(path, ATTRS, flush_seconds=0, resume_after_step=40)
    assert writer.set_aside is not None
    moved, reason = writer.set_aside
    assert moved == tmp_path / f"{METRICS_FILE}.damaged-{stamp}.1" and moved.read_text() == "not HDF5 at all\n"
    assert (tmp_path / f"{METRICS_FILE}.damaged-{stamp}").read_text() == "an earlier damaged file\n"
    assert reason and "\n" not in reason
    writer.log_step(**_row(41))
    writer.close()
    assert read_metrics(path)["steps"]["step"].tolist() == [41]
