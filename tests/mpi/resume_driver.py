"""Run under ``mpirun -np 2`` in two phases, each a fresh set of processes:

    phase first:  for every case, a run of 2N steps (run dir full/), and a run stopped by
                  --stop-at-step N after writing its checkpoint (run dir resumed/)
    phase resume: for every case, resumed/ continued with --resume auto

Each finished run leaves each rank's complete training state in rank<r>.npz for
tests/mpi/test_checkpoints.py to compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_localsgd.algorithms.optimizer_state import STATE_KINDS  # noqa: E402
from hpc_localsgd.comm import make_communicator  # noqa: E402
from hpc_localsgd.config import load_config  # noqa: E402
from hpc_localsgd.io.metrics import read_metrics  # noqa: E402
from hpc_localsgd.launcher.env import detect_launch  # noqa: E402
from hpc_localsgd.train.loop import TrainResult, train  # noqa: E402
from hpc_localsgd.train.ranks import merged_groups, planned_groups  # noqa: E402
from tests.mpi.cases import BASE, GPT_TEXT  # noqa: E402

STOP = 7  # between two syncs for H = 4, before the post-local switch
TOTAL = 2 * STOP

RESUME_CASES: dict[str, list[str]] = {
    "allreduce": ["algorithm.method=allreduce"],
    "local_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4"],
    "post_local_switch10_H2": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=2",
        "algorithm.switch_step=10",
    ],
    "slowmo_H4": ["algorithm.method=local_sgd", "algorithm.sync_period=4", "algorithm.outer=slowmo"],
    # Both ranks one worker: gradients inside the worker every local step, counted per level.
    "workers2_post_local_switch5_H4": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=4",
        "algorithm.switch_step=5",
        "algorithm.ranks_per_worker=2",
        "algorithm.outer=slowmo",
    ],
    "nesterov_H4_avg_momentum": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.outer=nesterov",
        "algorithm.optimizer_state=average",
    ],
}
# Mixed precision: bf16 autocast; fp16 with its per-rank loss scaler, which the checkpoint carries.
RESUME_CASES["bf16_local_H4"] = ["algorithm.method=local_sgd", "algorithm.sync_period=4", "train.precision=bf16"]
RESUME_CASES["fp16_post_local_switch5_H4"] = [
    "algorithm.method=post_local_sgd",
    "algorithm.sync_period=4",
    "algorithm.switch_step=5",
    "train.precision=fp16",
]
# Stopped while a delayed sync is in flight (step 8's, started after step 5), with int8's error feedback.
RESUME_CASES["int8_delay3_slowmo_H4"] = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.sync_delay=3",
    "algorithm.outer=slowmo",
    "comm.sync_compression=int8",
]
# The same with the sync thread (encoded and waited for beside the step), and int8 at τ = H = 1: stopped after
# step 7, step 8's update is encoded on the sync thread but not yet sent (that would be before step 8's
# backward), so the checkpoint sends it, waits for it and carries it.
RESUME_CASES["int8_delay3_slowmo_H4_sync_thread"] = [*RESUME_CASES["int8_delay3_slowmo_H4"], "comm.sync_thread=true"]
RESUME_CASES["int8_delay1_H1_sync_thread"] = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=1",
    "algorithm.sync_delay=1",
    "comm.sync_compression=int8",
    "comm.sync_thread=true",
]
# The inner optimizers' state through a checkpoint, mid-period: AdamW's moments (averaged at each sync) and
# step counts under outer Nesterov; Muon's momentum for an MLP's hidden matrices and AdamW's for the rest.
RESUME_CASES["adamw_nesterov_H4_avg_state"] = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.outer=nesterov",
    "algorithm.optimizer_state=average",
    "optim.name=adamw",
    "optim.lr_per_256=0.05",
    "optim.weight_decay=0.1",
]
RESUME_CASES["muon_mlp_H4"] = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "model.name=mlp",
    "model.width=16",
    "optim.name=muon",
    "optim.lr_per_256=0.05",
    "optim.muon_lr_ratio=4",
]
# The inner optimizers with mixed precision and streaming syncs: AdamW under fp16's loss scaler, stopped while
# an int8 sync is in flight; Muon under bf16 autocast with the model synced in two fragments.
RESUME_CASES["adamw_fp16_int8_delay3_nesterov_H4"] = [
    *RESUME_CASES["int8_delay3_slowmo_H4"][:3],
    "algorithm.outer=nesterov",
    "comm.sync_compression=int8",
    "train.precision=fp16",
    *RESUME_CASES["adamw_nesterov_H4_avg_state"][4:],
]
RESUME_CASES["muon_mlp_bf16_fragments2_H4"] = [
    *RESUME_CASES["muon_mlp_H4"],
    "algorithm.fragments=2",
    "train.precision=bf16",
]
# The language model through a checkpoint: Muon on its hidden matrices, AdamW on the tied embedding, the
# moments averaged at each sync; data windows found again from (seed, rank, step), no sampler saved.
RESUME_CASES["gpt_text_muon_avg_state_H4"] = [
    "algorithm.method=local_sgd",
    "algorithm.sync_period=4",
    "algorithm.optimizer_state=average",
    *GPT_TEXT,
    "optim.name=muon",
    "optim.lr_per_256=0.05",
]
# Cases for 4 ranks (--cases), run by tests/mpi/test_worker_groups.py: workers of 2 ranks.
FOUR_RANK_RESUME_CASES: dict[str, list[str]] = {
    "workers2_post_local_slowmo_np4": [
        "algorithm.method=post_local_sgd",
        "algorithm.sync_period=4",
        "algorithm.switch_step=5",
        "algorithm.ranks_per_worker=2",
        "algorithm.outer=slowmo",
    ],
    # Stopped while step 8's delayed sync between workers is in flight: each rank's int8 error is its shard's.
    "workers2_int8_delay3_np4": [
        "algorithm.method=local_sgd",
        "algorithm.sync_period=4",
        "algorithm.sync_delay=3",
        "algorithm.ranks_per_worker=2",
        "comm.sync_compression=int8",
    ],
}
OVERRIDES = [
    *BASE,
    f"train.max_steps={TOTAL}",
    "train.eval_every_epochs=0.2",
    "checkpoint.every_steps=5",
    "checkpoint.poll_every_steps=3",
]


def save(result: TrainResult, run_dir: Path, rank: int) -> None:
    state = {f"rank.{k}": v.detach().numpy() for k, v in result.engine.rank_state().items()}
    state.update({f"shared.{k}": v.detach().numpy() for k, v in result.engine.shared_state().items()})
    state.update({f"model.{k}": v.detach().numpy() for k, v in result.model.state_dict().items()})
    state["counters"] = np.array([result.stats.sync_rounds, result.stats.bytes_sent, result.steps])
    levels = sorted(result.stats.rounds_by_level)
    state["counters_by_level"] = np.array(
        [[result.stats.rounds_by_level[level], result.stats.bytes_by_level[level]] for level in levels]
    )
    np.savez(run_dir / f"rank{rank}.npz", **state)


def assert_resumed_equals_full(full: Path, resumed: Path, ranks: int) -> None:
    """Every rank's whole training state, and the metrics file's deterministic series, are bit-identical."""
    for rank in range(ranks):
        a, b = np.load(full / f"rank{rank}.npz"), np.load(resumed / f"rank{rank}.npz")
        assert sorted(a.files) == sorted(b.files)
        # The inner optimizer's state is compared too (the registry's segments: SGD's momentum, AdamW's moments).
        assert any(k.rpartition(".")[2] in STATE_KINDS for k in a.files)
        for key in a.files:
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"rank {rank} {key}")
    ma, mb = read_metrics(full / "metrics.h5"), read_metrics(resumed / "metrics.h5")
    for group in ("steps", "evals"):
        # Everything but times: the counters (totals and per level) and the learning figures.
        names = [name for name in ma[group] if not name.endswith(("seconds", "samples_per_s"))]
        assert {"global_bytes_sent", "loss" if group == "steps" else "test_loss"} <= set(names)
        assert set(names) == {name for name in mb[group] if not name.endswith(("seconds", "samples_per_s"))}
        for name in names:
            np.testing.assert_array_equal(mb[group][name], ma[group][name], err_msg=f"{group}/{name}")
    # The resumed run's metrics continue the stopped run's file: one row per step, no gap, no repeat.
    assert list(mb["steps"]["step"]) == list(range(1, 2 * STOP + 1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("first", "resume"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(RESUME_CASES))
    args = parser.parse_args()
    cases = {**RESUME_CASES, **FOUR_RANK_RESUME_CASES}
    names = args.cases.split(",")
    launch = detect_launch()
    plans = [planned_groups(load_config(None, [*OVERRIDES, *cases[name]]), launch.layout) for name in names]
    comm = make_communicator("auto", launch, torch.device("cpu"), **merged_groups(plans))
    quiet = {"launch": launch, "comm": comm, "print_fn": lambda _line: None}
    for name in names:
        overrides = cases[name]
        full, resumed = Path(args.out) / name / "full", Path(args.out) / name / "resumed"
        if args.phase == "first":
            result = train(load_config(None, [*OVERRIDES, *overrides, f"output.run_dir={full}"]), **quiet)
            save(result, full, comm.rank)
            stopped = train(
                load_config(None, [*OVERRIDES, *overrides, f"output.run_dir={resumed}"]), stop_at_step=STOP, **quiet
            )
            assert stopped.stopped and stopped.steps == STOP
        else:
            result = train(
                load_config(None, [*OVERRIDES, *overrides, f"output.run_dir={resumed}"]), resume="auto", **quiet
            )
            save(result, resumed, comm.rank)
    comm.close()
    print(f"OK {args.phase} rank {comm.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
