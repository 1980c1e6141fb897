"""metrics.h5's membership table (written at once, read back with its strings, resumed, absent from older
files), the line a membership change prints, ``inspect``'s account of it and the report's marks."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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
from hpc_localsgd.report import collect, plan_outputs
from hpc_localsgd.report.plots import (
    LANGUAGE_CURVE_AXES,
    MEMBERSHIP_GID,
    MembershipMark,
    _curve_styles,
    membership_marks,
    plot_curves,
)
from hpc_localsgd.report.table import group_runs, markdown, summarise
from tests.unit.test_report import TOTAL_STEPS, write_run
from tests.unit.test_report_language import write_lm_run

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
    assert membership_line(12, 3, 2, 0.31, "worker 1 (rank 1) lost:\nTraceback ...\n  RuntimeError: gone\n") == (
        "hpc-localsgd: step 12: worker 1 (rank 1) lost: Traceback ... RuntimeError: gone; 2 of 3 workers go on"
        " (recovered in 0.3 s)"
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


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    """local SGD at H=4 and H=8 on 4 workers, one seed each: the H=4 run lost a worker at step 8 and got
    one back at step 16; the H=8 run's workers never changed."""
    root = tmp_path / "runs"
    write_run(root / "h4", "local_sgd", 4, 4, 0)
    add_membership(root / "h4" / "metrics.h5", [LOST, JOINED])
    write_run(root / "h8", "local_sgd", 8, 4, 0)
    return root


def membership_artists(figure: Figure) -> list[Line2D]:
    return [line for ax in figure.axes for line in ax.lines if (line.get_gid() or "").startswith(MEMBERSHIP_GID)]


def legend_labels(figure: Figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_marks_fall_where_the_run_was_at_each_change(two_runs: Path) -> None:
    changed, unchanged = (collect.read_run(two_runs / name / "metrics.h5") for name in ("h4", "h8"))
    assert changed is not None and unchanged is not None
    assert changed.membership_changes == 2 and unchanged.membership_changes == 0
    assert changed.membership is not None and list(changed.membership.description) == [
        LOST["description"],
        JOINED["description"],
    ]
    kinds = ["lost", "joined"]
    # write_run: wall time 0.5 s per step; H=4 has sent 2 rounds of 1000 B by its evaluation at step 10 and
    # 5 by step 20; costs are interpolated from zero at step 0: step 8 = 0.8 of step 10, step 16 = 10 + 0.6·10.
    expected = {"step": [8, 16], "wall_seconds": [4.0, 8.0], "sync_rounds": [1.6, 3.8], "bytes_sent": [1600, 3800]}
    for x_name, xs in expected.items():
        marks = membership_marks(changed, x_name)
        assert [mark.kind for mark in marks] == kinds
        np.testing.assert_allclose([mark.x for mark in marks], xs, rtol=1e-12, err_msg=x_name)
        assert membership_marks(unchanged, x_name) == []
    assert membership_marks(changed, "tokens") == []  # a classifier trains on no tokens


def test_a_change_after_the_last_evaluation_is_marked_on_the_step_axis_only(tmp_path: Path) -> None:
    write_run(tmp_path / "going", "local_sgd", 4, 4, 0, evals=(10, 20))
    add_membership(tmp_path / "going" / "metrics.h5", [{**LOST, "step": 24}], after_step=24)
    run = collect.read_run(tmp_path / "going" / "metrics.h5")
    assert run is not None
    assert membership_marks(run, "step") == [MembershipMark(24.0, "lost")]
    assert membership_marks(run, "wall_seconds") == []


def test_the_report_marks_the_run_whose_workers_changed(two_runs: Path, tmp_path: Path) -> None:
    runs = collect.collect_runs([two_runs])
    out = tmp_path / "report"
    out.mkdir()
    # The report's own plan, its table and curves written (the other figure would only take time here).
    plan = {output.files[0].name: output for output in plan_outputs(runs, out)}
    for name in ("results.csv", "results.md"):
        plan[name].write()
    figure = plan["curves-W4.png"].write()
    assert [path.name for path in plan["curves-W4.png"].files] == ["curves-W4.png", "curves-W4.svg"]
    assert all(path.stat().st_size > 0 for path in plan["curves-W4.png"].files)
    artists = membership_artists(figure)
    # 2 changes × 4 columns × 2 rows, a line and a marker each, in the color of the H=4 run's line only.
    assert len(artists) == 32 and len({line.get_gid() for line in artists}) == 32
    groups = group_runs(runs)
    color = {key.sync_period: style[0] for key, style in _curve_styles(groups).items()}[4]
    assert all(line.get_color() == color for line in artists)
    assert sorted({line.get_marker() for line in artists} - {"None"}) == ["^", "v"]
    assert legend_labels(figure).count("worker lost") == 1 and legend_labels(figure).count("worker joined") == 1
    assert "worker replaced" not in legend_labels(figure)
    svg = (out / "curves-W4.svg").read_text()
    assert svg.count(f'id="{MEMBERSHIP_GID}-') == 32 and "worker lost" in svg
    # The table's row of the run that changed says so; the other's has nothing to note.
    md = (out / "results.md").read_text()
    assert "| local SGD | 4 | 4 | 1 |" in md and md.splitlines()[-2].endswith("| 2 membership changes |")
    assert md.splitlines()[-1].startswith("| local SGD | 8 |") and md.splitlines()[-1].endswith("| – |")
    rows = {row["H"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert (rows["4"]["membership_changes"], rows["8"]["membership_changes"]) == ("2", "0")


def drawing(figure: Figure) -> list[object]:
    """What a figure shows, artist by artist: every line's points and style, every legend's words."""
    lines = [
        (line.get_xydata().tolist(), line.get_color(), line.get_linestyle(), line.get_marker())
        for ax in figure.axes
        for line in ax.lines
    ]
    return [lines, legend_labels(figure), [ax.get_xscale() for ax in figure.axes]]


def test_runs_whose_workers_never_changed_draw_as_before(two_runs: Path) -> None:
    run = collect.read_run(two_runs / "h8" / "metrics.h5")
    assert run is not None and run.membership is not None and len(run.membership) == 0
    old = replace(run, membership=None)  # as read from a file written before changes were recorded
    figures = [plot_curves(group_runs([each]), [], "curves") for each in (run, old)]
    assert membership_artists(figures[0]) == [] and not any("worker" in label for label in legend_labels(figures[0]))
    assert drawing(figures[0]) == drawing(figures[1])
    md = markdown(summarise([run, old]))
    assert "notes" not in md and "membership" not in md


def test_language_curves_mark_changes_on_every_axis_tokens_too(tmp_path: Path) -> None:
    write_lm_run(tmp_path / "lm", "local_sgd", 4, 4, 0, final_loss=1.5)
    add_membership(tmp_path / "lm" / "metrics.h5", [{**LOST, "workers_after": 4, "joined": 1}])
    run = collect.read_run(tmp_path / "lm" / "metrics.h5")
    assert run is not None and run.tokens_per_step is not None
    assert membership_marks(run, "tokens") == [MembershipMark(8.0 * run.tokens_per_step, "replaced")]
    figure = plot_curves(group_runs([run]), [], "curves")  # drawn, not saved
    assert len(membership_artists(figure)) == 1 * len(LANGUAGE_CURVE_AXES) * 2 * 2
    assert legend_labels(figure).count("worker replaced") == 1
