"""The stall watchdog's pure parts (who is late, who reports, the lines' wording) from heartbeat records, its
count of collectives through a wrapped communicator, its thread against heartbeat files, and the settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from hpc_localsgd.comm import torch_collective_timeout
from hpc_localsgd.comm.single import SingleCommunicator
from hpc_localsgd.comm.watchdog import (
    MAX_NAMED_RANKS,
    Wait,
    Watchdog,
    WatchedCommunicator,
    describe_phase,
    describe_rank,
    describe_ranks,
    late_ranks,
    read_heartbeat,
    reporter,
    stall_text,
    watch_collectives,
    write_heartbeat,
)
from hpc_localsgd.config import load_config
from hpc_localsgd.errors import ConfigError, RankStalled

NOW = 1_000_000.0
FRESH = 2.5
REPO_ROOT = Path(__file__).resolve().parents[2]


def record(
    collectives: int,
    written: float = NOW,
    step: int = 40,
    phase: str = "data loading",
    since: float = NOW - 10,
    wait: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "token": "t",
        "rank": 0,
        "pid": 1,
        "host": "h",
        "step": step,
        "phase": phase,
        "phase_since": since,
        "collectives": collectives,
        "wait": wait,
        "written": written,
    }


def waiting(seq: int, since: float = NOW - 61) -> dict[str, Any]:
    return {"seq": seq, "operation": "allreduce", "context": "the global sync after step 40", "since": since}


def test_the_late_ranks_have_not_started_the_collective_or_have_no_heartbeat() -> None:
    heartbeats = {0: record(7, wait=waiting(7)), 2: record(6), 3: None, 4: record(9)}
    assert late_ranks(heartbeats, 5, rank=1, seq=7) == [2, 3]  # rank 3 wrote none (or an earlier run's)
    assert late_ranks({}, 3, rank=0, seq=1) == [1, 2]


def test_the_lowest_rank_alive_and_waiting_at_the_same_collective_reports() -> None:
    def speaker(heartbeats: dict[int, dict[str, Any] | None], rank: int) -> int:
        return reporter(heartbeats.get, rank, 7, NOW, FRESH)

    assert speaker({}, rank=0) == 0
    assert speaker({0: record(7, wait=waiting(7)), 1: record(7, wait=waiting(7))}, 2) == 0
    # Not rank 0 when it waits elsewhere, is late itself, or went silent while waiting (stopped there).
    assert speaker({0: record(6, wait=waiting(6))}, 2) == 2
    assert speaker({0: record(7, wait=waiting(7), written=NOW - 30)}, 2) == 2
    assert speaker({0: None, 1: record(7, wait=waiting(7))}, 2) == 1
    # The ranks below are read in order, up to the first that waits there: the reporter alone reads them all.
    asked: list[int] = []
    waiting_ranks = {3: record(7, wait=waiting(7))}
    assert reporter(lambda r: asked.append(r) or waiting_ranks.get(r), 9, 7, NOW, FRESH) == 3 and asked == [0, 1, 2, 3]


def test_a_silent_rank_reads_as_last_heard_and_a_busy_one_as_alive() -> None:
    assert describe_rank(1, record(6, written=NOW - 58), NOW, FRESH) == (
        "rank 1 (last heard 58 s ago: step 40, data loading)"
    )
    busy = record(6, phase="checkpoint write", since=NOW - 45)
    assert describe_rank(1, busy, NOW, FRESH) == "rank 1 (alive, in the checkpoint write after step 40 for 45 s)"
    elsewhere = record(6, wait=waiting(6, since=NOW - 12))
    assert describe_rank(3, elsewhere, NOW, FRESH) == (
        "rank 3 (alive, waiting 12 s in the allreduce of the global sync after step 40)"
    )
    assert describe_rank(2, None, NOW, FRESH) == "rank 2 (no heartbeat from it in this run)"


def test_the_warning_names_every_late_rank_up_to_a_cap() -> None:
    wait = Wait(7, "allreduce", describe_phase("global sync", 40), NOW - 61)
    one = stall_text(0, wait, [1], {1: record(6, written=NOW - 58)}, NOW, FRESH)
    assert one == (
        "rank 0 has waited 61 s in the allreduce of the global sync after step 40 "
        "for rank 1 (last heard 58 s ago: step 40, data loading)"
    )
    two = describe_ranks([1, 2], {1: record(6, written=NOW - 58), 2: None}, NOW, FRESH)
    assert two == "rank 1 (last heard 58 s ago: step 40, data loading) and rank 2 (no heartbeat from it in this run)"
    many = describe_ranks(list(range(1, 1001)), {}, NOW, FRESH)
    assert many.count("rank ") == MAX_NAMED_RANKS and many.endswith(f"and {1000 - MAX_NAMED_RANKS} more ranks")


def test_phases_read_as_sentences() -> None:
    assert describe_phase("gradient allreduce", 8) == "the gradients of step 9"
    assert describe_phase("training step", 8) == "training step 9"
    assert describe_phase("start-up", 0) == "the start-up"
    assert describe_phase("something new", 3) == "something new after step 3"


def test_heartbeats_of_another_run_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rank-1.json"
    write_heartbeat(path, record(3))
    assert read_heartbeat(path, "t") == record(3)
    assert read_heartbeat(path, "an earlier attempt's token") is None
    assert read_heartbeat(tmp_path / "rank-2.json", "t") is None
    path.write_text("{half a reco")
    assert read_heartbeat(path, "t") is None
    path.write_text(json.dumps({"token": "t", "step": 3}))  # another format
    assert read_heartbeat(path, "t") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_one_count_over_a_communicator_and_its_groups(tmp_path: Path) -> None:
    watchdog = Watchdog(0, 1, tmp_path, warn_seconds=60, timeout_seconds=None)
    watched = WatchedCommunicator(SingleCommunicator(name="mpi"), watchdog)
    assert (watched.name, watched.rank, watched.size, watched.replicas) == ("mpi", 0, 1, 1)
    watched.note_phase("global sync", 40)
    buffer = torch.ones(4)
    handle = watched.iallreduce_(buffer)
    group = watched.split(1)
    assert isinstance(group, WatchedCommunicator) and group.watchdog is watchdog
    group.broadcast_(buffer)
    watched.barrier()
    handle.wait()
    assert watchdog._started == 3 and not watchdog._waits
    assert watchdog.begin("allgather") == Wait(4, "allgather", "the global sync after step 40", 0.0)


def test_the_thread_warns_once_naming_the_silent_rank(tmp_path: Path) -> None:
    lines: list[str] = []
    watchdog = Watchdog(0, 2, tmp_path, warn_seconds=0.4, timeout_seconds=None, say=lines.append)
    write_heartbeat(tmp_path / "rank-1.json", {**record(0, written=time.time() - 30, step=8), "token": "run"})
    watchdog.start("run")
    try:
        watchdog.heartbeat.set("global sync", 12)
        started = watchdog.begin("allreduce")
        with watchdog.waiting(started):
            time.sleep(1.5)
            mine = json.loads((tmp_path / "rank-0.json").read_text())
    finally:
        watchdog.stop()
    assert mine["wait"]["seq"] == 1 and mine["collectives"] == 1 and mine["token"] == "run"
    assert (mine["step"], mine["phase"]) == (12, "global sync")
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"hpc-localsgd: warning: rank 0 has waited \d s in the allreduce of the global sync after step 12 "
        r"for rank 1 \(last heard \d\d s ago: step 8, data loading\)",
        lines[0],
    ), lines[0]
    assert not any(t.name == "hpc-localsgd-watchdog" for t in threading.enumerate())


def test_threads_simulated_and_single_runs_are_not_watched(tmp_path: Path) -> None:
    assert watch_collectives(SingleCommunicator(), tmp_path, 60.0, None) is None
    assert watch_collectives(SingleCommunicator(name="mpi"), tmp_path, 60.0, None) is None  # one rank


def test_the_settings_are_refused_with_one_line() -> None:
    cfg = load_config(None, ["comm.stall_warn_seconds=2", "comm.stall_timeout_seconds=5"])
    assert (cfg.comm.stall_warn_seconds, cfg.comm.stall_timeout_seconds) == (2.0, 5.0)
    assert load_config(None).comm.stall_timeout_seconds is None
    with pytest.raises(ConfigError, match=r"^comm.stall_timeout_seconds: must exceed comm.stall_warn_seconds \(60\)"):
        load_config(None, ["comm.stall_timeout_seconds=30"])
    for bad in ("comm.stall_warn_seconds=0", "comm.stall_timeout_seconds=-1"):
        with pytest.raises(ConfigError, match=r"^comm.stall_"):
            load_config(None, [bad])


GIVE_UP = """
import sys, time
from pathlib import Path
from hpc_localsgd.comm.watchdog import Watchdog

