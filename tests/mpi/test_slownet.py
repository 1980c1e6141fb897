"""The emulated slow network (launcher/slownet.py): two namespaces, a real rate limit, nothing left behind;
and a sweep run on it (``sweep --run-here --emulated-link``) that ``report --measured`` places beside
its projection.

It needs root and the ``ip``/``tc`` tools; where it cannot create namespaces the test fails with the
harness's one line (never a skip).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from hpc_localsgd.launcher.slownet import (
    SlowNetworkUnavailable,
    core_shares,
    existing_namespaces,
    slow_network,
)
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, run_gpu_check

DRIVER = str(REPO_ROOT / "tests" / "mpi" / "slownet_driver.py")
RATE_BITS = 100_000_000  # "100mbit": slow enough that the payload's time dwarfs latency, fast enough for CI
PAYLOAD = 4_000_000  # bytes: at least 0.32 s on the link


def ours(prefix: str) -> set[str]:
    return {name for name in existing_namespaces() if name.startswith(prefix)}


def test_ranks_in_two_namespaces_talk_over_a_rate_limited_link() -> None:
    prefix = "hlsgd-test"
    try:
        with slow_network(2, "100mbit", prefix=prefix) as network:
            assert ours(prefix) == {f"{prefix}-0", f"{prefix}-1", f"{prefix}-hub"}
            done = network.run([sys.executable, DRIVER, "--bytes", str(PAYLOAD)], timeout=180)
    except SlowNetworkUnavailable as error:
        pytest.fail(str(error))
    report = f"exit code {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, report
    lines = dict(
        (int(m[1]), (m[2], float(m[3]), tuple(int(core) for core in m[4].split(","))))
        for m in re.finditer(r"^OK rank (\d) netns (\S+) seconds ([\d.]+) cores ([\d,]+)$", done.stdout, re.MULTILINE)
    )
    assert sorted(lines) == [0, 1], report
    own = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip()
    namespaces = {lines[0][0], lines[1][0]}
    assert len(namespaces) == 2 and own not in namespaces, report  # one namespace each, neither this one's
    # Rank 1 finishes the broadcast only when every byte has crossed the link: bytes / rate at least
    # (HTB's burst lets a few kilobytes through early: 2 % of slack).
    assert lines[1][1] >= 0.98 * PAYLOAD * 8 / RATE_BITS, report
    # Each rank runs on its own share of this machine's cores, as on one node; not every rank on the same
    # core, which is where mpirun binds one rank per "node" without the rankfile.
    assert [lines[0][2], lines[1][2]] == core_shares(2, sorted(os.sched_getaffinity(0))), report
    assert ours(prefix) == set()


COLLECTIVES_DRIVER = str(REPO_ROOT / "tests" / "mpi" / "collectives_driver.py")
NAMESPACE_REFUSAL = (
    "hpc-localsgd: error: comm.backend is 'torch' and some rank runs on rank 0's host but in another network "
    "namespace, where rank 0's address cannot be told from its host name; set MASTER_ADDR (an address of rank 0 "
    "that every rank reaches) and MASTER_PORT"
)


def test_the_torch_backend_reaches_rank_0_across_the_namespaces() -> None:
    # The namespaces share this machine's host name. The harness gives the ranks rank 0's address
    # (MASTER_ADDR) and their link (GLOO_SOCKET_IFNAME), so torch.distributed's store and Gloo connect over
    # the links; without them every rank stops with one line rather than waiting on its own loopback.
    shell = '"$0" "$@"; echo "exit status $?"'
    driver = [sys.executable, COLLECTIVES_DRIVER, "--backend", "torch", "--compression"]
    try:
        with slow_network(2, "1gbit", prefix="hlsgd-torch") as network:
            # The driver imports the tests' reference (tests/compression_reference.py): the repository on the path.
            on_path = {"PYTHONPATH": str(REPO_ROOT)}
            works = network.run(driver, timeout=180, env=on_path)
            refused = network.run(
                ["sh", "-c", shell, "env", "-u", "MASTER_ADDR", "-u", "MASTER_PORT", *driver],
                timeout=180,
                env={**on_path, "OMPI_MCA_orte_abort_on_non_zero_status": "0"},
            )
    except SlowNetworkUnavailable as error:
        pytest.fail(str(error))
    report = f"--- stdout ---\n{works.stdout}\n--- stderr ---\n{works.stderr}"
    assert works.returncode == 0, report
    for rank in range(2):
        assert f"OK torch rank {rank} of 2 (torch.distributed Gloo on host memory)" in works.stdout, report
    report = f"--- stdout ---\n{refused.stdout}\n--- stderr ---\n{refused.stderr}"
    assert refused.stdout.splitlines() == ["exit status 2"] * 2, report
    errors = [line for line in refused.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    assert errors == [NAMESPACE_REFUSAL] * 2 and "Traceback" not in refused.stderr, report
    assert ours("hlsgd-torch") == set()


TRANSFER_SCRIPT = str(REPO_ROOT / "scripts" / "slownet-transfer.py")


def test_the_transfer_breakdown_script_times_each_way_of_waiting_on_the_link() -> None:
    # scripts/slownet-transfer.py gives docs/BENCHMARKS.md its breakdown of a sync's cost beside a step; here
    # it runs small (a small model, 1 M values) on a 100 Mb/s link, and every transfer it times must have
    # taken at least what its bytes need on the link: each rank receives the other's 1 MB (allgather) or,
    # by any algorithm, half the other's 4 MB (allreduce), and both halves as the backend's two exchanges do it.
    elements = 1_000_000
    try:
        with slow_network(2, "100mbit", prefix="hlsgd-transfer") as network:
            done = network.run(
                [sys.executable, TRANSFER_SCRIPT, "--model", "resnet18", "--batch", "2", "--steps", "2"]
                + ["--elements", str(elements), "--alone", "1"],
                timeout=300,
            )
    except SlowNetworkUnavailable as error:
        pytest.fail(str(error))
    report = f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, report
    line = re.compile(
        r"^rank (\d) (\S+) +transfer alone ([\d.]+) s .*, ([\d.]+) s beside the step .* speed ([\d.]+), ",
        re.MULTILINE,
    )
    found = {(int(m[1]), m[2]): (float(m[3]), float(m[4]), float(m[5])) for m in line.finditer(done.stdout)}
    ways = ("allreduce", "allreduce-polled", "allgather", "allgather-polled", "allreduce-exchanges", "wakeups")
    assert sorted(found) == sorted((rank, way) for rank in range(2) for way in ways), report
    least = {"allgather": elements, "allgather-polled": elements, "allreduce-exchanges": 4 * elements, "wakeups": 0}
    for (_, way), (alone, beside, speed) in found.items():
        least_bytes = least.get(way, 4 * elements / 2)
        assert min(alone, beside) >= 0.98 * least_bytes * 8 / RATE_BITS, report
        assert 0 < speed < 2, report
    for rank in range(2):  # the thread that only wakes up sleeps for its half second each time
        assert found[(rank, "wakeups")][1] >= 0.5, report
    # The machine's CPU by kind (/proc/stat): a blocking allreduce's poll never sleeps, so both ranks'
    # threads are busy for the whole transfer and the machine's CPU time per transfer is at least its time.
    machine = re.compile(
        r"^rank 0 allreduce +transfer alone ([\d.]+) s .* per transfer alone: "
        r"user ([\d.]+), system ([\d.]+), softirq ([\d.]+), irq ([\d.]+); per second of the bare steps: user",
        re.MULTILINE,
    ).search(done.stdout)
    assert machine is not None, report
    alone_seconds, *cpu = (float(value) for value in machine.groups())
    assert sum(cpu) >= alone_seconds, report
    assert ours("hlsgd-transfer") == set()


def test_gpu_check_compares_the_sync_thread_on_the_emulated_network_with_carried_tools(tmp_path: Path) -> None:
    """scripts/gpu-check.sh check 7 as a machine without iproute2 runs it: ip and tc packed by
    scripts/iproute2-bundle.sh (run through their own loader), the emulated network on the CPUs, the two
    target configurations without and with the sync thread in one bench run, and nothing left behind."""
    bundle = tmp_path / "iproute2"
    packed = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "iproute2-bundle.sh"), str(bundle)], capture_output=True, text=True
    )
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert sorted(path.name for path in (bundle / "bin").iterdir()) == ["ip", "tc"]
    before = existing_namespaces()
    out = tmp_path / "out"
    proc = run_gpu_check(out, "7", IPROUTE2=str(bundle))
    log = out / "bench-slownet.log"
    report = proc.stdout + proc.stderr + (log.read_text(errors="replace") if log.exists() else "")
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    check = [line for line in lines if line.startswith("gpu-check: 7 ")]
    assert len(check) == 1 and ": MEASURED ip " + str(bundle / "bin" / "ip") + "," in check[0], report
    assert ", in-process limit over bare " in check[0], report
    for variant in ("h4_delay3", "h1_int8_delay1"):
        assert f"; {variant} efficiency without the sync thread " in check[0], report
        assert check[0].count(f"{variant}") == 1 and check[0].count("(in-process ") == 4, report
    assert lines[-1].startswith("gpu-check: all checks passed"), report
    document = json.loads((out / "bench-slownet.json").read_text())
    assert document["measurement"]["sync_thread"] == "compared"
    assert document["world"]["size"] == 2 and document["skipped"] == []
    speedups = [f["id"] for f in document["figures"] if f["id"].endswith(".sync_thread_speedup")]
    assert speedups == ["streaming.h4_delay3.sync_thread_speedup", "streaming.h1_int8_delay1.sync_thread_speedup"]
    assert existing_namespaces() == before


def test_ranks_get_contiguous_shares_of_the_cores_as_on_one_node() -> None:
    assert core_shares(2, [0, 1]) == [(0,), (1,)]
    assert core_shares(2, [0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert core_shares(4, [0, 1]) == [(0,), (0,), (1,), (1,)]
    assert core_shares(2, [0, 1, 2]) == [(0,), (1, 2)]
    assert core_shares(3, [4, 6]) == [(4,), (4,), (6,)]  # the cores this process may use, by number
    assert core_shares(2, [5]) == [(5,), (5,)]


def test_namespaces_are_removed_when_the_body_fails() -> None:
    prefix = "hlsgd-fail"
    with pytest.raises(RuntimeError, match="inside"):
        with slow_network(2, "1gbit", prefix=prefix):
            assert len(ours(prefix)) == 3
            raise RuntimeError("inside")
    assert ours(prefix) == set()


def test_a_network_that_cannot_be_created_says_so_in_one_line_and_leaves_nothing() -> None:
    # A rate tc cannot parse: the namespaces exist by then and must go again.
    prefix = "hlsgd-bad"
    with pytest.raises(SlowNetworkUnavailable) as raised:
        with slow_network(2, "fast", prefix=prefix):
            pass
    message = str(raised.value)
    assert message.startswith("cannot set up the slow network: tc class add") and "\n" not in message
    assert ours(prefix) == set()


MEASURED_GRID = """
name: measured
base: {base}
set:
  model.width: 32          # 79 KB a sync: much more than what HTB lets through at once after an idle link
  train.epochs: 1
  train.eval_every_epochs: 0.5
  optim.warmup_epochs: 0.25
  optim.decay_epochs: [0.75]
  comm.backend: {backend}
  comm.simulated_workers: {workers}
