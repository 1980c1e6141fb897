"""metrics.h5's per-sync table (written, read back, resumed, absent from older files) and the
report's drift figure on small generated metrics files with known values."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_localsgd.io.metrics import SYNC_FIELDS, SYNCS, MetricsWriter, read_metrics, read_syncs
from hpc_localsgd.report import collect, plan_outputs
from hpc_localsgd.report.drift import drift_figures, mean_drift, read_drift
from tests.unit.test_report import TOTAL_STEPS, write_run


def sync_rows(sync_period: int, seed: int, outer: bool) -> list[dict[str, float]]:
    """Known values: consensus distance 1e-3·H·(step/H) + seed·1e-4, ‖Δ‖ = step/10 with an outer optimizer,
    cosine 0.5 from the second outer step on."""
    rows = []
    for index, step in enumerate(range(sync_period, TOTAL_STEPS + 1, sync_period)):
        rows.append(
            {
                "step": step,
                "consensus_distance": 1e-3 * step + seed * 1e-4,
                "model_norm": 10.0,
                "outer_update_norm": step / 10 if outer else math.nan,
                "outer_update_cosine": (0.5 if index else math.nan) if outer else math.nan,
                "outer_step": int(outer),
            }
        )
    return rows


def add_syncs(path: Path, rows: list[dict[str, float]]) -> None:
    writer = MetricsWriter(path, {}, flush_seconds=0, resume_after_step=TOTAL_STEPS)
    for row in rows:
        writer.log_sync(**row)
    writer.close()


def test_sync_rows_are_written_and_read_back(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "local_sgd", 4, 2, 0, "slowmo")
    path = tmp_path / "run" / "metrics.h5"
    rows = sync_rows(4, 0, outer=True)
    add_syncs(path, rows)
    table = read_metrics(path)[SYNCS]
    assert set(table) == set(SYNC_FIELDS) and read_syncs(path) is not None
    assert table["step"].dtype == np.int64 and table["outer_step"].dtype == np.int64
    for name in SYNC_FIELDS:
        np.testing.assert_array_equal(table[name], [row[name] for row in rows], err_msg=name)
    assert math.isnan(table["outer_update_cosine"][0]) and table["outer_update_cosine"][1] == 0.5
    # A resume drops the rows logged after the checkpoint's step, as it does for steps and evaluations.
    MetricsWriter(path, {}, flush_seconds=0, resume_after_step=20).close()
    assert list(read_metrics(path)[SYNCS]["step"]) == [4, 8, 12, 16, 20]


def test_older_files_without_the_table_still_read_and_gain_it_on_resume(tmp_path: Path) -> None:
    write_run(tmp_path / "old", "local_sgd", 4, 2, 0)
    path = tmp_path / "old" / "metrics.h5"
    with h5py.File(path, "a") as f:
        del f[SYNCS]  # as written before the table existed
    assert SYNCS not in read_metrics(path) and read_syncs(path) is None
    run = collect.read_run(path)
    assert run is not None and run.finished and read_drift(run) is None
    assert drift_figures([run], tmp_path, lambda task: "") == []
    add_syncs(path, sync_rows(4, 0, outer=False)[:2])  # resumed by this version: the table starts here
    assert list(read_syncs(path)["step"]) == [4, 8]  # type: ignore[index]


def test_mean_over_seeds_skips_missing_outer_steps() -> None:
    tables = []
    for seed in (0, 1):
        rows = sync_rows(8, seed, outer=True)
        tables.append({name: np.array([row[name] for row in rows], dtype=float) for name in SYNC_FIELDS})
    tables[1] = {name: values[:3] for name, values in tables[1].items()}  # seed 1 still going: 3 syncs
    curve = mean_drift("SlowMo", 8, tables)
    assert list(curve.step) == [8, 16, 24, 32, 40]
    expected = [1e-3 * s + 0.5e-4 for s in (8, 16, 24)] + [1e-3 * s for s in (32, 40)]
    np.testing.assert_allclose(curve.values["consensus_distance"], expected, rtol=1e-12)
    np.testing.assert_allclose(curve.values["outer_update_norm"], [0.8, 1.6, 2.4, 3.2, 4.0], rtol=1e-12)
    assert math.isnan(curve.values["outer_update_cosine"][0])
    np.testing.assert_array_equal(curve.values["outer_update_cosine"][1:], 0.5)


@pytest.fixture
def drift_sweep(tmp_path: Path) -> Path:
    """SlowMo and local SGD at H in {2, 8}, 2 seeds, 4 workers; all-reduce (no syncs table rows); and
    local SGD at 2 workers from before the table existed."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(root / f"ar-s{seed}", "allreduce", 1, 4, seed)
        for outer in ("none", "slowmo"):
            for h in (2, 8):
                write_run(root / f"{outer}-h{h}-s{seed}", "local_sgd", h, 4, seed, outer)
                add_syncs(root / f"{outer}-h{h}-s{seed}" / "metrics.h5", sync_rows(h, seed, outer == "slowmo"))
        write_run(root / f"old-s{seed}", "local_sgd", 4, 2, seed)
        with h5py.File(root / f"old-s{seed}" / "metrics.h5", "a") as f:
            del f[SYNCS]
    return root


def test_report_draws_the_drift_figure_per_worker_count(drift_sweep: Path, tmp_path: Path) -> None:
    runs = collect.collect_runs([drift_sweep], warn=lambda line: None)
    out = tmp_path / "report"
    # The report verb plans the figure beside its others (writing them all would take a while here).
    names = {file.name for output in plan_outputs(runs, out) for file in output.files}
    assert {"drift-W4.png", "drift-W4.svg", "curves-W2.png"} <= names and not any("drift-W2" in n for n in names)
    planned = drift_figures(runs, out, lambda task: "")
    assert [[f.name for f in files] for files, _ in planned] == [["drift-W4.png", "drift-W4.svg"]]
    out.mkdir()
    planned[0][1]()
    svg = (tmp_path / "report" / "drift-W4.svg").read_text()
    for label in ("local SGD, H=2", "local SGD, H=8", "SlowMo, H=2", "SlowMo, H=8", "cos(Δ, previous Δ)"):
        assert label in svg, label
    assert "all-reduce" not in svg  # no model averages, no drift
    assert (tmp_path / "report" / "drift-W4.png").stat().st_size > 10_000
