"""How long a lost worker and its replacement cost (comm.on_worker_loss: continue), measured on real processes.

    .venv/bin/python scripts/recovery-times.py --model demo --out docs/benchmarks/recovery-demo.json
    .venv/bin/python scripts/recovery-times.py --model resnet50 --out docs/benchmarks/recovery-resnet50.json

Starts RANKS processes with torchrun's variables (a launcher that lets the others go on when one dies) and:

* loss: the last rank kills itself inside the global sync after step S (the fault harness), so the survivors
  are blocked from the moment it dies. Figures: death → the survivors' next step completed (rank 0's progress
  line), that step's usual time for comparison, and the recovery metrics.h5 records (failure noticed →
  survivors agreed).
* replacement: the last rank dies after step S; once rank 0 has printed the loss, a replacement starts
  (``train --rejoin``). Figures: its start → taken in with rank 0's state (its first step begins), of which its
  own start-up (imports, data, model) until it waits as a spare, and the members' pause to take it in.

Every line the processes print is time-stamped as it arrives, so the figures include nothing but the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "demo": [],  # configs/demo.yaml as it is: smallcnn on the digits
    "resnet50": [
        "model.name=resnet50",
        "data.name=synthetic",
        "data.synthetic.shape=[3, 32, 32]",
        "data.synthetic.num_classes=10",
        "data.synthetic.train_samples=4096",
        "data.synthetic.test_samples=64",
        "data.batch_size=32",
        "data.eval_batch_size=64",
    ],
}


class Process:
    """One process whose output lines are kept with their arrival time."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.started = time.time()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        return next((t for t, line in list(self.lines) if t >= after and re.search(pattern, line)), None)

    def wait_for(self, pattern: str, timeout: float) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.first(pattern)
            if found is not None:
                return found
            time.sleep(0.05)
        raise SystemExit(
            f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(text for _, text in self.lines)
        )

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code


def launch(ranks: int, args: list[str], fault: str, port: int, rejoin: bool = False, rank: int = 0) -> Process:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "HPC_LOCALSGD_INJECT_FAULT"):
        env.pop(name, None)
    if not rejoin:
        env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
        env["HPC_LOCALSGD_INJECT_FAULT"] = fault
    argv = [sys.executable, "-m", "hpc_localsgd", "train", str(REPO / "configs" / "demo.yaml"), *args]
    return Process(argv + (["--rejoin"] if rejoin else []), env)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def step_times(process: Process, before: int) -> list[float]:
    """Gaps between rank 0's consecutive progress lines up to step ``before``."""
    stamps = [(int(m.group(1)), t) for t, line in process.lines if (m := re.match(r"step (\d+)/", line))]
    return [b - a for (s, a), (_, b) in zip(stamps, stamps[1:], strict=False) if s + 1 < before]


def membership_rows(run_dir: Path) -> list[dict[str, object]]:
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        group = f["membership"]
        names = list(group.keys())
        rows = [dict(zip(names, values, strict=True)) for values in zip(*(group[k][()] for k in names), strict=True)]
    return [
        {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        for r in rows
    ]


def measure_loss(ranks: int, common: list[str], step: int, run_dir: Path) -> dict[str, object]:
    port = free_port()
    fault = f"kill:{ranks - 1}:{step}:sync"
    procs = [launch(ranks, [*common, "--run-dir", str(run_dir)], fault, port, rank=r) for r in range(ranks)]
    died = procs[-1].wait_for("fault injected", timeout=600)
    next_step = procs[0].wait_for(rf"^step {step + 1}/", timeout=600)
    for p in procs[:-1]:
        p.finish(timeout=1800)
    usual = statistics.median(step_times(procs[0], step))
    return {
        "fault": fault,
        "death_to_next_step_seconds": next_step - died,
        "usual_step_seconds": usual,
        "membership": membership_rows(run_dir),
    }


def measure_replacement(ranks: int, common: list[str], step: int, run_dir: Path) -> dict[str, object]:
    port = free_port()
    fault = f"kill:{ranks - 1}:{step}"
    procs = [launch(ranks, [*common, "--run-dir", str(run_dir)], fault, port, rank=r) for r in range(ranks)]
    procs[0].wait_for(r"lost: ", timeout=600)
    spare = launch(ranks, [*common, "--run-dir", str(run_dir)], "", port, rejoin=True)
    waiting = spare.wait_for("waiting as a spare", timeout=600)
    joined = spare.wait_for("joined at step", timeout=600)
    for p in [*procs[:-1], spare]:
        p.finish(timeout=1800)
    rows = membership_rows(run_dir)
    return {
        "fault": fault,
        "start_to_taken_in_seconds": joined - spare.started,
        "start_up_until_waiting_seconds": waiting - spare.started,
        "members_pause_to_take_in_seconds": next(r["recovery_seconds"] for r in rows if r["joined"]),
        "membership": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--step", type=int, default=8, help="the sync step at which the worker is lost")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: long enough)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Long enough that the members still train once a replacement has started (a few seconds here).
    steps = args.steps or (3000 if args.model == "demo" else 40)
    common = [
        *[arg for o in MODELS[args.model] for arg in ("--set", o)],
        *[
            arg
            for o in (
                "comm.backend=torch",
                "comm.on_worker_loss=continue",
                f"train.max_steps={steps}",
                "train.log_every_steps=1",
                "train.epochs=1000",
                "train.eval_every_epochs=1000",
                "train.threads=1",
            )
            for arg in ("--set", o)
        ],
    ]
    with tempfile.TemporaryDirectory() as scratch:
        loss = measure_loss(args.ranks, common, args.step, Path(scratch) / "loss")
        replacement = measure_replacement(args.ranks, common, args.step, Path(scratch) / "replacement")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "model": args.model,
        "ranks": args.ranks,
        "loss": loss,
        "replacement": replacement,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss", "replacement")}))
    print("loss:", {k: v for k, v in loss.items() if k != "membership"})
    print("replacement:", {k: v for k, v in replacement.items() if k != "membership"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
