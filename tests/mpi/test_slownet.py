"""The emulated slow network (bench/slownet.py): two namespaces, a real rate limit, nothing left behind.

It needs root and the ``ip``/``tc`` tools; where it cannot create namespaces the test fails with the
harness's one line (never a skip).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hpc_localsgd.bench.slownet import SlowNetworkUnavailable, existing_namespaces, slow_network
from tests.helpers import REPO_ROOT

DRIVER = str(REPO_ROOT / "tests" / "mpi" / "slownet_driver.py")
RATE_BITS = 100_000_000  # "100mbit": slow enough that the payload's time dwarfs latency, fast enough for CI
PAYLOAD = 4_000_000  # bytes: at least 0.32 s on the link


def ours(prefix: str) -> set[str]:
    return {name for name in existing_namespaces() if name.startswith(prefix)}


def test_ranks_in_two_namespaces_talk_over_a_rate_limited_link() -> None:
    prefix = "hlsgd-test"
    try:
        with slow_network(2, "100mbit", prefix=prefix) as network:
            assert ours(prefix) == {f"{prefix}-0", f"{prefix}-1", f"{prefix}-hub"}
            done = network.run([sys.executable, DRIVER, "--bytes", str(PAYLOAD)], timeout=180)
    except SlowNetworkUnavailable as error:
        pytest.fail(str(error))
    report = f"exit code {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, report
    lines = dict(
        (int(m[1]), (m[2], float(m[3])))
        for m in re.finditer(r"^OK rank (\d) netns (\S+) seconds ([\d.]+)$", done.stdout, re.MULTILINE)
    )
    assert sorted(lines) == [0, 1], report
    own = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip()
    namespaces = {lines[0][0], lines[1][0]}
    assert len(namespaces) == 2 and own not in namespaces, report  # one namespace each, neither this one's
    # Rank 1 finishes the broadcast only when every byte has crossed the link: bytes / rate at least
    # (HTB's burst lets a few kilobytes through early: 2 % of slack).
    assert lines[1][1] >= 0.98 * PAYLOAD * 8 / RATE_BITS, report
    assert ours(prefix) == set()


def test_namespaces_are_removed_when_the_body_fails() -> None:
    prefix = "hlsgd-fail"
    with pytest.raises(RuntimeError, match="inside"):
        with slow_network(2, "1gbit", prefix=prefix):
            assert len(ours(prefix)) == 3
            raise RuntimeError("inside")
    assert ours(prefix) == set()


def test_a_network_that_cannot_be_created_says_so_in_one_line_and_leaves_nothing() -> None:
    # A rate tc cannot parse: the namespaces exist by then and must go again.
    prefix = "hlsgd-bad"
    with pytest.raises(SlowNetworkUnavailable) as raised:
        with slow_network(2, "fast", prefix=prefix):
            pass
    message = str(raised.value)
    assert message.startswith("cannot set up the slow network: tc class add") and "\n" not in message
    assert ours(prefix) == set()
