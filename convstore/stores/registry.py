"""An OCI registry as a convstore store, on oras-py.

oras-py's ``Registry`` provider gives auth (docker config, basic, token),
the distribution API paths and ``do_request``; it takes file paths for
blobs and has no ranged reads, so :class:`RegistryClient` extends it with
byte-level blob upload, ranged GET, manifest PUT/GET by reference, tag
listing and retries with backoff on 5xx and connection errors.

:class:`RegistryStore` maps convstore's objects onto a repository:

* chunks are packed: the chunks written between two flushes (at most
  ``PACK_BYTES``) are uploaded as one blob, and a *pack index* artifact
  (``artifactType application/vnd.convstore.chunk-index.v1``, tag
  ``x-<random>``) lists (chunk id, offset, length) in it; a chunk is read
  with an HTTP Range request.  Measured on loopback (docs/benchmarks.md):
  uploading 1,000 40 kB chunks took 10.9 s as 1,000 blobs and 0.2 s as one
  pack, and a ranged read of one chunk costs about what a whole small blob
  does (4.7 vs 3.3 ms), so packs win;
* every other object (sealed image manifests, catalog entries, domains,
  store identity) is an OCI artifact with one layer, tagged
  ``o-<sha256(key)[:40]>`` and annotated with its key; sealed manifests have
  ``artifactType application/vnd.convstore.manifest.v1`` and catalog entries
  (images) ``application/vnd.convstore.image.v1``.

Pushes are idempotent: a blob already present is not sent again (HEAD),
and an interrupted push re-run sends only what is missing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests

from ..errors import InvalidReference, StoreError
from .base import ChunkStore, ObjectStore

log = logging.getLogger(__name__)

EMPTY_CONFIG: dict[str, Any] = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
AT_OBJECT = "application/vnd.convstore.object.v1"
AT_MANIFEST = "application/vnd.convstore.manifest.v1"
AT_IMAGE = "application/vnd.convstore.image.v1"
AT_CHUNK_INDEX = "application/vnd.convstore.chunk-index.v1"
MT_BLOB = "application/vnd.convstore.blob.v1"
_SEG_HEAD = struct.Struct("<4sI32s")  # b"CSRX", version, pack blob digest
_SEG = struct.Struct("<32sQI")  # cid, offset, length
PACK_BYTES = 32 << 20
RETRIES = 4


class RegistryError(StoreError):
    """The registry refused, failed, or could not be reached."""


def parse_store_url(url: str) -> tuple[str, str]:
    """``oci://HOST[:PORT]/REPO`` -> (host, repo)."""
    if not url.startswith("oci://"):
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    host, _, repo = url[6:].partition("/")
    if not host or not repo:
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    return host, repo.rstrip("/")


