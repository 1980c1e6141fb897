"""Checkpoints on real ranks: bit-exact resume for every algorithm, crash safety, damaged files,
mismatches, and files that h5dump reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_localsgd.io.checkpoint import Checkpoint, list_checkpoints
from tests.helpers import MPI_TEST_ENV, REPO_ROOT, kill_session, run_mpi
from tests.mpi.cases import BASE
from tests.mpi.resume_driver import RESUME_CASES, STOP, assert_resumed_equals_full


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    for phase in ("first", "resume"):
        proc = run_mpi(2, ["python", "tests/mpi/resume_driver.py", phase, "--out", str(out)], timeout=300)
        assert proc.returncode == 0 and proc.stdout.count(f"OK {phase}") == 2, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_stopped_and_resumed_run_is_bit_identical(resumed_runs: Path, case: str) -> None:
    assert_resumed_equals_full(resumed_runs / case / "full", resumed_runs / case / "resumed", ranks=2)


def test_checkpoint_between_syncs_keeps_each_ranks_replica(resumed_runs: Path) -> None:
    local = Checkpoint(resumed_runs / "local_H4" / "resumed" / "checkpoints" / f"step-{STOP:09d}.h5")
    assert local.meta.step == STOP and STOP % 4  # between two syncs: the replicas differ
    r0, r1 = local.rank_state(0).tensors, local.rank_state(1).tensors
    assert not np.array_equal(r0["flat0.params"].numpy(), r1["flat0.params"].numpy())
    with h5py.File(local.path) as f:
        assert isinstance(f.get("ranks/1/state/flat0.params", getlink=True), h5py.HardLink)
    # All-reduce SGD keeps parameters and momentum identical: rank 1 stores links to rank 0's copies;
    # its BatchNorm statistics (from its own batches) are its own.
    sync = resumed_runs / "allreduce" / "resumed" / "checkpoints" / f"step-{STOP:09d}.h5"
    with h5py.File(sync) as f:
        assert isinstance(f.get("ranks/1/state/flat0.params", getlink=True), h5py.SoftLink)
        assert isinstance(f.get("ranks/1/state/flat0.momentum", getlink=True), h5py.SoftLink)
        assert isinstance(f.get("ranks/1/state/flat0.buffers", getlink=True), h5py.HardLink)


def test_h5dump_reads_every_file(resumed_runs: Path) -> None:
    files = list((resumed_runs / "slowmo_H4" / "resumed").rglob("*.h5"))
    assert any("checkpoints" in str(p) for p in files) and any(p.name == "metrics.h5" for p in files)
    for path in files:
        dump = subprocess.run(["h5dump", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, f"{path}: {dump.stderr}"


# --- crash while writing -----------------------------------------------------------------------------
def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "big.yaml"
    # A model large enough (ResNet-18, ~45 MB of parameters and momentum per rank) that a write takes a while.
    config.write_text("{}\n")
    overrides = [
        "model.name=resnet18",
        "model.cifar_stem=true",
        "data.name=synthetic",
        "data.synthetic.shape=[3, 16, 16]",
        "data.synthetic.train_samples=128",
        "data.synthetic.test_samples=16",
        "data.batch_size=4",
        "optim.warmup_epochs=0",
        "train.max_steps=12",
        "train.threads=1",
        "train.eval_every_epochs=100",
        "checkpoint.every_steps=2",
        "checkpoint.keep=10",
        "algorithm.sync_period=3",
    ]
    args = [
        sys.executable,
        "-m",
        "hpc_localsgd",
        "train",
        str(config),
        "--run-dir",
        str(run_dir),
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT)}
    killed_during: str | None = None
    proc = subprocess.Popen(
        ["mpirun", "-np", "2", "--oversubscribe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and killed_during is None:
            checkpoints = run_dir / "checkpoints"
            complete = {p.name for p in list_checkpoints(checkpoints)}
            partial = [p.name for p in checkpoints.glob(".step-*.h5.tmp")] if complete else []
            # A write of a checkpoint newer than every complete one is under way.
            if partial and partial[0][1 : -len(".tmp")] not in complete:
                kill_session(proc.pid)  # SIGKILL to every rank and mpirun, mid-write
                killed_during = partial[0]
            time.sleep(0.005)
    finally:
        kill_session(proc.pid)
        output = proc.communicate(timeout=60)[0]
    assert killed_during, f"never caught a checkpoint being written:\n{output}"
    complete = list_checkpoints(run_dir / "checkpoints")
    assert complete
    # Almost always the kill lands mid-write and the partial file stays behind; if the rename won
    # the race by a hair, the same guarantees below must hold all the same.
    print(
        f"killed while {killed_during} was being written; "
        f"left behind: {(run_dir / 'checkpoints' / killed_during).exists()}"
    )
    for path in complete:  # every complete checkpoint is intact
        Checkpoint(path).verify()
    newest = Checkpoint(complete[0]).meta.step
    resumed = run_mpi(2, [*args, "--resume", "auto"], timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {complete[0]} at step {newest}" in resumed.stdout
    assert "hpc-localsgd: done" in resumed.stdout
    assert not list((run_dir / "checkpoints").glob(".step-*.tmp"))  # the leftover was cleared


# --- damaged and mismatching checkpoints (one process is enough) -------------------------------------
SMALL = [*BASE, "train.max_steps=6", "checkpoint.every_steps=3"]


def hpc(*args: str, expect: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if expect is not None:
        assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    (root / "c.yaml").write_text("{}\n")
    hpc("train", str(root / "c.yaml"), "--run-dir", str(root / "run"), *sets(SMALL), expect=0)
    return root


def flip_bit(path: Path, dataset: str, byte_offset: int, mask: int) -> None:
    """Flip bits of one byte of ``dataset``'s stored data in place, as a failing disk would."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset() + byte_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def damaged_copies(small_run: Path, tmp_path: Path) -> dict[str, Path]:
    good = small_run / "run" / "checkpoints" / "step-000000006.h5"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flipped = tmp_path / "flipped.h5"
    shutil.copy(good, flipped)
    flip_bit(flipped, "ranks/0/state/flat0.params", 8, 0x10)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5 at all\n")
    return {"truncated": truncated, "flipped": flipped, "foreign": foreign, "text": text}


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated", "is not a readable HDF5 file"),
        ("flipped", "ranks/0/state/flat0.params does not match its checksum"),
        ("foreign", "is not an hpc-localsgd checkpoint"),  # inspect: "... checkpoint or metrics file"
        ("text", "is not a readable HDF5 file"),
    ],
)
def test_damaged_checkpoints_are_refused(small_run: Path, tmp_path: Path, kind: str, message: str) -> None:
    path = damaged_copies(small_run, tmp_path)[kind]
    shown = hpc("inspect", str(path), expect=1)
    assert "INVALID" in shown.stdout and message in shown.stdout, shown.stdout
    run_dir = tmp_path / "fresh"
    proc = hpc(
        "train", str(small_run / "c.yaml"), "--run-dir", str(run_dir), *sets(SMALL), "--resume", str(path), expect=2
    )
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("hpc-localsgd: error: checkpoint") and message in errors[0]
    assert str(path) in errors[0]


