"""Field-by-field checks of the JSON rmc reads back (indexes, manifests, sidecars, results, records).

Such a file may have been edited, damaged or made by someone else, so every field is checked when read: its type,
its range or its allowed values. A schema is built from the specs below and applied with `check(doc, spec, source,
fix)`, which returns the document or raises a one-line `RMCError` naming the file, the field (a dotted path), what
it must be and the fix. Values are shown through `repr` and shortened, so a hostile string cannot break the line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NoReturn

from rmc.errors import RMCError
from rmc.paths import safe_name

SHOWN = 48                  # characters of a bad value quoted in an error
MAX_TEXT = 4096             # a free-text field's length at most (names, notes, layer names, sources)
MAX_INT = 2 ** 53           # integers past this are not counts or indices of anything rmc writes
HEX64 = re.compile(r"[0-9a-f]{64}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


class At:
    """Where a value sits: the file, the dotted field path and the fix to print."""

    def __init__(self, source: str | Path, fix: str, path: str = ""):
        self.source, self.fix, self.path = source, fix, path

    def child(self, key: object) -> "At":
        part = f"[{key}]" if isinstance(key, int) else str(key)
        shown = part if len(part) <= SHOWN else part[:SHOWN - 3] + "..."
        return At(self.source, self.fix, f"{self.path}.{shown}" if self.path and not isinstance(key, int)
                  else self.path + shown)

    def fail(self, must: str, value: Any = None, show: bool = True) -> NoReturn:
        field = f"field {self.path!r}" if self.path else "the document"
        got = f", got {_show(value)}" if show else ""
        raise RMCError(f"{self.source}: {field} must be {must}{got}; {self.fix}")


class Spec:
    """A check of one value; returns the value."""

    def __call__(self, value: Any, at: At) -> Any:
        raise NotImplementedError


class Str(Spec):
    def __init__(self, choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None,
                 max_len: int = MAX_TEXT, empty: bool = True, what: str = "a string"):
        self.choices, self.pattern, self.max_len, self.empty, self.what = choices, pattern, max_len, empty, what

    def __call__(self, value, at):
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                at.fail(f"one of {', '.join(self.choices)}", value)
            return value
        if not isinstance(value, str) or len(value) > self.max_len or (not value and not self.empty):
            at.fail(f"{self.what} of {'1' if not self.empty else '0'} to {self.max_len} characters", value)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            at.fail(self.what, value)
        if "\x00" in value:
            at.fail(f"{self.what} without NUL characters", value)
        return value


class Name(Spec):
    """A name that may become a path component (rmc.paths.safe_name)."""

    def __call__(self, value, at):
        return safe_name(value, f"field {at.path!r}", at.source)


class Int(Spec):
    def __init__(self, lo: int | None = 0, hi: int = MAX_INT):
        self.lo, self.hi = lo, hi

    def __call__(self, value, at):
        if isinstance(value, bool) or not isinstance(value, int) or not (self.lo is None or value >= self.lo) \
                or value > self.hi:
            low = "" if self.lo is None else f"{self.lo} <= "
            at.fail(f"an integer, {low}n <= {self.hi}", value)
        return value


class Num(Spec):
    """A finite number (an integer or a float) in [lo, hi]; `finite=False` also lets NaN and infinities through (a
    recorded loss that diverged)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, finite: bool = True):
        self.lo, self.hi, self.finite = lo, hi, finite

    def __call__(self, value, at):
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if number and not self.finite and not math.isfinite(value):
            return value
        ok = number and math.isfinite(value) and (self.lo is None or value >= self.lo) \
            and (self.hi is None or value <= self.hi)
        if not ok:
            bounds = f" in [{self.lo if self.lo is not None else '-inf'}, {self.hi if self.hi is not None else 'inf'}]"
            at.fail("a finite number" + (bounds if self.lo is not None or self.hi is not None else ""), value)
        return value


class Bool(Spec):
    def __call__(self, value, at):
        if not isinstance(value, bool):
            at.fail("true or false", value)
        return value


