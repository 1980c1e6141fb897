"""Run under ``mpirun -np 2``: the drift measurements on real ranks, for tests/mpi/test_drift.py.

    mpirun -np 2 python tests/mpi/drift_driver.py --out DIR

- ``known``: every rank's float64 model moved to known parameters and synced twice with SlowMo
  (engine.sync, as a training step calls it); each rank saves its parameters before each sync, the
  start x0 and what the engine measured (``known/rank<r>.npz``, ``.json``).
- ``identical``: local SGD with H = 1, a model without BatchNorm and the same batches on both ranks:
  the ranks never differ; each rank saves what every sync measured (``identical/rank<r>.json``).
- ``train``: the package's training run of each DRIFT_CASES entry (metrics.h5 with its ``syncs``
  table; each rank's final model in ``<case>/rank<r>.npz``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_localsgd.algorithms.engine import AveragingEngine  # noqa: E402
from hpc_localsgd.algorithms.schedule import SyncSchedule  # noqa: E402
from hpc_localsgd.comm import make_communicator  # noqa: E402
from hpc_localsgd.comm.base import Communicator  # noqa: E402
from hpc_localsgd.config import load_config  # noqa: E402
from hpc_localsgd.config.schema import AlgorithmConfig  # noqa: E402
from hpc_localsgd.launcher.env import detect_launch  # noqa: E402
from hpc_localsgd.train.loop import train  # noqa: E402
from tests.mpi.cases import BASE  # noqa: E402

KNOWN = AlgorithmConfig(method="local_sgd", outer="slowmo", slow_lr=0.8, slow_momentum=0.5)
LR = 0.1
DRIFT_CASES: dict[str, list[str]] = {
    # Averages after every 2 steps, the SlowMo step after every 2nd average (steps 4, 8, 12).
    "slowmo_H2_outer_every2": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=2",
        "algorithm.outer=slowmo",
        "algorithm.slow_momentum=0.5",
        "algorithm.outer_every=2",
    ],
}


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def perturbation(worker: int, round_: int, size: int) -> torch.Tensor:
    """As tests/unit/test_consensus.py perturbs worker ``worker`` before sync ``round_``."""
    g = torch.Generator().manual_seed(100 * round_ + worker)
    return 0.01 * (worker + 1) * torch.randn(size, generator=g, dtype=torch.float64)


def known(comm: Communicator, out: Path) -> None:
    model = mlp(seed=comm.rank)  # different on each rank: the engine starts every rank from rank 0's
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine = AveragingEngine(model, opt, comm, KNOWN, SyncSchedule(1, 0))
    engine.broadcast_initial_state()
    engine.anchors = [g.slice("params").clone() for g in engine.groups]  # x_prev = x0, as at local_start
    saved = {"x0": flat(model).numpy().copy()}
    measured = []
    for round_ in range(2):
        x = flat(model) + perturbation(comm.rank, round_, flat(model).numel())
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p.copy_(x[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        saved[f"before{round_}"] = flat(model).numpy().copy()
        engine.sync(LR)
        measured.append(engine.last_sync.as_row())
    engine.close()
    np.savez(out / f"rank{comm.rank}.npz", **saved)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(measured))


def forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out, F.cross_entropy(out, y)


def identical(comm: Communicator, out: Path) -> None:
    model = mlp(seed=0).float()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    cfg = AlgorithmConfig(method="local_sgd", sync_period=1, average_bn_buffers=False)
    engine = AveragingEngine(model, opt, comm, cfg, SyncSchedule(1, 0))
    g = torch.Generator().manual_seed(5)  # the same batches on every rank
    rows = []
    for step in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        done = engine.train_step(step, LR, functools.partial(forward, model, x, y))
        rows.append({"synced": done.synced, **engine.last_sync.as_row()})
    engine.close()
    (out / f"rank{comm.rank}.json").write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    launch = detect_launch()
    comm = make_communicator("mpi", launch, torch.device("cpu"))
    for part in (known, identical):
        folder = Path(args.out) / part.__name__
        folder.mkdir(parents=True, exist_ok=True)
        part(comm, folder)
    for name, overrides in DRIFT_CASES.items():
        run_dir = Path(args.out) / name
        cfg = load_config(None, BASE + overrides + [f"output.run_dir={run_dir}", "comm.backend=mpi"])
        result = train(cfg, launch=launch, comm=comm, print_fn=lambda _line: None)
        np.savez(run_dir / f"rank{comm.rank}.npz", **{k: v.numpy() for k, v in result.model.state_dict().items()})
    comm.close()
    print(f"OK rank {comm.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
