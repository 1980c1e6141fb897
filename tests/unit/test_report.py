"""``hpc-localsgd report``: metrics files written by the real MetricsWriter, with final values chosen
here, must come out of the table as the mean and sample std computed by hand below."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import pytest

from hpc_localsgd.config import config_to_yaml, load_config
from hpc_localsgd.errors import UserError
from hpc_localsgd.io.metrics import EMULATED_LINK_ATTR, MetricsWriter
from hpc_localsgd.report import collect, write_report

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 40
EVAL_STEPS = (10, 20, 30, 40)
BYTES_PER_ROUND = 1000  # per worker; one round of averaging


def final_accuracy(method: str, sync_period: int, workers: int, seed: int) -> float:
    """The accuracy a run ends at: worse with H and workers, won back by SlowMo; seeds differ by 0.004."""
    base = {"allreduce": 0.95, "local_sgd": 0.93, "post_local_sgd": 0.945}[method]
    return base - 0.01 * math.log2(sync_period) - 0.005 * workers + 0.004 * seed


def write_run(
    path: Path,
    method: str,
    sync_period: int,
    workers: int,
    seed: int,
    outer: str = "none",
    evals: tuple[int, ...] = EVAL_STEPS,
    data: str = "digits",
    model: str = "smallcnn",
    extra: tuple[str, ...] = (),
    emulated_link: str | None = None,
    step_times: tuple[float, float] | None = None,
) -> None:
    """A run whose accuracy climbs linearly to ``final_accuracy`` at step TOTAL_STEPS; it syncs every
    ``sync_period`` steps (every step for all-reduce) and each eval is 0.5 s of wall time per step.
    ``step_times`` (compute seconds per step, seconds blocked per sync): a step table too, every step;
    ``emulated_link``: the rate of the emulated network it says it ran on."""
    overrides = [
        f"seed={seed}",
        f"algorithm.method={method}",
        f"algorithm.outer={outer}",
        f"data.name={data}",
        f"model.name={model}",
    ]
    if method != "allreduce":
        overrides.append(f"algorithm.sync_period={sync_period}")
    if method == "post_local_sgd":
        overrides.append("algorithm.switch_step=10")
    cfg = load_config(None, overrides + list(extra))
    path.mkdir(parents=True)
    attrs = {
        "config": config_to_yaml(cfg),
        "world": {"size": workers},
        "method": method,
        "steps_per_epoch": 10,
        "total_steps": TOTAL_STEPS,
    }
    if emulated_link is not None:
        attrs[EMULATED_LINK_ATTR] = emulated_link
    writer = MetricsWriter(path / "metrics.h5", attrs, flush_seconds=3600)
    period = 1 if method == "allreduce" else sync_period
    final = final_accuracy(method, period, workers, seed)
    if step_times is not None:
        compute, blocked = step_times
        for step in range(1, max(evals) + 1):
            synced = step % period == 0
            rounds = step // period
            writer.log_step(
                step=step,
                epoch=step / 10,
                lr=0.1,
                loss=1.0,
                accuracy=0.5,
                samples_per_s=100.0,
                comm_seconds=blocked if synced else 0.0,
                compute_seconds=compute,
                bytes_sent=rounds * BYTES_PER_ROUND,
                sync_rounds=rounds,
                synced=int(synced),
                global_bytes_sent=rounds * BYTES_PER_ROUND,
                global_sync_rounds=rounds,
            )
    for step in evals:
        rounds = step // period
        writer.log_eval(
            step=step,
            epoch=step / 10,
            train_loss=2.0 - step / 40,
            test_loss=2.1 - step / 40,
            test_accuracy=final * step / TOTAL_STEPS,
            wall_seconds=0.5 * step,
            comm_seconds=0.1 * step,
            bytes_sent=rounds * BYTES_PER_ROUND,
            sync_rounds=rounds,
            global_bytes_sent=rounds * BYTES_PER_ROUND,
            global_sync_rounds=rounds,
        )
    writer.close()


# (config method, outer, the report's label)
METHODS = (("local_sgd", "none", "local SGD"), ("post_local_sgd", "slowmo", "post-local SGD + SlowMo"))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 seeds × 2 methods × H in {2, 8} × {2, 4} workers, all-reduce at both worker counts; the
    post-local SlowMo H=8 W=4 seed 1 run is still going (last eval at step 20 of 40)."""
    root = tmp_path / "sweep"
    for workers in (2, 4):
        for seed in (0, 1):
            write_run(root / f"ar-w{workers}-s{seed}", "allreduce", 1, workers, seed)
            for method, outer, _ in METHODS:
                for h in (2, 8):
                    going = (method, h, workers, seed) == ("post_local_sgd", 8, 4, 1)
                    write_run(
                        root / f"{method}-{outer}-h{h}-w{workers}-s{seed}",
                        method,
                        h,
                        workers,
                        seed,
                        outer,
                        evals=EVAL_STEPS[:2] if going else EVAL_STEPS,
                    )
    return root


