"""The bench options go through the config loader: names, types and declared ranges, messages naming the option."""

from __future__ import annotations

import pytest

from hpc_localsgd.bench import BenchOptions
from hpc_localsgd.bench.report import describe_machine
from hpc_localsgd.bench.variants import VARIANT_NAMES, VARIANTS
from hpc_localsgd.errors import UserError


@pytest.mark.parametrize(
    "given,message",
    [
        ({"repeats": 0}, "--repeats: must be >= 1, got 0"),
        ({"num_classes": 1}, "--classes: must be >= 2, got 1"),
        ({"projection_step_seconds": 0.0}, "--project-step-seconds: must be > 0, got 0.0"),
        ({"backend": "nccl"}, "--backend: must be one of 'auto' | 'horovod' | 'mpi' | 'torch' | 'single', got 'nccl'"),
        ({"batch": "8"}, "--batch: expected an integer, got '8'"),
        ({"sync_periods": (4, 0)}, "--sync-periods: must be positive integers, got 4,0"),
        ({"repets": 3}, "--repets: unknown key; did you mean 'repeats'?"),
        (
            {"streaming_variants": ("h4_delay3", "h4_delay9")},
            "--streaming-variants: unknown configuration 'h4_delay9'; choose from " + ", ".join(VARIANT_NAMES),
        ),
        ({"streaming_variants": ()}, "--streaming-variants: choose at least one configuration"),
        (
            {"compare_sync_thread": True, "sync_thread": True},
            "--compare-sync-thread: measures comm.sync_thread off and on; leave --sync-thread out",
        ),
        ({"compare_sync_thread": True}, "--compare-sync-thread: needs the streaming phase (--phases)"),
    ],
)
def test_bad_options_name_the_option(given: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        BenchOptions.from_given(quick=True, phases=("averaging",), **given).validate()
    assert str(info.value) == message


def test_comparing_the_sync_thread_needs_an_overlapped_configuration() -> None:
    """Only a sync that travels while steps run (sync_delay > 0) uses the sync thread; the others would
    measure the same configuration twice."""
    blocking = tuple(v.name for v in VARIANTS if not v.overlapped)
    assert {"allreduce", "h1", "h4", "h1_int8"} <= set(blocking)

    def options(*variants: str) -> BenchOptions:
        return BenchOptions.from_given(
            quick=True, phases=("streaming",), streaming_variants=variants, compare_sync_thread=True
        )

    with pytest.raises(UserError) as info:
        options(*blocking).validate()
    assert str(info.value) == (
        "--compare-sync-thread: none of --streaming-variants overlaps its sync (sync_delay > 0), "
        "and only those use the sync thread"
    )
    options(*blocking, "h4_delay3").validate()


def test_quick_defaults_yield_to_given_options() -> None:
    options = BenchOptions.from_given(quick=True, batch=4, repeats=None, sync_periods=[2, 4])
    assert (options.model, options.batch, options.repeats, options.sync_periods) == ("smallcnn", 4, 3, (2, 4))
    assert options.quick and BenchOptions.from_given().model == "resnet50"


@pytest.mark.parametrize(
    "world,given,expected",
    [(4, None, 2), (8, None, 2), (2, None, None), (6, None, 2), (3, None, None), (1, None, None), (8, 4, 4)],
)
def test_ranks_per_worker_defaults_to_pairs_where_the_world_allows(world: int, given: int | None, expected) -> None:
    options = BenchOptions.from_given(quick=True, phases=("hierarchy",), ranks_per_worker=given)
    options.validate()
    assert options.workers_of(world) == expected


@pytest.mark.parametrize("world,given", [(4, 3), (4, 4), (6, 4), (2, 2)])
def test_ranks_per_worker_that_leaves_fewer_than_two_workers_is_refused(world: int, given: int) -> None:
    options = BenchOptions.from_given(quick=True, phases=("hierarchy",), ranks_per_worker=given)
    with pytest.raises(UserError) as info:
        options.workers_of(world)
    assert str(info.value) == (
        f"--ranks-per-worker: {given} ranks per worker need a world of 2·{given}, 3·{given}, ... ranks "
        f"(two workers or more); this run has {world}"
    )


def test_ranks_per_worker_below_two_names_the_option() -> None:
    with pytest.raises(UserError) as info:
        BenchOptions.from_given(quick=True, phases=("hierarchy",), ranks_per_worker=1).validate()
    assert str(info.value) == "--ranks-per-worker: must be >= 2, got 1"


def test_without_the_phase_ranks_per_worker_is_not_used() -> None:
    assert BenchOptions.from_given(quick=True, phases=("averaging",), ranks_per_worker=3).workers_of(4) is None


def test_the_streaming_phase_measures_every_configuration_unless_told() -> None:
    assert BenchOptions.from_given().streaming_variants == tuple(v.name for v in VARIANTS) == VARIANT_NAMES
    assert len(set(VARIANT_NAMES)) == len(VARIANT_NAMES)
    chosen = BenchOptions.from_given(streaming_variants=["h2_int8_delay1", "h4_delay3"])
    assert chosen.streaming_variants == ("h2_int8_delay1", "h4_delay3")


def test_the_machine_phrase_names_the_cpu_its_kernels_and_each_ranks_cores_as_ranges() -> None:
    info = {
        "cpu": "Example CPU",
        "cpu_count": 16,
        "cpu_capability": "AVX2",
        "isa_settings": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
        "rank_cores": [[0, 1, 2, 5], [8, 9, 10, 11, 12, 13, 14, 15]],
    }
    assert describe_machine(info) == (
        "Example CPU, 16 cores, AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2), ranks on cores 0-2,5 | 8-15"
    )
    assert describe_machine({**info, "isa_settings": {}, "rank_cores": [[3]]}).endswith(
        "AVX2 kernels, ranks on cores 3"
    )
