"""The report's speed–accuracy trade-off on metrics files with known counters: projected times,
the Pareto front and time to target, each computed by hand from the α–β ring model.

Runs from :func:`tests.unit.test_report.write_run`: 40 steps, evaluations at 10, 20, 30, 40, a
sync every H steps (every step for all-reduce) of 1000 bytes, accuracy climbing linearly to
0.95 (all-reduce), 0.93 (local SGD), 0.945 (post-local SGD) − 0.01·log2(H) − 0.005·workers.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_localsgd.errors import UserError
from hpc_localsgd.report import write_report
from hpc_localsgd.report.collect import collect_runs, summed_step_times
from hpc_localsgd.report.tradeoff import (
    DEFAULT_TIMING,
    load_timing,
    measured_rows,
    projected_seconds,
    tradeoff_rows,
)
from tests.unit.test_report import REPO, write_run

# compute 10 ms per step; α = 1 ms, β = 1 MB/s: round numbers for the hand computations below.
BENCH = {
    "projection": {
        "compute_seconds_per_step": 0.01,
        "compute_source": "test",
        "interconnects": [{"name": "slow", "alpha_seconds": 1e-3, "beta_bytes_per_second": 1e6}],
    }
}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """4 workers: all-reduce, local SGD H=2 and H=8, post-local SGD H=8 (same traffic as local H=8)."""
    root = tmp_path / "runs"
    write_run(root / "ar", "allreduce", 1, 4, 0)
    write_run(root / "h2", "local_sgd", 2, 4, 0)
    write_run(root / "h8", "local_sgd", 8, 4, 0)
    write_run(root / "post8", "post_local_sgd", 8, 4, 0)
    return root


@pytest.fixture
def bench_json(tmp_path: Path) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCH))
    return path


def test_projected_times_pareto_front_and_time_to_target(runs_dir: Path, bench_json: Path) -> None:
    rows = {
        (r.key.method, r.key.sync_period): r
        for r in tradeoff_rows(collect_runs([runs_dir]), load_timing(bench_json), 0.7)
    }
    # P = 4: a round costs 2·3·α = 6 ms of latency; a byte 2·3/4 / β = 1.5 µs.
    # all-reduce: 40 steps · 10 ms + 40 rounds · 6 ms + 40,000 B · 1.5 µs = 0.4 + 0.24 + 0.06
    assert rows["all-reduce", 1].seconds == pytest.approx(0.70)
    assert rows["all-reduce", 1].comm_seconds == pytest.approx(0.30)
    assert rows["local SGD", 2].seconds == pytest.approx(0.4 + 20 * 0.006 + 20_000 * 1.5e-6)  # 0.55
    assert rows["local SGD", 8].seconds == pytest.approx(0.4 + 5 * 0.006 + 5_000 * 1.5e-6)  # 0.4375
    assert rows["post-local SGD", 8].seconds == pytest.approx(0.4375)
    accuracy = {key: row.accuracy_mean for key, row in rows.items()}
    assert accuracy == pytest.approx(
        {("all-reduce", 1): 0.93, ("local SGD", 2): 0.90, ("local SGD", 8): 0.88, ("post-local SGD", 8): 0.895}
    )
    # Post-local SGD H=8 is as fast as local SGD H=8 and more accurate: the only point off the front.
    assert {key for key, row in rows.items() if not row.pareto} == {("local SGD", 8)}
    # Target 0.7 × 0.93 = 0.651: all-reduce reaches 0.6975 at step 30 (30 rounds, 30,000 B),
    # local SGD H=2 0.675 at step 30 (15 rounds), H=8 0.66 at step 30 (3 rounds).
    ar, h2, h8 = rows["all-reduce", 1], rows["local SGD", 2], rows["local SGD", 8]
    assert ar.target_accuracy == pytest.approx(0.651)
    assert (ar.reached, ar.steps_to_target, ar.bytes_to_target) == (1, 30, 30_000)
    assert ar.seconds_to_target == pytest.approx(0.3 + 30 * 0.006 + 30_000 * 1.5e-6)
    assert h2.seconds_to_target == pytest.approx(0.3 + 15 * 0.006 + 15_000 * 1.5e-6)
    assert (h8.steps_to_target, h8.bytes_to_target) == (30, 3000)
    assert h8.seconds_to_target == pytest.approx(0.3 + 3 * 0.006 + 3000 * 1.5e-6)


def test_defaults_are_stated_and_a_target_out_of_reach_is_not_invented(runs_dir: Path) -> None:
    rows = tradeoff_rows(collect_runs([runs_dir]), DEFAULT_TIMING, target=1.01)
    ethernet = next(r for r in rows if r.key.method == "all-reduce" and r.interconnect.startswith("10 Gb/s"))
    # 40 · 10 ms + 40 · 2·3 · 30 µs + 2·3/4 · 40,000 B / 1.25 GB/s
    assert ethernet.seconds == pytest.approx(0.4 + 40 * 6 * 30e-6 + 1.5 * 40_000 / 1.25e9)
    assert {r.interconnect for r in rows} == {"10 Gb/s Ethernet (TCP)", "100 Gb/s InfiniBand EDR"}
    assert all(r.reached == 0 and r.seconds_to_target is None for r in rows)
    assert "compute 10 ms/step" in DEFAULT_TIMING.describe() and "defaults (assumed)" in DEFAULT_TIMING.describe()


def test_no_rounds_costs_compute_only_and_one_worker_no_network() -> None:
    link = DEFAULT_TIMING.interconnects[0]
    assert projected_seconds(100, 0, 0, 8, link, 0.02) == pytest.approx(2.0)
    assert projected_seconds(100, 100, 1e6, 1, link, 0.02) == pytest.approx(2.0)


def test_report_writes_the_tradeoff_table_and_figure(runs_dir: Path, bench_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = write_report([runs_dir], out, say=None, timing=bench_json, target=0.7)
    assert {p.name for p in written} >= {"tradeoff.csv", "tradeoff.md", "tradeoff.png", "tradeoff.svg"}
    rows = {(r["method"], r["H"]): r for r in csv.DictReader((out / "tradeoff.csv").open())}
    assert float(rows["all-reduce", "1"]["projected_seconds"]) == pytest.approx(0.70)
    assert rows["local SGD", "8"]["pareto"] == "0" and rows["local SGD", "2"]["pareto"] == "1"
    assert rows["local SGD", "8"]["steps_to_target"] == "30.0"
    md = (out / "tradeoff.md").read_text()
    assert "projected: compute 10 ms/step" in md and "## digits/smallcnn — slow" in md
    assert "| all-reduce | 1 | 4 | 93.00 ± – | 0.7 s | 0.3 s | yes | 1/1 | 30 | 30.0 KB | 0.5 s |" in md
    # Without --tradeoff or --timing the report is as it was.
    plain = write_report([runs_dir], tmp_path / "plain", say=None)
    assert not any(p.name.startswith("tradeoff") for p in plain)


def test_bad_timing_file_is_one_line(runs_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "not.json").write_text("{")
    with pytest.raises(UserError, match=r"^--timing: '.*not\.json' is not JSON"):
        write_report([runs_dir], tmp_path / "r", say=None, timing=tmp_path / "not.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="has no projection section"):
        write_report([runs_dir], tmp_path / "r", say=None, timing=tmp_path / "other.json")
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "report", str(runs_dir), "--tradeoff", "--target", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "hpc-localsgd: error: --target: must be a fraction > 0 of all-reduce's final accuracy, got 0.0"
    ]


# --- runs measured on an emulated link, beside their projection -----------------------------------
# "8mbit": β = 1 MB/s, α = 30 µs. Every step computes 10 ms; every sync blocks 20 ms.
COMPUTE, BLOCKED = 0.01, 0.02


@pytest.fixture
def measured_dir(tmp_path: Path) -> Path:
    root = tmp_path / "measured"
    write_run(root / "ar", "allreduce", 1, 4, 0, emulated_link="8mbit", step_times=(COMPUTE, BLOCKED))
    write_run(root / "h8", "local_sgd", 8, 4, 0, emulated_link="8mbit", step_times=(COMPUTE, BLOCKED))
    return root


def test_measured_runs_sit_beside_their_projection_with_their_own_compute(measured_dir: Path) -> None:
    rows = {(r.key.method, r.key.sync_period): r for r in measured_rows(collect_runs([measured_dir]))}
    ar, h8 = rows["all-reduce", 1], rows["local SGD", 8]
    assert ar.link.name == "emulated 8mbit" and ar.link.beta_bytes_per_second == 1e6
    # Measured: 40 steps · 10 ms + rounds · 20 ms (40 rounds; 5 at H=8).
    assert ar.measured_seconds == pytest.approx(0.4 + 40 * 0.02)
    assert ar.measured_comm_seconds == pytest.approx(0.8)
    assert h8.measured_seconds == pytest.approx(0.4 + 5 * 0.02)
    assert ar.compute_seconds_per_step == pytest.approx(0.01)
    # Projected with the run's own compute: 40 · 10 ms + rounds · 2·3·30 µs + 2·3/4 · bytes / 1 MB/s.
    assert ar.projected_seconds == pytest.approx(0.4 + 40 * 180e-6 + 1.5 * 40_000 / 1e6)  # 0.4672
    assert ar.projected_comm_seconds == pytest.approx(40 * 180e-6 + 1.5 * 40_000 / 1e6)
    assert h8.projected_seconds == pytest.approx(0.4 + 5 * 180e-6 + 1.5 * 5_000 / 1e6)  # 0.4084
    assert ar.ratio == pytest.approx(1.2 / 0.4672)
    assert ar.accuracy_mean == pytest.approx(0.93) and h8.accuracy_mean == pytest.approx(0.88)


def test_report_measured_adds_its_table_and_a_panel_beside_the_projection(
    runs_dir: Path, measured_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    written = write_report([runs_dir], out, say=None, measured=[measured_dir], target=0.7)  # implies the trade-off
    assert {p.name for p in written} >= {
        "tradeoff.csv",
        "tradeoff-measured.csv",
        "tradeoff-measured.md",
        "tradeoff.svg",
    }
    rows = {(r["method"], r["H"]): r for r in csv.DictReader((out / "tradeoff-measured.csv").open())}
    assert set(rows) == {("all-reduce", "1"), ("local SGD", "8")}
    assert rows["all-reduce", "1"]["link"] == "emulated 8mbit"
    assert float(rows["all-reduce", "1"]["measured_seconds"]) == pytest.approx(1.2)
    assert float(rows["local SGD", "8"]["projected_seconds"]) == pytest.approx(0.4084)
    md = (out / "tradeoff-measured.md").read_text()
    assert "## digits/smallcnn — emulated 8mbit (α = 30 µs, β = 1 MB/s)" in md
    assert "| all-reduce | 1 | 4 | 93.00 ± – | 10.0 ms | 1.2 s | 0.8 s | 0.5 s | 0.1 s | 2.57 |" in md
    svg = (out / "tradeoff.svg").read_text()
    assert "emulated 8mbit: measured (open) and projected (filled)" in svg
    assert "10 Gb/s Ethernet (TCP) (projected)" in svg  # the projected panels are still there
    # The measured runs stay out of the other tables.
    assert {r["method"] for r in csv.DictReader((out / "results.csv").open())} == {
        "all-reduce",
        "local SGD",
        "post-local SGD",
    }
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4


def test_a_run_not_measured_on_a_link_or_without_its_step_times_is_refused(runs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--measured: '.*metrics\.h5' did not run on an emulated link"):
        write_report([runs_dir], tmp_path / "r", say=None, measured=[runs_dir / "ar"])
    write_run(tmp_path / "no-steps", "allreduce", 1, 4, 0, emulated_link="8mbit")
    with pytest.raises(UserError, match="has no step time for every step up to its last evaluation"):
        write_report([runs_dir], tmp_path / "r", say=None, measured=[tmp_path / "no-steps"])
    assert not (tmp_path / "r").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "report", str(runs_dir), "--measured", str(runs_dir / "h2")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "did not run on an emulated link" in proc.stderr


def test_step_times_are_summed_up_to_each_evaluation_and_unknown_past_a_gap() -> None:
    steps = {
        "step": np.array([1, 2, 3, 4, 6]),  # step 5 missing
        "compute_seconds": np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
        "comm_seconds": np.array([0.0, 0.5, 0.0, 0.5, 0.0]),
    }
    total, compute = summed_step_times(np.array([2, 4, 6]), steps)
    assert list(total[:2]) == [2.5, 5.0] and list(compute[:2]) == [2.0, 4.0]
    assert np.isnan(total[2]) and np.isnan(compute[2])
    late = {name: values[1:] for name, values in steps.items()}  # a file restarted after step 1
    assert np.isnan(summed_step_times(np.array([4]), late)[0]).all()
    assert np.isnan(summed_step_times(np.array([1]), {})[0]).all()
