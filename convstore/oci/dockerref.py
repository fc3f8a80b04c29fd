"""Docker references as containers/image's ``reference.ParseNormalizedNamed``
reads them (``[DOMAIN/]PATH[:TAG][@DIGEST]``; no domain means ``docker.io``,
a one-component path on docker.io gets ``library/``), for matching a
signature's claimed identity against the image it is meant for."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidReference

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_DOMAIN = "docker.io"


@dataclass(frozen=True, slots=True)
class DockerRef:
    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``DOMAIN/PATH`` (reference.Named.Name())."""
        return f"{self.domain}/{self.path}"

    @property
    def name_only(self) -> bool:
        return self.tag is None and self.digest is None

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @classmethod
    def parse(cls, s: str) -> DockerRef:
        """Parse and normalize; :class:`InvalidReference` if malformed."""
        if not isinstance(s, str) or not s or len(s) > 4096:
            raise InvalidReference(f"invalid docker reference {s!r}")
        rest, digest = s, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.match(digest):
                raise InvalidReference(f"invalid digest in docker reference {s!r}")
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.match(tag):
                raise InvalidReference(f"invalid tag in docker reference {s!r}")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
            domain, path = first, remainder
            if not _DOMAIN_RE.match(domain):
                raise InvalidReference(f"invalid registry host in docker reference {s!r}")
        else:
            if _HEX64.match(rest):
                raise InvalidReference(f"docker reference {s!r} is an image ID, not a name")
            domain, path = DEFAULT_DOMAIN, rest
        if domain == "index.docker.io":
            domain = DEFAULT_DOMAIN
        if domain == DEFAULT_DOMAIN and "/" not in path:
            path = "library/" + path
        if not _PATH.match(path) or len(domain) + 1 + len(path) > 255:
            raise InvalidReference(f"invalid repository name in docker reference {s!r}")
        return cls(domain, path, tag, digest)


def namespaces(ref: DockerRef) -> list[str]:
    """The policy scopes that cover ``ref``, most specific first
    (containers/image's DockerReferenceNamespaces): the repository, its parent
    namespaces up to the host, then ``*.DOMAIN`` wildcards of the host name."""
    out = []
    name = ref.name
    while True:
        out.append(name)
        if "/" not in name:
            break
        name = name.rsplit("/", 1)[0]
    host = name.split(":", 1)[0]
    while "." in host:
        host = host.split(".", 1)[1]
        out.append("*." + host)
    return out


def identity(ref: DockerRef) -> str:
    """The exact policy scope of ``ref``: ``NAME:TAG`` or ``NAME@DIGEST``."""
    if ref.digest and not ref.tag:
        return f"{ref.name}@{ref.digest}"
    return f"{ref.name}:{ref.tag or 'latest'}"
