"""The three outputs of a benchmark run: a table for people, one greppable line, and a JSON file
that follows ``schema.json`` (shipped beside this file; its ``schema_version`` is below)."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..comm.base import Communicator
from ..launcher.env import software_versions
from .stats import Figure

# 1.1: the hierarchy phase, measurement.ranks_per_worker, projection.two_fabrics; 1.2: the streaming,
# precision and simulation phases; 1.3: allreduce_over_horovod isolates Horovod from the package's windows
# (other backends), figure allreduce_around_horovod in place of allreduce_with_horovod_running; 1.4:
# measurement.streaming_variants; 1.5: measurement.sync_thread, streaming.<variant>.cpu_per_step.<thread>;
# 1.6: measurement.sync_thread "compared", <variant>_sync_thread and streaming.<variant>.sync_thread_speedup;
# 1.7: environment.cpu_capability, environment.isa_settings and environment.rank_cores; 1.8: language models
# (problem.optimizer, .tokens_per_sample, .gpt, image_size null; measurement.mfu; figures in tokens/s)
SCHEMA_VERSION = "1.8"
SUMMARY_PREFIX = "hpc-localsgd-bench:"

# Figures named in the summary line, with their keys there (ReFrame and grep read these).
SUMMARY_KEYS = (
    ("sync_over_floor", "averaging.sync_over_floor"),
    ("allreduce_over_horovod", "synchronous.allreduce_over_horovod"),
    ("allreduce_over_ddp", "synchronous.allreduce_over_ddp"),
    ("h16_efficiency", "local_sgd.h16.efficiency"),
    ("slowmo_extra_ms", "slowmo.extra_seconds_per_sync"),
    ("slowmo_param_copies", "slowmo.extra_memory_param_copies"),
    ("ckpt_write_over_raw", "checkpoint.write_over_raw"),
    ("ckpt_read_over_raw", "checkpoint.read_over_raw"),
)


def load_schema() -> dict[str, Any]:
    return json.loads(importlib.resources.files(__package__).joinpath("schema.json").read_text())


versions = software_versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Variables that make torch and oneDNN take kernels for another instruction set than the CPU's best.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# Cores a rank may run on travel as a mask of this many bits (rank_cores).
CORE_MASK_BITS = 4096


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Where rank 0 ran; the load average tells whether the machine was shared meanwhile. The CPU
    model, the instruction set torch's kernels use and the cores each rank may use (``rank_cores``,
    filled in once the ranks can gather) are recorded because a ratio between two loops measured in
    the same run still moves with them: two figures from different machines are not one figure."""
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_settings": {name: os.environ[name] for name in ISA_VARIABLES if name in os.environ},
        "rank_cores": [sorted(os.sched_getaffinity(0))],
        "threads_per_rank": threads,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_start": list(os.getloadavg()),
        "load_average_end": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def gather_rank_cores(comm: Communicator) -> list[list[int]]:
    """The cores each rank may run on (its CPU affinity), in rank order: whether and how ranks were pinned."""
    mask = torch.zeros(CORE_MASK_BITS, dtype=torch.uint8)
    mask[[core for core in os.sched_getaffinity(0) if core < CORE_MASK_BITS]] = 1
    gathered = torch.zeros((comm.size, CORE_MASK_BITS), dtype=torch.uint8)
    comm.iallgather(mask, gathered).wait()
    return [row.nonzero().flatten().tolist() for row in gathered]


def describe_machine(info: dict[str, Any]) -> str:
    """One phrase for the start-up line: ``AMD EPYC 9R14, 2 cores, AVX512 kernels, ranks on cores 0 | 1``."""
    settings = ", ".join(f"{name}={value}" for name, value in info["isa_settings"].items())
    cores = " | ".join(_core_ranges(cores) for cores in info["rank_cores"])
    return (
        f"{info['cpu']}, {info['cpu_count']} cores, {info['cpu_capability']} kernels"
        f"{f' ({settings})' if settings else ''}, ranks on cores {cores}"
    )