class RegistryClient:
    """Byte-level registry operations over oras-py's provider (auth, paths)."""

    def __init__(self, host: str, insecure: bool = False, username: str | None = None,
                 password: str | None = None):
        import oras.provider

        self.host = host
        self.reg = oras.provider.Registry(hostname=host, insecure=insecure,
                                          auth_backend="basic" if username else "token")
        if username:
            self.reg.auth.set_basic_auth(username, password or "")
        self.base = f"{'http' if insecure else 'https'}://{host}/v2"
        self._empty_done: set[str] = set()
        self._do_request = getattr(oras.provider.Registry.do_request, "__wrapped__", oras.provider.Registry.do_request)

    def __repr__(self) -> str:  # never the credentials
        return f"RegistryClient({self.host})"

    def _req(self, method: str, url: str, ok: tuple[int, ...], **kw: Any) -> requests.Response:
        import oras.auth

        delay = 0.2
        for attempt in range(RETRIES):
            try:
                # oras-py's do_request (auth handling) without its retry decorator, whose
                # backoff sleeps up to 81 s and hides errors: this policy is bounded (~3 s).
                r = self._do_request(self.reg, url, method, **kw)
            except oras.auth.AuthenticationException as e:
                raise RegistryError(f"registry {self.host} refused the credentials ({e})") from None
            except requests.ConnectionError:
                if attempt == RETRIES - 1:
                    raise RegistryError(f"cannot reach the registry at {self.host}") from None
            except (ValueError, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema):
                # oras could not answer the auth challenge: no (usable) credentials
                raise RegistryError(f"registry {self.host} requires credentials (--username with "
                                    f"--password-stdin, or docker login)") from None
            else:
                if r.status_code in ok:
                    return r
                if r.status_code in (401, 403):
                    raise RegistryError(f"registry {self.host} refused the credentials (HTTP {r.status_code})")
                if r.status_code < 500 and r.status_code != 429:
                    raise RegistryError(f"registry {self.host} refused {method} {url.split('/v2/', 1)[-1]}: "
                                        f"HTTP {r.status_code} {r.text[:200].strip()}")
                if attempt == RETRIES - 1:
                    raise RegistryError(f"registry {self.host} failed: HTTP {r.status_code} for {method}")
            time.sleep(delay)
            delay *= 2
        raise RegistryError(f"registry {self.host}: giving up")  # pragma: no cover

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self._req("HEAD", f"{self.base}/{repo}/blobs/{digest}", (200, 404)).status_code == 200

    def put_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Upload ``data`` (monolithic POST + PUT) unless it is already there."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        if self.blob_exists(repo, digest):
            return digest
        r = self._req("POST", f"{self.base}/{repo}/blobs/uploads/", (202,))
        loc = r.headers.get("Location", "")
        if not loc:
            raise RegistryError("registry gave no upload location")
        if not loc.startswith("http"):
            loc = self.base.rsplit("/v2", 1)[0] + loc
        sep = "&" if "?" in loc else "?"
        self._req("PUT", f"{loc}{sep}digest={digest}", (201,), data=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        return digest

    def get_blob(self, repo: str, digest: str, start: int | None = None, end: int | None = None) -> bytes:
        headers = {"Range": f"bytes={start}-{end - 1}"} if start is not None and end is not None else {}
        r = self._req("GET", f"{self.base}/{repo}/blobs/{digest}", (200, 206, 404), headers=headers)
        if r.status_code == 404:
            raise KeyError(digest)
        data = r.content
        if not headers and not hmac.compare_digest("sha256:" + hashlib.sha256(data).hexdigest(), digest):
            raise RegistryError(f"blob {digest} from {self.host} does not match its digest")
        return data

    def open_blob(self, repo: str, digest: str) -> Any:
        """A streaming reader of a blob (the caller verifies the digest)."""
        r = self._req("GET", f"{self.base}/{repo}/blobs/{digest}", (200, 404), stream=True)
        if r.status_code == 404:
            raise KeyError(digest)
        r.raw.decode_content = False
        return r.raw

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str = OCI_MANIFEST) -> None:
        if repo not in self._empty_done:  # artifacts name the empty config; the registry wants it present
            self.put_blob(repo, b"{}", str(EMPTY_CONFIG["digest"]))
            self._empty_done.add(repo)
        self._req("PUT", f"{self.base}/{repo}/manifests/{ref}", (201,), data=body,
                  headers={"Content-Type": media_type})

    def get_manifest(self, repo: str, ref: str, accept: list[str]) -> tuple[bytes, str, str] | None:
        r = self._req("GET", f"{self.base}/{repo}/manifests/{ref}", (200, 404), headers={"Accept": ", ".join(accept)})
        if r.status_code == 404:
            return None
        body = r.content
        return body, r.headers.get("Content-Type", ""), "sha256:" + hashlib.sha256(body).hexdigest()

    def delete_manifest(self, repo: str, digest: str) -> None:
        self._req("DELETE", f"{self.base}/{repo}/manifests/{digest}", (202, 404))

    def tags(self, repo: str) -> list[str]:
        out: list[str] = []
        url = f"{self.base}/{repo}/tags/list?n=1000"
        while url:
            r = self._req("GET", url, (200, 404))
            if r.status_code == 404:
                return out
            out += r.json().get("tags") or []
            link = r.headers.get("Link", "")
            url = ""
            if 'rel="next"' in link:
                nxt = link.split(";")[0].strip("<> ")
                url = nxt if nxt.startswith("http") else self.base.rsplit("/v2", 1)[0] + nxt
        return out


def _artifact(artifact_type: str, layer_digest: str, size: int, annotations: dict[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                       "config": EMPTY_CONFIG,
                       "layers": [{"mediaType": MT_BLOB, "digest": layer_digest, "size": size}],
                       "annotations": annotations}, sort_keys=True).encode()


