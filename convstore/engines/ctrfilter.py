"""containerd's filter syntax, for the snapshots service's ``List``.

containerd (``filters`` package) sends filters such as::

    labels."containerd.io/snapshot.ref"==sha256:...,parent=="default/4/sha256:..."

Grammar (containerd's ``filters/parser.go``)::

    selectors := selector ("," selector)*          all must match
    selector  := fieldpath [operator value]        no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go double-quoted string

Several filter strings in one request match when any of them does; no
filter matches everything.  The fields of a snapshot are ``name``,
``parent``, ``kind`` (``view``, ``active``, ``committed``) and
``labels.KEY``.  Anything else (another field, operator or quoting, a
malformed string) is refused with :class:`FilterError`, never ignored: a
filter that silently matched more than asked would answer a lookup with the
wrong snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: longest filter string accepted (containerd's own are a few hundred bytes)
MAX_FILTER = 16 << 10
_FIELD = re.compile(r"[A-Za-z0-9_-]+")
_OP = re.compile(r"[=!~]+")
_VALUE = re.compile(r"[^\s,]+")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_NUMERIC = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


class FilterError(ValueError):
    """A filter string convstore does not understand."""


@dataclass(frozen=True)
class Subject:
    """What a filter sees of one snapshot."""

    name: str
    parent: str
    kind: str
    labels: Mapping[str, str]

    def field(self, path: Sequence[str]) -> tuple[str, bool]:
        """(value, present) of a field path checked by :func:`_check_path`."""
        if path[0] == "labels":
            key = ".".join(path[1:])
            return self.labels.get(key, ""), key in self.labels
        return getattr(self, path[0]), True


def _check_path(path: Sequence[str]) -> None:
    if path[0] == "labels":
        if len(path) < 2:
            raise FilterError("'labels' needs a label key (labels.KEY)")
    elif len(path) != 1 or path[0] not in ("name", "parent", "kind"):
        raise FilterError(f"unknown snapshot field {'.'.join(path)!r} (name, parent, kind, labels.KEY)")


Predicate = Callable[[Subject], bool]


def _quoted(s: str, i: int) -> tuple[str, int]:
    """The Go double-quoted string starting at ``s[i] == '"'``: (its value, the index after it)."""
    out: list[str] = []
    i += 1
    while True:
        if i >= len(s) or s[i] == "\n":
            raise FilterError("quoted string not terminated")
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = s[i + 1 : i + 2]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in _NUMERIC or e.isdigit() and e < "8":
            base, n = _NUMERIC.get(e, (8, 3))
            start = i + 1 if base == 8 else i + 2
            digits = s[start : start + n]
            allowed = "01234567" if base == 8 else "0123456789abcdefABCDEF"
            if len(digits) != n or any(d not in allowed for d in digits):
                raise FilterError("bad numeric escape in a quoted string")
            try:
                out.append(chr(int(digits, base)))
            except ValueError:
                raise FilterError("bad numeric escape in a quoted string") from None
            i = start + n
        else:
            raise FilterError("bad escape in a quoted string")


def _selector(s: str, i: int) -> tuple[Predicate, int]:
    path: list[str] = []
    while True:
        if i < len(s) and s[i] == '"':
            part, i = _quoted(s, i)
        else:
            m = _FIELD.match(s, i)
            if m is None:
                raise FilterError(f"expected a field at offset {i}")
            part, i = m.group(), m.end()
        path.append(part)
        if i < len(s) and s[i] == ".":
            i += 1
            continue
        break
    _check_path(path)
    while i < len(s) and s[i].isspace():
        i += 1
    if i >= len(s) or s[i] == ",":
        return (lambda x: x.field(path)[1]), i
    m = _OP.match(s, i)
    if m is None or m.group() not in ("==", "!=", "~="):
        raise FilterError(f"expected ==, != or ~= at offset {i}")
    op, i = m.group(), m.end()
    while i < len(s) and s[i].isspace():
        i += 1
    if i < len(s) and s[i] == '"':
        value, i = _quoted(s, i)
    else:
        vm = _VALUE.match(s, i)
        if vm is None or vm.group()[0] in "/|'":
            raise FilterError(f"expected a value at offset {i}")
        value, i = vm.group(), vm.end()
    if op == "==":
        return (lambda x: x.field(path) == (value, True)), i
    if op == "!=":
        return (lambda x: x.field(path)[0] != value), i
    try:
        rx = re.compile(value)
    except re.error as e:
        raise FilterError(f"bad regular expression {value!r}: {e}") from None
    return (lambda x: rx.search(x.field(path)[0]) is not None), i


def parse(s: str) -> Predicate:
    """One filter string: all its selectors must match."""
    if len(s) > MAX_FILTER:
        raise FilterError(f"filter longer than {MAX_FILTER} bytes")
    if "\0" in s:
        raise FilterError("NUL in a filter")
    if not s:
        return lambda x: True
    selectors: list[Predicate] = []
    i = 0
    while True:
        while i < len(s) and s[i].isspace():
            i += 1
        sel, i = _selector(s, i)
        selectors.append(sel)
        while i < len(s) and s[i].isspace():
            i += 1
        if i >= len(s):
            break
        if s[i] != ",":
            raise FilterError(f"unexpected {s[i]!r} at offset {i}")
        i += 1
    return lambda x: all(sel(x) for sel in selectors)


def parse_all(filters: Sequence[str]) -> Predicate:
    """Several filter strings: any may match (none: everything matches)."""
    preds = [parse(f) for f in filters]
    if not preds:
        return lambda x: True
    return lambda x: any(p(x) for p in preds)
