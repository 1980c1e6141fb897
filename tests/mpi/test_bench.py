"""``hpc-localsgd bench`` on real ranks: the quick problem under ``mpirun -np 2`` writes JSON that
follows the shipped schema, whose counted figures equal what the maths says and whose timed
figures are sane; the hierarchy phase alone under ``mpirun -np 4`` (workers of 2 ranks) likewise;
bad input ends every rank with one line; the ReFrame check runs locally."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from hpc_localsgd.config.schema import GptConfig, ModelConfig
from hpc_localsgd.train.gpt import flops_per_token, parameter_count
from hpc_localsgd.train.models import build_model
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, run_mpi

SCHEMA = json.loads((REPO_ROOT / "hpc_localsgd" / "bench" / "schema.json").read_text())
QUICK_BATCH, QUICK_CLASSES, QUICK_IMAGE = 8, 10, 32
SYNC_PERIODS = (1, 2, 4, 8, 16, 32)


def bench(*args: str) -> list[str]:
    return ["python", "-m", "hpc_localsgd", "bench", *args]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    folder = tmp_path_factory.mktemp("bench")
    proc = run_mpi(2, bench("--quick", "--out", str(folder / "bench.json")), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((folder / "bench.json").read_text()), folder


HIERARCHY_PERIODS, HIERARCHY_STEPS = (2, 4), 4


@pytest.fixture(scope="module")
def hierarchy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """The hierarchy phase alone, 4 ranks: workers of 2 ranks (the default for an even world above 2)."""
    folder = tmp_path_factory.mktemp("bench-hierarchy")
    periods = ",".join(map(str, HIERARCHY_PERIODS))
    args = ["--quick", "--phases", "hierarchy", "--sync-periods", periods, "--steps", str(HIERARCHY_STEPS)]
    proc = run_mpi(4, bench(*args, "--out", str(folder / "bench.json")), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((folder / "bench.json").read_text())


# What the ranks' interpreter reports about itself, asked in a process of its own: the modules'
# own __version__, where the bench records package metadata (torch aside).
VERSION_PROBE = (
    "import json, platform, h5py, mpi4py, numpy, torch, hpc_localsgd; print(json.dumps({"
    "'python': platform.python_version(), 'torch': torch.__version__, 'numpy': numpy.__version__, "
    "'h5py': h5py.__version__, 'mpi4py': mpi4py.__version__, 'hpc_localsgd': hpc_localsgd.__version__}))"
)


@pytest.fixture(scope="module")
def ranks_versions() -> dict[str, str]:
    """The versions a rank started like the bench's ranks (mpirun, this session's interpreter) reports."""
    proc = run_mpi(1, ["python", "-c", VERSION_PROBE], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recorded_versions(document: dict, expected: dict[str, str]) -> dict[str, str]:
    return {name: document["versions"].get(name) for name in expected}


def model_bytes() -> tuple[int, int]:
    """(parameter bytes, floating-point buffer bytes) of the quick problem's model, counted here."""
    model = build_model(ModelConfig(name="smallcnn"), QUICK_CLASSES, (3, QUICK_IMAGE, QUICK_IMAGE))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    return params, buffers


def figures(document: dict) -> dict[str, dict]:
    return {f["id"]: f for f in document["figures"]}


