"""The registry client's protocol and fault handling over an injected
transport: a scripted registry (a requests adapter) that fails, lies and
oversends on cue, so each rule is met without a registry process.  The real
registry's integration tests stay in test_registry.py and test_pins.py."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests.adapters
import requests.structures

from convstore.errors import DigestMismatch
from convstore.oci import registry_client
from convstore.oci.registry_client import (RegistryClient, RegistryCorrupt, RegistryError,
                                           RegistryResponseTooLarge)

HOST = "registry.test:5000"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Answer = tuple[int, dict[str, str], bytes]


class Body(io.BytesIO):
    """An answer's body as the network hands it over (read as the client asks)."""

    sent = 0  # bytes the client read

    def read(self, n: int | None = -1, decode_content: bool | None = None) -> bytes:
        data = super().read(n)
        self.sent += len(data)
        return data


class ScriptedRegistry(requests.adapters.BaseAdapter):
    """A transport that answers each request with ``handler(method, path,
    headers)``: an (HTTP status, headers, body) triple, or an exception to
    raise as the network would.  Every request is recorded in ``seen``."""

    def __init__(self, handler: Callable[[str, str, dict[str, str]], Answer | Exception]):
        super().__init__()
        self.handler = handler
        self.seen: list[tuple[str, str]] = []
        self.last = Body(b"")

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        method, path = request.method or "", urllib.parse.urlsplit(request.url or "").path
        self.seen.append((method, path))
        got = self.handler(method, path, dict(request.headers))
        if isinstance(got, Exception):
            raise got
        status, headers, body = got
        r = requests.Response()
        r.status_code, r.reason, r.url, r.request = status, "scripted", request.url or "", request
        r.headers = requests.structures.CaseInsensitiveDict(headers)
        r.raw = self.last = Body(body)
        return r

    def close(self) -> None:
        pass


def client(handler: Callable[[str, str, dict[str, str]], Answer | Exception], **kw: Any) -> tuple[
        RegistryClient, ScriptedRegistry]:
    transport = ScriptedRegistry(handler)
    return RegistryClient(HOST, insecure=True, transport=transport, **kw), transport


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the backoff's sleeps (the policy counts attempts, not time)."""
    monkeypatch.setattr(registry_client.time, "sleep", lambda _s: None)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BODY = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": []}).encode()


def test_5xx_and_dropped_connections_are_retried_then_succeed():
    answers: list[Answer | Exception] = [(503, {}, b"busy"), requests.ConnectionError("reset"),
                                         (429, {}, b"slow down"), (200, {"Content-Type": MANIFEST}, BODY)]
    c, t = client(lambda m, p, h: answers.pop(0))
    body, ctype, dg = c.get_manifest("app", "v1", [MANIFEST]) or (b"", "", "")
    assert (body, ctype, dg) == (BODY, MANIFEST, digest(BODY))
    assert t.seen == [("GET", "/v2/app/manifests/v1")] * 4


def test_retries_are_bounded_and_the_error_names_the_registry():
    c, t = client(lambda m, p, h: (500, {}, b"down"))
    with pytest.raises(RegistryError, match=f"registry {HOST} failed: HTTP 500 for GET"):
        c.get_manifest("app", "v1", [MANIFEST])
    assert len(t.seen) == registry_client.RETRIES
    c, t = client(lambda m, p, h: requests.ConnectionError("refused"))
    with pytest.raises(RegistryError, match=f"cannot reach the registry at {HOST}"):
        c.blob_exists("app", digest(b"x"))
    assert len(t.seen) == registry_client.RETRIES
    c, t = client(lambda m, p, h: requests.ReadTimeout("stalled"), timeout=2.0)
    with pytest.raises(RegistryError, match="did not answer within 2 s"):
        c.tags("app")
    assert len(t.seen) == registry_client.RETRIES


def test_a_declared_oversize_answer_is_refused_unread_and_not_retried():
    big = b"{" + b" " * (4 << 20) + b"}"
    c, t = client(lambda m, p, h: (200, {"Content-Type": MANIFEST, "Content-Length": str(len(big))}, big))
    with pytest.raises(RegistryResponseTooLarge, match=f"registry {HOST} sent a manifest larger than 4 MiB"):
        c.get_manifest("app", "v1", [MANIFEST])
    assert len(t.seen) == 1 and t.last.sent == 0  # not a byte of it read


def test_an_undeclared_oversend_is_cut_at_the_cap():
    """A ranged read asked for 100 bytes; the registry streams more, with no length."""
    def handler(m: str, p: str, h: dict[str, str]) -> Answer:
        assert h["Range"] == "bytes=0-99"
        return 206, {}, b"x" * 100_000
    c, t = client(handler)
    with pytest.raises(RegistryResponseTooLarge, match="a blob range larger than 100 bytes"):
        c.get_blob("app", digest(b"pack"), 0, 100)
    assert len(t.seen) == 1 and t.last.sent <= 1 << 16  # one read past the cap, not the rest
    c, _t = client(lambda m, p, h: (200, {}, b"y" * 5000))
    with pytest.raises(RegistryResponseTooLarge, match="larger than 4096 bytes"):
        c.get_blob("app", digest(b"cfg"), size=4096)


