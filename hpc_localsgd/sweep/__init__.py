"""``hpc-localsgd sweep GRID.yaml``: a grid of runs → validated configs, a manifest, Slurm job arrays.

A grid file::

    name: cifar10-local-sgd
    base: ../cifar10/resnet18_allreduce.yaml     # relative to the grid file
    set: {data.path: /scratch/cifar-10-batches-py}   # applied to every run
    variants:                                    # one entry per method; list values expand
      - {algorithm.method: allreduce}
      - {algorithm.method: local_sgd, algorithm.sync_period: [2, 4, 8, 16, 32]}
    grid: {seed: [0, 1, 2]}                      # crossed with every variant
    slurm:
      nodes: [1, 4]                              # crossed too: one job array per node count
      ntasks_per_node: 8
      cpus_per_task: 8
      gpus_per_task: 1
      time: "24:00:00"
      throttle: 16                               # at most this many tasks of an array at once (%N)
      options: ["--partition=gpu"]               # more #SBATCH lines
      launcher: srun                             # or mpirun

Every point is checked against the config schema before anything is written. The output
folder gets ``configs/NNNN-<slug>.yaml`` (resolved, with its own run dir under ``runs/``),
``manifest.json`` (one entry per run: its overrides, array, task id, world size, paths) and
``array-<nodes>n.sbatch``, whose tasks pick their config by ``SLURM_ARRAY_TASK_ID`` and run
``slurm/train.sbatch`` (so they checkpoint, requeue and resume like any single run).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import build, read_yaml, section, setting
from ..config.fields import check_declared
from ..config.load import config_to_yaml, load_config
from ..config.schema import LANGUAGE_DATA
from ..errors import ConfigError, UserError

REPO_TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


@dataclass
class SlurmShape:
    """The shape of every job array of a sweep: the ``slurm:`` section of a sweep file."""

    nodes: list[int] = setting(
        [1],
        "Node counts; each gets its own job array, in which every point runs.",
        range="<= 1e5",
        rule="positive integers; one number means a list of it",
    )
    ntasks_per_node: int = setting(1, "Ranks per node (#SBATCH --ntasks-per-node).", range=">= 1, <= 4096")
    cpus_per_task: int = setting(1, "Cores per rank (#SBATCH --cpus-per-task).", range=">= 1, <= 4096")
    gpus_per_task: int = setting(
        0, "GPUs per rank (#SBATCH --gpus-per-task; 0: none asked for).", range=">= 0, <= 1024"
    )
    time: str = setting(
        "01:00:00", "Time limit of every task (#SBATCH --time); quote it in YAML, which reads 24:00:00 as a number."
    )
    throttle: int = setting(
        0, "At most this many tasks of an array at once (--array=...%N; 0: no limit).", range=">= 0, <= 1e6"
    )
    options: list[str] = setting([], "More #SBATCH lines, e.g. --partition=gpu.")
    launcher: Literal["srun", "mpirun"] = setting(
        "srun", "How each task starts its ranks (LAUNCHER of slurm/train.sbatch)."
    )
    train_script: str = setting(
        str(REPO_TRAIN_SCRIPT), "The script every task runs (default: this checkout's slurm/train.sbatch)."
    )

    def validate(self, key: str = "slurm") -> None:
        check_declared(self, key)
        if not all(n >= 1 for n in self.nodes):
            raise ConfigError(f"{key}.nodes: must be positive integers, got {self.nodes}")


@dataclass
class SweepFile:
    """The keys of a sweep file (an example is in this module's docstring)."""

    name: str | None = setting(
        None,
        "The sweep's name: its output folder sweeps/<name> and its job names "
        "(null: the sweep file's name without .yaml).",
    )
    base: str | None = setting(
        None, "The run config every point starts from, relative to the sweep file (null: the defaults)."
    )
    set: dict[str, Any] = setting({}, "Overrides (dotted key: value) applied to every point.")
    variants: list[dict[str, Any]] = setting(
        [],
        "One entry per method: overrides, where a list value expands "
        "into one variant per value (none: one empty variant).",
    )
    grid: dict[str, Any] = setting({}, "Overrides crossed with every variant; a list value expands too.")
    slurm: SlurmShape = section(SlurmShape, "The shape of every job array.")

    def validate(self) -> None:
        self.slurm.validate("slurm")


def read_sweep_file(grid_path: Path) -> SweepFile:
    """The sweep file's keys, names, types and ranges checked by the config loader; messages name the file."""
    spec = read_yaml(grid_path, "sweep file", "a mapping")
    # An empty key (`set:`) means its default, as it always has.
    spec = {key: value for key, value in spec.items() if value is not None}
    slurm = spec.get("slurm")
    if isinstance(slurm, dict) and "nodes" in slurm and not isinstance(slurm["nodes"], list):
        spec["slurm"] = {**slurm, "nodes": [slurm["nodes"]]}  # `nodes: 4` is one node count
    try:
        sweep = build(SweepFile, spec)
        sweep.validate()
    except ConfigError as exc:
        raise ConfigError(f"sweep file '{grid_path}': {exc}") from None
    return sweep


@dataclass
class Point:
    index: int
    name: str
    overrides: dict[str, Any]
    nodes: int
    config_path: Path
    run_dir: Path
    array: str = ""
    task: int = 0


@dataclass
class SweepPlan:
    name: str
    out: Path
    points: list[Point]
    arrays: dict[str, list[Point]]
    shape: SlurmShape
    scripts: dict[str, str]
    base: Path | None  # the config every point starts from
    common: dict[str, Any]  # overrides applied to every point


def _expand(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """{'a': [1, 2], 'b': 3} → [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]."""
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _slug(overrides: dict[str, Any], nodes: int) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in overrides.items()] + [f"nodes-{nodes}"]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))


