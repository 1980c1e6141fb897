"""metrics.h5's membership table (written at once, read back with its strings, resumed, absent from older
files), the line a membership change prints, ``inspect``'s account of it and the report's marks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_localsgd.io.inspect import describe, format_description
from hpc_localsgd.io.metrics import (
    MEMBERSHIP,
    MEMBERSHIP_DESCRIPTION,
    MEMBERSHIP_FIELDS,
    SYNCS,
    MetricsWriter,
    membership_line,
    read_membership,
    read_metrics,
)
from tests.unit.test_report import TOTAL_STEPS, write_run

LOST = {
    "step": 8,
    "workers_before": 4,
    "workers_after": 3,
    "left": 1,
    "joined": 0,
    "recovery_seconds": 3.14,
    "description": "worker 2 (rank 2) lost: connection closed",
}
JOINED = {
    "step": 16,
    "workers_before": 3,
    "workers_after": 4,
    "left": 0,
    "joined": 1,
    "recovery_seconds": 1.25,
    "description": "worker 2 (rank 5) joined from rank 0",
}


def add_membership(path: Path, rows: list[dict], after_step: int = TOTAL_STEPS) -> None:
    """Reopen a written run (as a resume at ``after_step`` does) and log these changes."""
    writer = MetricsWriter(path, {}, flush_seconds=3600, resume_after_step=after_step)
    for row in rows:
        writer.log_membership(**row)
    writer.close()


def test_a_new_file_has_an_empty_membership_table(tmp_path: Path) -> None:
    path = tmp_path / "metrics.h5"
    MetricsWriter(path, {"world": {"size": 4}}, flush_seconds=3600).close()
    with h5py.File(path, "r") as f:
        assert set(f[MEMBERSHIP]) == {*MEMBERSHIP_FIELDS, MEMBERSHIP_DESCRIPTION}
        assert h5py.check_string_dtype(f[MEMBERSHIP][MEMBERSHIP_DESCRIPTION].dtype).encoding == "utf-8"
    table = read_membership(path)
    assert table is not None and all(len(values) == 0 for values in table.values())


def test_a_change_is_on_disk_before_the_writer_flushes_or_closes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.h5"
    writer = MetricsWriter(path, {"world": {"size": 4}}, flush_seconds=3600)  # steps wait an hour
    writer.log_step(**{name: 1 for name in read_metrics(path)["steps"]})
    writer.log_membership(**LOST)
    # No close: a crash right after the change must leave its row (and the steps before it) in the file.
    table = read_membership(path)
    assert table is not None
    for name in MEMBERSHIP_FIELDS:
        assert table[name].tolist() == [LOST[name]], name
    assert table[MEMBERSHIP_DESCRIPTION].tolist() == [LOST["description"]]
    assert table["step"].dtype == np.int64 and table["left"].dtype == np.int64
    assert table["recovery_seconds"].dtype == np.float64
    assert read_metrics(path)["steps"]["step"].tolist() == [1]
    writer.close()


def test_descriptions_round_trip_as_str(tmp_path: Path) -> None:
    path = tmp_path / "metrics.h5"
    writer = MetricsWriter(path, {}, flush_seconds=3600)
    text = "worker 1 (rank 3) lost: connexion fermée — peer «gpu-07» gone"
    writer.log_membership(**{**LOST, "description": text})
    writer.log_membership(**JOINED)
    writer.close()
    for table in (read_membership(path), read_metrics(path)[MEMBERSHIP]):
        assert table is not None
        assert table[MEMBERSHIP_DESCRIPTION].tolist() == [text, JOINED["description"]]
        assert all(type(value) is str for value in table[MEMBERSHIP_DESCRIPTION])


def test_a_resume_drops_the_changes_after_its_step(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "local_sgd", 4, 4, 0)
    path = tmp_path / "run" / "metrics.h5"
    add_membership(path, [LOST, JOINED])
    MetricsWriter(path, {}, flush_seconds=0, resume_after_step=12).close()  # checkpoint of step 12
    table = read_membership(path)
    assert table is not None and table["step"].tolist() == [8]
    assert table[MEMBERSHIP_DESCRIPTION].tolist() == [LOST["description"]]
    assert read_metrics(path)["evals"]["step"].tolist() == [10]


def test_older_files_have_none_and_gain_the_table_on_resume(tmp_path: Path) -> None:
    write_run(tmp_path / "old", "local_sgd", 4, 4, 0)
    path = tmp_path / "old" / "metrics.h5"
    with h5py.File(path, "a") as f:
        del f[MEMBERSHIP], f[SYNCS]  # as written before either table existed
    assert read_membership(path) is None and MEMBERSHIP not in read_metrics(path)
    add_membership(path, [JOINED], after_step=20)  # resumed by this version: the tables start here
    table = read_membership(path)
    assert table is not None and table["step"].tolist() == [16]
    assert read_metrics(path)[SYNCS]["step"].tolist() == []


def test_the_line_for_a_lost_and_a_joined_worker() -> None:
    assert (
        membership_line(8, 4, 3, 3.14, "worker 2 (rank 2) lost: connection closed")
        == "hpc-localsgd: step 8: worker 2 (rank 2) lost: connection closed; 3 of 4 workers go on (recovered in 3.1 s)"
    )
    assert (
        membership_line(16, 3, 4, 1.25, "worker 2 (rank 5) joined from rank 0")
        == "hpc-localsgd: step 16: worker 2 (rank 5) joined from rank 0; 4 workers go on, up from 3"
        " (recovered in 1.2 s)"
    )


def test_the_line_for_the_last_worker_a_replacement_and_no_recovery_time() -> None:
    assert membership_line(4, 2, 1, 0.5, "worker 1 (rank 1) lost: timed out").endswith(
        "; 1 of 2 workers goes on (recovered in 0.5 s)"
    )
    assert membership_line(30, 4, 4, 2.0, "worker 3 (rank 3) replaced by rank 7").endswith(
        ": worker 3 (rank 3) replaced by rank 7; 4 workers go on (recovered in 2.0 s)"
    )
    assert membership_line(30, 2, 3, math.nan, "worker 3 (rank 3) joined") == (
        "hpc-localsgd: step 30: worker 3 (rank 3) joined; 3 workers go on, up from 2"
    )


@pytest.mark.parametrize("row", [LOST, JOINED])
def test_the_line_holds_the_logged_row(row: dict) -> None:
    line = membership_line(
        row["step"], row["workers_before"], row["workers_after"], row["recovery_seconds"], row["description"]
    )
    assert "\n" not in line and f"step {row['step']}: {row['description']};" in line


def test_inspect_lists_the_changes(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "local_sgd", 4, 4, 0)
    path = tmp_path / "run" / "metrics.h5"
    quiet = describe(path)
    assert quiet["membership_changes"] == [] and "  membership_changes: none" in format_description(quiet)
    add_membership(path, [LOST, JOINED])
    description = describe(path)
    assert description["membership_changes"] == [
        "step 8: worker 2 (rank 2) lost: connection closed; 3 of 4 workers go on (recovered in 3.1 s)",
        "step 16: worker 2 (rank 5) joined from rank 0; 4 workers go on, up from 3 (recovered in 1.2 s)",
    ]
    json.dumps(description)  # the --json form
    text = format_description(description).splitlines()
    start = text.index("  membership_changes: 2")
    assert text[start + 1 : start + 3] == [f"    {change}" for change in description["membership_changes"]]
    with h5py.File(path, "a") as f:
        del f[MEMBERSHIP]  # a file written before changes were recorded says nothing of them
    assert "membership_changes" not in describe(path)
