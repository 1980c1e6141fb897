"""One way of writing byte counts, for the start-up and summary lines and for the report's tables."""

from __future__ import annotations

from hpc_localsgd.algorithms.accounting import human_bytes


def test_bytes_are_written_in_decimal_units() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 20_000, 1_500_000, 2 * 10**9, 3 * 10**12, 4 * 10**15)] == [
        "0 B",
        "999 B",
        "1.0 KB",
        "20.0 KB",
        "1.5 MB",
        "2.0 GB",
        "3.0 TB",
        "4.0 PB",
    ]
