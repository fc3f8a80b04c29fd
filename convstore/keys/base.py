"""The KMS-style master key seam.

A :class:`KeyProvider` wraps and unwraps small secrets (data keys, domain
secrets) under a master key it never reveals, bound to an *encryption
context*: a flat ``str -> str`` mapping saying what the secret is for.  A
wrapped key only unwraps under the exact context it was wrapped with.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The byte form of an encryption context used as AAD: sorted, compact JSON."""
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("encryption context keys and values must be str")
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


class KeyProvider(ABC):
    """Wraps data keys under a master key.  Implementations must raise
    :class:`~convstore.errors.KeyAccessDenied` when the key exists but refuses
    (wrong key, revoked, wrong context) and never put key bytes in messages."""

    #: Short scheme name used in ``--key`` specs and records ("file", ...).
    scheme: str = ""

    @property
    def spec(self) -> str | None:
        """The ``--key`` spec that reopens this provider, if it has one."""
        return None

    @property
    @abstractmethod
    def key_id(self) -> str:
        """A stable, non-secret identifier of the master key."""

    @abstractmethod
    def wrap(self, plaintext_key: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext_key`` (at most 64 bytes) bound to ``context``."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Inverse of :meth:`wrap`; raises KeyAccessDenied on any mismatch."""

    def generate(self, context: Mapping[str, str], size: int = 32) -> tuple[bytes, bytes]:
        """A new random data key and its wrapped form (KMS: GenerateDataKey)."""
        key = os.urandom(size)
        return key, self.wrap(key, context)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key_id={self.key_id}>"