def test_quick_bench_follows_the_schema(quick_run) -> None:
    proc, document, folder = quick_run
    jsonschema.validate(document, SCHEMA)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("hpc-localsgd-bench:")]
    assert lines == [document["summary_line"]]  # rank 0 alone prints it
    assert document["world"]["size"] == 2 and document["problem"]["quick"] is True
    assert sorted(p.name for p in folder.iterdir()) == ["bench.json"]  # the checkpoint files are gone
    broken = dict(document)
    del broken["projection"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_quick_bench_records_the_versions_its_ranks_ran(quick_run, ranks_versions) -> None:
    _, document, _ = quick_run
    assert recorded_versions(document, ranks_versions) == ranks_versions


def test_quick_bench_counts_bytes_exactly(quick_run) -> None:
    _, document, _ = quick_run
    by_id = figures(document)
    params, buffers = model_bytes()
    assert document["problem"]["parameter_bytes"] == params and document["problem"]["buffer_bytes"] == buffers
    assert by_id["averaging.bytes_per_sync"]["median"] == params + buffers
    for period in SYNC_PERIODS:
        figure = by_id[f"local_sgd.h{period}.bytes_per_sample"]
        assert figure["exact"] and figure["samples"] == [(params + buffers) / (period * QUICK_BATCH)] * 3
    assert by_id["synchronous.allreduce.bytes_per_sample"]["median"] == params / QUICK_BATCH
    # The streaming phase's all-reduce SGD: its gradients per step, in fp32 and in bf16 (half, exactly).
    assert by_id["streaming.allreduce.bytes_per_step"]["median"] == params
    assert by_id["streaming.allreduce_bf16_gradients.bytes_per_step"]["median"] == params // 2
    # SlowMo keeps x_prev and u: two fp32 copies of the parameters, nothing else.
    assert by_id["slowmo.extra_memory_bytes"]["median"] == 2 * params
    assert by_id["slowmo.extra_memory_param_copies"]["median"] == 2.0
    assert by_id["slowmo.extra_memory_param_copies"]["met"] is True
    # The cosine between consecutive outer updates (metrics.h5's syncs table) keeps the previous one.
    assert by_id["slowmo.drift_measurement_bytes"]["median"] == params
    # Each of 2 ranks: parameters, BN statistics, momentum; rank 0 also SlowMo's x_prev and u, and the
    # previous outer update.
    assert by_id["checkpoint.bytes"]["median"] == 2 * (params + buffers + params) + 3 * params


def test_quick_bench_figures_are_sane(quick_run) -> None:
    _, document, _ = quick_run
    by_id = figures(document)
    for figure in document["figures"]:
        values = figure["samples"]
        assert len(values) == figure["repetitions"] and all(math.isfinite(v) for v in values), figure["id"]
        spread = figure["spread"]
        assert spread["min"] <= spread["q1"] <= figure["median"] <= spread["q3"] <= spread["max"], figure["id"]
        if figure["unit"] in ("s", "samples/s", "ratio", "GB/s") and figure["id"] != "slowmo.extra_seconds_per_sync":
            assert all(v > 0 for v in values), figure["id"]
        if figure["unit"] == "fraction":
            assert all(0 <= v <= 1 for v in values), figure["id"]
        if figure["target"] is not None:
            op, value = figure["target"]["op"], figure["target"]["value"]
            assert figure["met"] == (figure["median"] <= value if op == "<=" else figure["median"] >= value)
        else:
            assert figure["met"] is None
    for name in (
        "averaging.sync_over_floor",
        "synchronous.allreduce_over_horovod",
        "synchronous.allreduce_over_ddp",
        "local_sgd.h16.efficiency",
        "checkpoint.write_over_raw",
        "checkpoint.read_over_raw",
    ):
        assert name in by_id and by_id[name]["target"] is not None
    # Paired ratios: each sample is the quotient of the same repetition's two measurements.
    write, raw = by_id["checkpoint.write_seconds"]["samples"], by_id["checkpoint.raw_write_seconds"]["samples"]
    assert by_id["checkpoint.write_over_raw"]["samples"] == pytest.approx(
        [r / w for r, w in zip(raw, write, strict=True)]
    )
    limit = by_id["throughput.limit_samples_per_s"]["samples"]
    h4 = by_id["local_sgd.h4.samples_per_s"]["samples"]
    assert by_id["local_sgd.h4.efficiency_in_process"]["samples"] == pytest.approx(
        [a / b for a, b in zip(h4, limit, strict=True)]
    )
    # The target's efficiency is against the bare limit, measured before any communication library started.
    bare = by_id["throughput.bare_limit_samples_per_s"]["median"]
    assert by_id["local_sgd.h16.efficiency"]["samples"] == pytest.approx(
        [v / bare for v in by_id["local_sgd.h16.samples_per_s"]["samples"]]
    )
    # Less communication, smaller share of the time communicating (H=1 against H=32, 8 vs 1/4 syncs per window).
    assert by_id["local_sgd.h32.comm_share"]["median"] < by_id["local_sgd.h1.comm_share"]["median"]
    # Where a synchronous step's CPU goes, for the package and both baselines: the whole process (every
    # thread, the libraries' own included) uses at least what the step's thread does.
    for name in ("allreduce", "ddp", "horovod"):
        step = by_id[f"synchronous.{name}.cpu_per_step.step"]["samples"]
        process = by_id[f"synchronous.{name}.cpu_per_step.process"]["samples"]
        assert all(0 < s <= p for s, p in zip(step, process, strict=True)), (name, step, process)
    totals = document["targets"]
    judged = [f for f in document["figures"] if f["target"] is not None]
    assert totals["total"] == len(judged) and totals["met"] == sum(f["met"] for f in judged)


def test_quick_bench_measures_every_precision_and_the_batched_simulation(quick_run) -> None:
    _, document, _ = quick_run
    by_id = figures(document)
    assert document["measurement"]["precisions"] == ["fp32", "bf16"]
    assert document["measurement"]["simulated_workers"] == 4
    for precision in ("fp32", "bf16"):
        engine = by_id[f"precision.{precision}.samples_per_s"]["samples"]
        plain = by_id[f"precision.{precision}.plain_samples_per_s"]["samples"]
        # The same window in both: the paired ratio of times is the ratio of the rates.
        assert by_id[f"precision.{precision}.vs_plain"]["samples"] == pytest.approx(
            [e / p for e, p in zip(engine, plain, strict=True)]
        )
        assert by_id[f"precision.{precision}.vs_plain"]["target"] == {"op": ">=", "value": 0.95}
    batched = by_id["simulation.replicated_samples_per_s"]["samples"]
    sequential = by_id["simulation.sequential_samples_per_s"]["samples"]
    assert by_id["simulation.speedup"]["samples"] == pytest.approx(
        [b / s for b, s in zip(batched, sequential, strict=True)]
    )


def test_horovod_baseline_runs_apart_from_the_package_on_another_backend(tmp_path: Path) -> None:
    """With the mpi backend, Horovod's windows run between the package's windows before hvd.init and
    after hvd.shutdown, and the ratio pairs each with the mean of the package's two."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--backend", "mpi", "--phases", "throughput", "--baselines", "horovod"]
    proc = run_mpi(2, bench(*args, "--sync-periods", "16", "--repeats", "2", "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    assert document["schema_version"] == "1.8" and document["measurement"]["baselines"] == ["horovod"]
    by_id = figures(document)
    assert "synchronous.allreduce_with_horovod_running.samples_per_s" not in by_id
    around = by_id["synchronous.allreduce_around_horovod.samples_per_s"]["samples"]
    horovod = by_id["synchronous.horovod.samples_per_s"]["samples"]
    assert len(around) == len(horovod) == 2
    assert by_id["synchronous.allreduce_over_horovod"]["samples"] == pytest.approx(
        [a / h for a, h in zip(around, horovod, strict=True)]
    )
    # The mpi backend's communication thread carries the gradient allreduces: its CPU is measured apart.
    assert by_id["synchronous.allreduce.cpu_per_step.communication"]["median"] > 0
    assert len(by_id["synchronous.horovod.cpu_per_step.process"]["samples"]) == 2


def test_the_json_and_the_start_line_name_the_machine_its_kernels_and_each_ranks_cores(tmp_path: Path) -> None:
    """Each rank bound to its own core (taskset, as a launcher's binding does) and torch's kernels capped
    at the baseline instruction set: the JSON records both, and the CPU model, and the start line says so."""
    out = tmp_path / "bench.json"
    cores = len(os.sched_getaffinity(0))
    argv = " ".join(bench("--quick", "--phases", "averaging", "--repeats", "1", "--out", str(out))[1:])
    pinned = f"exec taskset -c $((OMPI_COMM_WORLD_RANK % {cores})) {sys.executable} {argv}"
    proc = run_mpi(2, ["sh", "-c", pinned], timeout=120, env={"ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    machine = document["environment"]
    assert machine["rank_cores"] == [[0], [1 % cores]]
    assert machine["cpu_capability"] == "DEFAULT"  # what torch reports with the variable set
    assert machine["isa_settings"] == {"ATEN_CPU_CAPABILITY": "default"}
    assert machine["cpu"] and machine["cpu_count"] == os.cpu_count()
    start = proc.stdout.splitlines()[0]
    assert start.endswith(
        f"| {machine['cpu']}, {os.cpu_count()} cores, DEFAULT kernels (ATEN_CPU_CAPABILITY=default), "
        f"ranks on cores 0 | {1 % cores}"
    ), start


def test_precision_phase_measures_torch_compile_paired_with_eager(tmp_path: Path) -> None:
    """--compile true adds the compiled package step and the compiled plain loop to the precision phase,
    every repetition paired with the eager ones."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--phases", "precision", "--precisions", "bf16", "--compile", "true", "--repeats", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "bench", *args, "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    by_id = figures(document)
    eager, compiled = by_id["precision.bf16.samples_per_s"], by_id["precision.bf16.compiled_samples_per_s"]
    assert by_id["precision.bf16.compile_speedup"]["samples"] == pytest.approx(
        [c / e for c, e in zip(compiled["samples"], eager["samples"], strict=True)]
    )
    plain = by_id["precision.bf16.compiled_plain_samples_per_s"]["samples"]
    assert by_id["precision.bf16.compiled_vs_plain"]["samples"] == pytest.approx(
        [c / p for c, p in zip(compiled["samples"], plain, strict=True)]
    )
    assert by_id["precision.bf16.compiled_vs_plain"]["target"] is not None


GPT_SHAPE = GptConfig(layers=1, heads=2, dim=32, seq_len=16, vocab=256)
GPT_ARGS = ["--model", "gpt", "--gpt-layers", "1", "--gpt-heads", "2", "--gpt-dim", "32", "--gpt-seq-len", "16"]


def test_precision_phase_of_a_language_model_reports_tokens_per_s_against_the_nanogpt_loop(tmp_path: Path) -> None:
    """--model gpt: both loops train the transformer with AdamW on random token ids; every rate in samples/s
    has its twin in tokens/s (times seq_len), the ratio to the plain loop is judged as a classifier's, and a
    CPU has no MFU, said with the reason."""
    out = tmp_path / "bench.json"
    args = ["--quick", *GPT_ARGS, "--batch", "4", "--phases", "precision", "--precisions", "bf16", "--repeats", "2"]
    proc = run_mpi(2, bench(*args, "--steps", "2", "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    problem = document["problem"]
    assert problem["optimizer"] == {"name": "adamw", "clip_grad_norm": 1.0}
    assert problem["gpt"] == dataclasses.asdict(GPT_SHAPE) and problem["tokens_per_sample"] == 16
    assert problem["parameters"] == parameter_count(GPT_SHAPE) and problem["image_size"] is None
    assert " seq_len=16 " in document["summary_line"]
    by_id = figures(document)
    for rate in ("samples_per_s", "plain_samples_per_s"):
        samples = by_id[f"precision.bf16.{rate}"]
        tokens = by_id[f"precision.bf16.{rate.replace('samples', 'tokens')}"]
        assert tokens["unit"] == "tokens/s" and samples["unit"] == "samples/s"
        assert tokens["samples"] == pytest.approx([v * 16 for v in samples["samples"]], rel=1e-12)
        # One value per repetition.
        assert len(samples["samples"]) == 2 and all(v > 0 for v in samples["samples"])
    engine, plain = (
        by_id["precision.bf16.tokens_per_s"]["samples"],
        by_id["precision.bf16.plain_tokens_per_s"]["samples"],
    )
    vs_plain = by_id["precision.bf16.vs_plain"]
    assert vs_plain["samples"] == pytest.approx([e / p for e, p in zip(engine, plain, strict=True)])
    assert vs_plain["target"] == {"op": ">=", "value": 0.95}
    mfu = document["measurement"]["mfu"]
    assert mfu["reason"] == "no GPU" and mfu["peak_flops"] == {"bf16": None} and mfu["device"] is None
    assert mfu["flops_per_token"] == flops_per_token(GPT_SHAPE)
    assert {"id": "precision.bf16.mfu", "reason": "no GPU"} in document["skipped"]


def test_projection_follows_the_alpha_beta_model(quick_run) -> None:
    _, document, _ = quick_run
    projection = document["projection"]
    assert projection["label"] == "projection, not a measurement"
    compute = projection["compute_seconds_per_step"]
    assert compute == pytest.approx(figures(document)["throughput.bare_step_seconds"]["median"])
    links = {link["name"]: link for link in projection["interconnects"]}
    assert len(projection["rows"]) == len(links) * len(projection["workers"]) * (1 + len(SYNC_PERIODS))
    for row in projection["rows"]:
        link, m = links[row["interconnect"]], row["workers"]
        n = projection["gradient_bytes_per_step"] if row["method"] == "allreduce" else projection["bytes_per_sync"]
        ring = 2 * (m - 1) * link["alpha_seconds"] + 2 * (m - 1) / m * n / link["beta_bytes_per_second"]
        assert row["comm_seconds_per_step"] == pytest.approx(ring / row["sync_period"])
        assert row["efficiency"] == pytest.approx(compute / (compute + ring / row["sync_period"]))


def test_quick_bench_at_two_ranks_skips_the_hierarchy_saying_why(quick_run) -> None:
    _, document, _ = quick_run
    skipped = {entry["id"]: entry["reason"] for entry in document["skipped"]}
    assert skipped["hierarchy"].startswith("2 rank(s) hold no two workers of 2 ranks")
    assert document["measurement"]["ranks_per_worker"] is None
    assert not [f for f in document["figures"] if f["group"] == "hierarchy"]


def test_hierarchy_phase_follows_the_schema_and_names_every_configuration(hierarchy_run) -> None:
    proc, document = hierarchy_run
    jsonschema.validate(document, SCHEMA)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert document["schema_version"] == "1.8" and document["world"]["size"] == 4
    assert document["measurement"]["ranks_per_worker"] == 2
    per_configuration = ("samples_per_s", "efficiency", "efficiency_in_process", "global_bytes_per_sample")
    configurations = ["allreduce"] + [f"{kind}_h{h}" for h in HIERARCHY_PERIODS for kind in ("local_sgd", "workers_r2")]
    expected = {"hierarchy.limit.samples_per_s"}
    expected |= {f"hierarchy.{c}.{name}" for c in configurations for name in (*per_configuration, "bytes_per_sample")}
    expected |= {
        f"hierarchy.workers_r2_h{h}.{name}"
        for h in HIERARCHY_PERIODS
        for name in ("worker_bytes_per_sample", "over_local_sgd")
    }
    assert {f["id"] for f in document["figures"]} == expected
    for figure in document["figures"]:
        assert figure["group"] == "hierarchy" and figure["repetitions"] == 3, figure["id"]
        assert all(math.isfinite(v) and v > 0 for v in figure["samples"]), figure["id"]
    # The projection carries the two fabrics, from the bare limit this phase measured.
    two = document["projection"]["two_fabrics"]
    assert two["label"] == "projection, not a measurement" and two["ranks_per_node"] == 8


def test_hierarchy_phase_counts_bytes_per_level_exactly(hierarchy_run) -> None:
    _, document = hierarchy_run
    by_id = figures(document)
    params, buffers = model_bytes()
    model = params + buffers  # one model average: parameters and BatchNorm statistics
    repeats = [None] * 3

    def samples(figure_id: str) -> list[float]:
        figure = by_id[figure_id]
        assert figure["exact"], figure_id
        return figure["samples"]

    # All-reduce SGD: every step's gradients over all ranks.
    assert samples("hierarchy.allreduce.global_bytes_per_sample") == [params / QUICK_BATCH for _ in repeats]
    assert samples("hierarchy.allreduce.bytes_per_sample") == [params / QUICK_BATCH for _ in repeats]
    for h in HIERARCHY_PERIODS:
        window = h * -(-HIERARCHY_STEPS // h)
        # Flat local SGD sends the whole model average over all ranks every H steps; workers of 2 ranks
        # send one half each between workers (rank 0's figure: the first, longer half of an odd count) ...
        flat_model = model / (h * QUICK_BATCH)
        assert samples(f"hierarchy.local_sgd_h{h}.global_bytes_per_sample") == [flat_model for _ in repeats]
        assert samples(f"hierarchy.local_sgd_h{h}.bytes_per_sample") == [flat_model for _ in repeats]
        half = 4 * -(-(model // 4) // 2)
        assert samples(f"hierarchy.workers_r2_h{h}.global_bytes_per_sample") == [
            half / (h * QUICK_BATCH) for _ in repeats
        ]
        # ... and inside the worker every step's gradients, and at a sync the BN average and the gathered halves.
        inside = (window * params + window // h * (buffers + model)) / (window * QUICK_BATCH)
        assert samples(f"hierarchy.workers_r2_h{h}.worker_bytes_per_sample") == [inside for _ in repeats]
        total = (window * params + window // h * (buffers + model + half)) / (window * QUICK_BATCH)
        assert samples(f"hierarchy.workers_r2_h{h}.bytes_per_sample") == [total for _ in repeats]
        # Paired: each repetition's two rates measured in the same repetition.
        grouped = by_id[f"hierarchy.workers_r2_h{h}.samples_per_s"]["samples"]
        flat = by_id[f"hierarchy.local_sgd_h{h}.samples_per_s"]["samples"]
        assert by_id[f"hierarchy.workers_r2_h{h}.over_local_sgd"]["samples"] == pytest.approx(
            [g / f for g, f in zip(grouped, flat, strict=True)]
        )


def test_bad_ranks_per_worker_ends_every_rank_with_one_line_and_status_2(tmp_path: Path) -> None:
    proc = run_mpi(4, bench("--quick", "--phases", "hierarchy", "--ranks-per-worker", "3"), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert errors == [
        "hpc-localsgd: error: --ranks-per-worker: 3 ranks per worker need a world of 2·3, 3·3, ... ranks "
        "(two workers or more); this run has 4"
    ], proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--repeats", "0"], "--repeats: must be >= 1, got 0"),
        (["--model", "nosuchnet"], "model.name: unknown model 'nosuchnet'"),
        (["--sync-periods", "4,0"], "--sync-periods: must be positive integers, got 4,0"),
    ],
)
def test_bad_input_ends_every_rank_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_mpi(2, bench("--quick", "--io-dir", str(tmp_path), *args), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_bad_input_single_process_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "bench", "--quick", "--out", str(tmp_path / "missing" / "b.json")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hpc-localsgd: error: --out: folder '{tmp_path / 'missing'}' does not exist"


def test_sbatch_script_parses() -> None:
    subprocess.run(["bash", "-n", str(REPO_ROOT / "slurm" / "bench.sbatch")], check=True)


def test_reframe_check_runs_with_the_local_launcher(tmp_path: Path, ranks_versions: dict[str, str]) -> None:
    reframe = str(Path(sys.executable).parent / "reframe")
    # scripts/install.sh installs reframe-hpc: a missing one is a failure, not a skip.
    assert Path(reframe).exists(), "reframe-hpc is not installed in this environment"
    # TMPDIR: ReFrame logs its start-up to a temporary file before it reads the configuration.
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [
            reframe,
            "-C",
            str(REPO_ROOT / "bench" / "reframe" / "settings.py"),
            "-c",
            str(REPO_ROOT / "bench" / "reframe" / "hpc_localsgd_bench.py"),
            "--prefix",
            str(tmp_path),
            "--nocolor",
            "-S",
            "quick=true",
            "--keep-stage-files",
            "-r",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "[  PASSED  ] Ran 1/1 test case(s)" in proc.stdout, proc.stdout[-5000:]
    # The performance variables were extracted from the summary line.
    assert "sync_over_floor" in proc.stdout and "h16_efficiency" in proc.stdout
    # The check's ranks ran this environment's interpreter and packages: their bench.json says so.
    written = sorted((tmp_path / "stage").rglob("bench.json"))
    assert len(written) == 1, written
    assert recorded_versions(json.loads(written[0].read_text()), ranks_versions) == ranks_versions


def test_the_streaming_phase_measures_only_the_configurations_asked_for(tmp_path: Path) -> None:
    chosen = ("h4_delay3", "h1_int8_delay1")  # the two with targets, neither the first of the list
    out = tmp_path / "bench.json"
    args = ["--quick", "--phases", "streaming", "--streaming-variants", ",".join(chosen), "--steps", "4"]
    proc = run_mpi(2, bench(*args, "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    assert document["measurement"]["streaming_variants"] == list(chosen)
    measured = {f["id"].split(".")[1] for f in document["figures"] if f["id"].endswith(".efficiency")}
    assert measured == set(chosen)
    params, buffers = model_bytes()
    int8_params = params // 4 + 4 * math.ceil(params // 4 / 256)  # a byte an element, a float scale a block
    # A sync sends the int8 update and the BatchNorm statistics in fp32, whatever else was left out.
    assert figures(document)["streaming.h1_int8_delay1.bytes_per_sync"]["median"] == int8_params + buffers
    assert figures(document)["streaming.h4_delay3.bytes_per_sync"]["median"] == params + buffers
    assert figures(document)["streaming.int8.bytes_vs_fp32"]["median"] == pytest.approx(int8_params / params)
    # Beside the bare limit, the in-process one, interleaved: each configuration's efficiency against it is
    # paired repetition by repetition.
    by_id = figures(document)
    limit = by_id["streaming.limit.samples_per_s"]["samples"]
    assert len(limit) == 3 and all(rate > 0 for rate in limit)
    for name in chosen:
        rates = by_id[f"streaming.{name}.samples_per_s"]["samples"]
        paired = [rate / alone for rate, alone in zip(rates, limit, strict=True)]
        assert by_id[f"streaming.{name}.efficiency_in_process"]["samples"] == pytest.approx(paired)
    assert by_id["streaming.limit_over_bare"]["median"] > 0


def test_the_streaming_phase_says_where_the_cpu_goes(tmp_path: Path) -> None:
    """CPU seconds a step on each Python thread of a rank: the step's own, the sync thread's (told on:
    the int8 variant encodes and decodes there; the blocking one has none) and the mpi backend's
    communication thread. A thread's CPU time cannot exceed the window's wall time."""
    out = tmp_path / "bench.json"
    variants = "h4,h1_int8_delay1"
    args = ["--quick", "--phases", "streaming", "--streaming-variants", variants, "--steps", "4"]
    proc = run_mpi(2, bench(*args, "--backend", "mpi", "--sync-thread", "true", "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    assert document["measurement"]["sync_thread"] is True
    by_id = figures(document)
    for variant in variants.split(","):
        # Repetition by repetition: the slowest rank's seconds a step, and the ranks' mean CPU a step.
        walls = [2 * QUICK_BATCH / rate for rate in by_id[f"streaming.{variant}.samples_per_s"]["samples"]]
        steps = by_id[f"streaming.{variant}.cpu_per_step.step"]["samples"]
        assert len(steps) == len(walls) == 3
        assert all(0 < cpu <= 1.01 * wall for cpu, wall in zip(steps, walls, strict=True)), (steps, walls)
        assert by_id[f"streaming.{variant}.cpu_per_step.communication"]["median"] > 0
    assert by_id["streaming.h1_int8_delay1.cpu_per_step.sync"]["median"] > 0
    assert "streaming.h4.cpu_per_step.sync" not in by_id


def test_the_streaming_phase_compares_the_sync_thread_off_and_on(tmp_path: Path) -> None:
    """``--compare-sync-thread``: each overlapped configuration twice, without and with the sync thread,
    in the same repetitions; a blocking one once. The paired figure is the two rates' ratio repetition by
    repetition, and only the twin with the thread has a sync thread's CPU."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--phases", "streaming", "--streaming-variants", "h4,h1_int8_delay1", "--steps", "4"]
    proc = run_mpi(2, bench(*args, "--backend", "mpi", "--compare-sync-thread", "true", "--out", str(out)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    assert document["measurement"]["sync_thread"] == "compared"
    assert document["skipped"] == []
    by_id = figures(document)
    measured = [f["id"].split(".")[1] for f in document["figures"] if f["id"].endswith(".efficiency")]
    assert measured == ["h4", "h1_int8_delay1", "h1_int8_delay1_sync_thread"]
    off, on = (by_id[f"streaming.{name}.samples_per_s"]["samples"] for name in measured[1:])
    speedup = by_id["streaming.h1_int8_delay1.sync_thread_speedup"]["samples"]
    assert speedup == pytest.approx([a / b for a, b in zip(on, off, strict=True)]) and len(speedup) == 3
    assert "streaming.h4.sync_thread_speedup" not in by_id
    assert by_id["streaming.h1_int8_delay1_sync_thread.cpu_per_step.sync"]["median"] > 0
    assert "streaming.h1_int8_delay1.cpu_per_step.sync" not in by_id
    # Both carry the configuration's target and send the same bytes.
    for name in measured[1:]:
        assert by_id[f"streaming.{name}.efficiency"]["target"] == {"op": ">=", "value": 0.8}
    assert (
        by_id["streaming.h1_int8_delay1_sync_thread.bytes_per_sync"]["median"]
        == (by_id["streaming.h1_int8_delay1.bytes_per_sync"]["median"])
    )


def test_a_sync_thread_that_cannot_run_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """One rank has nothing to average beside its step: the twin is left out and the JSON says why."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--phases", "streaming", "--streaming-variants", "h1_int8_delay1", "--steps", "2"]
    proc = run_mpi(
        1, bench(*args, "--backend", "single", "--compare-sync-thread", "true", "--out", str(out)), timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    jsonschema.validate(document, SCHEMA)
    reason = "the sync thread cannot run here: one worker: nothing to average"
    assert document["skipped"] == [{"id": "streaming.h1_int8_delay1_sync_thread", "reason": reason}]
    assert f"skipped streaming.h1_int8_delay1_sync_thread: {reason}" in proc.stdout
    assert "streaming.h1_int8_delay1.efficiency" in figures(document)
    assert not [f for f in figures(document) if "sync_thread" in f]