def test_table_holds_mean_and_sample_std_over_seeds(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    lines: list[str] = []
    written = write_report([sweep], out, say=lines.append)
    rows = list(csv.DictReader((out / "results.csv").open()))
    # Table order: workers, then method (all-reduce first), then H.
    order = [
        (w, label, h)
        for w in (2, 4)
        for label, h in [("all-reduce", 1)] + [(label, h) for _, _, label in METHODS for h in (2, 8)]
    ]
    assert [(int(r["workers"]), r["method"], int(r["H"])) for r in rows] == order
    assert {r["task"] for r in rows} == {"digits/smallcnn"}
    by_key = {(r["method"], int(r["H"]), int(r["workers"])): r for r in rows}
    for (label, h, workers), row in by_key.items():
        method = {"all-reduce": "allreduce", "local SGD": "local_sgd", "post-local SGD + SlowMo": "post_local_sgd"}[
            label
        ]
        going = (method, h, workers) == ("post_local_sgd", 8, 4)
        first = final_accuracy(method, h, workers, 0)
        # The unfinished seed counts with its latest evaluation: step 20 of 40, half of its final accuracy.
        second = final_accuracy(method, h, workers, 1) * (0.5 if going else 1.0)
        last_step = (TOTAL_STEPS, 20 if going else TOTAL_STEPS)
        rounds = [s // h for s in last_step]
        assert row["seeds"] == "2"
        assert row["complete"] == ("1/2" if going else "2/2")
        assert float(row["test_accuracy_mean"]) == pytest.approx((first + second) / 2, rel=1e-12)
        assert float(row["test_accuracy_std"]) == pytest.approx(abs(first - second) / math.sqrt(2), rel=1e-9)
        assert float(row["sync_rounds_mean"]) == sum(rounds) / 2
        assert float(row["bytes_sent_per_worker_mean"]) == BYTES_PER_ROUND * sum(rounds) / 2
        assert float(row["wall_seconds_mean"]) == 0.5 * sum(last_step) / 2
    # Markdown: percent with std, human bytes, the complete column. local SGD H=2, 2 workers:
    # accuracy 0.93 - 0.01·log2(2) - 0.005·2 = 0.91 and 0.914 -> 91.20 ± 0.28; 20 rounds of 1000 B; 20 s.
    md = (out / "results.md").read_text()
    assert "| local SGD | 2 | 2 | 2 | 91.20 ± 0.28 | 20 | 20.0 KB | 20.0 s | 2/2 |" in md
    assert "| post-local SGD + SlowMo | 8 | 4 | 2 |" in md and "| 1/2 |" in md
    assert "## digits/smallcnn" in md
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "results.csv",
            "results.md",
            "accuracy_vs_H.png",
            "accuracy_vs_H.svg",
            "curves-W2.png",
            "curves-W2.svg",
            "curves-W4.png",
            "curves-W4.svg",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == names
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        elif path.suffix == ".svg":
            assert ET.parse(path).getroot().tag.rsplit("}", 1)[-1] == "svg"
    assert lines[:-1] == [f"wrote {p}" for p in written]
    assert lines[-1].startswith("report: 20 run(s) (1 still going) in 10 group(s), 1 task(s); 8 files")


def test_single_seed_has_no_std_and_tasks_get_their_own_figures(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "a", "local_sgd", 4, 2, 0)
    write_run(tmp_path / "runs" / "b", "local_sgd", 4, 2, 0, data="synthetic", model="mlp")
    out = tmp_path / "report"
    written = write_report([tmp_path / "runs"], out, say=None)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["task"], r["seeds"], r["test_accuracy_std"]) for r in rows] == [
        ("digits/smallcnn", "1", ""),
        ("synthetic/mlp", "1", ""),
    ]
    assert f"{100 * final_accuracy('local_sgd', 4, 2, 0):.2f} ± –" in (out / "results.md").read_text()
    assert {p.name for p in written} >= {
        "accuracy_vs_H-digits-smallcnn.svg",
        "accuracy_vs_H-synthetic-mlp.png",
        "curves-digits-smallcnn-W2.png",
        "curves-synthetic-mlp-W2.svg",
    }


def test_existing_report_is_kept_unless_overwrite(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "allreduce", 1, 2, 0)
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.csv").write_text("mine\n")
    with pytest.raises(UserError, match="results.csv' exists; pass --overwrite"):
        write_report([tmp_path / "run"], out, say=None)
    assert [p.name for p in out.iterdir()] == ["results.csv"]  # refused before writing anything
    write_report([tmp_path / "run"], out, overwrite=True, say=None)
    assert (out / "results.csv").read_text().startswith("task,method,H,workers,seeds")


