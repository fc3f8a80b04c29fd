"""An OCI registry as a convstore store, on oras-py.

oras-py's ``Registry`` provider gives auth (docker config, basic, token),
the distribution API paths and ``do_request``; it takes file paths for
blobs and has no ranged reads, so :class:`RegistryClient` extends it with
byte-level blob upload, ranged GET, manifest PUT/GET by reference, tag
listing and retries with backoff on 5xx and connection errors.

:class:`RegistryStore` and :class:`RegistryChunkStore` map convstore's
objects onto a repository (layout 2, docs/format.md):

* chunks are packed: the chunks written between two flushes (at most
  ``PACK_BYTES``) are uploaded as one blob; a chunk is read with an HTTP
  Range request at the place its image manifest's location hint names, so a
  read needs no index.  Measured on loopback (docs/benchmarks.md):
  uploading 1,000 40 kB chunks took 10.9 s as 1,000 blobs and 0.2 s as one
  pack, and a ranged read of one chunk costs about what a whole small blob
  does (4.7 vs 3.3 ms), so packs win;
* the chunk index -- used for dedup by writers -- lives in the sibling
  repository ``REPO/convstore-index`` as segments merged into snapshots
  (see :class:`RegistryChunkStore`);
* every other object (sealed image manifests, catalog entries, domains,
  store identity) is an OCI artifact with one layer, tagged
  ``<kind>-<sha256(key)[:40]>`` (kind ``r`` catalog entries, ``m`` manifests,
  ``d`` domains, ...: a listing of one kind reads only the tag list) and
  annotated with its key; objects up to ``INLINE_BYTES`` are also embedded in
  the descriptor (one GET reads them).

Pushes are idempotent: a blob already present is not sent again (HEAD),
and an interrupted push re-run sends only what is missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, cast

import requests
import requests.adapters

from ..errors import ConvstoreError, CorruptObject, DigestMismatch, InvalidReference, StoreError, StoreFormatError
from ..oci.media import MAX_MANIFEST, check_digest, sha256_digest, verify_bytes
from .base import ChunkStore, Location, ObjectStore
from .packs import AUTO_MERGE_MAX, SortedIndex, encode_midx, makedirs_private, record

log = logging.getLogger(__name__)

EMPTY_CONFIG: dict[str, Any] = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
AT_OBJECT = "application/vnd.convstore.object.v1"
AT_MANIFEST = "application/vnd.convstore.manifest.v1"
AT_IMAGE = "application/vnd.convstore.image.v1"
AT_CHUNK_INDEX = "application/vnd.convstore.chunk-index.v1"
AT_INDEX_SNAPSHOT = "application/vnd.convstore.chunk-index-snapshot.v1"
MT_BLOB = "application/vnd.convstore.blob.v1"
MT_PACK = "application/vnd.convstore.pack.v1"
_SEG_HEAD = struct.Struct("<4sI32s")  # b"CSRX", version, pack blob digest
_SEG = struct.Struct("<32sQI")  # cid, offset, length
SNAP_MAGIC = b"CSRSNAP\0"
INDEX_REPO = "convstore-index"  # the sibling repository of the chunk index
_INDEX_TAG = re.compile(r"[sx]-[0-9a-f]{32}\Z")  # what this client writes; anything else in the index is ignored
PACK_BYTES = 32 << 20
COMPACT_SEGMENTS = 16  # segments not yet merged that make a writer write a snapshot
INLINE_BYTES = 16 << 10  # objects up to this size are also embedded in their artifact (one GET reads them)
LIST_WORKERS = 16
# -- response caps, enforced while the body streams in (a registry's answer never decides how much is read)
# manifests and image indexes: the distribution spec's limit (media.MAX_MANIFEST); convstore's own
# artifacts are far below it (an image's artifact lists its pack blobs, ~150 bytes each: 27,000 packs)
MAX_TAGS_PAGE = 4 << 20  # one page of a tag listing: asked for 1,000 tags of at most 128 characters
MAX_TAGS = 1_000_000  # tags in one listing (every page): ~100 MB of Python strings, a 250,000-image store
MAX_TAG_PAGES = 10_000  # pages of one listing: MAX_TAGS at 100 a page (registries may give fewer than asked)
MAX_BLOB = 64 << 20  # a whole-blob GET with no descriptor size (configs, metadata objects are far smaller)
# the registry store's own blobs, each checked against its descriptor's size before it is read:
# an index segment lists the chunks of one pack (under PACK_BYTES, plus the chunk that fills it); a chunk
# is at least 32 bytes (its header and tag), a record 44 bytes: ~44 MiB at most
MAX_SEGMENT = _SEG_HEAD.size + _SEG.size * (PACK_BYTES // 32 + 2)
MAX_SNAPSHOT = 2 << 30  # a snapshot holds a record per chunk of the store: 2 GiB is ~25 M chunks
MAX_COVERED = 64 << 20  # a snapshot's JSON list of the tags it covers (~37 bytes a tag)
MAX_OBJECT = 1 << 30  # a sealed manifest (a row per chunk and every file's metadata) or catalog object
MAX_OTHER = 64 << 10  # any other answer (upload, delete, an error's body: only its start is shown)
RETRIES = 4  # attempts per request; backoff 0.2, 0.4, 0.8 s between them
TIMEOUT = 60.0  # seconds without an answer (connect: at most 10) before a request is retried
# an answer's body must arrive whole within TIMEOUT plus its cap at this rate (a manifest: 60 + 64 s),
# however it trickles in: a per-read timeout alone never fires on a byte sent every TIMEOUT - 1 s
MIN_RATE = 64 << 10


class RegistryError(StoreError):
    """The registry refused, failed, or could not be reached."""


class RegistryCorrupt(RegistryError, CorruptObject):
    """The registry returned a blob that does not match its digest."""


class RegistryResponseTooLarge(RegistryError):
    """The registry sent more than convstore reads for that kind of answer (final: not retried)."""


class RegistryTooSlow(RegistryError):
    """The registry's answer did not arrive whole by its deadline (final: not retried)."""


