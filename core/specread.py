"""Reading a YAML spec into typed values, with every problem named at once.

The mesh spec (controlplane/meshspec.py) and its loop sections (core/loopspec.py) are read
the same way: PyYAML's node tree rather than loaded objects, so every problem gets its line
and duplicate keys (which a plain load silently collapses) are caught.  A reader takes a
:class:`Field` (a node and its key path) and returns the value, or records a
:class:`Problem` and returns None, so one pass collects every problem; the caller raises
:class:`SpecError` with all of them, rendered as ``file:line: key.path: reason``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


@dataclass(frozen=True)
class Problem:
    """One reason a spec was refused."""

    path: str  # dotted key path, e.g. "services.payments.routes[0].split.v3"
    message: str  # what is wrong and what to do about it
    line: int | None = None  # 1-based line in the YAML file, when known

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(ValueError):
    """A mesh spec was refused; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


_T = TypeVar("_T")
_D = TypeVar("_D")
_N = TypeVar("_N", int, float)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNREADABLE = object()  # a scalar PyYAML cannot construct (bad explicit tag), or a collection
_UINT32_MAX = 2**32 - 1  # Envoy's counters and thresholds are uint32
NOT_SHOWN = "(the value is not shown, in case it is a secret)"  # said where one may be written by mistake

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_MIN_DURATION = Decimal("0.001")  # Envoy counts timeouts in whole ms: less would mean "no timeout"
_MAX_DURATION = Decimal(315_576_000_000)  # the protobuf Duration range