def test_auto_falls_back_past_a_damaged_newest_checkpoint(small_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run / "run", run_dir)
    damaged = damaged_copies(small_run, tmp_path)["flipped"]
    shutil.copy(damaged, run_dir / "checkpoints" / "step-000000009.h5")  # newer than any good one
    proc = hpc(
        "train",
        str(small_run / "c.yaml"),
        "--run-dir",
        str(run_dir),
        *sets(SMALL[:-2]),
        "--set",
        "train.max_steps=12",
        "--set",
        "checkpoint.every_steps=3",
        "--resume",
        "auto",
        expect=0,
    )
    assert "warning: skipping checkpoint" in proc.stdout and "step-000000009.h5" in proc.stdout
    assert "resuming from" in proc.stdout and "step-000000006.h5 at step 6" in proc.stdout


@pytest.mark.parametrize(
    "overrides,reshard,message",
    [
        (["model.width=8"], None, "holds another model (model.width 4 → 8)"),
        (["model.width=8"], "average", "holds another model"),
        (["algorithm.sync_period=8"], None, "was written with another algorithm (algorithm.sync_period 4 → 8)"),
        # Another grouping of ranks into workers is another algorithm: refused unless re-sharding.
        (
            ["algorithm.ranks_per_worker=node"],
            None,
            "was written with another algorithm (algorithm.ranks_per_worker 1 → 'node')",
        ),
        # Another inner optimizer keeps other state: refused unless re-sharding.
        (["optim.name=adamw"], None, "was written with inner optimizer 'sgd', this run uses 'adamw'"),
    ],
)
def test_mismatches_are_refused(
    small_run: Path, tmp_path: Path, overrides: list[str], reshard: str | None, message: str
) -> None:
    checkpoint = small_run / "run" / "checkpoints" / "step-000000006.h5"
    extra = ["--reshard", reshard] if reshard else []
    proc = hpc(
        "train",
        str(small_run / "c.yaml"),
        "--run-dir",
        str(tmp_path / "r"),
        *sets(SMALL + overrides),
        "--resume",
        str(checkpoint),
        *extra,
        expect=2,
    )
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_world_size_change_needs_reshard(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("{}\n")
    base = [sys.executable, "-m", "hpc_localsgd", "train", str(tmp_path / "c.yaml"), *sets(SMALL)]
    two = run_mpi(2, [*base, "--run-dir", str(tmp_path / "two")], timeout=120)
    assert two.returncode == 0, two.stderr
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000000006.h5"
    refused = hpc(
        "train",
        str(tmp_path / "c.yaml"),
        *sets(SMALL),
        "--run-dir",
        str(tmp_path / "one"),
        "--resume",
        str(checkpoint),
        expect=2,
    )
    assert "was written by 2 ranks, this run has 1; pass --reshard average" in refused.stderr
    for mode in ("average", "reset"):
        run_dir = tmp_path / f"one-{mode}"
        proc = hpc(
            "train",
            str(tmp_path / "c.yaml"),
            *sets(SMALL[:-2] + ["train.max_steps=9"]),
            "--run-dir",
            str(run_dir),
            "--resume",
            str(checkpoint),
            "--reshard",
            mode,
            expect=0,
        )
        assert f"re-shard: {mode}" in proc.stdout and "hpc-localsgd: done" in proc.stdout
        assert Checkpoint(run_dir / "checkpoints" / "step-000000009.h5").meta.world_size == 1
    # What a re-shard loads is checked exactly in tests/unit/test_checkpoint.py.


# Local SGD with a delayed, compressed sync: a poll at step 5k finds step 5k + (4 − 5k mod 4)'s sync in flight
# unless 5k is a multiple of 4 (τ = 3 of H = 4), so the checkpoint usually carries an average in flight.
DELAYED = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.sync_delay=3",
    "comm.sync_compression=int8",
]


