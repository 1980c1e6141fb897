"""The algorithm cases every backend runs under mpirun (tests/mpi/train_driver.py), and the same
problem trained by the independent reference (tests/reference.py) for them to be checked against."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STEPS = 12

# A tiny learnable problem with BatchNorm, so that BN averaging crosses real ranks too.
BASE = [
    "seed=3",
    "model.name=smallcnn",
    "model.width=4",
    "data.name=synthetic",
    "data.synthetic.train_samples=512",
    "data.synthetic.test_samples=64",
    "data.synthetic.shape=[1, 8, 8]",
    "data.synthetic.num_classes=4",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "optim.lr_per_256=3.2",
    "optim.weight_decay=0.001",
    "optim.warmup_epochs=0.25",
    "optim.schedule=cosine",
    f"train.max_steps={STEPS}",
    "train.epochs=10",
    "train.eval_every_epochs=100",
    "train.threads=1",
    "output.metrics_flush_seconds=0",
]

# A one-block GPT on the first 20 kB of the standard library's source, in windows of 16 bytes.
GPT_TEXT = [
    "model.name=gpt",
    "model.gpt.layers=1",
    "model.gpt.heads=2",
    "model.gpt.dim=16",
    "model.gpt.seq_len=16",
    "data.name=text",
    "data.text.max_bytes=20000",
    "data.eval_samples=64",
]

# AdamW at a learning rate it trains with (the base's 3.2 per 256 is SGD's).
_ADAMW = ["optim.name=adamw", "optim.lr_per_256=0.05", "optim.weight_decay=0.1"]

CASES: dict[str, list[str]] = {
    "allreduce": ["algorithm.method=allreduce"],
    "local_H1": ["algorithm.method=local_sgd", "algorithm.sync_period=1", "algorithm.average_bn_buffers=false"],
    "local_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4"],
    "local_H3_avg_momentum": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=3",
        "algorithm.optimizer_state=average",
    ],
    "post_local_H3": ["algorithm.method=post_local_sgd", "algorithm.sync_period=3", "algorithm.switch_step=6"],
    "slowmo_a1_b0_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=slowmo",
        "algorithm.slow_lr=1.0",
        "algorithm.slow_momentum=0.0",
    ],
    "slowmo_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=slowmo",
        "algorithm.slow_momentum=0.5",
    ],
    # Evaluating every 3 steps (between syncs) must not change the trajectory of local_H4.
    "local_H4_evaluated": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "train.eval_every_epochs=0.1"],
    "nesterov_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "algorithm.outer=nesterov"],
    # Streaming and compressed syncs (algorithms/streaming.py).
    "delay2_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "algorithm.sync_delay=2"],
    "int8_slowmo_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=slowmo",
        "algorithm.slow_momentum=0.5",
        "comm.sync_compression=int8",
    ],
    # τ = H: each Δ is taken at the sync step, before the sync is applied (one sync late). In fp32: with
    # int8 the simulated backend's batched-convolution rounding can move an element across a rounding
    # boundary, a whole int8 step (seen once: 4.7e-5 in one weight of 36). int8 at τ = H runs on real
    # ranks in tests/mpi/test_bench.py's streaming phase and against the reference in test_streaming.py.
    "delay2_H2": ["algorithm.method=local_sgd", "algorithm.sync_period=2", "algorithm.sync_delay=2"],
    "bf16_fragments2_delay1_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.fragments=2",
        "algorithm.sync_delay=1",
        "comm.sync_compression=bf16",
    ],
    # The DiLoCo recipe: AdamW inside (clipped), outer Nesterov; Muon on an MLP's hidden matrices, state reset.
    "adamw_clip_nesterov_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=nesterov",
        *_ADAMW,
        "optim.clip_grad_norm=1.0",
    ],
    "muon_mlp_reset_H3": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=3",
        "algorithm.optimizer_state=reset",
        "model.name=mlp",
        "model.width=16",
        *_ADAMW,
        "optim.name=muon",
        "optim.muon_lr_ratio=4",
    ],
    # AdamW through a streaming sync: int8 updates sent one step late, outer Nesterov on what arrives.
    "adamw_int8_delay1_nesterov_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.sync_delay=1",
        "algorithm.outer=nesterov",
        "comm.sync_compression=int8",
        *_ADAMW,
    ],
    # The language model: a one-block GPT (tied embeddings, causal attention) on byte-level text.
    "gpt_text_adamw_nesterov_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=nesterov",
        *GPT_TEXT,
        *_ADAMW,
    ],
    # Half-precision gradients in the synchronous phase (comm.gradient_compression).
    "allreduce_bf16_gradients": ["algorithm.method=allreduce", "comm.gradient_compression=bf16"],
    "post_local_H3_fp16_gradients": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=3",
        "algorithm.switch_step=6",
        "comm.gradient_compression=fp16",
    ],
}
# Cases whose last step syncs only part of the model (fragment 1 last synced at step 10 of 12).
ENDS_BETWEEN_FRAGMENT_SYNCS = {"bf16_fragments2_delay1_H4"}

_WORKERS2_INT8_DELAY1_SLOWMO_H4 = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.sync_delay=1",
    "algorithm.outer=slowmo",
    "algorithm.slow_momentum=0.5",
    "algorithm.ranks_per_worker=2",
    "comm.sync_compression=int8",
]
_LEVEL2_BF16_FRAGMENTS2_DELAY1_H4 = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.fragments=2",
    "algorithm.sync_delay=1",
    "algorithm.levels=[{ranks: 2, sync_period: 2}]",
    "comm.sync_compression=bf16",
]
# Worker groups and levels, for 4 ranks (tests/mpi/test_worker_groups.py).
HIERARCHY_CASES: dict[str, list[str]] = {
    "allreduce_4": ["algorithm.method=allreduce"],
    "workers2_local_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "algorithm.ranks_per_worker=2"],
    "workers2_post_local_slowmo": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=3",
        "algorithm.switch_step=6",
        "algorithm.outer=slowmo",
        "algorithm.slow_momentum=0.5",
        "algorithm.ranks_per_worker=2",
    ],
    "level2_nesterov_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=nesterov",
        "algorithm.levels=[{ranks: 2, sync_period: 2}]",
    ],
    "workers_node_H3": ["algorithm.method=local_sgd", "algorithm.sync_period=3", "algorithm.ranks_per_worker=node"],
    # Compression and overlap between workers (rank j of each worker averages shard j), and under a level
    # (there among all 4 ranks: the two-phase exchange; overlapped by 1, its second phase starts before the
    # backward of the step whose end applies it).
    "workers2_int8_delay1_slowmo_H4": [*_WORKERS2_INT8_DELAY1_SLOWMO_H4, "comm.sync_thread=false"],
    # The same with the sync thread, whatever the machine's cores: each rank's shard encoded, waited for and
    # decoded beside the step, the worker's assembly on the step's thread.
    "workers2_int8_delay1_slowmo_H4_sync_thread": [*_WORKERS2_INT8_DELAY1_SLOWMO_H4, "comm.sync_thread=true"],
    "level2_bf16_fragments2_delay1_H4": [*_LEVEL2_BF16_FRAGMENTS2_DELAY1_H4, "comm.sync_thread=false"],
    # The same with the sync thread: the all-to-all's wait, the chunk's sum and the gather's wait beside the step.
    "level2_bf16_fragments2_delay1_H4_sync_thread": [*_LEVEL2_BF16_FRAGMENTS2_DELAY1_H4, "comm.sync_thread=true"],
    # AdamW between workers of 2, its moments averaged with the model (three times the parameters' bytes).
    "workers2_adamw_avg_state_H4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.ranks_per_worker=2",
        "algorithm.optimizer_state=average",
        *_ADAMW,
    ],
    # bf16 gradients between all 4 ranks (the two-phase exchange) before the switch, fp32 inside workers after.
    "workers2_post_local_bf16_gradients": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=3",
        "algorithm.switch_step=6",
        "algorithm.ranks_per_worker=2",
        "comm.gradient_compression=bf16",
    ],
}
# The sync thread (comm.sync_thread), on and off whatever the machine's cores, for 2 ranks
# (tests/mpi/test_algorithms.py): int8 with error feedback at τ = 1, and fp32 at τ = H.
_INT8_DELAY1_H2 = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=2",
    "algorithm.sync_delay=1",
    "comm.sync_compression=int8",
]
SYNC_THREAD_CASES: dict[str, list[str]] = {
    "int8_delay1_H2_sync_thread": [*_INT8_DELAY1_H2, "comm.sync_thread=true"],
    "int8_delay1_H2_step_thread": [*_INT8_DELAY1_H2, "comm.sync_thread=false"],
    "delay2_H2_sync_thread": [*CASES["delay2_H2"], "comm.sync_thread=true"],
    "delay2_H2_step_thread": [*CASES["delay2_H2"], "comm.sync_thread=false"],
}
ALL_CASES = {**CASES, **HIERARCHY_CASES, **SYNC_THREAD_CASES}


def is_compressed(overrides: list[str]) -> bool:
    """Whether a case's syncs or gradients travel through a codec (which encodes float32 alone)."""
    return any(
        item.split("=", 1)[0] in ("comm.sync_compression", "comm.gradient_compression")
        and item.split("=", 1)[1] != "none"
        for item in overrides
    )