def test_a_blob_that_does_not_match_its_digest_is_corrupt():
    good, evil = b'{"config": 1}', b'{"config": 2}'
    c, _t = client(lambda m, p, h: (200, {}, evil))
    with pytest.raises(RegistryCorrupt, match=f"blob {digest(good)} from {HOST}"):
        c.get_blob("app", digest(good))
    c, _t = client(lambda m, p, h: (200, {}, good))
    assert c.get_blob("app", digest(good)) == good
    with pytest.raises(RegistryCorrupt):  # right bytes, but not the size the descriptor promised
        c.get_blob("app", digest(good), size=len(good) + 1)


def test_a_manifest_fetched_by_digest_must_hash_to_it():
    other = BODY.replace(b"[]", b"[ ]")
    c, _t = client(lambda m, p, h: (200, {"Content-Type": MANIFEST}, other))
    with pytest.raises(DigestMismatch, match=f"registry {HOST} sent another manifest"):
        c.get_manifest("app", digest(BODY), [MANIFEST])
    with pytest.raises(DigestMismatch):  # a tag with a promised digest (an index entry's)
        c.get_manifest("app", "v1", [MANIFEST], expect_digest=digest(BODY))


def test_404_is_absence_not_an_error():
    c, t = client(lambda m, p, h: (404, {}, b'{"errors": []}'))
    assert c.get_manifest("app", "v1", [MANIFEST]) is None
    assert c.blob_size("app", digest(b"x")) is None
    assert c.blob_exists("app", digest(b"x")) is False
    assert c.tags("app") == []
    with pytest.raises(KeyError):
        c.get_blob("app", digest(b"x"))
    with pytest.raises(KeyError):
        c.get_blob("app", digest(b"x"), 0, 100)
    assert len(t.seen) == 6  # each once: absence is final


def test_a_small_range_of_a_missing_blob_is_absence_whatever_the_error_body():
    """The registry's 404 body (its JSON error) is longer than a small range: still absence (the
    reader then falls back to the index), not an answer larger than the range."""
    body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry",
                                   "detail": "sha256:" + "0" * 64}]}).encode()
    c, _t = client(lambda m, p, h: (404, {"Content-Length": str(len(body))}, body))
    with pytest.raises(KeyError):
        c.get_blob("app", digest(b"x"), 0, 41)
    big = b"x" * (registry_client.MAX_OTHER + 1)  # an error body is still bounded
    c, _t = client(lambda m, p, h: (404, {}, big))
    with pytest.raises(RegistryResponseTooLarge):
        c.get_blob("app", digest(b"x"), 0, 41)


def test_401_and_403_are_refusals_not_retried():
    c, t = client(lambda m, p, h: (401, {}, b"who are you"))
    with pytest.raises(RegistryError, match=f"registry {HOST} requires credentials"):
        c.get_manifest("app", "v1", [MANIFEST])
    assert len(t.seen) == 1
    c, t = client(lambda m, p, h: (403, {}, b"no"), username="u", password="wrong")
    with pytest.raises(RegistryError, match=rf"registry {HOST} refused the credentials \(HTTP 403\)"):
        c.put_blob("app", b"data")
    assert [m for m, _p in t.seen] == ["HEAD"] * 3  # oras-py's own re-authentication, then no retry loop


def test_other_4xx_is_a_refusal_with_the_start_of_its_body():
    c, t = client(lambda m, p, h: (400, {}, b"DIGEST_INVALID " + b"x" * 10_000))
    with pytest.raises(RegistryError, match=r"refused GET app/manifests/v1: HTTP 400 DIGEST_INVALID x+$") as e:
        c.get_manifest("app", "v1", [MANIFEST])
    assert len(str(e.value)) < 400 and len(t.seen) == 1


def test_upload_skips_a_blob_that_is_there_and_sends_one_that_is_not():
    store: dict[str, bytes] = {}

    def handler(m: str, p: str, h: dict[str, str]) -> Answer:
        if m == "HEAD":
            d = p.rsplit("/", 1)[1]
            return (200, {"Content-Length": str(len(store[d]))}, b"") if d in store else (404, {}, b"")
        if m == "POST":
            return 202, {"Location": "/v2/app/blobs/uploads/u1"}, b""
        if m == "PUT":
            return 201, {}, b""
        return 405, {}, b""

    c, t = client(handler)
    d = c.put_blob("app", b"payload")
    assert d == digest(b"payload")
    assert [s[0] for s in t.seen] == ["HEAD", "POST", "PUT"]
    store[d] = b"payload"
    t.seen.clear()
    assert c.put_blob("app", b"payload") == d and [s[0] for s in t.seen] == ["HEAD"]
    assert c.blob_size("app", d) == len(b"payload")


def test_jsonschema_is_imported_only_once_something_validates():
    """oras-py imports jsonschema (~0.1 CPU s of a cold start) to validate what it pushes; convstore's client
    never asks it to: a client is made without it, and a validation still gets the real module."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from convstore.oci.registry_client import RegistryClient\n"
            "RegistryClient('127.0.0.1:1', insecure=True)\n"
            "print('jsonschema.validators' in sys.modules)\n"
            "import oras.provider, jsonschema\n"
            "try:\n"
            "    oras.provider.jsonschema.validate(1, {'type': 'object'})\n"
            "except jsonschema.ValidationError:\n"
            "    print('refused')\n"
            "print('jsonschema.validators' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["False", "refused", "True"], p.stdout + p.stderr
