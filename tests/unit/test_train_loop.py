"""The training loop in one process: deterministic on CPU, and its metrics file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hpc_localsgd.comm import SingleCommunicator
from hpc_localsgd.config import load_config
from hpc_localsgd.io.metrics import read_metrics
from hpc_localsgd.launcher.env import detect_launch
from hpc_localsgd.train.loop import train

OVERRIDES = [
    "seed=5",
    "model.name=smallcnn",
    "model.width=4",
    "data.name=synthetic",
    "data.synthetic.train_samples=256",
    "data.synthetic.test_samples=64",
    "data.synthetic.shape=[1, 8, 8]",
    "data.synthetic.num_classes=4",
    "data.batch_size=16",
    "optim.warmup_epochs=0",
    "optim.schedule=constant",
    "optim.lr_per_256=1.6",
    "train.epochs=2",
    "train.eval_every_epochs=1",
    "train.threads=1",
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.outer=slowmo",
    "output.metrics_flush_seconds=0",
]


def run(run_dir: Path, extra: tuple[str, ...] = ()):
    cfg = load_config(None, [*OVERRIDES, *extra, f"output.run_dir={run_dir}"])
    return train(cfg, launch=detect_launch({}), comm=SingleCommunicator(), print_fn=lambda _line: None)


def test_same_config_and_seed_give_the_same_numbers(tmp_path: Path) -> None:
    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    ma, mb = read_metrics(tmp_path / "a" / "metrics.h5"), read_metrics(tmp_path / "b" / "metrics.h5")
    for group in ("steps", "evals"):
        for name in ("loss", "accuracy", "lr") if group == "steps" else ("test_loss", "test_accuracy"):
            np.testing.assert_array_equal(ma[group][name], mb[group][name])
    other = run(tmp_path / "c", ("seed=6",))
    assert any(not torch.equal(a, b) for a, b in zip(first.model.parameters(), other.model.parameters(), strict=True))


def test_metrics_series_and_resolved_config(tmp_path: Path) -> None:
    result = run(tmp_path / "r")
    metrics = read_metrics(tmp_path / "r" / "metrics.h5")
    steps = metrics["steps"]
    assert list(steps["step"]) == list(range(1, result.steps + 1)) and result.steps == 2 * 256 // 16
    assert np.all(steps["lr"] == 1.6 * 16 / 256)
    assert list(metrics["evals"]["step"]) == [16, 32]
    assert metrics["evals"]["test_accuracy"][-1] == result.final.test_accuracy
    # One process sends nothing, so it counts no rounds or bytes.
    assert steps["bytes_sent"][-1] == 0 and steps["sync_rounds"][-1] == 0
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved == load_config(None, [*OVERRIDES, f"output.run_dir={tmp_path / 'r'}"])


def test_timed_checkpoints_are_decided_at_poll_steps(tmp_path: Path) -> None:
    # Due at every poll (a tiny interval); polls every 3 steps; no step-count trigger.
    run(
        tmp_path / "t",
        (
            "checkpoint.every_minutes=0.000001",
            "checkpoint.poll_every_steps=3",
            "checkpoint.keep=100",
            "checkpoint.at_end=false",
        ),
    )
    steps = sorted(int(p.name[5:14]) for p in (tmp_path / "t" / "checkpoints").glob("step-*.h5"))
    assert steps == list(range(3, 33, 3))


def test_inspect_describes_checkpoints_and_metrics(tmp_path: Path) -> None:
    from hpc_localsgd.io.inspect import describe

    run(tmp_path / "i")
    checkpoint = describe(tmp_path / "i" / "checkpoints" / "step-000000032.h5")
    assert (checkpoint["kind"], checkpoint["valid"], checkpoint["step"], checkpoint["world_size"]) == (
        "checkpoint",
        True,
        32,
        1,
    )
    assert checkpoint["config"]["algorithm"]["outer"] == "slowmo" and "torch" in checkpoint["versions"]
    metrics = describe(tmp_path / "i" / "metrics.h5")
    assert (metrics["kind"], metrics["steps_logged"], metrics["evaluations"]) == ("metrics", 32, 2)


def test_the_start_line_says_why_an_asked_for_sync_thread_cannot_run(tmp_path: Path) -> None:
    """comm.sync_thread: true where it cannot help: the run goes on without it and says why, in its start
    line; auto says nothing."""
    simulated = ("comm.backend=simulated", "comm.simulated_workers=2", "algorithm.sync_delay=1")
    cases = {
        ("comm.sync_thread=true", *simulated): ", no sync thread (the simulated backend) |",
        ("comm.sync_thread=true",): ", no sync thread (no delayed sync) |",
        ("comm.sync_thread=true", "algorithm.sync_delay=1"): ", no sync thread (one worker: nothing to average) |",
        simulated: None,
    }
    for number, (extra, expected) in enumerate(cases.items()):
        lines: list[str] = []
        cfg = load_config(None, [*OVERRIDES, "train.epochs=0.1", *extra, f"output.run_dir={tmp_path / str(number)}"])
        train(cfg, print_fn=lines.append)
        start = next(line for line in lines if line.startswith("hpc-localsgd: local SGD"))
        if expected is None:
            assert "sync thread" not in start, start
        else:
            assert expected in start, start
