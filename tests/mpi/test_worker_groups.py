"""Worker groups and hierarchical averaging on real MPI ranks (``mpirun -np 4 --oversubscribe``), on
every backend: the ranks of a worker agree at the end of every case, every backend equals the
independent reference (tests/reference.py, extended to groups and levels), workers as large as the
world are all-reduce SGD, the counters per level are exact, the simulated backend reproduces a
hierarchical run, and a bad hierarchy ends every rank with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_localsgd.algorithms.codecs import encoded_bytes
from hpc_localsgd.config import load_config
from hpc_localsgd.train.loop import train
from tests.helpers import run_mpi
from tests.mpi.cases import (
    BASE,
    BASELINE_KERNELS,
    HIERARCHY_CASES,
    REFERENCE_TOLERANCE,
    STEPS,
    assert_equivalent,
    default_dtype,
    equivalence_dtype,
    load_counters,
    load_state,
    reference_run,
    run_cases,
)
from tests.mpi.resume_driver import FOUR_RANK_RESUME_CASES, assert_resumed_equals_full

BACKENDS = ["mpi", "horovod", "torch"]
RANKS = 4
# Ranks that form one worker in each case (node: mpirun starts all 4 on this node).
RANKS_PER_WORKER = {
    "allreduce_4": 1,
    "workers2_local_H4": 2,
    "workers2_post_local_slowmo": 2,
    "level2_nesterov_H4": 1,
    "workers_node_H3": 4,
    "workers2_int8_delay1_slowmo_H4": 2,
    "workers2_int8_delay1_slowmo_H4_sync_thread": 2,
    "level2_bf16_fragments2_delay1_H4": 1,
    "level2_bf16_fragments2_delay1_H4_sync_thread": 1,
    "workers2_post_local_bf16_gradients": 2,
    "workers2_adamw_avg_state_H4": 2,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return run_cases(RANKS, BACKENDS, tmp_path_factory.mktemp("groups"), list(HIERARCHY_CASES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HIERARCHY_CASES))
def test_matches_reference_and_the_ranks_of_a_worker_agree(runs: dict[str, Path], backend: str, case: str) -> None:
    expected, model = reference_run(BASE + HIERARCHY_CASES[case], RANKS)
    got = [load_state(runs, backend, case, rank) for rank in range(RANKS)]
    for rank in range(RANKS):
        for key, want in expected[rank].items():
            np.testing.assert_allclose(
                got[rank][key], want, **REFERENCE_TOLERANCE, err_msg=f"{backend} {case} rank {rank} {key}"
            )
    per_worker = RANKS_PER_WORKER[case]
    for rank in range(RANKS):
        first = rank - rank % per_worker
        for name, _ in model.named_parameters():
            np.testing.assert_array_equal(got[rank][name], got[first][name], err_msg=f"{backend} {case} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_as_large_as_the_world_are_all_reduce_sgd(runs: dict[str, Path], backend: str) -> None:
    _, model = reference_run(BASE + HIERARCHY_CASES["allreduce_4"], RANKS)
    for rank in range(RANKS):
        one_worker, synchronous = (
            load_state(runs, backend, "workers_node_H3", rank),
            load_state(runs, backend, "allreduce_4", rank),
        )
        for name, _ in model.named_parameters():
            np.testing.assert_allclose(one_worker[name], synchronous[name], **REFERENCE_TOLERANCE, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        "workers2_int8_delay1_slowmo_H4",  # between workers of 2 ranks, each rank's shard gathered
        "level2_bf16_fragments2_delay1_H4",  # among all 4 under a level: the two-phase exchange
    ],
)
def test_the_sync_thread_gives_the_bits_of_the_step_thread(runs: dict[str, Path], backend: str, case: str) -> None:
    """comm.sync_thread on 4 ranks: the same parameters and counters, bit for bit, as the run whose ranks
    kept every part of the sync on the step's thread."""
    for rank in range(RANKS):
        want, got = load_state(runs, backend, case, rank), load_state(runs, backend, f"{case}_sync_thread", rank)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{backend} rank {rank} {key}")
        on, off = (load_counters(runs, backend, name, rank) for name in (f"{case}_sync_thread", case))
        assert (on["sync_thread"], off["sync_thread"]) == (True, False)
        assert (on["sync_rounds"], on["bytes_sent"]) == (off["sync_rounds"], off["bytes_sent"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_per_level_are_exact(runs: dict[str, Path], backend: str) -> None:
    for rank in range(RANKS):
        c = {case: load_counters(runs, backend, case, rank) for case in HIERARCHY_CASES}
        # What a sync averages (parameters and BN statistics, float32) and the gradients of a step.
        span, grad = c["workers2_local_H4"]["bytes_per_sync"], c["workers2_local_H4"]["gradient_bytes_per_step"]
        bn = span - grad
        assert grad > 0 and bn > 0
        # Between workers of 2, rank j sends shard j of the span; the first (elements % 2) shards are longer.
        elements = span // 4
        shard = 4 * (elements // 2 + (1 if rank % 2 < elements % 2 else 0))
        inside = bn + span  # a sync inside a worker: its BN average, then the gathered shards
        params = grad // 4  # a streaming sync's shards are of the parameters alone
        param_shard = params // 2 + (1 if rank % 2 < params % 2 else 0)
        bn_elements = bn // 4  # and of the BN statistics, with fragment 0
        bn_shard = 4 * (bn_elements // 2 + (1 if rank % 2 < bn_elements % 2 else 0))
        expected = {  # case: {level: (rounds, bytes)}
            "allreduce_4": {"global": (STEPS, STEPS * grad)},
            "workers2_local_H4": {
                "worker": (STEPS + STEPS // 4, STEPS * grad + STEPS // 4 * inside),
                "global": (STEPS // 4, STEPS // 4 * shard),
            },
            # 6 synchronous steps (global gradients), 6 local ones in workers of 2, syncs after 9 and 12.
            "workers2_post_local_slowmo": {
                "worker": (6 + 2, 6 * grad + 2 * inside),
                "global": (6 + 2, 6 * grad + 2 * shard),
            },
            # Groups of 2 every 2 local steps unless the global sync (every 4) is due: after 2, 6 and 10.
            "level2_nesterov_H4": {"level1": (3, 3 * span), "global": (3, 3 * span)},
            # One worker of 4: a sync only averages its BN statistics; nothing goes between workers.
            "workers_node_H3": {"worker": (STEPS + STEPS // 3, STEPS * grad + STEPS // 3 * bn)},
            # Syncs after 4, 8 and 12: rank j's int8 shard of Δ and shard j of the BN statistics (fp32)
            # between workers; inside the worker the fragment's assembly (fp32 parameters) and, as the
            # blocking sync does, the BN statistics' average and assembly.
            "workers2_int8_delay1_slowmo_H4": {
                "worker": (STEPS + 3, STEPS * grad + 3 * grad + 3 * 2 * bn),
                "global": (3, 3 * (encoded_bytes("int8", param_shard) + bn_shard)),
            },
            # Fragment 1 after 2, 6, 10, fragment 0 (with the BN statistics) after 4, 8, 12, each in bf16;
            # the level (groups of 2, fp32 parameters and BN statistics) after 2, 6, 10 as well.
            "level2_bf16_fragments2_delay1_H4": {"level1": (3, 3 * span), "global": (6, 3 * (grad // 2) + 3 * bn)},
            # As workers2_post_local_slowmo, with the 6 synchronous steps' gradients in bf16 between all ranks.
            "workers2_post_local_bf16_gradients": {
                "worker": (6 + 2, 6 * grad + 2 * inside),
                "global": (6 + 2, 6 * (grad // 2) + 2 * shard),
            },
        }
        # AdamW's two moments averaged with the parameters: a sync's span is three times theirs, with the BN
        # statistics; between workers rank j sends its shard of it.
        adamw = c["workers2_adamw_avg_state_H4"]
        assert adamw["bytes_per_sync"] == 3 * grad + bn
        adamw_elements = adamw["bytes_per_sync"] // 4
        adamw_shard = 4 * (adamw_elements // 2 + (1 if rank % 2 < adamw_elements % 2 else 0))
        expected["workers2_adamw_avg_state_H4"] = {
            "worker": (STEPS + STEPS // 4, STEPS * grad + STEPS // 4 * (bn + adamw["bytes_per_sync"])),
            "global": (STEPS // 4, STEPS // 4 * adamw_shard),
        }
        for case, levels in expected.items():
            got = {
                k[len("rounds.") :]: (v, c[case][f"bytes.{k[len('rounds.') :]}"])
                for k, v in c[case].items()
                if k.startswith("rounds.")
            }
            assert got == levels, (backend, case, rank)
            assert c[case]["sync_rounds"] == sum(r for r, _ in levels.values())
            assert c[case]["bytes_sent"] == sum(b for _, b in levels.values())


SIMULATED_CASES = [
    "workers2_post_local_slowmo",
    "level2_nesterov_H4",
    "workers2_int8_delay1_slowmo_H4",
    "level2_bf16_fragments2_delay1_H4",  # among 4: the two-phase exchange
    "workers2_post_local_bf16_gradients",
]


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The mpi backend's runs of SIMULATED_CASES, each in its ``equivalence_dtype``, at baseline kernels."""
    folder = tmp_path_factory.mktemp("groups-float64")
    return run_cases(RANKS, ["mpi"], folder, SIMULATED_CASES, float64=True, env=BASELINE_KERNELS)


def test_the_simulated_backend_reproduces_a_hierarchical_run(equivalence_runs: dict[str, Path], tmp_path: Path) -> None:
    for case in SIMULATED_CASES:
        overrides = BASE + HIERARCHY_CASES[case]
        cfg = load_config(
            None,
            [
                *overrides,
                f"output.run_dir={tmp_path / case}",
                "comm.backend=simulated",
                f"comm.simulated_workers={RANKS}",
            ],
        )
        dtype = equivalence_dtype(case)
        with default_dtype(dtype):
            result = train(cfg, print_fn=lambda _line: None)
        for rank in range(RANKS):
            want = load_state(equivalence_runs, "mpi", case, rank)
            got = result.model.worker_state(rank)
            for key, value in want.items():
                assert got[key].numpy().dtype == value.dtype, key  # both ran in the case's dtype
                assert_equivalent(got[key].numpy(), value, dtype, f"{case} rank {rank} {key}")
        mpi = load_counters(equivalence_runs, "mpi", case, 0)
        assert mpi["cpu_capability"] == "DEFAULT"
        assert result.stats.rounds_by_level == {
            k[len("rounds.") :]: v for k, v in mpi.items() if k.startswith("rounds.")
        }
        assert result.stats.bytes_by_level == {k[len("bytes.") :]: v for k, v in mpi.items() if k.startswith("bytes.")}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algorithm.ranks_per_worker=3"], "algorithm.ranks_per_worker: 3 ranks per worker do not divide the 4 ranks"),
        (
            ["algorithm.ranks_per_worker=2", "algorithm.levels=[{ranks: 2, sync_period: 2}]"],
            r"algorithm.levels\[0\].ranks: groups of 2 ranks must be larger than",
        ),
        (["algorithm.levels=[{ranks: node, sync_period: 2}]"], r"algorithm.levels\[0\].ranks: groups of 4 ranks"),
    ],
)
def test_a_bad_hierarchy_ends_every_rank_with_one_line_from_rank_0(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    import re

    args = ["python", "-m", "hpc_localsgd", "train", "configs/demo.yaml", "--run-dir", str(tmp_path / "run")]
    for item in ["comm.backend=mpi", "algorithm.method=local_sgd", "algorithm.sync_period=4", *overrides]:
        args += ["--set", item]
    proc = run_mpi(RANKS, args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpc-localsgd: error:")]
    # Seen alike by every rank (the same config, the same world): every rank stops, rank 0 says why once.
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", list(FOUR_RANK_RESUME_CASES))
def test_a_resumed_hierarchical_run_equals_an_uninterrupted_one(tmp_path: Path, case: str) -> None:
    for phase in ("first", "resume"):
        argv = ["python", "tests/mpi/resume_driver.py", phase, "--out", str(tmp_path), "--cases", case]
        proc = run_mpi(RANKS, argv, timeout=300)
        assert proc.returncode == 0 and proc.stdout.count(f"OK {phase}") == RANKS, proc.stdout + proc.stderr
    assert_resumed_equals_full(tmp_path / case / "full", tmp_path / case / "resumed", ranks=RANKS)
