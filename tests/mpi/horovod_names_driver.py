"""Run under ``mpirun -np 2``: the names the horovod backend gives Horovod's operations.

Trains cases of ``cases.py`` for one step and for all of ``cases.STEPS`` steps, recording the name of
every operation handed to Horovod, and checks that same-shaped buffers in flight at once get distinct
names that come back once they have completed. Each rank writes what it saw for
tests/mpi/test_horovod_names.py to check.

    mpirun -np 2 python tests/mpi/horovod_names_driver.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_localsgd.comm import make_communicator  # noqa: E402
from hpc_localsgd.config import load_config  # noqa: E402
from hpc_localsgd.launcher.env import detect_launch  # noqa: E402
from hpc_localsgd.train.loop import train  # noqa: E402
from tests.mpi.cases import BASE, CASES  # noqa: E402

NAMED_CASES = ("allreduce", "local_H1")
# Both runs agree on stopping at every step, so that the longer one starts no kind of operation the shorter lacks.
EVERY_STEP = ["checkpoint.poll_every_steps=1"]


class RecordingHorovod:
    """``horovod.torch`` as the backend sees it, with the name of every operation written down."""

    def __init__(self, hvd: Any) -> None:
        self._hvd = hvd
        self.names: list[str] = []

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._hvd, attribute)

    def allreduce_async_(self, tensor: torch.Tensor, **kwargs: Any) -> Any:
        self.names.append(kwargs["name"])
        return self._hvd.allreduce_async_(tensor, **kwargs)

    def allreduce_(self, tensor: torch.Tensor, **kwargs: Any) -> Any:
        self.names.append(kwargs["name"])
        return self._hvd.allreduce_(tensor, **kwargs)

    def broadcast_(self, tensor: torch.Tensor, **kwargs: Any) -> Any:
        self.names.append(kwargs["name"])
        return self._hvd.broadcast_(tensor, **kwargs)


def in_flight_names(comm: Any, hvd: RecordingHorovod) -> list[list[str]]:
    """Three buffers of one shape in flight at once, twice: the names of each round."""
    rounds = []
    for _ in range(2):
        start = len(hvd.names)
        buffers = [torch.full((5,), float(comm.rank + 1 + k)) for k in range(3)]
        handles = [comm.iallreduce_(b, average=False) for b in buffers]
        for handle in handles:
            handle.wait()
        for k, b in enumerate(buffers):  # sum over ranks r of (r + 1 + k)
            expected = sum(r + 1 + k for r in range(comm.size))
            assert torch.equal(b, torch.full((5,), float(expected))), (k, b)
        rounds.append(hvd.names[start:])
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    launch = detect_launch()
    comm = make_communicator("horovod", launch, torch.device("cpu"))
    hvd = RecordingHorovod(comm._hvd)  # type: ignore[attr-defined]
    comm._hvd = hvd  # type: ignore[attr-defined]
    seen: dict[str, Any] = {"in_flight": in_flight_names(comm, hvd)}
    for case in NAMED_CASES:
        for length, steps in (("one", ["train.max_steps=1"]), ("full", [])):
            run_dir = Path(args.out) / case / length
            cfg = load_config(
                None, BASE + CASES[case] + EVERY_STEP + steps + [f"output.run_dir={run_dir}", "comm.backend=horovod"]
            )
            start = len(hvd.names)
            result = train(cfg, launch=launch, comm=comm, print_fn=lambda _line: None)
            seen[f"{case}.{length}"] = hvd.names[start:]
            state = {k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()}
            np.savez(run_dir / f"rank{comm.rank}.npz", **state)
    (Path(args.out) / f"names{comm.rank}.json").write_text(json.dumps(seen, indent=1))
    comm.close()
    print(f"OK horovod rank {comm.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