directory = Path(sys.argv[1])
watchdog = Watchdog(0, 2, directory, warn_seconds=0.3, timeout_seconds=0.8)
watchdog.resume_hint = lambda: "; step-000000008.h5 stays the latest checkpoint: continue with --resume auto"
watchdog.on_stall.append(lambda line: (directory / "marked").write_text(line))
watchdog.start("run")
with watchdog.waiting(watchdog.begin("broadcast")):
    time.sleep(60)  # the main thread blocked in a collective that never completes
"""


def test_past_the_timeout_the_reporting_rank_says_why_runs_the_callbacks_and_exits_with_5(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GIVE_UP, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
    )
    assert done.returncode == RankStalled.exit_code == 5, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and re.fullmatch(
        r"hpc-localsgd: error: rank 0 has waited \d s in the broadcast of the start-up for rank 1 \(no heartbeat "
        r"from it in this run\); stopping \(comm.stall_timeout_seconds=0.8\): no checkpoint of this state was "
        r"written; step-000000008.h5 stays the latest checkpoint: continue with --resume auto",
        errors[0],
    ), errors
    assert (tmp_path / "marked").read_text() == errors[0].removeprefix("hpc-localsgd: error: ")
    assert done.stdout.startswith("hpc-localsgd: warning: rank 0 has waited")  # warned first, once
    assert done.stdout.count("\n") == 1


def test_torchs_collective_timeout_lies_past_the_watchdogs() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert torch_collective_timeout(300.0, cpu) == torch_collective_timeout(300.0, gpu) == timedelta(minutes=7)
    assert torch_collective_timeout(None, cpu) == timedelta(days=7)  # off: Gloo's ranks warn, and wait
    assert torch_collective_timeout(None, gpu) is None  # NCCL, unwatched: the rendezvous's 5 minutes, as before