variants:
  - {{algorithm.method: allreduce}}
  - {{algorithm.method: local_sgd, algorithm.sync_period: 4}}
slurm:
  ntasks_per_node: 2
"""
MEASURED_RATE, MEASURED_BETA = "20mbit", 20e6 / 8  # bytes per second


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def grid(tmp_path: Path, backend: str = "mpi", workers: int = 0) -> Path:
    path = tmp_path / f"grid-{backend}.yaml"
    base = REPO_ROOT / "configs" / "study" / "digits_smallcnn.yaml"
    path.write_text(MEASURED_GRID.format(base=base, backend=backend, workers=workers))
    return path


@pytest.mark.parametrize("backend", ["mpi", "torch"])  # torch: its store and Gloo over the links too
def test_a_sweep_on_the_emulated_network_is_measured_and_reported_beside_its_projection(
    tmp_path: Path, backend: str
) -> None:
    before = existing_namespaces()
    out = tmp_path / "sweep"
    done = cli(
        "sweep",
        str(grid(tmp_path, backend)),
        "--out",
        str(out),
        "--run-here",
        "--emulated-link",
        MEASURED_RATE,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"on an emulated {MEASURED_RATE} network" in done.stdout and "2 runs done" in done.stdout, done.stdout
    assert existing_namespaces() == before  # every namespace of every run removed
    for run in sorted((out / "runs").iterdir()):
        with h5py.File(run / "metrics.h5", "r") as f:
            assert f.attrs["emulated_link"] == MEASURED_RATE
    report = cli(
        "report", str(out / "runs"), "--measured", str(out / "runs"), "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    assert report.returncode == 0, report.stdout + report.stderr
    rows = {(r["method"], r["H"]): r for r in csv.DictReader((tmp_path / "r" / "tradeoff-measured.csv").open())}
    assert set(rows) == {("all-reduce", "1"), ("local SGD", "4")}
    for row in rows.values():
        steps, rounds, nbytes = (float(row[k]) for k in ("steps", "global_sync_rounds", "global_bytes_sent_per_worker"))
        assert row["link"] == f"emulated {MEASURED_RATE}" and row["workers"] == "2"
        # The projection: the run's measured compute and the ring model of the link (P = 2: 2 latencies,
        # each byte once).
        wire = nbytes / MEASURED_BETA
        projected = steps * float(row["compute_seconds_per_step"]) + rounds * 2 * 30e-6 + wire
        assert float(row["projected_seconds"]) == pytest.approx(projected)
        # The rate limit is real and the measurement sees it: training cannot end before its bytes have
        # crossed the link. HTB lets its burst (about 5 KB at this rate) through at once after the link
        # idled, at every sync: 10 % of slack.
        # (Not so the time rank 0 is blocked: the other rank's bytes start crossing while rank 0 still
        # computes, whenever that rank reaches the sync first.)
        assert float(row["measured_seconds"]) >= 0.9 * wire, row
        assert 0 < float(row["measured_comm_seconds"]) < float(row["measured_seconds"])
    svg = (tmp_path / "r" / "tradeoff.svg").read_text()
    assert f"emulated {MEASURED_RATE}: measured (open) and projected (filled)" in svg


def test_a_sweep_that_cannot_be_measured_on_the_emulated_network_is_refused_in_one_line(tmp_path: Path) -> None:
    mpi, simulated = str(grid(tmp_path)), str(grid(tmp_path, "simulated", 2))
    for args, message in (
        ((mpi, "--jobs", "2", "--emulated-link", MEASURED_RATE), "measures step times: run the points one at a time"),
        ((simulated, "--emulated-link", MEASURED_RATE), "runs simulated workers in one process"),
        ((mpi, "--emulated-link", "fast"), "--emulated-link: not a tc rate such as 1gbit or 100mbit: 'fast'"),
    ):
        done = cli("sweep", *args, "--run-here", "--out", str(tmp_path / "s"), "--overwrite", cwd=tmp_path)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
        assert lines[0].startswith("hpc-localsgd: error: ") and message in lines[0]
        assert not list((tmp_path / "s" / "runs").glob("*/metrics.h5"))  # nothing ran