def open_registry(url: str, insecure: bool = False, username: str | None = None,
                  password: str | None = None) -> tuple[RegistryStore, RegistryChunkStore]:
    """The metadata store and the chunk store of one registry repository (one client)."""
    host, repo = parse_store_url(url)
    client = RegistryClient(host, insecure, username, password)
    client.reg.auth.load_configs(client.reg.get_container(f"{host}/{repo}"))
    return RegistryStore(url, client, repo), RegistryChunkStore(url, client, repo)


class RegistryChunkStore(ChunkStore):
    """Chunks in packed blobs of one repository, found through pack-index artifacts (tags ``x-*``)."""

    supports_deletes = False  # chunks are reclaimed by the registry's own GC

    def __init__(self, url: str, client: RegistryClient, repo: str):
        self.url, self.client, self.repo = url, client, repo
        self._lock = threading.Lock()
        self._chunks: dict[bytes, tuple[str, int, int]] = {}  # cid -> (pack digest, offset, length)
        self._pending: dict[bytes, tuple[int, int]] = {}  # cid -> (offset, length) in _pack
        self._pack = bytearray()
        self._segments: set[str] = set()
        self.refresh()

    def __repr__(self) -> str:
        return f"RegistryChunkStore({self.url})"

    def refresh(self) -> None:
        """Load the pack indexes not seen yet."""
        tags = self.client.tags(self.repo)
        for t in tags:
            if t.startswith("x-") and t not in self._segments:
                got = self.client.get_manifest(self.repo, t, [OCI_MANIFEST])
                if got is None:
                    continue
                layer = json.loads(got[0])["layers"][0]
                data = self.client.get_blob(self.repo, layer["digest"])
                magic, version, pack = _SEG_HEAD.unpack_from(data)
                if magic != b"CSRX" or version != 1:
                    log.warning("skipping pack index %s: unknown format", t)
                    continue
                with self._lock:
                    for i in range(_SEG_HEAD.size, len(data) - _SEG.size + 1, _SEG.size):
                        cid, off, size = _SEG.unpack_from(data, i)
                        self._chunks.setdefault(cid, ("sha256:" + pack.hex(), off, size))
                    self._segments.add(t)

    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._chunks or cid in self._pending

    def get(self, cid: bytes) -> bytes:
        with self._lock:
            pend = self._pending.get(cid)
            if pend is not None:
                return bytes(self._pack[pend[0] : pend[0] + pend[1]])
            loc = self._chunks.get(cid)
        if loc is None:
            self.refresh()
            loc = self._chunks.get(cid)
            if loc is None:
                raise KeyError(cid.hex())
        data = self.client.get_blob(self.repo, loc[0], loc[1], loc[1] + loc[2])
        if len(data) != loc[2]:
            raise StoreError(f"registry returned {len(data)} bytes for a {loc[2]}-byte chunk")
        return data

    def get_many(self, cids: list[bytes], max_gap: int = 1 << 20, max_span: int = 16 << 20) -> dict[bytes, bytes]:
        """Chunks by coalesced ranged reads: neighbours in a pack (gaps up to
        ``max_gap``) come in one request of at most ``max_span`` bytes."""
        out: dict[bytes, bytes] = {}
        by_pack: dict[str, list[tuple[int, int, bytes]]] = {}
        for c in cids:
            loc = self._chunks.get(c)
            if loc is None:
                out[c] = self.get(c)
            else:
                by_pack.setdefault(loc[0], []).append((loc[1], loc[2], c))
        for digest, items in by_pack.items():
            items.sort()
            i = 0
            while i < len(items):
                j = i
                start = items[i][0]
                end = items[i][0] + items[i][1]
                while j + 1 < len(items) and items[j + 1][0] - end <= max_gap and \
                        items[j + 1][0] + items[j + 1][1] - start <= max_span:
                    j += 1
                    end = max(end, items[j][0] + items[j][1])
                data = self.client.get_blob(self.repo, digest, start, end)
                if len(data) != end - start:
                    raise StoreError(f"registry returned {len(data)} bytes for a {end - start}-byte range")
                for off, n, c in items[i : j + 1]:
                    out[c] = data[off - start : off - start + n]
                i = j + 1
        return out

    def size(self, cid: bytes) -> int:
        loc = self._chunks.get(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc[2]

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if cid in self._chunks or cid in self._pending:
                return
            self._pending[cid] = (len(self._pack), len(blob))
            self._pack += blob
            full = len(self._pack) >= PACK_BYTES
        if full:
            self.flush()

    def flush(self) -> None:
        """Upload the pending chunks as one pack blob, then its index artifact
        (the commit point: chunks are found only through an index)."""
        with self._lock:
            pending, pack = self._pending, bytes(self._pack)
            self._pending, self._pack = {}, bytearray()
        if not pending:
            return
        try:
            digest = self.client.put_blob(self.repo, pack)
            body = _SEG_HEAD.pack(b"CSRX", 1, bytes.fromhex(digest.split(":", 1)[1])) + b"".join(
                _SEG.pack(cid, off, n) for cid, (off, n) in pending.items())
            idx = self.client.put_blob(self.repo, body)
            tag = "x-" + secrets.token_hex(16)
            self.client.put_manifest(self.repo, tag, _artifact(AT_CHUNK_INDEX, idx, len(body), {}))
        except BaseException:
            with self._lock:  # keep them pending: a retry of flush sends them again
                for cid, (off, n) in pending.items():
                    self._pending.setdefault(cid, (len(self._pack), n))
                    self._pack += pack[off : off + n]
            raise
        with self._lock:
            for cid, (off, n) in pending.items():
                self._chunks[cid] = (digest, off, n)
            self._segments.add(tag)

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()
            self._pack = bytearray()

    def delete(self, cids: list[bytes]) -> None:
        if cids:
            raise StoreError("a registry store does not delete chunks: use the registry's garbage collection")

    def ids(self) -> Iterator[bytes]:
        self.refresh()
        return iter(list(self._chunks))

    def usage(self) -> int:
        return sum(n for _d, _o, n in self._chunks.values())


class RegistryStore(ObjectStore):
    """convstore metadata objects in one registry repository (see the module docstring)."""

    supports_writes = True
    supports_deletes = True  # tags can be deleted (chunk space is the registry GC's)
    supports_locking = False

    def __init__(self, url: str, client: RegistryClient, repo: str):
        self.url, self.client, self.repo = url, client, repo
        self._keys: dict[str, str] = {}  # tag -> key

    def __repr__(self) -> str:
        return f"RegistryStore({self.url})"

    @staticmethod
    def _tag(key: str) -> str:
        return "o-" + hashlib.sha256(key.encode()).hexdigest()[:40]

    def has(self, key: str) -> bool:
        return self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST]) is not None

    def get(self, key: str) -> bytes:
        got = self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST])
        if got is None:
            raise KeyError(key)
        m = json.loads(got[0])
        if (m.get("annotations") or {}).get("org.convstore.key") != key:
            raise StoreError(f"registry object for {key} is not what its tag claims")
        return self.client.get_blob(self.repo, m["layers"][0]["digest"])

    def size(self, key: str) -> int:
        return len(self.get(key))

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        if exclusive and self.has(key):
            return False
        digest = self.client.put_blob(self.repo, data)
        kind = AT_MANIFEST if key.startswith("manifests/") else AT_IMAGE if key.startswith("refs/") else AT_OBJECT
        self.client.put_manifest(self.repo, self._tag(key),
                                 _artifact(kind, digest, len(data), {"org.convstore.key": key}))
        self._keys[self._tag(key)] = key
        return True

    def delete(self, key: str) -> None:
        got = self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST])
        if got is not None:
            self.client.delete_manifest(self.repo, got[2])

    def list(self, prefix: str) -> Iterator[str]:
        for t in self.client.tags(self.repo):
            if not t.startswith("o-"):
                continue
            key = self._keys.get(t)
            if key is None:
                got = self.client.get_manifest(self.repo, t, [OCI_MANIFEST])
                if got is None:
                    continue
                key = (json.loads(got[0]).get("annotations") or {}).get("org.convstore.key", "")
                self._keys[t] = key
            if key.startswith(prefix.rstrip("/") + "/"):
                yield key

    def lock(self, name: str, shared: bool = False) -> Any:
        raise StoreError("a registry store has no locks: pack into a local store, then push")

    def append_line(self, key: str, line: str) -> None:
        log.info("audit %s", line)  # a registry has no append; the local cache keeps the audit log
