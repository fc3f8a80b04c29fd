"""Chroot-style resolution of layer entry paths, shared by the root
filesystem writer and the lazy ImageFS tree.

A layer entry's parent directories are walked from the root; a symlink met
on the way is followed as if the root were ``/`` (absolute targets restart at
the root); climbing above the root, or more than ``MAX_LINKS`` symlinks, is an
escape.  What a directory, a symlink or a missing component *is* depends on
the backend, given as a ``step`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

MAX_LINKS = 40
T = TypeVar("T")
Step = tuple[Literal["dir"], T] | tuple[Literal["link"], str] | tuple[Literal["notdir"], None]


class RootEscape(Exception):
    """The path leaves the root (through ``..`` or a symlink) or loops."""


class NotADirectory(Exception):
    """A parent component is neither a directory nor a symlink to one."""


def components(path: str) -> list[str]:
    """Split a path into components, dropping empty ones and ``.``."""
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve_dir(root: T, comps: list[str], step: Callable[[T, str], Step]) -> T:
    """Walk ``comps`` from ``root``; ``step(dir, name)`` says what ``name`` is
    in ``dir`` (creating a missing directory is the step's business)."""
    node: T = root
    stack: list[T] = []
    queue = list(comps)
    links = 0
    while queue:
        c = queue.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if not stack:
                raise RootEscape("/".join(comps))
            node = stack.pop()
            continue
        kind, val = step(node, c)
        if kind == "link":
            links += 1
            if links > MAX_LINKS:
                raise RootEscape("/".join(comps))
            target = str(val)
            if target.startswith("/"):
                node, stack = root, []
            queue = components(target) + queue
            continue
        if kind == "notdir":
            raise NotADirectory(c)
        stack.append(node)
        node = val  # type: ignore[assignment]
    return node
