"""How a setting is declared: its default, its meaning and its range, in one place.

Every schema of the package (the run config, the bench options, the sweep file) declares its
fields with :func:`setting` and its nested sections with :func:`section`. The meaning is what
``hpc-localsgd train --help-config`` prints, and a range (``">= 1, <= 1e6"``, ``"[0, 1)"``) or a
set of choices is checked by :func:`check_declared` from the declaration itself, so the help and
the check cannot drift apart. Every number has a finite upper bound: ``1e308`` or ``.inf`` is
refused with the key's name here, not met later as an overflow deep in torch. Rules that involve
several fields, or a list as a whole, stay in the schema's ``validate()``; ``rule`` then says in
words what it checks, for the help.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from ..errors import ConfigError

T = TypeVar("T")

#: How a field is named in messages: (the section's name, the field's name) → "algorithm.sync_period".
KeyNamer = Callable[[str, str], str]


def dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOUND = re.compile(rf"^(>=|>|<=|<)\s*({_NUMBER})$")
_INTERVAL = re.compile(rf"^([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ``">= 1"``, ``"> 0"``, ``"[0, 1)"``, ``"(0, 1]"``, or two one-sided bounds
    ``">= 1, <= 1e6"`` (a lower bound and a finite upper one, each named alone when it is broken)."""

    text: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    low_text: str | None = None  # how a broken bound is named: ">= 1", or the interval for one
    high_text: str | None = None

    @classmethod
    def parse(cls, text: str) -> Range:
        text = text.strip()
        interval = _INTERVAL.match(text)
        if interval:
            whole = f"in {text}"
            return cls(
                whole,
                low=float(interval.group(2)),
                high=float(interval.group(3)),
                low_open=interval.group(1) == "(",
                high_open=interval.group(4) == ")",
                low_text=whole,
                high_text=whole,
            )
        bounds: dict[str, Any] = {"text": text}
        for part in text.split(","):
            bound = _BOUND.match(part.strip())
            op = bound.group(1) if bound else ""
            side = "low" if op.startswith(">") else "high"
            if bound is None or f"{side}_text" in bounds:
                raise ValueError(f"not a range: {text!r} (write '>= 1', '> 0', '>= 1, <= 1e6', '[0, 1)' or '(0, 1]')")
            bounds[side] = float(bound.group(2))
            bounds[f"{side}_open"] = op in (">", "<")
            bounds[f"{side}_text"] = f"{op} {bound.group(2)}"
        return cls(**bounds)

    def _above_low(self, value: float) -> bool:
        return self.low is None or (value > self.low if self.low_open else value >= self.low)

    def _below_high(self, value: float) -> bool:
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __contains__(self, value: float) -> bool:
        # Written as what must hold, so that NaN (which every comparison fails) is outside every range.
        return self._above_low(value) and self._below_high(value)

    def broken_by(self, value: float) -> str:
        """The bound ``value`` breaks, as a message names it (the lower one for NaN)."""
        if not self._above_low(value) and self.low_text is not None:
            return self.low_text
        return self.high_text or self.low_text or self.text

    @property
    def finite(self) -> bool:
        """Whether both ends are finite: then no infinity passes, and NaN passes nothing."""
        return self.high is not None and math.isfinite(self.high) and (self.low is None or math.isfinite(self.low))

    def __str__(self) -> str:
        return self.text


def setting(
    default: T,
    help: str,
    *,
    range: str | None = None,
    choices: Sequence[str] | None = None,
    rule: str | None = None,
    flag: str | None = None,
) -> T:
    """A field of a schema dataclass.

    help     what the setting means (one or two sentences; printed by ``--help-config``)
    range    bounds checked for every value given (each item of a list): ``"[0, 1)"``, ``"(0, 1]"``,
             ``">= 1, <= 1e6"``; every number has a finite upper bound, so that no value overflows later
    choices  the allowed strings, for a setting whose choices are not a ``Literal`` type
    rule     in words, what ``validate()`` checks when it is not a simple bound (for the help only)
    flag     the command-line option that sets it, when messages name options (the bench)
    """
    metadata: dict[str, Any] = {"help": help}
    if range is not None:
        metadata["range"] = Range.parse(range)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if rule is not None:
        metadata["rule"] = rule
    if flag is not None:
        metadata["flag"] = flag
    if isinstance(default, (list, dict, set)):
        # A mutable default is copied for every instance, as default_factory would.
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: Callable[[], T], help: str) -> T:
    """A nested section of a schema (its own dataclass), built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def choices_text(choices: Sequence[Any]) -> str:
    return " | ".join(repr(c) for c in choices)


def type_name(tp: Any) -> str:
    """A type hint in the words of a message: ``an integer``, ``'keep' | 'average'``, ``a list of a number``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return choices_text(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list or origin is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is Any:
        return "anything"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def check_declared(obj: Any, prefix: str = "", name: KeyNamer = dotted) -> None:
    """Raise ``ConfigError`` for the first field of ``obj`` outside its declared range or choices.

    Sections are not entered: each schema's ``validate()`` calls this for itself and then
    validates its sections, so that the order of the checks follows the declaration.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool):
            continue
        bound = f.metadata.get("range")
        if bound is not None:
            numbers = value if isinstance(value, (list, tuple)) else [value]
            for index, number in enumerate(numbers):
                if isinstance(number, (int, float)) and not isinstance(number, bool) and number not in bound:
                    where = f"[{index}]" if numbers is value else ""
                    raise ConfigError(f"{name(prefix, f.name)}{where}: must be {bound.broken_by(number)}, got {number}")
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{name(prefix, f.name)}: must be one of {choices_text(allowed)}, got {value!r}")


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def range_of(f: dataclasses.Field) -> str:
    """The range a setting accepts, in words: its bound, its choices, or its rule."""
    parts = []
    if "range" in f.metadata:
        parts.append(str(f.metadata["range"]))
    if "choices" in f.metadata:
        parts.append(choices_text(f.metadata["choices"]))
    if "rule" in f.metadata:
        parts.append(str(f.metadata["rule"]))
    return "; ".join(parts)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every setting of a schema, sections entered: (dotted key, field, type hint), in declaration order."""
    hints = typing.get_type_hints(cls)
    found: list[tuple[str, dataclasses.Field, Any]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.extend(leaves(tp, dotted(prefix, f.name)))  # type: ignore[arg-type]
        else:
            found.append((dotted(prefix, f.name), f, tp))
    return found


def describe(cls: type, width: int = 100) -> str:
    """Every key of a schema with its type, default, range and meaning, as ``--help-config`` prints it.

    Defaults are written as JSON, which YAML and ``--set`` read back unchanged.
    """
    lines: list[str] = []
    section_name = None
    for key, f, tp in leaves(cls):
        head = key.rpartition(".")[0]
        if head != section_name and lines:
            lines.append("")
        section_name = head
        default = default_of(f)
        default = list(default) if isinstance(default, tuple) else default
        details = [f"type: {type_name(tp)}", f"default: {json.dumps(default)}"]
        accepted = range_of(f)
        if accepted:
            details.append(f"range: {accepted}")
        lines.append(key)
        lines.append("    " + "; ".join(details))  # one line, so that a script can read it
        lines.extend(textwrap.wrap(help_of(f), width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)
