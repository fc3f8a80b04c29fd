"""Audit every use of the master key, and cache unwrapped data keys briefly.

:class:`AuditedKeyProvider` wraps any provider.  Each call that reaches the
provider (generate, wrap, unwrap) appends one JSON line to the audit sink:
time, operation, provider, key id, purpose (image / manifest / domain),
process, user and outcome.  Key bytes and wrapped bytes are never logged.

Unwrapped data keys are cached in memory for ``ttl`` seconds (like the AWS
Encryption SDK's data key caching) so a lazy reader does not call the KMS per
read; a cache hit is not a key use and is not logged.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConvstoreError, KeyAccessDenied
from .base import KeyProvider, canonical_context

AuditSink = Callable[[dict[str, Any]], None]
AUDIT_LOG = "audit/keys.log"


def parse_audit(data: bytes, since: str | None = None, image: str | None = None) -> list[dict[str, Any]]:
    """The records of an audit log's bytes, optionally from an ISO time on, or for one image name."""
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if since and rec.get("time", "") < since:
            continue
        if image and rec.get("image") != image.split(":")[0]:
            continue
        out.append(rec)
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class AuditedKeyProvider(KeyProvider):
    def __init__(self, inner: KeyProvider, sink: AuditSink, ttl: float = 300.0, max_entries: int = 1024):
        self.inner = inner
        self.scheme = inner.scheme
        self._sink = sink
        self._ttl = ttl
        self._max = max_entries
        self._cache: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.provider_calls = 0

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    @property
    def spec(self) -> str | None:
        return self.inner.spec

    def __getattr__(self, name: str) -> Any:  # e.g. LocalKeyFile.path
        return getattr(self.inner, name)

    def _log(self, op: str, context: Mapping[str, str], outcome: str, error: str = "") -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
               "op": op, "provider": self.inner.scheme, "key_id": self.inner.key_id,
               "purpose": context.get("purpose", ""), "image": context.get("image", ""),
               "manifest": context.get("manifest", ""), "domain": context.get("domain", ""),
               "epoch": context.get("epoch", ""), "store": context.get("store", ""),
               "pid": os.getpid(), "user": _user(), "outcome": outcome}
        if error:
            rec["error"] = error
        self._sink(rec)

    def _do(self, op: str, context: Mapping[str, str], fn: Callable[[], Any]) -> Any:
        with self._lock:
            self.provider_calls += 1
        try:
            out = fn()
        except KeyAccessDenied as e:
            self._log(op, context, "denied", str(e))
            raise
        except ConvstoreError as e:
            self._log(op, context, "error", str(e))
            raise
        self._log(op, context, "ok")
        return out

    def wrap(self, plaintext_key: bytes, context: Mapping[str, str]) -> bytes:
        return self._do("wrap", context, lambda: self.inner.wrap(plaintext_key, context))

    def generate(self, context: Mapping[str, str], size: int = 32) -> tuple[bytes, bytes]:
        return self._do("generate", context, lambda: self.inner.generate(context, size))

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        ck = hashlib.sha256(wrapped + b"\0" + canonical_context(context)).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None and now - hit[0] < self._ttl:
                self._cache.move_to_end(ck)
                return hit[1]
        key: bytes = self._do("unwrap", context, lambda: self.inner.unwrap(wrapped, context))
        with self._lock:
            self._cache[ck] = (now, key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return key

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def __repr__(self) -> str:
        return f"<AuditedKeyProvider {self.inner!r}>"
