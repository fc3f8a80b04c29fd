"""How a store was opened: the one record a child process inherits.

:class:`StoreOptions` holds everything :meth:`Repository.open <convstore.core.Repository.open>` needs (where the
store is, which master key, registry and KMS settings, measurement
throttles).  A background re-pack or mount runs library code in a child
process (:mod:`convstore.worker`) that receives these options on its standard
input, never on its command line or in its environment, because a key spec
may carry a secret (a PKCS#11 PIN) and a registry password is one.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InvalidReference

#: what ``--store`` and ``$CONVSTORE_STORE`` accept, named in every error about them
STORE_FORMS = "a local folder (PATH), a registry repository (oci://HOST[:PORT]/REPO) or an S3 bucket (s3://BUCKET/PREFIX)"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def default_local_store() -> str:
    """The user's default local store: ``<user data dir>/convstore/store``."""
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("convstore"), "store")


def is_registry_url(location: str) -> bool:
    return location.startswith("oci://")


def is_s3_url(location: str) -> bool:
    return location.startswith("s3://")


def parse_s3_url(url: str, where: str = "an S3 store") -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at its ends); the one check of its form."""
    bucket, _, prefix = url[len("s3://"):].partition("/") if is_s3_url(url) else ("", "", "")
    prefix = prefix.strip("/")
    if not bucket or not prefix or any(p in ("", ".", "..") for p in prefix.split("/")):
        raise InvalidReference(f"{where} {url!r} names no bucket and prefix: use s3://BUCKET/PREFIX")
    return bucket, prefix


def is_remote_url(location: str) -> bool:
    """A store read through a local cache: a registry or an S3 bucket."""
    return is_registry_url(location) or is_s3_url(location)


def resolve_store_location(location: str | None) -> str:
    """The store ``--store`` names: ``location``, else ``$CONVSTORE_STORE``,
    else the default local store; an absolute local path or a checked
    ``oci://HOST[:PORT]/REPO``.  Anything that looks like a URL (``SCHEME:``)
    but is not one of those is refused (:class:`InvalidReference`) rather
    than taken as a folder name: ``oci:/h/r`` or ``ocl://h/r`` would
    otherwise silently become a local store named ``oci:``."""
    where = "--store" if location else "$CONVSTORE_STORE"
    location = location or os.environ.get("CONVSTORE_STORE") or default_local_store()
    if is_registry_url(location):
        host, _, repo = location[len("oci://"):].partition("/")
        if not host or not repo.strip("/"):
            raise InvalidReference(f"{where} {location!r} names no repository: use oci://HOST[:PORT]/REPO")
        return location.rstrip("/")
    if is_s3_url(location):
        parse_s3_url(location, where)
        return location.rstrip("/")
    if _SCHEME.match(location):
        raise InvalidReference(f"{where} {location!r} is not a store: give {STORE_FORMS} "
                               f"(a local folder whose name has a colon: write it as ./NAME)")
    return os.path.abspath(os.path.expanduser(location))


@dataclass(frozen=True)
class StoreOptions:
    path: str | None = None  #: local path, ``oci://HOST/REPO`` or ``s3://BUCKET/PREFIX``; None: the default local store
    key: str | None = field(default=None, repr=False)  #: ``--key`` spec (may hold a PIN: secret)
    kms_endpoint: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cache_dir: str | None = None
    cache_bytes: int = 2 << 30
    timeout: float = 60.0  #: seconds a registry may stay silent before a request is retried
    site_cache: str | None = None  #: ``http[s]://HOST[:PORT]``: the site tier chunks are read through (stores/sitetier.py)
    s3_endpoint: str | None = None  #: an S3 store's endpoint URL (None: $CONVSTORE_S3_ENDPOINT, else AWS)
    read_deadline: float = 10.0  #: seconds a registry store's read may wait with nothing arriving (READ_DEADLINE)
    offline_max_age: float = 86400.0  #: seconds a node-cache copy of metadata may serve while offline
    inactive_after: float | None = None
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    state_dir: str | None = None  #: trust state folder (rollback protection); None: the user's
    allow_rollback: bool = False
    now: float | None = None  #: a fixed clock (tests and what-if runs)
    create: bool = True  #: False: the store must exist (a read-only command never creates one)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StoreOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})
