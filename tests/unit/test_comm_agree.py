"""Agreement between ranks (``comm.agree``) on the in-process ``ThreadGroup``: every rank ends with the same outcome."""

from __future__ import annotations

import threading

import pytest

from hpc_localsgd.comm.agree import agree_on_failure, broadcast_text, decide_on_root
from hpc_localsgd.comm.threads import ThreadCommunicator, ThreadGroup
from hpc_localsgd.errors import ConfigError, UserError


@pytest.mark.parametrize("root", [0, 2])
@pytest.mark.parametrize("text", ["", "run-dir/.hpc-localsgd-bench-x1", "Ünïcødé ✓ with\x00a NUL", "é" * 5000])
def test_broadcast_text_gives_roots_text_to_every_rank(root: int, text: str) -> None:
    # Other ranks pass their own text (or None): only the root's counts. 10,000 bytes: longer than
    # the old fixed buffers (2048 and 4096 bytes), which cut such text.
    results = ThreadGroup(3).run(
        lambda comm: broadcast_text(comm, text if comm.rank == root else f"rank {comm.rank}", root=root)
    )
    assert results == [text] * 3


def test_broadcast_text_of_none_is_empty() -> None:
    assert ThreadGroup(2).run(lambda comm: broadcast_text(comm, None)) == ["", ""]


def test_no_failure_is_none_everywhere() -> None:
    assert ThreadGroup(4).run(lambda comm: agree_on_failure(comm, None)) == [None] * 4


@pytest.mark.parametrize("failing", [[0], [3], [1, 2], [2, 1, 3], [0, 1, 2, 3]])
def test_lowest_failing_rank_wins(failing: list[int]) -> None:
    def worker(comm: ThreadCommunicator) -> str | None:
        return agree_on_failure(comm, f"rank {comm.rank} cannot write" if comm.rank in failing else None)

    assert ThreadGroup(4).run(worker) == [f"rank {min(failing)} cannot write"] * 4


def test_an_empty_message_is_still_a_failure() -> None:
    assert ThreadGroup(2).run(lambda comm: agree_on_failure(comm, "" if comm.rank == 1 else None)) == ["", ""]


def test_a_long_failure_message_arrives_whole() -> None:
    long = "x" * 3000 + " the end"
    assert ThreadGroup(3).run(lambda comm: agree_on_failure(comm, long if comm.rank == 2 else None)) == [long] * 3


def test_decide_on_root_runs_once_and_gives_its_value_to_every_rank() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def decide(rank: int) -> int:
        with lock:
            calls.append(rank)
        return -7

    assert ThreadGroup(3).run(lambda comm: decide_on_root(comm, lambda: decide(comm.rank))) == [-7] * 3
    assert calls == [0]


def test_a_refusal_on_rank_0_is_raised_on_every_rank_with_its_message() -> None:
    message = "output.run_dir 'x' already holds a run " + "(long) " * 500

    def refuse() -> int:
        raise ConfigError(message)

    def worker(comm: ThreadCommunicator) -> tuple[str, str]:
        try:
            decide_on_root(comm, refuse)
        except UserError as exc:
            return "raised", str(exc)
        return "returned", ""

    assert ThreadGroup(3).run(worker) == [("raised", message)] * 3


def test_other_errors_are_not_turned_into_refusals() -> None:
    # A bug on rank 0 is not a user's error: it escapes there (the other ranks' collective then fails).
    def worker(comm: ThreadCommunicator) -> int:
        return decide_on_root(comm, lambda: 1 // 0)

    with pytest.raises(ZeroDivisionError):
        ThreadGroup(2, timeout=10).run(worker)
