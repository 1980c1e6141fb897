from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_localsgd.config import load_config
from hpc_localsgd.errors import ConfigError, UserError
from hpc_localsgd.sweep import plan_sweep, write_sweep

REPO = Path(__file__).resolve().parents[2]

GRID = """
name: mini
base: base.yaml
set: {train.max_steps: 5}
variants:
  - {algorithm.method: allreduce}
  - {algorithm.method: local_sgd, algorithm.sync_period: [2, 8]}
grid: {seed: [0, 1]}
slurm: {nodes: [1, 2], ntasks_per_node: 4, cpus_per_task: 2, throttle: 3, options: ["--partition=debug"]}
"""


def make(tmp_path: Path, text: str = GRID) -> Path:
    (tmp_path / "base.yaml").write_text("data: {name: synthetic}\nmodel: {name: mlp}\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    return grid


def test_grid_expands_to_validated_configs_manifest_and_arrays(tmp_path: Path) -> None:
    plan = plan_sweep(make(tmp_path), tmp_path / "out")
    assert len(plan.points) == 3 * 2 * 2  # variants × seeds × node counts
    write_sweep(plan, overwrite=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["runs"]
    assert [(r["array"], r["task"]) for r in manifest[:7]] == [("array-1n.sbatch", i) for i in range(6)] + [
        ("array-2n.sbatch", 0)
    ]
    seen = set()
    for run in manifest:
        cfg = load_config(run["config"])
        assert cfg.train.max_steps == 5 and cfg.data.name == "synthetic"  # base + common overrides
        for key, value in run["overrides"].items():
            section, name = key.split(".") if "." in key else (None, key)
            assert (getattr(getattr(cfg, section), name) if section else getattr(cfg, name)) == value
        assert cfg.output.run_dir == run["run_dir"] and run["ranks"] == 4 * run["nodes"]
        seen.add((run["nodes"], json.dumps(run["overrides"], sort_keys=True)))
    assert len(seen) == 12  # all distinct
    script = (tmp_path / "out" / "array-2n.sbatch").read_text()
    assert "#SBATCH --array=0-5%3" in script and "#SBATCH --nodes=2" in script
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --partition=debug" in script
    assert "--requeue" in script and "--signal=B:USR1@120" in script
    subprocess.run(["bash", "-n", str(tmp_path / "out" / "array-2n.sbatch")], check=True)
    # Task i of an array runs the config of its manifest entry.
    configs = script.split("configs=(")[1].split(")")[0].split()
    assert configs == [r["config"] for r in manifest if r["array"] == "array-2n.sbatch"]


def test_existing_sweep_is_not_overwritten(tmp_path: Path) -> None:
    plan = plan_sweep(make(tmp_path), tmp_path / "out")
    write_sweep(plan, overwrite=False)
    with pytest.raises(UserError, match="already holds a sweep"):
        write_sweep(plan, overwrite=False)
    write_sweep(plan, overwrite=True)


@pytest.mark.parametrize(
    "text,message",
    [
        (
            GRID.replace("sync_period: [2, 8]", "sync_period: [2, 0]"),
            "sweep point 0004-method-local_sgd_sync_period-0_seed-0_nodes-1: "
            "algorithm.sync_period: must be >= 1, got 0",
        ),
        # The sweep file is checked by the config loader: unknown keys with a suggestion, types, ranges.
        (GRID.replace("grid:", "gird:"), "grid.yaml': gird: unknown key; did you mean 'grid'?"),
        (GRID.replace("throttle: 3", "throtle: 3"), "grid.yaml': slurm.throtle: unknown key; did you mean 'throttle'?"),
        (GRID.replace("nodes: [1, 2]", "nodes: [0]"), "grid.yaml': slurm.nodes: must be positive integers, got [0]"),
        (
            GRID.replace("throttle: 3", "throttle: 3, time: 24:00:00"),
            "grid.yaml': slurm.time: expected a string, got 86400",
        ),  # YAML 1.1 reads an unquoted time as a number
        (GRID.replace("ntasks_per_node: 4", "ntasks_per_node: 0"), "slurm.ntasks_per_node: must be >= 1, got 0"),
        (
            GRID.replace("throttle: 3", "throttle: 3, launcher: slurm"),
            "slurm.launcher: must be one of 'srun' | 'mpirun', got 'slurm'",
        ),
        (
            GRID.replace("  - {algorithm.method: allreduce}", "  - allreduce"),
            "variants[0]: expected a mapping, got 'allreduce'",
        ),
    ],
)
def test_bad_grids_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_sweep(make(tmp_path, text), tmp_path / "out")
    assert message in str(info.value)


def test_one_node_count_and_empty_keys(tmp_path: Path) -> None:
    text = GRID.replace("nodes: [1, 2]", "nodes: 2").replace("grid: {seed: [0, 1]}", "grid:")
    plan = plan_sweep(make(tmp_path, text), tmp_path / "out")
    assert plan.shape.nodes == [2] and len(plan.points) == 3


@pytest.mark.parametrize("grid", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_expand(grid: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "sweep", str(grid), "--dry-run", "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    first = proc.stdout.splitlines()[0]
    assert "runs in" in first and "job array" in first
