"""Run by tests/mpi/test_slownet.py under ``mpirun -np 2`` on the emulated slow network (launcher/slownet.py).

Checks an allreduce across the namespaces on the mpi backend, then times a broadcast of ``--bytes`` from
rank 0, which rank 1 can only finish once every byte crossed the rate-limited links. Prints
``OK rank <r> netns <namespace id> seconds <broadcast seconds> cores <the cores it may run on>`` per rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from hpc_localsgd.comm import make_communicator
from hpc_localsgd.errors import print_line
from hpc_localsgd.launcher.env import detect_launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, required=True)
    args = parser.parse_args()
    comm = make_communicator("mpi", detect_launch(), torch.device("cpu"))
    summed = torch.full((1000,), float(comm.rank + 1))
    comm.allreduce_(summed, average=False)
    if not torch.equal(summed, torch.full((1000,), float(comm.size * (comm.size + 1) // 2))):
        print_line(f"FAIL rank {comm.rank}: allreduce gave {summed[:3].tolist()}", sys.stderr)
        return 1
    payload = torch.full((args.bytes,), 7 if comm.rank == 0 else 0, dtype=torch.uint8)
    comm.barrier()
    start = time.perf_counter()
    comm.broadcast_(payload, root=0)
    seconds = time.perf_counter() - start
    if not bool((payload == 7).all()):
        print_line(f"FAIL rank {comm.rank}: broadcast did not arrive", sys.stderr)
        return 1
    comm.barrier()
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    print_line(
        f"OK rank {comm.rank} netns {os.readlink('/proc/self/ns/net')} seconds {seconds:.4f} cores {cores}", sys.stdout
    )
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
