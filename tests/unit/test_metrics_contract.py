"""The metrics-file contract (``io.metrics``): one "finished" rule for the report and the sweep, and a
report that reads metrics files without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_localsgd.io.metrics import (
    EVAL_FIELDS,
    GLOBAL_LEVEL,
    METRICS_FILE,
    TOTAL_STEPS_ATTR,
    MetricsWriter,
    level_fields,
    metrics_file_finished,
    run_finished,
)
from hpc_localsgd.report import collect
from hpc_localsgd.sweep import _finished as sweep_finished

REPO = Path(__file__).resolve().parents[2]
TOTAL = 40


@pytest.mark.parametrize(
    "eval_steps, finished",
    [
        ([10, 20, 30, 40], True),  # last evaluation exactly at total_steps
        ([20, 40, 60], True),  # past it: resumed with a larger train.max_steps
        ([10, 20, 30, 39], False),  # one step short
        ([], False),  # no evaluation yet
    ],
)
def test_finished_rule(eval_steps: list[int], finished: bool) -> None:
    assert run_finished(eval_steps, TOTAL) is finished
    assert run_finished(np.asarray(eval_steps, dtype=np.int64), TOTAL) is finished


def write_metrics(run_dir: Path, eval_steps: list[int], total_steps: int | None = TOTAL) -> Path:
    run_dir.mkdir(parents=True)
    attrs = {"config": "{}", "world": {"size": 2}}
    if total_steps is not None:
        attrs[TOTAL_STEPS_ATTR] = total_steps
    writer = MetricsWriter(run_dir / METRICS_FILE, attrs, flush_seconds=0)
    for step in eval_steps:
        fields = EVAL_FIELDS + level_fields([GLOBAL_LEVEL])  # a flat run: one level
        writer.log_eval(**{name: step if name == "step" else 0 for name in fields})
    writer.close()
    return run_dir / METRICS_FILE


@pytest.mark.parametrize("eval_steps", [[20, 40], [20, 41], [20, 39], []])
def test_report_and_sweep_agree_on_a_written_file(tmp_path: Path, eval_steps: list[int]) -> None:
    path = write_metrics(tmp_path / "run", eval_steps)
    expected = run_finished(eval_steps, TOTAL)
    assert metrics_file_finished(path) is expected
    assert sweep_finished(tmp_path / "run") is expected
    run = collect.read_run(path)
    assert run is not None and run.finished is expected


def test_a_file_without_a_plan_or_absent_is_not_finished(tmp_path: Path) -> None:
    assert not metrics_file_finished(write_metrics(tmp_path / "no-total", [40], total_steps=None))
    assert not metrics_file_finished(tmp_path / "missing" / METRICS_FILE)
    (tmp_path / "text.h5").write_text("not hdf5")
    assert not metrics_file_finished(tmp_path / "text.h5")


def test_the_written_file_carries_the_format_and_the_report_reads_its_fields(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run", [40])
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == collect.METRICS_FORMAT == "hpc-localsgd/metrics"
        assert set(f["evals"]) == set(EVAL_FIELDS + level_fields([GLOBAL_LEVEL]))
    assert set(collect._EVAL_FIELDS) <= set(EVAL_FIELDS)


def test_report_imports_no_torch() -> None:
    # The report runs where torch may be missing or slow to import (a login node, a laptop).
    code = (
        "import sys, hpc_localsgd.report, hpc_localsgd.report.collect, hpc_localsgd.io.metrics, "
        "hpc_localsgd.io.hdf5; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
