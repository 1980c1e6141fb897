"""``hpc-localsgd bench``: the package's communication and I/O against their floors and baselines.

One run, the same ranks, model and batch throughout:

1. the averaging step (``AveragingEngine.sync``) against a raw allreduce of the same bytes;
2. synchronous training (method ``allreduce``) against plain Horovod and plain DDP loops;
3. local SGD at several H against the no-communication limit;
3b. local SGD with workers of several ranks (gradients averaged inside a worker every step, the
    model over all ranks every H steps) against flat local SGD and all-reduce SGD, with the bytes
    that cross between workers;
4. SlowMo's extra time per sync and extra memory;
5. checkpoint write and read against raw h5py of the same bytes;

and an α–β projection of the measured step time and bytes per sync onto real interconnects
and worker counts, and onto nodes of GPUs joined by a fast fabric (``projection.py``). Output:
a table, one ``hpc-localsgd-bench:`` line, and JSON following ``schema.json``.
"""

from .options import BASELINES, PHASES, BenchOptions
from .report import SCHEMA_VERSION, SUMMARY_PREFIX, load_schema
from .runner import run_bench

__all__ = ["BASELINES", "PHASES", "SCHEMA_VERSION", "SUMMARY_PREFIX", "BenchOptions", "load_schema", "run_bench"]