def _written(seconds: Decimal) -> str:
    """A bound as the spec would write it: the largest unit that states it exactly."""
    for unit in ("h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count == count.to_integral_value() and count >= 1:
            return f"{count:f}{unit}"
    return f"{seconds:f}s"


def duration_seconds(written: str) -> Decimal | None:
    """The seconds of a duration written as the spec writes them ('250ms', '2s', '1.5m', '2h');
    None when it is not one (the CLI's flags take the same grammar)."""
    found = _DURATION.fullmatch(written)
    return None if found is None else Decimal(found[1]) * _DURATION_UNITS[found[2]]


def duration_within(low: str, high: str) -> Callable[[Field], float | None]:
    """A reader of a duration bounded where a value outside would hurt the mesh (both bounds
    written as in the spec, e.g. '1m' and '720h')."""
    lo, hi = duration_seconds(low), duration_seconds(high)
    assert lo is not None and hi is not None, (low, high)
    return lambda f: f.duration(lo, hi)


def compose(text: str, problems: list[Problem], expected: str) -> Node | None:
    """The document's node tree, or None after recording why there is none (`expected`
    says what an empty file should have held)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        reason = ", ".join(" ".join(part.split()) for part in (exc.context, exc.problem) if part)
        problems.append(Problem("", f"invalid YAML: {reason}", mark.line + 1 if mark else None))
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problems.append(Problem("", f"invalid YAML: character #x{exc.character:04x} is not allowed", line))
        return None
    except RecursionError:
        problems.append(Problem("", "invalid YAML: nested too deeply"))
        return None
    if root is None:
        problems.append(Problem("", f"the file is empty: expected {expected}"))
    return root


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown(what: str, value: str, choices: Iterable[str]) -> str:
    """'unknown key 'timout' (did you mean 'timeout'?)', or the list of choices."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of: {', '.join(choices)}"
    return f"unknown {what} '{shorten(value)}'{hint}"


def all_read(values: list[_T | None]) -> list[_T] | None:
    """The values, or None if reading any of them failed (each failure is already recorded)."""
    read = [v for v in values if v is not None]
    return read if len(read) == len(values) else None


@dataclass(frozen=True, eq=False)
class Field:
    """A node and its key path.  Readers return the node's value, or record a Problem
    at this path and line and return None, so one pass collects every problem."""

    node: Node
    path: str
    problems: list[Problem]

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str) -> None:
        self.problems.append(Problem(self.path, message, self.line))

    def key(self, name: str, node: Node | None = None) -> Field:
        """The field at ``path.name``; without a node, placed here (for a missing key)."""
        path = f"{self.path}.{name}" if self.path else name
        return Field(self.node if node is None else node, path, self.problems)

    def mapping(self, known: tuple[str, ...] | None = None, refused: dict[str, str] | None = None) -> Mapping | None:
        """The mapping's entries; `known` makes every other key a problem, and a key of
        `refused` is a problem with the reason given there (its value is never read)."""
        if isinstance(self.node, MappingNode):
            return Mapping(self, known, refused or {})
        self._expected("a mapping", " (write {} for an empty one)" if self._value() is None else "")
        return None

    def each(self, reader: Callable[[Field], _T | None], *, at_least_one: str = "") -> list[_T] | None:
        """Every item read with `reader`; `at_least_one` names the item if an empty list is wrong."""
        if not isinstance(self.node, SequenceNode):
            self._expected("a list")
            return None
        if at_least_one and not self.node.value:
            self.fail(f"give at least one {at_least_one}")
            return None
        return all_read([reader(Field(n, f"{self.path}[{i}]", self.problems)) for i, n in enumerate(self.node.value)])

    def string(self, *, echo: bool = True) -> str | None:
        """Text; `echo=False` keeps the value out of the message (where a secret may be
        written by mistake)."""
        value = self._value()
        if isinstance(value, str):
            return value
        if not echo:
            self.fail(f"expected a string, got {self._kind()} {NOT_SHOWN}")
            return None
        # A plain 2, yes or 1.5 that YAML read as another type: quoting makes it text.
        quotable = isinstance(self.node, ScalarNode) and self.node.style is None and value not in (None, _UNREADABLE)
        self._expected("a string", f' (quote it: "{shorten(self.node.value)}")' if quotable else "")
        return None

    def boolean(self) -> bool | None:
        value = self._value()
        if isinstance(value, bool):
            return value
        self._expected("true or false")
        return None

    def integer(self, low: int, high: int = _UINT32_MAX) -> int | None:
        value = self._value()
        if isinstance(value, int) and not isinstance(value, bool):
            return self._within(value, low, high)
        self._expected("an integer")
        return None

    def number(self, low: float, high: float) -> float | None:
        value = self._value()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self._within(float(value), low, high)
        self._expected("a number")
        return None

    def duration(self, low: Decimal = _MIN_DURATION, high: Decimal = _MAX_DURATION) -> float | None:
        """Seconds, from a string like '250ms', '2s', '1.5s' or '1m', between low and high."""
        value = self._value()
        seconds = duration_seconds(value) if isinstance(value, str) else None
        if seconds is None:
            bare = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            self._expected("a duration like '250ms' or '2s'", f" (add a unit: '{self.node.value}s')" if bare else "")
            return None
        if low <= seconds <= high:
            return float(seconds)
        self.fail(f"must be between {_written(low)} and {_written(high)}, got '{shorten(value)}'")
        return None

    def _within(self, value: _N, low: float, high: float) -> _N | None:
        if low <= value <= high:
            return value
        self.fail(f"must be between {low} and {high}, got {shorten(self.node.value)}")
        return None

    def _expected(self, what: str, hint: str = "") -> None:
        self.fail(f"expected {what}, got {self._describe()}{hint}")

    def _value(self) -> object:
        """The scalar's Python value (YAML 1.1 types), or _UNREADABLE."""
        if not isinstance(self.node, ScalarNode):
            return _UNREADABLE
        try:
            return yaml.constructor.SafeConstructor().construct_object(self.node, deep=True)
        except Exception:  # PyYAML's constructors raise all sorts on a bad explicit tag (!!int x)
            return _UNREADABLE

    def _describe(self) -> str:
        """How the value reads in a message: 'fast', integer 7, null, a list."""
        if isinstance(self.node, MappingNode):
            return "a mapping"
        if isinstance(self.node, SequenceNode):
            return "a list"
        value, raw = self._value(), shorten(self.node.value)
        if isinstance(value, str):
            return f"'{shorten(value)}'"
        if value is None:
            return "null"
        if value is _UNREADABLE:
            return f"'{raw}' tagged {self.node.tag.replace('tag:yaml.org,2002:', '!!')}"
        return f"{self._kind()} {raw}"

    def _kind(self) -> str:
        """What YAML made of the node, without its value: 'a list', integer, null."""
        if not isinstance(self.node, ScalarNode):
            return self._describe()
        value = self._value()
        if value is None:
            return "null"
        if value is _UNREADABLE:
            return "a tagged value"
        return {bool: "boolean", int: "integer", float: "number", str: "a string"}.get(
            type(value), self.node.tag.rsplit(":", 1)[-1])