def _core_ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2,5"."""
    ranges: list[str] = []
    for core in cores:
        if ranges and core == int(ranges[-1].split("-")[-1]) + 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{core}"
        else:
            ranges.append(str(core))
    return ",".join(ranges)


def targets_summary(figures: list[Figure]) -> dict[str, Any]:
    judged = [f for f in figures if f.target is not None]
    return {
        "met": sum(1 for f in judged if f.met),
        "total": len(judged),
        "all_met": all(f.met for f in judged),
        "missed": [f.id for f in judged if not f.met],
    }


def summary_line(world: dict[str, Any], problem: dict[str, Any], figures: list[Figure], out: str | None) -> str:
    by_id = {f.id: f for f in figures}
    parts = [
        SUMMARY_PREFIX,
        f"ranks={world['size']}",
        f"backend={world['backend']}",
        f"model={problem['model']}",
        f"params={problem['parameters']}",
        f"batch={problem['batch_per_rank']}",
        f"image={problem['image_size']}"
        if problem.get("tokens_per_sample") is None
        else f"seq_len={problem['tokens_per_sample']}",
    ]
    for key, figure_id in SUMMARY_KEYS:
        figure = by_id.get(figure_id)
        if figure is None:
            parts.append(f"{key}=n/a")
        elif key.endswith("_ms"):
            parts.append(f"{key}={figure.median * 1e3:.4g}")
        else:
            parts.append(f"{key}={figure.median:.3f}")
    totals = targets_summary(figures)
    parts.append(f"targets_met={totals['met']}/{totals['total']}")
    if out:
        parts.append(f"json={out}")
    return " ".join(parts)


def _number(value: float, unit: str) -> str:
    if unit == "B" or unit == "B/sample":
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{value:.4g}"
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if unit != "ratio" else f"{value:.3f}"


def _shown(value: float, unit: str, measured_unit: str) -> str:
    """``value`` (in ``measured_unit``) as the table shows it in ``unit``: ``ms`` for seconds below one."""
    return f"{value * 1e3:.4g}" if unit == "ms" else _number(value, measured_unit)


def format_table(header: str, figures: list[Figure]) -> str:
    width = max([42, *(len(f.id) for f in figures)])
    lines = [header, f"{'figure':<{width}} {'median':>13} {'min … max':>27} {'unit':<10} {'target':<8} met"]
    group = None
    for f in figures:
        if f.group != group:
            group = f.group
            lines.append(f"-- {group}")
        spread = f.spread()
        unit = "ms" if f.unit == "s" and all(abs(v) < 1 for v in f.samples) else f.unit
        spread_text = (
            "exact" if f.exact else f"{_shown(spread['min'], unit, f.unit)} … {_shown(spread['max'], unit, f.unit)}"
        )
        target = "" if f.target is None else f"{f.target.op}{f.target.value:g}"
        met = "" if f.met is None else ("yes" if f.met else "MISSED")
        lines.append(
            f"{f.id:<{width}} {_shown(f.median, unit, f.unit):>13} {spread_text:>27} {unit:<10} {target:<8} {met}"
        )
    return "\n".join(lines)


def build_document(
    *,
    command: list[str],
    environment_info: dict[str, Any],
    world: dict[str, Any],
    problem: dict[str, Any],
    measurement: dict[str, Any],
    figures: list[Figure],
    skipped: list[dict[str, str]],
    projection: dict[str, Any] | None,
    summary: str,
    seconds: float,
) -> dict[str, Any]:
    environment_info = {**environment_info, "load_average_end": list(os.getloadavg())}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "hpc-localsgd bench",
        "command": command,
        "wall_seconds": seconds,
        "environment": environment_info,
        "versions": versions(),
        "world": world,
        "problem": problem,
        "measurement": measurement,
        "figures": [f.as_json() for f in figures],
        "targets": targets_summary(figures),
        "skipped": skipped,
        "projection": projection,
        "summary_line": summary,
    }


def validate_document(document: dict[str, Any]) -> None:
    """Check against schema.json when jsonschema is installed (it is in the test extra)."""
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(document, load_schema())


def write_document(document: dict[str, Any], path: str) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, target)