def equivalence_dtype(case: str) -> torch.dtype:
    """The dtype in which two paths that compute the same maths with different kernels are compared.

    Batched convolutions (the simulated backend) and one batch per rank take different kernels, and
    which ones depends on the CPU's instruction set: in float32 they differ in the last bits, and 12
    steps at a large learning rate grow that to 1e-4 relative on some CPUs (AVX2 without AVX-512),
    beyond any tolerance that would still catch a bug. In float64 the same paths agree to about 1e-13
    on every instruction set (tests/mpi/test_simulated.py), so a tight tolerance keeps its power.
    The codecs encode float32, so compressed cases stay float32."""
    return torch.float32 if is_compressed(ALL_CASES[case]) else torch.float64


# Ranks against the reference (tests/reference.py) in float32: the same kernels on both sides, the averages
# summed in another order, and int8 can turn a last-bit difference into one quantum of an update. Under five
# CPU settings (docs/testing.md) the reference comparisons used at most 0.5 % of it, two orders of summation
# (local SGD at H = 1 against all-reduce SGD, 12 steps) 17 %.
REFERENCE_TOLERANCE = {"rtol": 2e-4, "atol": 2e-5}
# Measured on a 2-core AMD EPYC under five CPU settings (native AVX-512, ATEN_CPU_CAPABILITY=default,
# ONEDNN_MAX_CPU_ISA=AVX2 and =SSE41, both at AVX2; docs/testing.md): over every simulated-against-ranks case,
# float64 agreed to 3.8e-14 relative and 8.9e-16 absolute at worst. A margin of over 1000.
FLOAT64_TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}
# float32 rounding noise between two kernels over a run of this problem (the tolerance these comparisons
# had before they moved to float64, which held for every uncompressed case on some CPUs only).
FLOAT32_NOISE = {"rtol": 1e-4, "atol": 1e-5}
# A codec's rounding flip: one element one quantum apart (bf16: 2^-8 of a gradient) times the learning
# rate. The largest measured under the five settings: 2.3e-5 (ATEN_CPU_CAPABILITY=default); 4 times that.
CODEC_FLIP = 1e-4