class Mapping:
    """A mapping's entries by key.  Keys that are not strings, duplicate keys and (given
    a fixed schema) unknown keys are reported here, so a typo never silently does nothing."""

    def __init__(self, owner: Field, known: tuple[str, ...] | None, refused: dict[str, str]):
        self.owner = owner
        self.entries: dict[str, tuple[Field, Field]] = {}
        self.refused: set[str] = set()  # keys of `refused` present (each reported)
        for key_node, value_node in owner.node.value:
            name = self._name(key_node)
            if name is None:
                continue
            key = owner.key(name, key_node)
            if name in self.entries:
                key.fail(f"duplicate key '{name}' (first at line {self.entries[name][0].line})")
            elif name in refused:
                key.fail(refused[name])
                self.refused.add(name)
            elif known is not None and name not in known:
                key.fail(unknown("key", name, known))
            else:
                self.entries[name] = (key, owner.key(name, value_node))

    def _name(self, node: Node) -> str | None:
        if node.tag == _MERGE_TAG:
            self.owner.key("<<", node).fail("YAML merge keys ('<<') are not supported: write the keys out")
            return None
        return self.owner.key(node.value if isinstance(node, ScalarNode) else "?", node).string()

    def get(self, key: str) -> Field | None:
        entry = self.entries.get(key)
        return None if entry is None else entry[1]

    def items(self) -> list[tuple[str, Field, Field]]:
        """(name, key field, value field) in file order."""
        return [(name, key, value) for name, (key, value) in self.entries.items()]

    def need(self, key: str, reader: Callable[[Field], _T | None]) -> _T | None:
        """A required key's value; None if it is missing or invalid (recorded)."""
        value = self.get(key)
        if value is None:
            self.owner.key(key).fail("required key is missing")
            return None
        return reader(value)

    def read(self, key: str, reader: Callable[[Field], _T | None], default: _D) -> _T | _D:
        """An optional key's value; `default` if it is absent, or invalid (recorded)."""
        value = self.get(key)
        result = None if value is None else reader(value)
        return default if result is None else result


# --- value rules every section uses -------------------------------------------


def matching(f: Field, pattern: re.Pattern[str], what: str, rule: str) -> str | None:
    value = f.string()
    if value is None or pattern.fullmatch(value):
        return value
    f.fail(f"'{shorten(value)}' is not a valid {what}: use {rule}")
    return None


def claim(f: Field, value: str | None, seen: dict[str, Field], what: str) -> str | None:
    """Pass `value` through, recording a problem if an earlier field in `seen` has it."""
    if value is not None:
        first = seen.setdefault(value, f)
        if first is not f:
            f.fail(f"duplicate {what} '{value}': already at {first.path} (line {first.line})")
    return value


def distinct(
    f: Field, reader: Callable[[Field], str | None], what: str, at_least_one: str = ""
) -> tuple[str, ...] | None:
    """A list of strings read with `reader`, none repeated."""
    seen: dict[str, Field] = {}
    values = f.each(lambda item: claim(item, reader(item), seen, what), at_least_one=at_least_one)
    return None if values is None else tuple(values)


def reference(f: Field, declared: tuple[str, ...] | None, what: str = "service") -> str | None:
    """A name that must be declared (not checked while `declared` is unreadable)."""
    name = f.string()
    if name is None or declared is None or name in declared:
        return name
    f.fail(unknown(what, name, declared) if declared else f"unknown {what} '{shorten(name)}': none is declared")
    return None


def non_empty(f: Field) -> str | None:
    value = f.string()
    if value == "":
        f.fail("must not be empty")
        return None
    return value


def percent(f: Field) -> float | None:
    return f.number(0, 100)


def positive(f: Field) -> int | None:
    return f.integer(1)
