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

import pytest

from hpc_localsgd.errors import UserError
from hpc_localsgd.report import write_report
from hpc_localsgd.report.collect import collect_runs
from hpc_localsgd.report.tradeoff import DEFAULT_TIMING, load_timing, projected_seconds, tradeoff_rows
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
