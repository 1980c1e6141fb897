"""Numbers in configs: exponent notation (``1e-4``) is a number wherever a number is expected, and every
numeric setting has a finite range, so that ``1e308``, ``.inf`` and ``.nan`` end with one line naming the key."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest

from hpc_localsgd.bench import BenchOptions
from hpc_localsgd.cli import _integer
from hpc_localsgd.config import RunConfig, load_config
from hpc_localsgd.config.fields import Range, describe
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.sweep import SweepFile, plan_sweep, read_sweep_file, write_sweep


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exponent_notation_in_a_file_and_in_set(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  weight_decay: 1e-4\n  lr_per_256: 5E-1\n  decay_epochs: [3e1, 6.0e1]\n")
    cfg = load_config(path, ["algorithm.slow_lr=2.5e-1", "train.epochs=5E+1", "algorithm.outer_lr=+7e-1"])
    assert (cfg.optim.weight_decay, cfg.optim.lr_per_256, cfg.optim.decay_epochs) == (1e-4, 0.5, [30.0, 60.0])
    assert (cfg.algorithm.slow_lr, cfg.train.epochs, cfg.algorithm.outer_lr) == (0.25, 50.0, 0.7)
    assert all(type(v) is float for v in (cfg.optim.weight_decay, cfg.train.epochs, cfg.optim.decay_epochs[0]))
    # A negative number is read as one, and then refused by its range.
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay: must be in \[0, 1\], got -0\.0001$"):
        load_config(None, ["optim.weight_decay=-1e-4"])


def test_an_integer_setting_takes_a_whole_number_in_exponent_notation(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data:\n  synthetic:\n    train_samples: 5E+3\n"), ["train.max_steps=1.5e3"])
    assert cfg.data.synthetic.train_samples == 5000 and type(cfg.data.synthetic.train_samples) is int
    assert cfg.train.max_steps == 1500 and type(cfg.train.max_steps) is int
    assert load_config(None, ["algorithm.ranks_per_worker=2e0"]).algorithm.ranks_per_worker == 2
    with pytest.raises(ConfigError, match=r"^train\.max_steps: expected an integer or null, got '1e-3'$"):
        load_config(None, ["train.max_steps=1e-3"])
    # Only exponent notation is taken from a string: other strings stay strings.
    with pytest.raises(ConfigError, match=r"^algorithm\.sync_period: expected an integer, got '8'$"):
        load_config(write(tmp_path, "algorithm:\n  sync_period: '8'\n"))
    with pytest.raises(ConfigError, match=r"^algorithm\.sync_period: expected an integer, got '2\.5e0'$"):
        load_config(None, ["algorithm.sync_period=2.5e0"])


def test_a_string_setting_keeps_the_text(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "model:\n  name: 1e-4\n"), ["output.run_dir=1E5"])
    assert (cfg.model.name, cfg.output.run_dir) == ("1e-4", "1E5")


def test_bench_options_and_the_sweep_file_read_exponent_notation(tmp_path: Path) -> None:
    assert BenchOptions.from_given(bucket_mb="2.5e1", steps="1.6e1").bucket_mb == 25.0
    assert BenchOptions.from_given(steps="1.6e1").steps == 16
    assert _integer("1e3") == 1000 and _integer("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '1e-3'"):
        _integer("1e-3")
    write(tmp_path, "data: {name: synthetic}\noptim: {weight_decay: 2e-4}\n", "base.yaml")
    grid = write(
        tmp_path,
        "base: base.yaml\nset: {optim.lr_per_256: 1e-1}\ngrid: {optim.weight_decay: [1e-4, 5E-4]}\n"
        "slurm: {ntasks_per_node: 4e0}\n",
        "grid.yaml",
    )
    plan = plan_sweep(grid, tmp_path / "out")
    assert [p.overrides for p in plan.points] == [{"optim.weight_decay": "1e-4"}, {"optim.weight_decay": "5E-4"}]
    write_sweep(plan, overwrite=False)
    configs = [load_config(point.config_path) for point in plan.points]
    assert [(c.optim.weight_decay, c.optim.lr_per_256) for c in configs] == [(1e-4, 0.1), (5e-4, 0.1)]
    assert read_sweep_file(grid).slurm.ntasks_per_node == 4


BIG = ["optim.weight_decay", "optim.warmup_epochs", "algorithm.slow_lr", "train.epochs", "train.eval_every_epochs"]


@pytest.mark.parametrize("key", BIG)
@pytest.mark.parametrize("value", ["1e308", "1e999", ".inf", "-.inf", ".nan", "inf", "nan"])
def test_overflowing_and_non_finite_values_are_refused_with_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    if value in ("inf", "nan"):  # YAML reads these as words
        assert message == f"{key}: expected a number, got {value!r}"
    elif value in ("1e308", "1e999", ".inf"):
        upper = {"optim.weight_decay": "in [0, 1]", "algorithm.slow_lr": "<= 100"}.get(key, "<= 1e6")
        assert message == f"{key}: must be {upper}, got {float(value.lstrip('.'))}"


def test_the_same_in_a_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay: must be in \[0, 1\], got inf$"):
        load_config(write(tmp_path, "optim:\n  weight_decay: .inf\n"))
    with pytest.raises(ConfigError, match=r"^train\.epochs: must be > 0, got nan$"):
        load_config(write(tmp_path, "train:\n  epochs: .NaN\n"))
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be <= 1e12, got 10{30}$"):
        load_config(write(tmp_path, "train:\n  max_steps: 1000000000000000000000000000000\n"))
    with pytest.raises(ConfigError, match=r"^optim\.decay_epochs\[1\]: must be <= 1e6, got 1e\+300$"):
        load_config(write(tmp_path, "optim:\n  decay_epochs: [1, 1e300]\n"))


def test_a_range_names_the_bound_a_value_breaks() -> None:
    both = Range.parse(">= 1, <= 1e6")
    assert (both.broken_by(0), both.broken_by(2e6), both.broken_by(math.nan)) == (">= 1", "<= 1e6", ">= 1")
    assert 1 in both and 1e6 in both and math.inf not in both and math.nan not in both
    assert Range.parse("[0, 1)").broken_by(2) == "in [0, 1)"
    for bad in ("<= 1, <= 2", ">= 1,", "1 <= x"):
        with pytest.raises(ValueError, match="not a range"):
            Range.parse(bad)


def _numeric(tp: Any) -> bool:
    """Whether a type hint holds a number: int, float, or a list, tuple or union holding one."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, list, tuple):
        return any(_numeric(arg) for arg in typing.get_args(tp) if arg is not Ellipsis)
    return origin is not Literal and tp in (int, float)


def _numeric_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    found: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(_numeric_fields(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        elif _numeric(tp):
            found[f"{prefix}{f.name}"] = f
    return found


@pytest.mark.parametrize("schema", [RunConfig, BenchOptions, SweepFile])
def test_every_number_of_every_schema_has_a_finite_range(schema: type) -> None:
    fields = _numeric_fields(schema)
    assert fields
    unbounded = [key for key, f in fields.items() if "range" not in f.metadata or not f.metadata["range"].finite]
    assert unbounded == []
    # ... and a lower bound, in the range or in the rule validate() checks.
    no_lower = [k for k, f in fields.items() if f.metadata["range"].low is None and "rule" not in f.metadata]
    assert no_lower == []


def test_help_config_prints_the_bounds() -> None:
    text = describe(RunConfig)
    assert "range: in [0, 1]" in text.split("optim.weight_decay\n")[1].splitlines()[0]
    assert "range: > 0, <= 1e6" in text.split("train.epochs\n")[1].splitlines()[0]
    assert "range: >= 0, <= 4294967295" in text.split("seed\n")[1].splitlines()[0]
