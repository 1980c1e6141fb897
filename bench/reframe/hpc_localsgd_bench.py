"""ReFrame check for ``hpc-localsgd bench``: runs the benchmark on the partition's ranks and
reports its ratios as performance variables with reference values (the targets of issue 5).

    reframe -C bench/reframe/settings.py -c bench/reframe/hpc_localsgd_bench.py -r
    reframe -C bench/reframe/settings.py -c bench/reframe/hpc_localsgd_bench.py -r -S quick=true
    reframe -C bench/reframe/settings.py --system slurm:compute -c bench/reframe/hpc_localsgd_bench.py -r

With the ``local`` launcher (a workstation, CI) the check starts the ranks itself with
``mpirun -np num_tasks``; with ``srun`` or ``mpirun`` partitions ReFrame's launcher does.
``quick=true`` runs the seconds-long CI problem, whose ratios are reported but not judged
(a tiny model is latency-bound, so its ratios say nothing about the targets).
"""

import os
import sys

import reframe as rfm
import reframe.utility.sanity as sn
import reframe.utility.typecheck as typ
from reframe.core.builtins import performance_function, run_before, sanity_function, variable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (performance variable, key in the summary line, unit, reference, lower, upper): thresholds are
# fractions of the reference, so (1.0, None, 0.10) means "at most 1.10" and (1.0, -0.05, None) "at least 0.95".
FIGURES = (
    ("sync_over_floor", "ratio", (1.0, None, 0.10)),
    ("allreduce_over_horovod", "ratio", (1.0, -0.05, None)),
    ("allreduce_over_ddp", "ratio", (1.0, -0.05, None)),
    ("h16_efficiency", "ratio", (1.0, -0.10, None)),
    ("slowmo_param_copies", "copies", (2.0, None, 0.0)),
    ("slowmo_extra_ms", "ms", None),
    ("ckpt_write_over_raw", "ratio", (1.0, -0.20, None)),
    ("ckpt_read_over_raw", "ratio", (1.0, -0.20, None)),
)


@rfm.simple_test
class HpcLocalSGDBench(rfm.RunOnlyRegressionTest):
    descr = "hpc-localsgd bench: averaging, throughput, SlowMo and checkpoints against floors and baselines"
    valid_systems = ["*"]
    valid_prog_environs = ["*"]
    num_tasks = 2
    python = variable(str, value=sys.executable)
    quick = variable(bool, value=False)
    model = variable(str, value="resnet50")
    batch = variable(int, value=32)
    image_size = variable(int, value=224)
    repeats = variable(int, value=5)
    steps = variable(int, value=16)
    backend = variable(str, value="auto")
    extra_options = variable(typ.List[str], value=[])
    time_limit = "2h"
    tags = {"benchmark", "hpc-localsgd"}

    @run_before("run")
    def set_command(self):
        if self.quick:
            options = ["--quick"]
        else:
            options = [
                "--model",
                self.model,
                "--batch",
                str(self.batch),
                "--image-size",
                str(self.image_size),
                "--repeats",
                str(self.repeats),
                "--steps",
                str(self.steps),
            ]
        options += ["--backend", self.backend, "--out", "bench.json", *self.extra_options]
        command = [self.python, "-m", "hpc_localsgd", "bench", *options]
        self.env_vars["PYTHONPATH"] = f"{REPO_ROOT}:${{PYTHONPATH:-}}"
        self.env_vars["HDF5_USE_FILE_LOCKING"] = "FALSE"
        if self.current_partition.launcher_type.registered_name == "local":
            # The local launcher runs one process; mpirun makes the ranks.
            self.executable = "mpirun"
            self.executable_opts = ["-np", str(self.num_tasks), "--oversubscribe", *command]
        else:
            self.executable = command[0]
            self.executable_opts = command[1:]

    @run_before("performance")
    def set_references(self):
        if self.quick:
            return
        self.reference = {"*": {name: (*limits, unit) for name, unit, limits in FIGURES if limits is not None}}

    @sanity_function
    def validate(self):
        return sn.all(
            [
                sn.assert_found(r"^hpc-localsgd-bench: ", self.stdout),
                sn.assert_not_found(r"Traceback", self.stderr),
                sn.assert_true(os.path.exists(os.path.join(self.stagedir, "bench.json"))),
            ]
        )

    def _figure(self, key):
        return sn.extractsingle(rf"^hpc-localsgd-bench: .*\b{key}=([0-9.eE+-]+)", self.stdout, 1, float)

    @performance_function("ratio")
    def sync_over_floor(self):
        return self._figure("sync_over_floor")

    @performance_function("ratio")
    def allreduce_over_horovod(self):
        return self._figure("allreduce_over_horovod")

    @performance_function("ratio")
    def allreduce_over_ddp(self):
        return self._figure("allreduce_over_ddp")

    @performance_function("ratio")
    def h16_efficiency(self):
        return self._figure("h16_efficiency")

    @performance_function("copies")
    def slowmo_param_copies(self):
        return self._figure("slowmo_param_copies")

    @performance_function("ms")
    def slowmo_extra_ms(self):
        return self._figure("slowmo_extra_ms")

    @performance_function("ratio")
    def ckpt_write_over_raw(self):
        return self._figure("ckpt_write_over_raw")

    @performance_function("ratio")
    def ckpt_read_over_raw(self):
        return self._figure("ckpt_read_over_raw")
