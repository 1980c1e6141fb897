"""The phase registry drives the bench: the ``--phases`` choices and help, the run order, and which
module measures each phase; and the registry, the options and the command line import no torch."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from hpc_localsgd.bench import PHASES, BenchOptions
from hpc_localsgd.bench.phases import PHASE_NAMES, selected
from hpc_localsgd.cli import build_parser
from hpc_localsgd.errors import UserError
from tests.helpers import REPO_ROOT

EXPECTED = ("averaging", "throughput", "streaming", "precision", "simulation", "hierarchy", "slowmo", "checkpoint")


def bench_help() -> str:
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb")
    return verbs.choices["bench"].format_help()  # type: ignore[index, union-attr]


def test_the_registry_lists_every_phase_once_in_run_order() -> None:
    assert PHASE_NAMES == EXPECTED
    assert BenchOptions.from_given().phases == EXPECTED  # all of them unless told
    assert all(phase.description and "\n" not in phase.description for phase in PHASES)


@pytest.mark.parametrize("phase", PHASES, ids=lambda p: p.name)
def test_every_phase_is_selectable_and_measured_by_its_own_modules_run(phase) -> None:
    options = BenchOptions.from_given(quick=True, phases=(phase.name,))
    options.validate()
    assert [p.name for p in selected(options.phases)] == [phase.name]
    run = phase.run
    assert run.__module__ == f"hpc_localsgd.bench.{phase.name}" and run.__name__ == "run"
    assert list(inspect.signature(run).parameters) == ["ctx"]
    # --phases' help names it with its description.
    assert f"{phase.name}: " in " ".join(bench_help().split())


def test_phases_run_in_the_registry_order_whatever_order_they_are_given_in() -> None:
    assert [p.name for p in selected(("checkpoint", "averaging", "hierarchy"))] == [
        "averaging",
        "hierarchy",
        "checkpoint",
    ]


def test_an_unknown_phase_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(UserError) as info:
        BenchOptions.from_given(quick=True, phases=("averaging", "nosuch")).validate()
    assert str(info.value) == f"--phases: unknown phase 'nosuch'; choose from {', '.join(EXPECTED)}"


@pytest.mark.parametrize("world,given,reason", [(2, None, True), (4, None, False), (8, 4, False), (6, None, False)])
def test_the_hierarchy_says_why_it_cannot_run(world: int, given: int | None, reason: bool) -> None:
    hierarchy = next(p for p in PHASES if p.name == "hierarchy")
    options = BenchOptions.from_given(quick=True, phases=("hierarchy",), ranks_per_worker=given)
    said = hierarchy.unavailable(options, world)
    if reason:
        assert said == (
            f"{world} rank(s) hold no two workers of 2 ranks; give --ranks-per-worker R, R dividing the "
            "world size and at most half of it"
        )
    else:
        assert said is None
    assert all(p.unavailable(options, world) is None for p in PHASES if p.name != "hierarchy")


def test_the_phases_that_compare_with_the_bare_limit() -> None:
    assert {p.name for p in PHASES if p.needs_bare_limit} == {"throughput", "streaming", "hierarchy"}


def test_the_command_line_and_the_options_import_no_torch() -> None:
    # hpc-localsgd report runs where torch may be missing (a login node): building the parser, bench
    # flags included, must not need it.
    code = (
        "import sys, hpc_localsgd.cli as cli, hpc_localsgd.bench; cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
