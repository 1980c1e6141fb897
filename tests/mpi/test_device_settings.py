"""train.compile and train.channels_last on real MPI ranks: the compiled, channels-last run computes what
the eager one does (to float tolerance: other kernels, other rounding), its ranks stay in step through
the syncs, and the start-up line says how the run sits on its device and how its collectives travel."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from hpc_localsgd.io.metrics import read_metrics
from tests.helpers import REPO_ROOT, run_gpu_check, run_mpi
from tests.mpi.cases import BASE, GPT_TEXT
from tests.mpi.test_cli import cli, empty_config, sets

LOCAL_H4 = [*BASE, "algorithm.method=local_sgd", "algorithm.sync_period=4", "comm.backend=mpi"]


def train_two_ranks(tmp_path: Path, name: str, extra: list[str]) -> tuple[str, dict]:
    run_dir = tmp_path / name
    argv = cli("train", *sets(LOCAL_H4 + extra), "--run-dir", str(run_dir), empty_config(tmp_path))
    proc = run_mpi(2, argv, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, read_metrics(run_dir / "metrics.h5")


def test_compiled_channels_last_run_matches_the_eager_one(tmp_path: Path) -> None:
    eager_out, eager = train_two_ranks(tmp_path, "eager", [])
    fast_out, fast = train_two_ranks(tmp_path, "fast", ["train.compile=true", "train.channels_last=true"])
    start = fast_out.splitlines()[0]
    # (The thread tests its exchanges every millisecond where the ranks fill the machine's cores.)
    polled = r"(, byte exchanges and allreduces from 1 MiB tested every 1 ms)?"
    described = rf"mpi backend \(MPI on host memory, a communication thread{polled}\), "
    assert re.search(described + r"cpu, channels-last, compiled, fp32 \|", start), start
    assert "channels-last" not in eager_out.splitlines()[0]
    # Rank 0's loss at every step, and the averaged model's test loss at the end: syncs included. float32
    # through other kernels for the compiled graph: at most 0.2 % of the tolerance used under five CPU
    # settings (docs/testing.md).
    np.testing.assert_allclose(fast["steps"]["loss"], eager["steps"]["loss"], rtol=1e-4, atol=1e-5)
    assert list(fast["steps"]["synced"]) == list(eager["steps"]["synced"])
    np.testing.assert_allclose(fast["evals"]["test_loss"], eager["evals"]["test_loss"], rtol=1e-4)


def test_compile_with_the_simulated_backend_is_refused_in_one_line(tmp_path: Path) -> None:
    overrides = [*BASE, "comm.backend=simulated", "comm.simulated_workers=2", "train.compile=true"]
    argv = [sys.executable, "-m", "hpc_localsgd", "train", *sets(overrides), "--run-dir", str(tmp_path / "r")]
    proc = subprocess.run([*argv, empty_config(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "hpc-localsgd: error: train.compile: comm.backend=simulated runs its workers as one batched model "
        "(torch.func over stacked weights), which is not compiled; set train.compile=false"
    )
    assert not (tmp_path / "r").exists()


def test_gpu_check_script_runs_its_cpu_fallback(tmp_path: Path) -> None:
    """scripts/gpu-check.sh without a GPU: check 2's logic (torchrun ranks against the simulation) on the CPU,
    for both of its variants."""
    proc = run_gpu_check(tmp_path, "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu-check: device: no CUDA device visible"), proc.stdout
    for variant in ("", "-grad"):  # SlowMo, and post-local SGD with bf16 gradient buckets
        assert any(
            line.startswith(f"gpu-check: 2 two-simulated-cpu{variant} (in-process") and ": PASS 4 evaluations" in line
            for line in lines
        ), proc.stdout
    assert "gpu-check: 2 two ranks on one GPU, simulation on CUDA: SKIP no GPU" in lines
    assert lines[-1].startswith("gpu-check: all checks passed")
    assert (tmp_path / "gpu-check.txt").read_text().splitlines() == lines


def test_compiled_gpt_matches_the_eager_one(tmp_path: Path) -> None:
    """The language model through torch.compile on ranks: the same losses as eager to float tolerance, and
    channels_last: auto leaves it alone (it has no convolutions)."""
    gpt = [*GPT_TEXT, "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.1", "train.channels_last=auto"]
    eager_out, eager = train_two_ranks(tmp_path, "gpt-eager", gpt)
    compiled_out, compiled = train_two_ranks(tmp_path, "gpt-compiled", [*gpt, "train.compile=true"])
    start = compiled_out.splitlines()[0]
    assert re.search(r"cpu, compiled, fp32 \| gpt on text", start), start
    np.testing.assert_allclose(compiled["steps"]["loss"], eager["steps"]["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(compiled["evals"]["test_loss"], eager["evals"]["test_loss"], rtol=1e-4)
