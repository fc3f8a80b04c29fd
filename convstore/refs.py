"""Image references: ``NAME[:TAG]`` parsing and validation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class ImageRef:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def key(self) -> str:
        return f"refs/{self.name}:{self.tag}"

    @classmethod
    def parse(cls, s: str, default_tag: str = "latest") -> ImageRef:
        """Parse ``NAME[:TAG]`` with the OCI distribution rules for both parts."""
        name, sep, tag = s.rpartition(":")
        if not sep or "/" in tag:
            name, tag = s, default_tag
        if not _NAME.match(name) or len(name) > 255:
            raise InvalidReference(f"invalid image name {name!r} (lowercase letters, digits, separators . _ - /)")
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return cls(name, tag)

    @classmethod
    def from_key(cls, key: str) -> ImageRef:
        return cls.parse(key.removeprefix("refs/"))