def _assignments(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def plan_sweep(grid_file: str | Path, out: str | Path | None = None) -> SweepPlan:
    grid_path = Path(grid_file)
    sweep = read_sweep_file(grid_path)
    name = sweep.name or grid_path.stem
    base = (grid_path.parent / sweep.base).resolve() if sweep.base else None
    shape = sweep.slurm
    out_dir = Path(out) if out else Path("sweeps") / name
    out_dir = out_dir.resolve()

    common = sweep.set
    variants = [v for entry in (sweep.variants or [{}]) for v in _expand(entry)]
    crossed = _expand(sweep.grid)
    points: list[Point] = []
    for nodes in shape.nodes:
        for variant in variants:
            for extra in crossed:
                overrides = {**variant, **extra}
                index = len(points)
                slug = f"{index:04d}-{_slug(overrides, nodes)}"
                run_dir = out_dir / "runs" / slug
                try:
                    load_config(base, _assignments({**common, **overrides}) + [f"output.run_dir={run_dir}"])
                except ConfigError as exc:
                    raise ConfigError(f"sweep point {slug}: {exc}") from None
                points.append(Point(index, slug, overrides, nodes, out_dir / "configs" / f"{slug}.yaml", run_dir))
    if not points:
        raise ConfigError(f"sweep file '{grid_path}' expands to no runs")

    arrays: dict[str, list[Point]] = {}
    for point in points:
        point.array = f"array-{point.nodes}n.sbatch"
        group = arrays.setdefault(point.array, [])
        point.task = len(group)
        group.append(point)
    scripts = {array: _array_script(name, members, shape, out_dir) for array, members in arrays.items()}
    return SweepPlan(name, out_dir, points, arrays, shape, scripts, base, common)


def _array_script(name: str, members: list[Point], shape: SlurmShape, out: Path) -> str:
    nodes = members[0].nodes
    throttle = f"%{shape.throttle}" if shape.throttle else ""
    lines = [
        "#!/bin/bash",
        f"# Generated by hpc-localsgd sweep: {len(members)} runs of '{name}' on {nodes} node(s) each.",
        f"#SBATCH --job-name={name}-{nodes}n",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={shape.ntasks_per_node}",
        f"#SBATCH --cpus-per-task={shape.cpus_per_task}",
    ]
    if shape.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={shape.gpus_per_task}")
    lines += [
        f"#SBATCH --time={shape.time}",
        f"#SBATCH --output={out}/logs/%x-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        f"#SBATCH --array=0-{len(members) - 1}{throttle}",
    ]
    lines += [f"#SBATCH {option}" for option in shape.options]
    lines += [
        "set -uo pipefail",
        "configs=(" + " ".join(shlex.quote(str(p.config_path)) for p in members) + ")",
        "run_dirs=(" + " ".join(shlex.quote(str(p.run_dir)) for p in members) + ")",
        "task=${SLURM_ARRAY_TASK_ID:?this script runs as a Slurm job array}",
        f"export LAUNCHER=${{LAUNCHER:-{shape.launcher}}}",
        'export RUN_DIR="${run_dirs[$task]}"',
        f'exec bash {shlex.quote(shape.train_script)} "${{configs[$task]}}"',
        "",
    ]
    return "\n".join(lines)


def write_sweep(plan: SweepPlan, overwrite: bool) -> None:
    manifest = plan.out / "manifest.json"
    if manifest.exists() and not overwrite:
        raise UserError(
            f"sweep folder '{plan.out}' already holds a sweep (manifest.json); "
            "pass --overwrite to regenerate it, or choose another --out"
        )
    if not Path(plan.shape.train_script).is_file():
        raise UserError(f"slurm.train_script '{plan.shape.train_script}' does not exist")
    (plan.out / "configs").mkdir(parents=True, exist_ok=True)
    (plan.out / "logs").mkdir(exist_ok=True)
    for point in plan.points:
        cfg = load_config(
            plan.base, _assignments({**plan.common, **point.overrides}) + [f"output.run_dir={point.run_dir}"]
        )
        point.config_path.write_text(config_to_yaml(cfg))
    for array, text in plan.scripts.items():
        (plan.out / array).write_text(text)
    entries = [
        {
            "index": p.index,
            "name": p.name,
            "overrides": p.overrides,
            "nodes": p.nodes,
            "ranks": p.nodes * plan.shape.ntasks_per_node,
            "array": p.array,
            "task": p.task,
            "config": str(p.config_path),
            "run_dir": str(p.run_dir),
        }
        for p in plan.points
    ]
    manifest.write_text(json.dumps({"name": plan.name, "runs": entries}, indent=2) + "\n")


def describe_plan(plan: SweepPlan) -> str:
    ranks = plan.shape.ntasks_per_node
    lines = [f"sweep '{plan.name}': {len(plan.points)} runs in {len(plan.arrays)} job array(s) -> {plan.out}"]
    for point in plan.points:
        lines.append(f"  {point.array}[{point.task}]  {point.nodes * ranks:4d} ranks  {point.name}")
    lines += [f"sbatch {plan.out / array}" for array in plan.arrays]
    return "\n".join(lines)


def submit(plan: SweepPlan) -> list[str]:
    """sbatch every array; returns the job ids (also written to submitted.json)."""
    ids = []
    for array in plan.arrays:
        try:
            done = subprocess.run(
                ["sbatch", "--parsable", str(plan.out / array)], capture_output=True, text=True, timeout=120
            )
        except OSError as exc:
            raise UserError(f"sbatch could not be run: {exc}") from None
        if done.returncode != 0:
            raise UserError(f"sbatch {plan.out / array} failed: {' '.join(done.stderr.split())}")
        ids.append(done.stdout.strip().split(";")[0])
    (plan.out / "submitted.json").write_text(json.dumps(dict(zip(plan.arrays, ids, strict=True)), indent=2) + "\n")
    return ids


# --- running a sweep on this machine ------------------------------------------------------------
def _status(run_dir: Path) -> str:
    """ "finished" (the run reached its last step and evaluated it), "diverged" (it stopped on a NaN
    or inf model: running it again would diverge again) or "unfinished"."""
    from ..io.metrics import METRICS_FILE, metrics_file_status  # h5py only when a sweep runs here

    return metrics_file_status(run_dir / METRICS_FILE)


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that reached its last step and evaluated it."""
    return _status(run_dir) == "finished"


# What a point's run ends with besides a test accuracy (see _run_point).
_FINISHED_LINE = "finished"
_DIVERGED_PREFIX = "diverged: "


def _run_point(
    config_path: str, log_path: str, ranks: int, threads: int, emulated_link: str | None = None
) -> tuple[float | None, str]:
    """One point, in a pool worker: (final test accuracy or None, one line about it). ``threads``:
    torch threads for a simulated point whose config leaves them to the machine (train.threads 0),
    so that the pool's runs share the cores instead of each taking all of them. ``emulated_link``:
    run the ranks on an emulated network of that rate (launcher/slownet.py), one namespace each."""
    import sys
    import traceback

    from ..config.load import load_config as load
    from ..errors import TrainingDiverged
    from ..errors import UserError as Refused

    cfg = load(config_path, [])
    with open(log_path, "a", buffering=1) as log:
        if cfg.comm.backend == "simulated":
            if cfg.train.threads == 0:
                cfg.train.threads = threads
            from ..launcher.env import detect_launch
            from ..train.loop import train

            try:
                # The pool worker is a plain process: the launch is this process, whatever the parent had.
                result = train(
                    cfg, overwrite=True, launch=detect_launch({}), print_fn=lambda line: print(line, file=log)
                )
            except TrainingDiverged as exc:
                print(f"hpc-localsgd: error: {exc}", file=log)
                return None, f"{_DIVERGED_PREFIX}{exc}"
            except Refused as exc:
                print(f"hpc-localsgd: error: {exc}", file=log)
                return None, str(exc)
            except Exception as exc:  # a bug: keep the traceback in the run's log, report one line
                traceback.print_exc(file=log)
                return None, f"{type(exc).__name__}: {exc} (traceback in {log_path})"
            assert result.final is not None
            if cfg.data.name in LANGUAGE_DATA:  # a language model: its loss says how it did
                return result.final.test_accuracy, f"val loss {result.final.test_loss:.4f}"
            return result.final.test_accuracy, f"test acc {result.final.test_accuracy:.4f}"
        argv = [sys.executable, "-m", "hpc_localsgd", "train", str(Path(config_path).resolve()), "--resume", "auto"]
        if emulated_link is None:
            done = subprocess.run(["mpirun", "-np", str(ranks), *argv], stdout=log, stderr=subprocess.STDOUT)
        else:
            from ..launcher.slownet import slow_network

            try:
                with slow_network(ranks, emulated_link) as network:
                    done = subprocess.run(network.mpirun_command(argv), stdout=log, stderr=subprocess.STDOUT)
            except Refused as exc:
                print(f"hpc-localsgd: error: {exc}", file=log)
                return None, str(exc)
        if done.returncode == TrainingDiverged.exit_code:
            return None, f"{_DIVERGED_PREFIX}see {log_path}"
        if done.returncode != 0:
            return None, f"mpirun exited with {done.returncode} (see {log_path})"
    return None, _FINISHED_LINE


def check_emulated_link(plan: SweepPlan, jobs: int, rate: str) -> None:
    """Refuse, in one line and before any run starts, a sweep that cannot run on an emulated link of
    ``rate``: a rate tc does not read, runs at once (they would share the cores their step times
    measure), a point of simulated workers or of one rank (no network between them), or a machine
    where the namespaces cannot be created."""
    from ..algorithms.network import emulated_link
    from ..launcher.slownet import MAX_RANKS, check_can_create

    try:
        emulated_link(rate)
    except ValueError as exc:
        raise UserError(f"--emulated-link: {exc}") from None
    if jobs != 1:
        raise UserError(f"--emulated-link measures step times: run the points one at a time (--jobs 1, not {jobs})")
    for point in plan.points:
        ranks = point.nodes * plan.shape.ntasks_per_node
        backend = load_config(point.config_path, []).comm.backend
        if backend == "simulated":
            raise UserError(
                f"--emulated-link: point {point.name} runs simulated workers in one process, with no network "
                "between them (set comm.backend to mpi, horovod or torch)"
            )
        if not 2 <= ranks <= MAX_RANKS:
            raise UserError(
                f"--emulated-link: point {point.name} runs {ranks} rank(s); an emulated network joins 2 to "
                f"{MAX_RANKS} (slurm.nodes × slurm.ntasks_per_node)"
            )
    check_can_create()


def run_here(plan: SweepPlan, jobs: int, print_fn: Any = print, emulated_link: str | None = None) -> int:
    """Run every point of a written sweep on this machine, ``jobs`` at a time, skipping points whose
    run already finished or diverged (so an interrupted sweep continues where it stopped). Simulated
    points run inside the pool's processes (one torch import per process, not per run); others run
    under ``mpirun -np <ranks>`` with ``--resume auto``, or with ``emulated_link`` (a tc rate such as
    "10mbit") one rank per network namespace of an emulated network of that rate, so that each run's
    step times are a measurement on that link (``report --measured``). Returns the number of failed
    points: a run that diverged is an outcome of the study (shown as DIVERGED, counted apart), not a
    failure."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if emulated_link is not None:
        check_emulated_link(plan, jobs, emulated_link)
    status = {p.name: _status(p.run_dir) for p in plan.points}
    todo = [p for p in plan.points if status[p.name] == "unfinished"]
    skipped = len(plan.points) - len(todo)
    done_before = sum(s == "diverged" for s in status.values())
    print_fn(
        f"sweep '{plan.name}': {len(todo)} of {len(plan.points)} runs to go ({skipped - done_before} already "
        f"finished{f', {done_before} diverged' if done_before else ''}), {jobs} at a time"
        f"{f' on an emulated {emulated_link} network' if emulated_link else ''}; logs in {plan.out / 'logs'}"
    )
    failed = diverged = 0
    start = time.perf_counter()
    # spawn: a forked child would inherit the parent's torch threads and locks.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        futures = {
            pool.submit(
                _run_point,
                str(p.config_path),
                str(plan.out / "logs" / f"{p.name}.out"),
                p.nodes * plan.shape.ntasks_per_node,
                threads,
                emulated_link,
            ): p
            for p in todo
        }
        for count, future in enumerate(as_completed(futures), start=1):
            point = futures[future]
            try:
                accuracy, line = future.result()
                ok = accuracy is not None or line == _FINISHED_LINE
            except Exception as exc:  # the worker process died (killed, out of memory)
                ok, line = False, f"worker died: {type(exc).__name__}: {exc}"
            if line.startswith(_DIVERGED_PREFIX):
                diverged += 1
                line = "DIVERGED: " + line.removeprefix(_DIVERGED_PREFIX)
            elif not ok:
                failed += 1
                line = "FAILED: " + line
            print_fn(f"[{count}/{len(todo)}] {point.name}: {line}")
    print_fn(
        f"sweep '{plan.name}': {len(todo) - failed - diverged} runs done, {skipped} skipped, {failed} failed"
        f"{f', {diverged} diverged' if diverged else ''} in {time.perf_counter() - start:.0f} s; "
        f"figures and table: hpc-localsgd report {plan.out / 'runs'}"
    )
    return failed


def already_written(plan: SweepPlan) -> bool:
    """Whether ``plan.out`` holds this very sweep (same runs, same order): ``--run-here`` then
    continues it instead of refusing to overwrite it."""
    manifest = plan.out / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        written = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return [run.get("name") for run in written.get("runs", [])] == [p.name for p in plan.points]