@pytest.mark.parametrize(
    "extra",
    [[], DELAYED, [*DELAYED, "comm.sync_thread=true"]],
    ids=["default", "delayed_int8_sync", "delayed_int8_sync_on_the_sync_thread"],
)
def test_signal_checkpoints_and_stops(tmp_path: Path, extra: list[str]) -> None:
    """SIGUSR1 to every rank (as Slurm's --signal does): all agree, checkpoint, exit cleanly; the run
    resumes from that checkpoint and finishes."""
    (tmp_path / "c.yaml").write_text("{}\n")
    run_dir = tmp_path / "run"
    overrides = [
        *BASE,
        "train.max_steps=100000",
        "train.epochs=1000",
        "checkpoint.poll_every_steps=5",
        "train.eval_every_epochs=1000",
        *extra,
    ]
    env = {**os.environ, **MPI_TEST_ENV, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [
            "mpirun",
            "-np",
            "2",
            "--oversubscribe",
            sys.executable,
            "-m",
            "hpc_localsgd",
            "train",
            str(tmp_path / "c.yaml"),
            "--run-dir",
            str(run_dir),
            *sets(overrides),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.h5").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        # The ranks alone (not mpirun, which would forward it anyway): they share mpirun's session.
        subprocess.run(["pkill", "-USR1", "-s", str(proc.pid), "-f", "hpc_localsgd train"], check=True)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 0, stdout + stderr
    assert "stopped at step" in stdout and "(SIGUSR1)" in stdout and "Traceback" not in stderr
    (newest,) = list_checkpoints(run_dir / "checkpoints")[:1]
    Checkpoint(newest).verify()
    step = Checkpoint(newest).meta.step
    assert step % 5 == 0  # decided at a poll, the same step on every rank
    if extra:
        if step % 4:
            assert any(name.startswith("inflight0") for name in Checkpoint(newest).shared())  # carried
        more = [*overrides, f"train.max_steps={step + 6}"]
        argv = ["python", "-m", "hpc_localsgd", "train", str(tmp_path / "c.yaml"), "--run-dir", str(run_dir)]
        resumed = run_mpi(2, [*argv, "--resume", "auto", *sets(more)], timeout=120)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"resuming from {newest} at step {step}" in resumed.stdout, resumed.stdout


def test_damage_in_another_ranks_part_is_found_by_that_rank(tmp_path: Path) -> None:
    """Each rank verifies only its own part when it resumes; damage in rank 1's state must still
    stop every rank (explicit path: one error line) or send all of them to the previous
    checkpoint (auto), with rank 1's finding as the message."""
    (tmp_path / "c.yaml").write_text("{}\n")
    run_dir = tmp_path / "run"
    train = ["python", "-m", "hpc_localsgd", "train", str(tmp_path / "c.yaml"), "--run-dir", str(run_dir)]
    first = run_mpi(2, [*train, *sets(SMALL)], timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    newest = run_dir / "checkpoints" / "step-000000006.h5"
    with h5py.File(newest, "r") as f:
        assert not isinstance(f.get("ranks/1/state/flat0.params", getlink=True), h5py.SoftLink)
    flip_bit(newest, "ranks/1/state/flat0.params", 16, 0x01)
    finding = "ranks/1/state/flat0.params does not match its checksum"

    explicit = run_mpi(2, [*train, *sets(SMALL), "--resume", str(newest)], timeout=180)
    assert explicit.returncode == 2, explicit.stdout + explicit.stderr
    # Our lines only (mpirun adds its own report of the exit status); rank 0 speaks for all ranks.
    errors = [line for line in explicit.stderr.splitlines() if line.startswith("hpc-localsgd")]
    assert len(errors) == 1 and finding in errors[0] and "Traceback" not in explicit.stderr, explicit.stderr

    auto = run_mpi(
        2,
        [*train, *sets([*SMALL[:-2], "train.max_steps=9", "checkpoint.every_steps=3"]), "--resume", "auto"],
        timeout=180,
    )
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert auto.stdout.count("warning: skipping checkpoint") == 1 and finding in auto.stdout, auto.stdout
    assert "step-000000003.h5 at step 3" in auto.stdout and "hpc-localsgd: done" in auto.stdout
