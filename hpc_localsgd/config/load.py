"""YAML → typed schema dataclasses, with ``--set key=value`` overrides and one-line errors.

:func:`build` turns a plain mapping into any schema dataclass (the run config, the bench
options, the sweep file): the checks are plain Python over the dataclass type hints (Literal,
Optional, list, tuple, mapping, nested dataclasses), so a wrong key, type or value is reported
with its name before any rank touches a communicator. Ranges and choices come from each field's
declaration (:mod:`.fields`); :func:`load_config` reads the run config on top of it.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import re
import sys
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ..errors import ConfigError, print_line
from .fields import KeyNamer, dotted, type_name
from .schema import RunConfig

T = TypeVar("T")


# A number in exponent notation as YAML 1.2 and JSON write it (1e-4, 5E+3, -2.5e3). PyYAML follows
# YAML 1.1, which reads these as strings (its floats need a dot and a signed exponent); every
# published config writes them so. Only this form is taken from a string: "8" stays a string.
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def number_from_text(text: str, tp: type) -> int | float | None:
    """``text`` in exponent notation as an ``int`` or ``float`` (``tp``); None when it is not one, or
    when an integer is asked for and ``text`` is not a whole number (``1e3`` is one, ``1e-3`` is not)."""
    if not _EXPONENT_NUMBER.fullmatch(text.strip()):
        return None
    if tp is float:
        return float(text)
    exact = decimal.Decimal(text)
    # Past 30 digits no integer setting can hold it; int() of "1e999999999" would take all the memory.
    if exact.adjusted() > 30 or exact != exact.to_integral_value():
        return None
    return int(exact)


def _number(value: Any, tp: type, key: str) -> Any:
    """The one place where a value becomes an integer or a number.

    bool is an int in Python; a YAML ``true`` given for a number is almost surely a mistake.
    A string in exponent notation (``1e-4``, see ``_EXPONENT_NUMBER``) is a number.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if isinstance(value, str):
        number = number_from_text(value, tp)
        if number is not None:
            return number
    elif tp is int and isinstance(value, int):
        return value
    elif tp is float and isinstance(value, (int, float)):
        return float(value)
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def _convert(value: Any, tp: Any, key: str, name: KeyNamer) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key, name)  # type: ignore[arg-type]
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, name)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is list or origin is tuple:
        # A tuple hint is written tuple[X, ...]: a sequence of any length, as a list is.
        if not isinstance(value, (list, tuple)) or (origin is list and isinstance(value, tuple)):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        items = [_convert(v, item, f"{key}[{i}]", name) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type, key, name): _convert(v, value_type, f"{key}.{k}", name) for k, v in value.items()}
    if tp is int or tp is float:
        return _number(value, tp, key)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


class RenamedKey(UserWarning):
    """A key given by its former name (a schema class's ``RENAMED_KEYS``): accepted, with a notice."""


def _renamed(cls: type, data: Mapping[str, Any], prefix: str, name: KeyNamer) -> Mapping[str, Any]:
    """``data`` with former key names replaced by today's, each announced once (``RenamedKey``)."""
    renamed: dict[str, str] = getattr(cls, "RENAMED_KEYS", {})
    if not any(old in data for old in renamed):
        return data
    out = dict(data)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{name(prefix, old)}: the former name of {name(prefix, new)}; give only one of them")
        out[new] = out.pop(old)
        warnings.warn(
            RenamedKey(f"{name(prefix, old)} is now called {name(prefix, new)}; the old name still works"), stacklevel=2
        )
    return out


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "", name: KeyNamer = dotted) -> T:
    """The schema dataclass ``cls`` from a mapping of its field names (missing ones keep their default).

    Unknown keys are refused with a did-you-mean suggestion; every value is checked against its
    type hint. Ranges are checked by the schema's ``validate()``, after the whole tree is built,
    because some of them depend on other fields. ``name`` says how a key is named in messages.
    """
    data = _renamed(cls, data, prefix, name)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for given in data:
        if given not in names:
            close = difflib.get_close_matches(str(given), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{name(prefix, str(given))}: unknown key{hint}")
    kwargs = {field: _convert(value, hints[field], name(prefix, field), name) for field, value in data.items()}
    return cls(**kwargs)


def read_yaml(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); ``what`` names the file in messages
    ("config file"), ``expected`` says what its top level must be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{what} '{path}': {problem}{where}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} '{path}': expected {expected}")
    return loaded or {}


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. algorithm.sync_period=8")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # an unquoted string that YAML cannot parse is meant literally
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None, overrides: tuple[str, ...] | list[str] = (), notices: list[str] | None = None
) -> RunConfig:
    """Read a YAML config (or only defaults when ``path`` is None), apply overrides, validate.

    A key given by its former name is accepted; the one-line notice saying so goes into ``notices``
    (for the caller to print once, on rank 0), or to stderr when none is given."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path, "config file", "a mapping of sections at the top level")
    for assignment in overrides:
        _apply_override(tree, assignment)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RenamedKey)
        config = build(RunConfig, tree)
    for warning in caught:
        if not issubclass(warning.category, RenamedKey):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        elif notices is not None:
            notices.append(str(warning.message))
        else:
            print_line(f"hpc-localsgd: note: {warning.message}", sys.stderr)
    config.validate()
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