class Const(Spec):
    def __init__(self, value: Any):
        self.value = value

    def __call__(self, value, at):
        if type(value) is not type(self.value) or value != self.value:
            at.fail(repr(self.value), value)
        return value


class Opt(Spec):
    """null, or what `spec` accepts."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def __call__(self, value, at):
        return None if value is None else self.spec(value, at)


class ListOf(Spec):
    def __init__(self, item: Spec, min_len: int = 0, max_len: int = MAX_INT):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def __call__(self, value, at):
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            size = f"{self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
            at.fail(f"a list of {size} items", value)
        for i, v in enumerate(value):
            self.item(v, at.child(i))
        return value


class TupleOf(Spec):
    """A list of exactly len(items) entries, each checked by the spec at its position (e.g. a shape)."""

    def __init__(self, *items: Spec):
        self.items = items

    def __call__(self, value, at):
        if not isinstance(value, list) or len(value) != len(self.items):
            at.fail(f"a list of {len(self.items)} items", value)
        for i, (spec, v) in enumerate(zip(self.items, value, strict=True)):
            spec(v, at.child(i))
        return value


class MapOf(Spec):
    """A JSON object whose keys `key` and values `value` accept."""

    def __init__(self, key: Spec, value: Spec, max_len: int = MAX_INT):
        self.key, self.value, self.max_len = key, value, max_len

    def __call__(self, value, at):
        if not isinstance(value, dict) or len(value) > self.max_len:
            at.fail("a mapping" + (f" of at most {self.max_len} entries" if self.max_len < MAX_INT else ""), value)
        for k, v in value.items():
            self.key(k, at.child(k))
            self.value(v, at.child(k))
        return value


class Obj(Spec):
    """A JSON object with `required` and `optional` fields; other keys are allowed (and ignored by the reader) when
    `extra`, else refused."""

    def __init__(self, required: dict[str, Spec], optional: dict[str, Spec] | None = None, extra: bool = True):
        self.required, self.optional, self.extra = required, optional or {}, extra

    def __call__(self, value, at):
        if not isinstance(value, dict):
            at.fail("a mapping", value)
        for key, spec in self.required.items():
            if key not in value:
                at.child(key).fail("present (the field is missing)", show=False)
            spec(value[key], at.child(key))
        for key, spec in self.optional.items():
            if key in value:
                spec(value[key], at.child(key))
        if not self.extra:
            unknown = sorted(k for k in value if k not in self.required and k not in self.optional)
            if unknown:
                at.child(unknown[0]).fail("absent (not a field of this file)", show=False)
        return value


class Json(Spec):
    """Any JSON value nested at most `depth` deep, its numbers finite (free-form settings kept for the record)."""

    def __init__(self, depth: int = 16):
        self.depth = depth

    def __call__(self, value, at, _level: int = 0):
        if _level > self.depth:
            at.fail(f"nested at most {self.depth} deep", show=False)
        if isinstance(value, dict):
            for k, v in value.items():
                self(v, at.child(k), _level + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self(v, at.child(i), _level + 1)
        elif isinstance(value, float) and not math.isfinite(value):
            at.fail("a finite number", value)
        elif isinstance(value, str) and (len(value) > MAX_TEXT or "\x00" in value):
            at.fail(f"a string of at most {MAX_TEXT} characters without NUL", value)
        return value


class Lazy(Spec):
    """A spec named before it is defined (a table holds tables)."""

    def __init__(self, get):
        self.get = get

    def __call__(self, value, at):
        return self.get()(value, at)


SHA256 = Str(pattern=HEX64, what="a sha256 (64 lowercase hex digits)")


def check(doc: Any, spec: Spec, source: str | Path, fix: str) -> Any:
    """`doc` if `spec` accepts it; else a one-line RMCError naming `source`, the field and `fix`."""
    return spec(doc, At(source, fix))


__all__ = ["At", "Bool", "Const", "Int", "Json", "Lazy", "ListOf", "MapOf", "Name", "Num", "Obj", "Opt", "SHA256",
           "Spec", "Str", "TupleOf", "check"]
