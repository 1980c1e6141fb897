"""The fault-injection plan (launcher/faults.py): what each entry means, and bad plans refused in one line."""

from __future__ import annotations

import re

import pytest

from hpc_localsgd.errors import ConfigError
from hpc_localsgd.launcher.faults import FAULT_VARIABLE, Fault, FaultPlan, parse_faults


def test_entries_name_action_rank_step_and_point() -> None:
    assert parse_faults("kill:1:12, stop:0:5,kill:2:16:sync") == (
        Fault("kill", 1, 12, "step"),
        Fault("stop", 0, 5, "step"),
        Fault("kill", 2, 16, "sync"),
    )
    assert parse_faults("") == ()


def test_a_rank_keeps_only_its_own_faults() -> None:
    env = {FAULT_VARIABLE: "kill:1:12,stop:0:5,kill:1:20:sync"}
    assert FaultPlan.from_env(1, env).faults == (Fault("kill", 1, 12), Fault("kill", 1, 20, "sync"))
    assert not FaultPlan.from_env(3, env)


def test_a_fault_fires_only_at_its_point_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append((pid, sig)))
    plan = FaultPlan(parse_faults("stop:0:5:sync"), 0)
    plan.reached("step", 5)
    plan.reached("sync", 4)
    assert sent == []
    plan.reached("sync", 5)
    assert len(sent) == 1 and sent[0][1] == 19  # SIGSTOP


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("kill:1", "expected ACTION:RANK:STEP[:POINT]"),
        ("pause:1:3", "action 'pause' is not one of kill, stop"),
        ("kill:-1:3", "RANK must be >= 0 and STEP >= 1"),
        ("kill:1:0", "RANK must be >= 0 and STEP >= 1"),
        ("kill:1:3:eval", "point 'eval' is not one of step, sync"),
    ],
)
def test_bad_entries_are_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(f"{FAULT_VARIABLE}: '{text}': {problem}")):
        parse_faults(f"kill:0:1,{text}")