def parse_store_url(url: str) -> tuple[str, str]:
    """``oci://HOST[:PORT]/REPO`` -> (host, repo)."""
    if not url.startswith("oci://"):
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    host, _, repo = url[6:].partition("/")
    if not host or not repo:
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    return host, repo.rstrip("/")


class _Watchdog:
    """Shuts ``r``'s socket down ``seconds`` from now unless cancelled: a read blocked on it then ends
    or fails at once (a per-read timeout never fires on a body trickled in); ``expired`` tells why."""

    def __init__(self, r: requests.Response, seconds: float):
        self.r, self.seconds = r, seconds
        self.expired = threading.Event()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired.set()
        try:
            self.r.raw.shutdown()
        except Exception:  # already closed, or no socket: nothing is blocked on it
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _read_capped(r: requests.Response, cap: int, host: str, kind: str, timeout: float) -> bytes:
    """The body of ``r`` if it has at most ``cap`` bytes, read as it arrives (64 KiB at a time,
    decoded: a Content-Encoding is capped on what it inflates to) and whole within ``timeout``
    seconds plus ``cap`` at MIN_RATE bytes a second (a trickle meets no per-read timeout: past the
    deadline the socket is shut down); :class:`RegistryResponseTooLarge` naming ``host`` and
    ``kind`` past the cap, :class:`RegistryTooSlow` past the deadline.  A HEAD answer has no body."""
    def too_large() -> RegistryResponseTooLarge:
        r.close()
        limit = f"{cap >> 20} MiB" if cap >= 1 << 20 and cap % (1 << 20) == 0 else f"{cap} bytes"
        why = " (the distribution spec's limit)" if kind == "a manifest" else ""
        return RegistryResponseTooLarge(f"registry {host} sent {kind} larger than {limit}{why}")

    if r.request is not None and r.request.method == "HEAD":
        return b""
    try:
        declared = int(r.headers.get("Content-Length", ""))
    except ValueError:
        declared = -1
    if declared > cap:
        raise too_large()
    deadline = timeout + cap / MIN_RATE
    watchdog = _Watchdog(r, deadline)
    buf = bytearray()
    try:
        for part in r.iter_content(1 << 16):
            buf += part
            if len(buf) > cap:
                raise too_large()
            if watchdog.expired.is_set():
                break
    except (requests.exceptions.RequestException, OSError):
        if not watchdog.expired.is_set():
            raise
    finally:
        watchdog.cancel()
    if watchdog.expired.is_set():
        r.close()
        raise RegistryTooSlow(f"registry {host} sent {kind} too slowly (not whole within {deadline:g} s)")
    return bytes(buf)


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Every request gets a (connect, read) timeout: a stalled registry is an
    error after it, never a hang (oras-py sets none).  A body nobody streams
    (oras-py's token requests; :meth:`RegistryClient._req` streams and caps
    its own) is read here, at most ``MAX_MANIFEST``, and so is a redirect's
    (which requests reads whole, streamed or not), at most ``MAX_OTHER``."""

    def __init__(self, timeout: tuple[float, float], host: str):
        super().__init__()
        self.timeout = timeout
        self.host = host

    def send(self, request: requests.PreparedRequest, *args: Any, **kw: Any) -> requests.Response:
        if kw.get("timeout") is None:
            kw["timeout"] = self.timeout
        streamed = bool(kw.get("stream"))
        kw["stream"] = True
        r = super().send(request, *args, **kw)
        host = urllib.parse.urlsplit(request.url or "").netloc or self.host
        if r.is_redirect:  # requests reads a redirect's body whole itself before it follows it
            r._content = _read_capped(r, MAX_OTHER, host, "a redirect", self.timeout[1])
        elif not streamed:
            r._content = _read_capped(r, MAX_MANIFEST, host, "an answer", self.timeout[1])  # requests' .content
        return r


class _BlobStream(io.RawIOBase):
    """A blob's body as it streams in (undecoded), whole within ``deadline`` seconds: past it the
    socket is shut down and a read is :class:`RegistryTooSlow`; a body broken off is a RegistryError."""

    def __init__(self, r: requests.Response, deadline: float, host: str, what: str):
        self._r, self._deadline, self._host, self._what = r, deadline, host, what
        self._watchdog = _Watchdog(r, deadline)
        self._expired = self._watchdog.expired

    def _too_slow(self) -> RegistryTooSlow:
        return RegistryTooSlow(f"registry {self._host} sent {self._what} too slowly "
                               f"(not whole within {self._deadline:g} s)")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._expired.is_set():
            raise self._too_slow()
        try:
            n = self._r.raw.readinto(b)
        except ConvstoreError:
            raise
        except Exception as e:  # urllib3's and http.client's errors, OSError: the connection broke
            self._watchdog.cancel()
            if self._expired.is_set():
                raise self._too_slow() from None
            raise RegistryError(f"registry {self._host} broke off {self._what} ({type(e).__name__})") from None
        if self._expired.is_set():
            raise self._too_slow()
        if not n:
            self._watchdog.cancel()
        return n

    def close(self) -> None:
        self._watchdog.cancel()
        self._r.close()
        super().close()


class RegistryClient:
    """Byte-level registry operations over oras-py's provider (auth, paths)."""

    def __init__(self, host: str, insecure: bool = False, username: str | None = None,
                 password: str | None = None, timeout: float = TIMEOUT):
        import oras.provider

        self.host = host
        self.timeout = timeout
        self.reg = oras.provider.Registry(hostname=host, insecure=insecure,
                                          auth_backend="basic" if username else "token")
        adapter = _TimeoutAdapter((min(timeout, 10.0), timeout), host)
        self.reg.session.mount("http://", adapter)
        self.reg.session.mount("https://", adapter)
        if username:
            self.reg.auth.set_basic_auth(username, password or "")
        self.base = f"{'http' if insecure else 'https'}://{host}/v2"
        self._empty_done: set[str] = set()
        self._do_request = getattr(oras.provider.Registry.do_request, "__wrapped__", oras.provider.Registry.do_request)

    def __repr__(self) -> str:  # never the credentials
        return f"RegistryClient({self.host})"

    def _req(self, method: str, url: str, ok: tuple[int, ...], *, cap: int = MAX_OTHER, kind: str = "an answer",
             stream: bool = False, **kw: Any) -> requests.Response:
        """One request, retried on connection errors, timeouts, 5xx and 429.

        The body of an answer in ``ok`` is read here, at most ``cap`` bytes
        (:class:`RegistryResponseTooLarge` naming ``kind`` past it, never
        retried), and is then the response's ``content``; ``stream=True``
        leaves it unread for the caller.  Other answers are never read whole.
        """
        import oras.auth

        delay = 0.2
        for attempt in range(RETRIES):
            r = None
            try:
                # oras-py's do_request (auth handling) without its retry decorator, whose
                # backoff sleeps up to 81 s and hides errors: this policy is bounded (~3 s).
                r = self._do_request(self.reg, url, method, stream=True, **kw)
                if r.status_code in ok:
                    if not stream:  # (a HEAD answer has no body: its Content-Length is the GET's)
                        r._content = _read_capped(r, cap, self.host, kind, self.timeout)  # requests' .content
                    return r
            except oras.auth.AuthenticationException as e:
                raise RegistryError(f"registry {self.host} refused the credentials ({e})") from None
            except requests.Timeout:
                if attempt == RETRIES - 1:
                    raise RegistryError(f"registry {self.host} did not answer within {self.timeout:g} s "
                                        f"({RETRIES} attempts)") from None
            except requests.exceptions.SSLError as e:
                # up, but not TLS: a plain-HTTP registry answers the TLS hello with HTTP ("wrong version number")
                if "WRONG_VERSION_NUMBER" in str(e).upper().replace(" ", "_"):
                    raise RegistryError(f"the registry at {self.host} speaks plain HTTP; use --insecure") from None
                raise RegistryError(f"TLS with the registry at {self.host} failed: {e.__class__.__name__}") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError):
                if attempt == RETRIES - 1:
                    raise RegistryError(f"cannot reach the registry at {self.host}") from None
            except (ValueError, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema):
                # oras could not answer the auth challenge: no (usable) credentials
                raise RegistryError(f"registry {self.host} requires credentials (--username with "
                                    f"--password-stdin, or docker login)") from None
            except (AttributeError, TypeError) as e:  # oras-py read a token answer of another shape
                raise RegistryError(f"registry {self.host} sent a malformed authentication answer "
                                    f"({type(e).__name__}: {e})") from None
            else:
                try:
                    if r.status_code in (401, 403):
                        raise RegistryError(f"registry {self.host} refused the credentials (HTTP {r.status_code})")
                    if r.status_code < 500 and r.status_code != 429:
                        raise RegistryError(f"registry {self.host} refused {method} {url.split('/v2/', 1)[-1]}: "
                                            f"HTTP {r.status_code} {self._snippet(r, self.timeout)}")
                    if attempt == RETRIES - 1:
                        raise RegistryError(f"registry {self.host} failed: HTTP {r.status_code} for {method}")
                finally:
                    r.close()
            finally:
                if r is not None and not stream and r._content is False:  # body unread: drop the connection
                    r.close()
            time.sleep(delay)
            delay *= 2
        raise RegistryError(f"registry {self.host}: giving up")  # pragma: no cover

    @staticmethod
    def _snippet(r: requests.Response, timeout: float) -> str:
        """The start of an error answer's body (at most 200 bytes are read, within ``timeout``)."""
        watchdog = _Watchdog(r, timeout)
        try:
            head = r.raw.read(200, decode_content=True) or b""
        except Exception:  # the error is already being reported; its body is a courtesy
            head = b""
        finally:
            watchdog.cancel()
        return head.decode("utf-8", "replace").strip()

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self._req("HEAD", f"{self.base}/{repo}/blobs/{digest}", (200, 404)).status_code == 200

    def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of a blob, or None if the registry does not have it."""
        r = self._req("HEAD", f"{self.base}/{repo}/blobs/{digest}", (200, 404))
        if r.status_code != 200:
            return None
        try:
            return int(r.headers.get("Content-Length", ""))
        except ValueError:
            raise RegistryError(f"registry {self.host} gave no size for blob {digest}") from None

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

    def get_blob(self, repo: str, digest: str, start: int | None = None, end: int | None = None, *,
                 size: int | None = None, max_bytes: int = MAX_BLOB) -> bytes:
        """A byte range of a blob (as the registry sends it: the caller checks what it holds),
        or the whole blob, checked against ``digest`` and, where given (a descriptor's),
        ``size``: :class:`RegistryCorrupt` otherwise.  A whole blob is read up to ``size``
        or else ``max_bytes``, a range up to its length."""
        url = f"{self.base}/{repo}/blobs/{digest}"
        if start is not None and end is not None:
            r = self._req("GET", url, (200, 206, 404), headers={"Range": f"bytes={start}-{end - 1}"},
                          cap=max(0, end - start), kind="a blob range")
            if r.status_code == 404:
                raise KeyError(digest)
            return r.content
        what = f"blob {digest} from {self.host}"
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise RegistryCorrupt(f"{what}: its descriptor's size {size!r} is not a size")
        if size is not None and size > max_bytes:
            raise RegistryResponseTooLarge(f"{what}: its descriptor's size {size} is over the {max_bytes}-byte "
                                           f"limit for it")
        r = self._req("GET", url, (200, 404), cap=max_bytes if size is None else size, kind=f"blob {digest}")
        if r.status_code == 404:
            raise KeyError(digest)
        try:
            return verify_bytes(r.content, digest, size, what)
        except DigestMismatch as e:
            raise RegistryCorrupt(str(e)) from None

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> BinaryIO:
        """A streaming reader of a blob as stored (the caller verifies the digest), whole within the
        timeout plus ``size`` (else ``MAX_BLOB``) at MIN_RATE bytes a second: :class:`RegistryTooSlow`
        past it, :class:`RegistryError` for a body broken off."""
        r = self._req("GET", f"{self.base}/{repo}/blobs/{digest}", (200, 404), stream=True)
        if r.status_code == 404:
            r.close()
            raise KeyError(digest)
        r.raw.decode_content = False
        deadline = self.timeout + (size if size is not None and size >= 0 else MAX_BLOB) / MIN_RATE
        return cast(BinaryIO, _BlobStream(r, deadline, self.host, f"blob {digest}"))  # a raw binary stream

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str = OCI_MANIFEST) -> None:
        if repo not in self._empty_done:  # artifacts name the empty config; the registry wants it present
            self.put_blob(repo, b"{}", str(EMPTY_CONFIG["digest"]))
            self._empty_done.add(repo)
        self._req("PUT", f"{self.base}/{repo}/manifests/{ref}", (201,), data=body,
                  headers={"Content-Type": media_type})

    def get_manifest(self, repo: str, ref: str, accept: list[str], *, expect_digest: str | None = None,
                     expect_size: int | None = None) -> tuple[bytes, str, str] | None:
        """(body, Content-Type, digest of the body), or None if there is no such manifest.

        A digest is a promise: when ``ref`` is a digest (or ``expect_digest``
        is given) the body must hash to it, and have ``expect_size`` bytes
        where given (an index entry's size), else :class:`DigestMismatch`.
        At most the distribution spec's 4 MiB is read."""
        if expect_digest is None and ":" in ref:  # a tag never holds a colon: this is a digest reference
            expect_digest = ref
        if expect_digest is not None:
            check_digest(expect_digest)
        r = self._req("GET", f"{self.base}/{repo}/manifests/{ref}", (200, 404), headers={"Accept": ", ".join(accept)},
                      cap=MAX_MANIFEST, kind="a manifest")
        if r.status_code == 404:
            return None
        body = r.content
        if expect_digest is not None:
            verify_bytes(body, expect_digest, expect_size, f"registry {self.host} sent another manifest for "
                                                           f"{repo}@{expect_digest}")
        elif expect_size is not None and len(body) != expect_size:
            raise DigestMismatch(f"registry {self.host} sent a manifest of {len(body)} bytes for {repo}:{ref}, "
                                 f"expected {expect_size}")
        return body, r.headers.get("Content-Type", ""), sha256_digest(body)

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest (and its tags); False where the registry does not allow deletes."""
        try:
            self._req("DELETE", f"{self.base}/{repo}/manifests/{digest}", (202, 404))
        except RegistryError as e:
            if "HTTP 405" in str(e) or "HTTP 400" in str(e):
                return False
            raise
        return True

    def tags(self, repo: str) -> list[str]:
        """Every tag of ``repo`` (each page read up to MAX_TAGS_PAGE, at most MAX_TAGS in all, in at
        most MAX_TAG_PAGES pages, each adding a tag)."""
        out: list[str] = []
        pages = 0
        url = f"{self.base}/{repo}/tags/list?n=1000"
        while url:
            r = self._req("GET", url, (200, 404), cap=MAX_TAGS_PAGE, kind="a tag list page")
            if r.status_code == 404:
                return out
            try:
                doc = r.json()
                page = doc.get("tags") or []
                if not isinstance(page, list):
                    raise ValueError
            except (ValueError, AttributeError):
                raise RegistryError(f"registry {self.host} sent a malformed tag list for {repo}") from None
            out += page
            pages += 1
            if len(out) > MAX_TAGS or pages > MAX_TAG_PAGES:
                raise RegistryResponseTooLarge(f"registry {self.host} lists more than {MAX_TAGS} tags or "
                                               f"{MAX_TAG_PAGES} pages of them in {repo}")
            link = r.headers.get("Link", "")
            url = ""
            if 'rel="next"' in link:
                if not page:  # a next page after one that added nothing: a listing that never ends
                    raise RegistryError(f"registry {self.host} sent a tag list page for {repo} with no tag "
                                        f"and a next page")
                nxt = link.split(";")[0].strip("<> ")
                url = nxt if nxt.startswith("http") else self.base.rsplit("/v2", 1)[0] + nxt
        return out


def _artifact(artifact_type: str, layers: list[dict[str, Any]], annotations: dict[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                       "config": EMPTY_CONFIG, "layers": layers, "annotations": annotations},
                      sort_keys=True).encode()


def _layer(digest: str, size: int, media_type: str = MT_BLOB, data: bytes | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if data is not None:
        d["data"] = base64.b64encode(data).decode()
    return d


def _inline(layer: dict[str, Any]) -> bytes | None:
    """A descriptor's embedded ``data`` (OCI image-spec 1.1), if present and it matches the digest."""
    raw = layer.get("data")
    if not isinstance(raw, str):
        return None
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        return None
    ok = hmac.compare_digest("sha256:" + hashlib.sha256(data).hexdigest(), str(layer.get("digest", "")))
    return data if ok and len(data) == layer.get("size") else None


def open_registry(url: str, insecure: bool = False, username: str | None = None,
                  password: str | None = None, index_dir: str | None = None,
                  timeout: float = TIMEOUT) -> tuple[RegistryStore, RegistryChunkStore]:
    """The metadata store and the chunk store of one registry repository (one client)."""
    host, repo = parse_store_url(url)
    client = RegistryClient(host, insecure, username, password, timeout)
    client.reg.auth.load_configs(client.reg.get_container(f"{host}/{repo}"))
    meta, chunks = RegistryStore(url, client, repo), RegistryChunkStore(url, client, repo, index_dir)
    meta.chunks = chunks
    return meta, chunks


class RegistryChunkStore(ChunkStore):
    """Chunks in packed blobs of one repository.

    Reads need no index: manifests carry each chunk's (pack digest, offset,
    length) as a hint, read with one ranged GET.  The index -- for dedup
    when packing or pushing, and for chunks without a hint -- lives in the
    sibling repository ``REPO/convstore-index`` and is loaded only then:

    * every flush adds a *segment* artifact (tag ``x-<random>``: the pack's
      digest and its (cid, offset, length) records);
    * a writer that sees ``COMPACT_SEGMENTS`` segments not yet merged writes a
      *snapshot* (tag ``s-<random>``: sorted records, read by bisection like
      a local multi-pack index, and the list of what it covers), size-tiered
      like the local indexes, and deletes what it merged where the registry
      allows;
    * tags are never re-pointed, so artifacts and blobs are cached in
      ``index_dir`` once fetched: a warm client asks for the tag list and
      the artifacts it has not seen.

    The index is a dedup accelerator, never the source of truth: an image's
    own sealed-manifest artifact references every pack blob it uses (so the
    registry's garbage collection keeps them), and a pack is checked to
    exist before an image that relies on it is published.
    """

    supports_deletes = False  # chunks are reclaimed by the registry's own GC
    needs_locations = True

    def __init__(self, url: str, client: RegistryClient, repo: str, index_dir: str | None = None):
        self.url, self.client, self.repo = url, client, repo
        self.index_repo = f"{repo}/{INDEX_REPO}"
        self.index_dir = index_dir
        self._lock = threading.RLock()
        self._loaded = False
        self._snaps: dict[str, SortedIndex] = {}  # snapshot tag -> mapped records
        self._snap_size: dict[str, int] = {}
        self._snap_covers: dict[str, list[str]] = {}  # snapshot tag -> every tag it covers
        self._segs: dict[bytes, tuple[str, int, int]] = {}  # cid -> (pack digest, offset, length), not merged
        self._seg_tags: dict[str, list[tuple[bytes, str, int, int]]] = {}  # loaded segment tag -> its records
        self._covered: set[str] = set()
        self._art_digest: dict[str, str] = {}  # index tag -> its manifest digest (for deletes)
        self._known: set[str] = set()  # pack digests (hex) the loaded index names, or this client wrote
        self._pending: dict[bytes, tuple[int, int]] = {}  # cid -> (offset, length) in _pack
        self._pack = bytearray()

    def __repr__(self) -> str:
        return f"RegistryChunkStore({self.url})"

    # -- the index ------------------------------------------------------------
    def _cached(self, kind: str, name: str, fetch: Callable[[], bytes]) -> bytes:
        """An immutable index object, from ``index_dir`` if it was fetched before."""
        path = os.path.join(self.index_dir, kind, name) if self.index_dir else None
        if path:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
        data = fetch()
        if path:
            makedirs_private(os.path.dirname(path))
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return data

    def _artifact_of(self, tag: str) -> dict[str, Any] | None:
        def fetch() -> bytes:
            got = self.client.get_manifest(self.index_repo, tag, [OCI_MANIFEST])
            if got is None:
                raise KeyError(tag)
            return got[0]

        try:
            body = self._cached("tags", tag, fetch)
        except KeyError:
            return None  # merged and deleted meanwhile
        self._art_digest[tag] = "sha256:" + hashlib.sha256(body).hexdigest()
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else None

    def _blob(self, layer: object, max_bytes: int) -> bytes:
        """An index artifact's layer blob, checked against its descriptor (digest and size)."""
        if not isinstance(layer, dict):
            raise StoreError("bad blob descriptor in the index")
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(digest, str):
            raise StoreError("bad blob digest in the index")
        hexd = digest.split(":", 1)[-1]
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise StoreError(f"bad blob digest {digest!r} in the index")
        if not isinstance(size, int):
            raise StoreError(f"index blob {digest} has no size")
        data = self._cached("blobs", hexd, lambda: self.client.get_blob(self.index_repo, digest, size=size,
                                                                         max_bytes=max_bytes))
        try:  # also what index_dir held
            return verify_bytes(data, digest, size, f"index blob {digest}")
        except DigestMismatch as e:
            raise StoreError(str(e)) from None

    def refresh(self) -> None:
        """Load the index artifacts not seen yet (one tag listing)."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        # only well-formed index tags: they become cache file names (a registry's tag list is not trusted)
        tags = [t for t in self.client.tags(self.index_repo) if isinstance(t, str) and _INDEX_TAG.match(t)]
        for t in sorted(t for t in tags if t.startswith("s-") and t not in self._snaps and t not in self._covered):
            got = self._index_artifact(t, AT_INDEX_SNAPSHOT, (MAX_SNAPSHOT, MAX_COVERED))
            if got is None:
                continue
            data, cov = got
            try:
                covered = json.loads(cov)
                if not isinstance(covered, list) or not all(isinstance(c, str) and _INDEX_TAG.match(c)
                                                            for c in covered):
                    raise StoreError("its list of covered tags is malformed")
                snap = SortedIndex.from_bytes(data, f"index snapshot {t}", SNAP_MAGIC, 32)
            except (StoreError, ValueError) as e:
                log.warning("skipping index snapshot %s: %s", t, e)
                continue
            self._snaps[t] = snap
            self._snap_size[t] = snap.count
            self._snap_covers[t] = [str(c) for c in covered]
            self._known |= snap.packs
            self._covered |= set(covered)
        for t in [t for t in self._snaps if t in self._covered]:
            del self._snaps[t]
        for t in sorted(t for t in tags if t.startswith("x-") and t not in self._seg_tags and t not in self._covered):
            got = self._index_artifact(t, AT_CHUNK_INDEX, (MAX_SEGMENT,))
            if got is None:
                continue
            try:
                recs = _decode_segment(got[0], t)
            except StoreError as e:
                log.warning("skipping pack index %s: %s", t, e)
                continue
            self._add_segment(t, recs)
        self._loaded = True

    def _index_artifact(self, tag: str, artifact_type: str, caps: tuple[int, ...]) -> list[bytes] | None:
        """The first blobs of the index artifact ``tag``, one per cap in ``caps``; None (logged)
        if it is gone, of another type, malformed or damaged.  A registry that
        fails (after retries) is an error, not a missing index."""
        try:
            art = self._artifact_of(tag)
            if art is None or art.get("artifactType") != artifact_type:
                return None
            return [self._blob(art["layers"][i], cap) for i, cap in enumerate(caps)]
        except RegistryError as e:
            if not isinstance(e, (CorruptObject, RegistryResponseTooLarge)):  # damaged or oversized: skipped
                raise
            log.warning("skipping index artifact %s: %s", tag, e)
        except (StoreError, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            log.warning("skipping index artifact %s: %s", tag, e)
        return None

    def _add_segment(self, tag: str, recs: list[tuple[bytes, str, int, int]]) -> None:
        self._seg_tags[tag] = recs
        for cid, pack, off, n in recs:
            self._segs.setdefault(cid, (pack, off, n))
            self._known.add(pack.split(":", 1)[1])

    def _lookup(self, cid: bytes) -> tuple[str, int, int] | None:
        if not self._loaded:
            self._load()
        loc = self._segs.get(cid)
        if loc is not None:
            return loc
        for snap in self._snaps.values():
            got = snap.find(cid)
            if got is not None:
                return "sha256:" + got[0].hex(), got[1], got[2]
        return None

    # -- the ChunkStore API ---------------------------------------------------
    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._pending or self._lookup(cid) is not None

    def holds(self, hint: Location) -> bool:
        with self._lock:
            return hint[0].hex() in self._known

    def locate(self, cid: bytes) -> Location | None:
        with self._lock:
            loc = self._lookup(cid)
        if loc is None:
            return None
        return bytes.fromhex(loc[0].split(":", 1)[1]), loc[1], loc[2]

    def _range(self, digest: str, start: int, end: int) -> bytes:
        data = self.client.get_blob(self.repo, digest, start, end)
        if len(data) != end - start:
            raise StoreError(f"registry returned {len(data)} bytes for a {end - start}-byte range")
        return data

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 32:
            try:
                return self._range("sha256:" + hint[0].hex(), hint[1], hint[1] + hint[2])
            except RegistryError:
                raise  # the registry failed (after retries): reported as such
            except (KeyError, StoreError):
                pass  # the pack is gone or shorter: the index says where the chunk is
        with self._lock:
            pend = self._pending.get(cid)
            if pend is not None:
                return bytes(self._pack[pend[0] : pend[0] + pend[1]])
            loc = self._lookup(cid)
            if loc is None:
                self._load()
                loc = self._lookup(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return self._range(loc[0], loc[1], loc[1] + loc[2])

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None,
                 max_gap: int = 1 << 20, max_span: int = 16 << 20) -> dict[bytes, bytes]:
        """Chunks by coalesced ranged reads: neighbours in a pack (gaps up to
        ``max_gap``) come in one request of at most ``max_span`` bytes."""
        out: dict[bytes, bytes] = {}
        by_pack: dict[str, list[tuple[int, int, bytes]]] = {}
        hints = hints or {}
        for c in cids:
            h = hints.get(c)
            if h is not None and len(h[0]) == 32:
                by_pack.setdefault("sha256:" + h[0].hex(), []).append((h[1], h[2], c))
                continue
            with self._lock:
                loc = None if c in self._pending else self._lookup(c)
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
                try:
                    data = self._range(digest, start, end)
                except RegistryError:
                    raise
                except (KeyError, StoreError):  # a stale hint: one by one through the index
                    for _off, _n, c in items[i : j + 1]:
                        out[c] = self.get(c)
                else:
                    for off, n, c in items[i : j + 1]:
                        out[c] = data[off - start : off - start + n]
                i = j + 1
        return out

    def size(self, cid: bytes) -> int:
        with self._lock:
            loc = self._lookup(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc[2]

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if cid in self._pending or self._lookup(cid) is not None:
                return
            self._pending[cid] = (len(self._pack), len(blob))
            self._pack += blob
            full = len(self._pack) >= PACK_BYTES
        if full:
            self.flush()

    def flush(self) -> None:
        """Upload the pending chunks as one pack blob, then its segment
        artifact (the commit point for dedup: chunks are found through it);
        then merge segments if there are enough."""
        with self._lock:
            pending, pack = self._pending, bytes(self._pack)
            self._pending, self._pack = {}, bytearray()
        if pending:
            try:
                digest = self.client.put_blob(self.repo, pack)
                body = _SEG_HEAD.pack(b"CSRX", 1, bytes.fromhex(digest.split(":", 1)[1])) + b"".join(
                    _SEG.pack(cid, off, n) for cid, (off, n) in pending.items())
                idx = self.client.put_blob(self.index_repo, body)
                tag = self._put_index_artifact("x-", AT_CHUNK_INDEX, [_layer(idx, len(body))])
            except BaseException:
                with self._lock:  # keep them pending: a retry of flush sends them again
                    for cid, (off, n) in pending.items():
                        self._pending.setdefault(cid, (len(self._pack), n))
                        self._pack += pack[off : off + n]
                raise
            with self._lock:
                self._add_segment(tag, [(cid, digest, off, n) for cid, (off, n) in pending.items()])
        with self._lock:
            loose = [t for t in self._seg_tags if t not in self._covered]
        if len(loose) >= COMPACT_SEGMENTS:
            try:
                self.compact(full=False)
            except RegistryError as e:  # a merge is an optimisation: the segments stay valid
                log.warning("could not merge the registry index: %s", e)

    def _put_index_artifact(self, prefix: str, artifact_type: str, layers: list[dict[str, Any]]) -> str:
        """Tag a new index artifact ``prefix<random>``; its tag (its digest is kept for deletes)."""
        tag = prefix + secrets.token_hex(16)
        art = _artifact(artifact_type, layers, {})
        self.client.put_manifest(self.index_repo, tag, art)
        self._art_digest[tag] = "sha256:" + hashlib.sha256(art).hexdigest()
        return tag

    def compact(self, full: bool = True) -> None:
        """Merge the loaded segments (and, size-tiered, the small snapshots)
        into one snapshot; then delete what it covers where the registry allows."""
        with self._lock:
            if not self._loaded:
                self._load()
            loose = [t for t in self._seg_tags if t not in self._covered]
            total = sum(len(self._seg_tags[t]) for t in loose)
            taken: list[str] = []
            for t, n in sorted(self._snap_size.items(), key=lambda kv: kv[1]):
                if t in self._snaps and (full or (n <= 2 * total and total + n <= AUTO_MERGE_MAX)):
                    taken.append(t)
                    total += n
            if not loose and len(taken) <= 1:
                return
            records: list[bytes] = []
            for t in taken:
                records.extend(bytes(r) for r in self._snaps[t].records())
            for t in loose:
                records.extend(record(cid, bytes.fromhex(pack.split(":", 1)[1]), off, n)
                               for cid, pack, off, n in self._seg_tags[t])
        data = encode_midx(records, SNAP_MAGIC, 32)
        covered = sorted({*loose, *taken, *(c for t in taken for c in self._snap_covers.get(t, ()))})
        cov = json.dumps(covered).encode()
        d1 = self.client.put_blob(self.index_repo, data)
        d2 = self.client.put_blob(self.index_repo, cov)
        tag = self._put_index_artifact("s-", AT_INDEX_SNAPSHOT,
                                       [_layer(d1, len(data)), _layer(d2, len(cov), "application/json")])
        with self._lock:
            snap = SortedIndex.from_bytes(data, f"index snapshot {tag}", SNAP_MAGIC, 32)
            self._snaps[tag] = snap
            self._snap_size[tag] = snap.count
            self._snap_covers[tag] = covered
            self._covered |= set(covered)
            for t in taken:
                self._snaps.pop(t, None)
            for t in loose:
                for cid, _p, _o, _n in self._seg_tags[t]:
                    self._segs.pop(cid, None)
        for t in covered:  # best effort: a registry without deletes keeps them (they are skipped as covered)
            digest = self._art_digest.get(t)
            if digest is not None and not self.client.delete_manifest(self.index_repo, digest):
                break

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()
            self._pack = bytearray()

    def delete(self, cids: list[bytes]) -> None:
        if cids:
            raise StoreError("a registry store does not delete chunks: use the registry's garbage collection")

    def ids(self) -> Iterator[bytes]:
        return (c for c, _n in self.entries())

    def entries(self) -> Iterator[tuple[bytes, int]]:
        with self._lock:
            self._load()
            segs = [(c, n) for c, (_p, _o, n) in self._segs.items()]
            snaps = list(self._snaps.values())
        yield from segs
        for s in snaps:
            yield from s.entries()

    def usage(self) -> int:
        return sum(n for _c, n in self.entries())

    def pack_sizes(self, containers: set[bytes]) -> dict[bytes, int]:
        """The size of each pack blob (one HEAD each); StoreError naming one
        that is missing (so no image that relies on it is published)."""
        out = {}
        for c in containers:
            size = self.client.blob_size(self.repo, "sha256:" + c.hex())
            if size is None:
                raise RegistryError(f"pack blob sha256:{c.hex()} is missing from {self.url} (removed by the "
                                    f"registry's garbage collection?): run the push or pack again")
            out[c] = size
        return out


def _decode_segment(data: bytes, what: str) -> list[tuple[bytes, str, int, int]]:
    if len(data) < _SEG_HEAD.size or (len(data) - _SEG_HEAD.size) % _SEG.size:
        raise StoreError(f"{what}: truncated pack index")
    magic, version, pack = _SEG_HEAD.unpack_from(data)
    if magic != b"CSRX" or version != 1:
        raise StoreError(f"{what}: unknown pack index format")
    digest = "sha256:" + pack.hex()
    return [(cid, digest, off, n) for cid, off, n in _SEG.iter_unpack(data[_SEG_HEAD.size:])]


# object keys -> tag prefixes: a listing of one kind needs only the tag list
_KINDS = (("store.json", "s-"), ("refs/", "r-"), ("manifests/", "m-"), ("domains/", "d-"), ("layers/", "l-"), ("profiles/", "p-"))


class RegistryStore(ObjectStore):
    """convstore metadata objects in one registry repository (see the module docstring)."""

    supports_writes = True
    supports_deletes = True  # tags can be deleted (chunk space is the registry GC's)
    supports_locking = False

    def __init__(self, url: str, client: RegistryClient, repo: str):
        self.url, self.client, self.repo = url, client, repo
        self._keys: dict[str, str] = {}  # tag -> key
        self._listed: dict[str, bytes] = {}  # tag -> manifest body fetched by list(), for the get() that follows
        #: the repository's chunk store (image manifests reference its pack blobs)
        self.chunks: RegistryChunkStore | None = None
        self._memo_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RegistryStore({self.url})"

    @staticmethod
    def _tag(key: str) -> str:
        prefix = next((t for k, t in _KINDS if key.startswith(k)), "o-")
        return prefix + hashlib.sha256(key.encode()).hexdigest()[:40]

    def _manifest(self, tag: str, use_listed: bool = False) -> dict[str, Any] | None:
        body = None
        if use_listed:
            with self._memo_lock:
                body = self._listed.pop(tag, None)
        if body is None:
            got = self.client.get_manifest(self.repo, tag, [OCI_MANIFEST])
            if got is None:
                return None
            body = got[0]
        try:
            doc = json.loads(body)
        except ValueError:
            raise StoreError(f"registry object {tag} is not a convstore artifact") from None
        return doc if isinstance(doc, dict) else None

    def _value(self, key: str, m: dict[str, Any] | None) -> bytes:
        if m is None:
            raise KeyError(key)
        try:
            if (m.get("annotations") or {}).get("org.convstore.key") != key:
                raise StoreError(f"registry object for {key} is not what its tag claims")
            layer = m["layers"][0]
            digest = str(layer["digest"])
        except (AttributeError, KeyError, IndexError, TypeError):
            raise StoreError(f"registry object for {key} is not a convstore artifact") from None
        data = _inline(layer)
        return data if data is not None else self.client.get_blob(self.repo, digest, size=layer.get("size"),
                                                                  max_bytes=MAX_OBJECT)

    def has(self, key: str) -> bool:
        return self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST]) is not None

    def get(self, key: str) -> bytes:
        m = self._manifest(self._tag(key))
        if m is None and key == "store.json":
            self._refuse_layout_1()  # said even by a command that would not create the store
        return self._value(key, m)

    def _refuse_layout_1(self) -> None:
        if self.client.get_manifest(self.repo, "o-" + hashlib.sha256(b"store.json").hexdigest()[:40],
                                    [OCI_MANIFEST]) is not None:
            raise StoreFormatError(f"{self.url} holds a convstore store of registry layout 1 (before index "
                                   f"snapshots and location hints): push its images into a new repository")

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several objects, fetched in parallel (a listing's manifests are reused)."""
        def one(k: str) -> tuple[str, bytes | None]:
            try:
                return k, self._value(k, self._manifest(self._tag(k), use_listed=True))
            except (KeyError, ConvstoreError, ValueError):
                return k, None

        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            return {k: v for k, v in pool.map(one, keys) if v is not None}

    def size(self, key: str) -> int:
        return len(self.get(key))

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        if exclusive and self.has(key):
            return False
        if key == "store.json" and exclusive:
            self._refuse_layout_1()
        digest = self.client.put_blob(self.repo, data)
        kind = AT_MANIFEST if key.startswith("manifests/") else AT_IMAGE if key.startswith("refs/") else AT_OBJECT
        layers = [_layer(digest, len(data), data=data if len(data) <= INLINE_BYTES else None)]
        if refs and self.chunks is not None:  # the pack blobs an image uses: kept by the registry's gc
            sizes = self.chunks.pack_sizes(set(refs))
            layers += [_layer("sha256:" + c.hex(), n, MT_PACK) for c, n in sorted(sizes.items())]
        self.client.put_manifest(self.repo, self._tag(key), _artifact(kind, layers, {"org.convstore.key": key}))
        self._keys[self._tag(key)] = key
        return True

    def delete(self, key: str) -> None:
        got = self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST])
        if got is not None:
            self.client.delete_manifest(self.repo, got[2])

    def list(self, prefix: str) -> Iterator[str]:
        want = prefix.rstrip("/") + "/"
        tag_prefix = self._tag(want)[:2]
        tags = [t for t in self.client.tags(self.repo) if t.startswith(tag_prefix)]

        def key_of(t: str) -> tuple[str, str]:
            key = self._keys.get(t)
            if key is None:
                got = self.client.get_manifest(self.repo, t, [OCI_MANIFEST])
                if got is None:
                    return t, ""
                try:
                    doc = json.loads(got[0])
                    key = str((doc.get("annotations") or {}).get("org.convstore.key", ""))
                except (ValueError, AttributeError):
                    log.warning("skipping registry object %s: not a convstore artifact", t)
                    return t, ""
                with self._memo_lock:
                    self._listed[t] = got[0]
                self._keys[t] = key
            return t, key

        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            found = list(pool.map(key_of, tags))
        for _t, key in found:
            if key.startswith(want):
                yield key

    def lock(self, name: str, shared: bool = False) -> Any:
        raise StoreError("a registry store has no locks")

    def append_line(self, key: str, line: str) -> None:
        log.info("audit %s", line)  # a registry has no append; the local cache keeps the audit log
