"""``hpc-localsgd train --help-config`` lists every key of the run config with its default and meaning."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from hpc_localsgd.cli import main
from hpc_localsgd.config import RunConfig, load_config
from hpc_localsgd.errors import ConfigError
from tests.helpers import REPO_ROOT


def schema_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf field of a schema by dotted key, walked independently of the code under test."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(schema_keys(hints[f.name], key + "."))
        else:
            keys[key] = f
    return keys


def blocks(text: str) -> dict[str, list[str]]:
    """The help text as {key: the indented lines under it}."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines()[1:]:
        if line and not line.startswith(" "):
            current = found.setdefault(line, [])
        elif line.strip():
            current.append(line.strip())
    return found


def test_every_key_is_listed_with_its_default_and_a_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help-config"])  # no config file needed
    assert exit_.value.code == 0
    listed = blocks(capsys.readouterr().out)
    defaults = RunConfig()
    keys = schema_keys(RunConfig)
    assert list(listed) == list(keys)
    for key in keys:
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        details, *meaning = listed[key]
        assert f"default: {json.dumps(value)}" in details, key
        assert "type: " in details, key
        assert meaning and all(meaning), f"{key} has no meaning"


def test_every_field_declares_a_meaning() -> None:
    for key, f in schema_keys(RunConfig).items():
        assert str(f.metadata.get("help", "")).strip(), f"{key} has no stated meaning"


def test_the_listed_defaults_load_back_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help-config"])
    listed = blocks(capsys.readouterr().out)
    overrides = [f"{key}={lines[0].split('default: ')[1].split('; range:')[0]}" for key, lines in listed.items()]
    assert load_config(None, overrides) == load_config(None)


def test_a_declared_range_is_checked_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint\.keep: must be >= 1, got 0$"):
        load_config(None, ["checkpoint.keep=0"])
    with pytest.raises(SystemExit):
        main(["train", "--help-config"])
    assert "range: >= 1" in blocks(capsys.readouterr().out)["checkpoint.keep"][0]


def test_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_localsgd", "train", "--help-config"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert "\noptim.weight_decay\n" in proc.stdout
