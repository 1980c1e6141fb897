"""A diverged run as metrics.h5, the report and the sweep see it (issue 15): one contract, three readers."""

from __future__ import annotations

from pathlib import Path

from hpc_localsgd.io.metrics import METRICS_FILE, MetricsWriter, metrics_file_status
from hpc_localsgd.report.collect import read_run
from hpc_localsgd.sweep import _finished as sweep_finished
from hpc_localsgd.sweep import _status as sweep_status

ATTRS = {"config": "algorithm: {method: local_sgd, sync_period: 4}\n", "world": {"size": 2}, "total_steps": 40}


def _eval(step: int) -> dict[str, float]:
    names = ("train_loss", "test_loss", "test_accuracy", "wall_seconds", "comm_seconds")
    counters = ("bytes_sent", "sync_rounds", "global_bytes_sent", "global_sync_rounds")
    return {"step": step, "epoch": step / 10, **{n: 0.5 for n in names}, **{c: step for c in counters}}


def test_a_diverged_run_is_neither_finished_nor_going(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    writer = MetricsWriter(path, ATTRS, flush_seconds=0)
    writer.log_eval(**_eval(20))
    writer.mark_stopped("diverged", 24, "training diverged at step 24: ...")
    writer.close()
    assert metrics_file_status(path) == "diverged"
    assert sweep_status(tmp_path) == "diverged" and not sweep_finished(tmp_path)
    run = read_run(path)
    assert run is not None and run.status == "diverged" and not run.finished and run.stopped_step == 24

    # Resumed (say with a smaller learning rate) from a checkpoint before the stop: going again.
    resumed = MetricsWriter(path, ATTRS, flush_seconds=0, resume_after_step=20)
    assert resumed.set_aside is None
    assert metrics_file_status(path) == "unfinished"
    resumed.log_eval(**_eval(40))
    resumed.close()
    assert metrics_file_status(path) == "finished"
