"""How a store was opened: the one record a child process inherits.

:class:`StoreOptions` holds everything :meth:`Store.open` needs (where the
store is, which master key, registry and KMS settings, measurement
throttles).  A background re-pack or mount runs library code in a child
process (:mod:`convstore.worker`) that receives these options on its standard
input, never on its command line or in its environment, because a key spec
may carry a secret (a PKCS#11 PIN) and a registry password is one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class StoreOptions:
    path: str | None = None  #: local path or ``oci://HOST/REPO``; None: the default local store
    key: str | None = field(default=None, repr=False)  #: ``--key`` spec (may hold a PIN: secret)
    kms_endpoint: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cache_dir: str | None = None
    cache_bytes: int = 2 << 30
    timeout: float = 60.0  #: seconds a registry may stay silent before a request is retried
    inactive_after: float | None = None
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    state_dir: str | None = None  #: trust state folder (rollback protection); None: the user's
    allow_rollback: bool = False
    now: float | None = None  #: a fixed clock (tests and what-if runs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StoreOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    def open(self) -> Store:
        from .store import Store

        return Store.open_with(self)
