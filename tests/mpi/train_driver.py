"""Run under ``mpirun -np N``: train algorithm cases of ``cases.py`` on one backend and save each
rank's final model and counters for tests/mpi/test_algorithms.py (and test_worker_groups.py) to check.

    mpirun -np 2 python tests/mpi/train_driver.py --backend mpi --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_localsgd.comm import make_communicator  # noqa: E402
from hpc_localsgd.config import load_config  # noqa: E402
from hpc_localsgd.errors import UserError, print_line  # noqa: E402
from hpc_localsgd.launcher.env import detect_launch  # noqa: E402
from hpc_localsgd.train.loop import train  # noqa: E402
from hpc_localsgd.train.ranks import merged_groups, planned_groups  # noqa: E402
from tests.mpi.cases import ALL_CASES, BASE, CASES, default_dtype, equivalence_dtype  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated names from cases.py")
    parser.add_argument("--float64", action="store_true", help="each case in cases.equivalence_dtype (else float32)")
    args = parser.parse_args()
    launch = detect_launch()
    names = args.cases.split(",")
    # Every communicator the cases split the world into (Horovod registers its process sets at init).
    groups = merged_groups([planned_groups(load_config(None, BASE + ALL_CASES[name]), launch.layout) for name in names])
    try:
        comm = make_communicator(args.backend, launch, torch.device("cpu"), **groups)
    except UserError as exc:
        print_line(f"hpc-localsgd: error: {exc}", sys.stderr)
        return 2
    for name in names:
        overrides = ALL_CASES[name]
        run_dir = Path(args.out) / args.backend / name
        cfg = load_config(None, BASE + overrides + [f"output.run_dir={run_dir}", f"comm.backend={args.backend}"])
        with default_dtype(equivalence_dtype(name) if args.float64 else torch.float32):
            result = train(cfg, launch=launch, comm=comm, print_fn=lambda _line: None)
        state = {k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()}
        gradients = result.engine.gradients
        np.savez(run_dir / f"rank{comm.rank}.npz", **state)
        (run_dir / f"rank{comm.rank}.json").write_text(
            json.dumps(
                {
                    **result.stats.as_dict(),
                    "steps": result.steps,
                    "test_accuracy": result.final.test_accuracy,
                    "bytes_per_sync": result.engine.bytes_per_sync,
                    "gradient_bytes_per_step": gradients.bytes_per_step if gradients else 0,
                    "sync_thread": result.engine.uses_sync_thread,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                }
            )
        )
    comm.close()
    print(f"OK {args.backend} rank {comm.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