def test_bad_paths_and_files_name_the_path(tmp_path: Path) -> None:
    def error(path: Path) -> str:
        with pytest.raises(UserError) as info:
            write_report([path], tmp_path / "report", say=None)
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        return message

    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "holds no metrics.h5" in error(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "metrics.h5").write_text("step,loss\n1,2.0\n")
    assert "is not an HDF5 file" in error(tmp_path / "text" / "metrics.h5")
    (tmp_path / "foreign").mkdir()
    with h5py.File(tmp_path / "foreign" / "metrics.h5", "w") as f:
        f.attrs["format"] = "something-else"
    assert "not an hpc-localsgd metrics file" in error(tmp_path / "foreign" / "metrics.h5")
    assert not (tmp_path / "report").exists()


def test_runs_without_evaluation_are_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "runs" / "started", "local_sgd", 2, 2, 0, evals=())
    with pytest.raises(UserError, match="no run with an evaluation"):
        write_report([tmp_path / "runs"], tmp_path / "report", say=None)
    write_run(tmp_path / "runs" / "done", "local_sgd", 2, 2, 1)
    write_report([tmp_path / "runs"], tmp_path / "report", say=None)
    warnings = capsys.readouterr().err.splitlines()
    assert (
        warnings
        == [f"hpc-localsgd: warning: skipping '{tmp_path / 'runs' / 'started' / 'metrics.h5'}': no evaluation yet"] * 2
    )
    assert list(csv.DictReader((tmp_path / "report" / "results.csv").open()))[0]["seeds"] == "1"


def test_a_file_being_written_is_retried_then_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "runs" / "good", "local_sgd", 2, 2, 0)
    real_read = collect._read_once
    failures = {"left": 2}

    def busy_then_readable(path: Path):  # a writer holding the file for two attempts
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("Unable to synchronously open file (file is being written)")
        return real_read(path)

    monkeypatch.setattr(collect, "_read_once", busy_then_readable)
    assert len(collect.collect_runs([tmp_path / "runs"], pause_seconds=0)) == 1 and failures["left"] == 0
    monkeypatch.undo()
    # A flush cut short: the HDF5 signature is there, the rest is not. The run is skipped, not fatal.
    good = (tmp_path / "runs" / "good" / "metrics.h5").read_bytes()
    (tmp_path / "runs" / "cut").mkdir()
    (tmp_path / "runs" / "cut" / "metrics.h5").write_bytes(good[:600])
    warnings: list[str] = []
    runs = collect.collect_runs([tmp_path / "runs"], warn=warnings.append, pause_seconds=0)
    assert [run.path.parent.name for run in runs] == ["good"]
    assert len(warnings) == 1 and "runs/cut/metrics.h5" in warnings[0] and "after 5 attempts" in warnings[0]


def test_method_labels() -> None:
    assert [
        collect.method_label(m, o)
        for m, o in [
            ("allreduce", "none"),
            ("local_sgd", "none"),
            ("post_local_sgd", "none"),
            ("local_sgd", "slowmo"),
            ("post_local_sgd", "slowmo"),
            ("local_sgd", "nesterov"),
            ("post_local_sgd", "nesterov"),
        ]
    ] == [
        "all-reduce",
        "local SGD",
        "post-local SGD",
        "SlowMo",
        "post-local SGD + SlowMo",
        "local SGD + outer Nesterov",
        "post-local SGD + outer Nesterov",
    ]


def test_cli_prints_one_line_for_a_missing_run_dir(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "report", "missing_dir"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["hpc-localsgd: error: 'missing_dir' does not exist"]
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "report").exists()


def test_runs_differing_in_another_setting_are_told_apart_but_not_by_where_they_ran(tmp_path: Path) -> None:
    """SlowMo at two β is two methods to a reader; a simulation and an MPI run of one config are one."""
    for beta in (0.2, 0.8):
        for seed in (0, 1):
            write_run(
                tmp_path / f"b{beta}-s{seed}",
                "local_sgd",
                8,
                4,
                seed,
                outer="slowmo",
                extra=(f"algorithm.slow_momentum={beta}",),
            )
    write_run(tmp_path / "sim", "local_sgd", 8, 2, 0, extra=("comm.backend=simulated", "comm.simulated_workers=2"))
    write_run(tmp_path / "mpi", "local_sgd", 8, 2, 0, extra=("comm.backend=mpi",))
    # A compressed sync computes something else: its own label (comm.* settings otherwise are where a run ran).
    write_run(tmp_path / "int8", "local_sgd", 8, 2, 0, extra=("comm.backend=mpi", "comm.sync_compression=int8"))
    runs = collect.collect_runs([tmp_path], warn=lambda _line: None)
    labels = sorted({(run.method, run.workers) for run in runs})
    assert labels == [
        ("SlowMo (slow_momentum=0.2)", 4),
        ("SlowMo (slow_momentum=0.8)", 4),
        ("local SGD (sync_compression=int8)", 2),
        ("local SGD (sync_compression=none)", 2),
    ]
