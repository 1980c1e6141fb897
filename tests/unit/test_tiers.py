"""The test tiers of tests/conftest.py: each file's markers follow from where it lives."""

from __future__ import annotations

from tests.conftest import SLOW_FILES, TESTS, tier_markers


def test_each_folder_and_file_gets_its_tier() -> None:
    assert tier_markers("unit/test_engine.py") == ["quick"]
    assert tier_markers("unit/test_static_checks.py") == ["lint"]
    assert tier_markers("mpi/test_algorithms.py") == ["mpi", "quick"]
    assert tier_markers("mpi/test_bench.py") == ["mpi", "slow"]
    assert tier_markers("mpi/test_slownet.py") == ["mpi", "slownet"]
    assert tier_markers("slurm/test_training.py") == ["slurm"]


def test_every_slow_file_exists() -> None:
    # A renamed file would silently join the quick tier.
    assert all((TESTS / name).is_file() for name in SLOW_FILES), sorted(
        n for n in SLOW_FILES if not (TESTS / n).is_file()
    )
