"""One process of an elastic run (``comm.on_worker_loss: continue``), started by tests/mpi/test_worker_loss.py
with torchrun's variables: trains the config in float64 (so that the survivors can be held to the reference to
~1e-13) and saves this process's final model as OUT/rank<launcher rank>.npz (a replacement started with
``--rejoin``: OUT/replacement.npz).

    RANK=0 WORLD_SIZE=3 ... MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/mpi/elastic_driver.py OUT key=value ...

Options among the overrides: ``--rejoin``, ``--resume=auto|PATH``, ``--stop-at-step=N`` (as ``train``'s).

Bad input and a process the survivors dropped end with the CLI's one line and exit status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_localsgd.comm.membership import end_process_now  # noqa: E402
from hpc_localsgd.config import load_config  # noqa: E402
from hpc_localsgd.errors import UserError, print_line  # noqa: E402
from hpc_localsgd.launcher.env import detect_launch  # noqa: E402
from hpc_localsgd.train.loop import train  # noqa: E402
from tests.mpi.cases import default_dtype  # noqa: E402


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    options = {arg.partition("=")[0]: arg.partition("=")[2] for arg in args if arg.startswith("--")}
    overrides = [arg for arg in args if not arg.startswith("--")]
    rejoin = "--rejoin" in options
    stop = int(options["--stop-at-step"]) if "--stop-at-step" in options else None
    launch = detect_launch()
    try:
        cfg = load_config(None, overrides)
        with default_dtype(torch.float64):
            result = train(cfg, launch=launch, rejoin=rejoin, resume=options.get("--resume"), stop_at_step=stop)
    except UserError as exc:  # as the CLI says it: once where every rank sees it alike
        if not exc.same_on_every_rank or launch.layout.rank == 0:
            print_line(f"hpc-localsgd: error: {exc}", sys.stderr)
        return exc.exit_code
    state = {k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()}
    np.savez(out / ("replacement.npz" if rejoin else f"rank{launch.layout.rank}.npz"), **state)
    if end_process_now():  # as the CLI does: an old group may still wait for a stopped member
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