def assert_equivalent(got: np.ndarray, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    """Two paths of the same maths through different kernels (the simulated backend's batched
    convolutions, one batch per rank) give the same tensor: to ``FLOAT64_TOLERANCE`` in float64. A
    compressed case (float32) may differ where last-bit noise moved an element across a codec's
    rounding boundary: every element within ``CODEC_FLIP``, and all but 1 % of them (at least one)
    within float32 noise. A bug moves most elements; a rounding flip, a few."""
    if dtype == torch.float64 or want.dtype.kind != "f":
        np.testing.assert_allclose(got, want, **FLOAT64_TOLERANCE, err_msg=what)
        return
    np.testing.assert_allclose(got, want, rtol=0, atol=CODEC_FLIP, err_msg=what)
    noisy = ~np.isclose(got, want, **FLOAT32_NOISE)
    assert noisy.sum() <= max(1, want.size // 100), f"{what}: {noisy.sum()} of {want.size} beyond float32 noise"


# The ranks of the equivalence tests take torch's kernels for the baseline instruction set, the in-process
# side the CPU's best: the two sides compute through different kernels on every machine, whatever its CPU.
BASELINE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default float dtype inside the block (models, synthetic data): test-only float64 runs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_cases(
    ranks: int,
    backends: list[str],
    out: Path,
    cases: list[str] | None = None,
    float64: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Path]:
    """tests/mpi/train_driver.py under ``mpirun -np ranks`` once per backend; each backend's run folder.
    ``float64``: each case in its ``equivalence_dtype`` (float32 otherwise); ``env``: the ranks' additions."""
    from tests.helpers import run_mpi

    for backend in backends:
        argv = ["python", "tests/mpi/train_driver.py", "--backend", backend, "--out", str(out)]
        argv += ["--float64"] if float64 else []
        proc = run_mpi(ranks, [*argv, *(["--cases", ",".join(cases)] if cases else [])], timeout=300, env=env)
        assert proc.returncode == 0, f"{backend} run failed:\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.count(f"OK {backend}") == ranks, proc.stdout
    return {backend: out / backend for backend in backends}


def load_state(runs: dict[str, Path], backend: str, case: str, rank: int) -> dict[str, np.ndarray]:
    with np.load(runs[backend] / case / f"rank{rank}.npz") as f:
        return dict(f)


def load_counters(runs: dict[str, Path], backend: str, case: str, rank: int) -> dict:
    return json.loads((runs[backend] / case / f"rank{rank}.json").read_text())


def reference_run(
    overrides: list[str],
    ranks: int,
    departures: dict[int, int] | None = None,
    steps: int | None = None,
    returns: dict[int, tuple[int, int]] | None = None,
) -> tuple[list[dict[str, np.ndarray]], torch.nn.Module]:
    """Each rank's final state_dict when tests/reference.py trains ``ranks`` ranks on the problem of
    ``overrides`` (same data shards, initial model and LR as the package), and the initial model.
    ``node`` stands for all ranks: mpirun starts them on this one node. ``departures``: rank → the step of
    the first sync it misses (its shard is skipped from then on); ``returns``: rank → (the sync it comes back
    at, the rank it copies). ``steps``: the run's length (STEPS)."""
    steps = STEPS if steps is None else steps
    from hpc_localsgd.algorithms.schedule import SyncSchedule
    from hpc_localsgd.config import load_config
    from hpc_localsgd.train.data import ShardedBatches, build_datasets
    from hpc_localsgd.train.lr import LRSchedule
    from hpc_localsgd.train.models import build_model, hidden_matrix_names
    from hpc_localsgd.train.run import seed_everything
    from tests.reference import ReferenceAlgorithm, reference_optimizer, simulate

    cfg = load_config(None, overrides)
    seed_everything(cfg.seed)
    datasets = build_datasets(cfg.data, cfg.seed, seq_len=cfg.model.gpt.seq_len)
    model = build_model(cfg.model, datasets.num_classes, datasets.input_shape)
    shards = [
        ShardedBatches(datasets.train, cfg.data.batch_size, rank, ranks, cfg.seed, augment=cfg.data.augment)
        for rank in range(ranks)
    ]
    batches = [list(shard.epoch(0))[:steps] for shard in shards]
    schedule = LRSchedule.from_config(cfg.optim, cfg.data.batch_size * ranks, shards[0].steps_per_epoch, steps)
    a = cfg.algorithm
    local_start = SyncSchedule.from_config(a, shards[0].steps_per_epoch, schedule.first_decay_step).local_start

    def group(value: int | str) -> int:
        return ranks if value == "node" else int(value)

    algo = ReferenceAlgorithm.from_config(
        a,
        local_start,
        ranks_per_worker=group(a.ranks_per_worker),
        levels=tuple((group(level.ranks), level.sync_period) for level in a.levels),
    )
    algo.compression, algo.error_feedback = cfg.comm.sync_compression, cfg.comm.uses_error_feedback
    algo.gradient_compression = cfg.comm.gradient_compression
    algo.last_step = steps  # train.max_steps: the run ends there
    hidden = hidden_matrix_names(model)
    workers = simulate(
        model,
        algo,
        batches,
        schedule.at,
        cfg.optim.value("momentum"),
        cfg.optim.weight_decay,
        cfg.optim.nesterov,
        make_optimizer=lambda worker: reference_optimizer(worker, cfg.optim, schedule.at(0), hidden),
        clip_grad_norm=cfg.optim.clip_grad_norm,
        departures=departures,
        returns=returns,
    )
    return [{k: v.detach().numpy() for k, v in w.state_dict().items()} for w in workers], model
