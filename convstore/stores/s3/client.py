"""The S3 calls an ``s3://BUCKET/PREFIX`` store makes, over boto3, with
AWS's own errors turned into convstore's (:class:`~convstore.errors.S3Error`
and its kinds).

Endpoint, region and credentials come the way the AWS tools take them
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and the
shared config files, ``AWS_REGION``/``AWS_DEFAULT_REGION``), plus an
endpoint (``--s3-endpoint`` / ``$CONVSTORE_S3_ENDPOINT``) for an object
store other than AWS's.  Nothing here logs or keeps a secret: the client's
``repr`` names the bucket, prefix and endpoint only.
"""

from __future__ import annotations

import email.utils
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import S3AccessDenied, S3Error, S3NoSuchBucket, S3Unreachable
from ...options import parse_s3_url

ENDPOINT_ENV = "CONVSTORE_S3_ENDPOINT"
#: ranged GETs one :meth:`S3Client.get_ranges` call sends at once (S3 has no multi-range GET: the spans a
#: registry gets in one request come as parallel GETs; a node's reads share the client's 32 connections)
RANGE_PARALLEL = 8
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "AccountProblem", "403"}
_ABSENT = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


_loaders: dict[str, Any] = {}  # botocore data path -> the process's botocore data loader for it
_loaders_lock = threading.Lock()


def _session() -> Any:
    """A boto3 session of its own -- endpoint, region, credentials, profile: read from this process's
    environment when a client first needs them, never shared -- over the process's one botocore data
    loader, which holds the S3 API's model (no credential) parsed once: a second client (a site
    tier's, the origin's) then costs ~0.01 CPU s to make instead of ~0.08."""
    try:
        import boto3
        import botocore.loaders
        import botocore.session
    except ImportError:
        raise S3Error("an s3:// store needs boto3: pip install 'convstore[aws]'") from None
    core = botocore.session.get_session()
    path = str(core.get_config_variable("data_path") or "")
    with _loaders_lock:
        loader = _loaders.get(path)
        if loader is None:
            loader = _loaders[path] = botocore.loaders.create_loader(path or None)
    core.register_component("data_loader", loader)
    session = boto3.session.Session(botocore_session=core)
    with _loaders_lock:  # each boto3 session adds its own data folder to the loader's: once is enough
        paths = loader.search_paths
        paths[:] = [p for i, p in enumerate(paths) if p not in paths[:i]]
    return session


def warm_up() -> None:
    """Parse the S3 API's model into the process's loader now (a daemon, before it forks its
    commands), if boto3 is installed: a client made with no credential and no network."""
    try:
        _session().client("s3", region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-")
    except S3Error:  # no boto3 (the aws extra): nothing to warm
        pass


class S3Client:
    """One bucket and key prefix: get (whole or a byte range), put (optionally
    only if absent: ``If-None-Match: *``), head, list, delete."""

    def __init__(self, url: str, endpoint: str | None = None, timeout: float = 60.0, *,
                 session: Any = None, attempts: int = 4) -> None:
        try:
            import boto3  # noqa: F401  (the aws extra: installed or a named error here)
            import botocore.exceptions
            from botocore.config import Config
        except ImportError:
            raise S3Error("an s3:// store needs boto3: pip install 'convstore[aws]'") from None
        self._errors = botocore.exceptions
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        where = self.endpoint or "AWS S3"
        self.where = f"{self.bucket} at {where}"
        kw: dict[str, Any] = dict(connect_timeout=min(timeout, 10.0), read_timeout=timeout,
                                  retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=32,
                                  s3={"addressing_style": "path"} if self.endpoint else {})
        try:  # no CRC trailers an S3-compatible store may not know (botocore >= 1.36 sends them by default)
            config = Config(request_checksum_calculation="when_required",
                            response_checksum_validation="when_required", **kw)
        except TypeError:
            config = Config(**kw)
        try:
            session = session or _session()
        except Exception as e:  # a named AWS_PROFILE that does not exist
            raise S3AccessDenied(f"AWS configuration: {type(e).__name__}: {e}") from None
        #: the boto3 client (tests count its requests with its event hooks)
        self.s3 = session.client("s3", endpoint_url=self.endpoint, config=config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Client({self.url} at {self.endpoint or 'AWS'})"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # -- error mapping ----------------------------------------------------
    def _fail(self, e: BaseException, what: str) -> S3Error:
        x = self._errors
        if isinstance(e, (x.NoCredentialsError, x.PartialCredentialsError)):
            return S3AccessDenied(f"no AWS credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and "
                                  f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(e, (x.EndpointConnectionError, x.ConnectionError, x.ReadTimeoutError)):
            return S3Unreachable(f"cannot reach the S3 endpoint {self.endpoint or 'of AWS'} (bucket {self.bucket})")
        if isinstance(e, x.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return S3NoSuchBucket(f"no bucket {self.bucket} at {self.endpoint or 'AWS S3'}")
            if code in _DENIED:
                return S3AccessDenied(f"access denied to s3://{self.bucket}/{self.prefix} ({code}) while {what}")
            return S3Error(f"S3 {what} failed on {self.where}: {code or 'error'}")
        return S3Error(f"S3 {what} failed on {self.where}: {type(e).__name__}")

    @staticmethod
    def _code(e: BaseException) -> str:
        resp = getattr(e, "response", None)
        if not isinstance(resp, dict):
            return ""
        code = str(resp.get("Error", {}).get("Code", ""))
        status = str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code if code not in ("", "None") else status

    # -- the calls -----------------------------------------------------------
    def get(self, name: str, start: int | None = None, end: int | None = None, max_bytes: int = 1 << 31) -> bytes:
        """An object's bytes (``[start, end)`` of it with a range); KeyError if absent."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name)}
        if start is not None and end is not None:
            kw["Range"] = f"bytes={start}-{end - 1}"
        try:
            r = self.s3.get_object(**kw)
            size = int(r.get("ContentLength") or 0)
            if size > max_bytes:
                r["Body"].close()
                raise S3Error(f"S3 object {name} is {size} bytes, more than {max_bytes} read for it")
            return bytes(r["Body"].read())
        except S3Error:
            raise
        except Exception as e:
            code = self._code(e)
            if code in _ABSENT:
                raise KeyError(name) from None
            if code in ("InvalidRange", "416"):
                raise KeyError(name) from None  # the object is shorter than the range: a stale hint
            raise self._fail(e, f"GET {name}") from None

    def get_ranges(self, spans: list[tuple[str, int, int]]) -> list[bytes | KeyError]:
        """``[start, end)`` of each object named in ``spans``, as :meth:`get` reads one, up to
        RANGE_PARALLEL GETs at once; a span of an absent object (or past its end) is a KeyError in its
        place, any other failure raises."""
        def one(span: tuple[str, int, int]) -> bytes | KeyError:
            try:
                return self.get(*span)
            except KeyError as e:
                return e

        if len(spans) <= 1:
            return [one(x) for x in spans]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(RANGE_PARALLEL, thread_name_prefix="convstore-s3-range")
            pool = self._pool
        return list(pool.map(one, spans))

    def put(self, name: str, data: bytes, *, if_absent: bool = False) -> str:
        """Store an object (atomically: S3 shows the old one or the new one); its ETag.
        With ``if_absent``, only if no object has that name (``If-None-Match: *``):
        "" (false) if one had."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name), "Body": data}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        try:
            return str(self.s3.put_object(**kw).get("ETag") or "-")
        except Exception as e:
            if if_absent and self._code(e) in _PRECONDITION:
                return ""
            raise self._fail(e, f"PUT {name}") from None

    def head(self, name: str) -> tuple[int, float, float, str] | None:
        """(size, last modified, the server's time now, ETag), both times in the
        server's clock (epoch seconds); None if absent."""
        try:
            r = self.s3.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:
            if self._code(e) in _ABSENT:
                return None
            raise self._fail(e, f"HEAD {name}") from None
        return int(r["ContentLength"]), r["LastModified"].timestamp(), self._server_time(r), str(r.get("ETag") or "")

    @staticmethod
    def _server_time(r: dict[str, Any]) -> float:
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            try:
                return email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                pass
        import time

        return time.time()

    def list_with_time(self, prefix: str) -> tuple[list[tuple[str, int, float]], float]:
        """The listing of ``prefix`` and the server's time at its first page."""
        full = self.key(prefix)
        cut = len(self.key(""))
        out: list[tuple[str, int, float]] = []
        now = None
        try:
            token: str | None = None
            while True:
                kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
                if token:
                    kw["ContinuationToken"] = token
                r = self.s3.list_objects_v2(**kw)
                now = now if now is not None else self._server_time(r)
                out += [(str(o["Key"])[cut:], int(o["Size"]), o["LastModified"].timestamp())
                        for o in r.get("Contents", ())]
                token = r.get("NextContinuationToken")
                if not r.get("IsTruncated") or not token:
                    break
        except Exception as e:
            raise self._fail(e, f"LIST {prefix}") from None
        return out, now

    def delete(self, names: list[str]) -> None:
        """Delete objects (absent ones are no error)."""
        for i in range(0, len(names), 1000):
            batch = names[i : i + 1000]
            try:
                if len(batch) == 1:
                    self.s3.delete_object(Bucket=self.bucket, Key=self.key(batch[0]))
                    continue
                r = self.s3.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self.key(n)} for n in batch], "Quiet": True})
            except Exception as e:
                raise self._fail(e, f"DELETE {batch[0]}") from None
            errors = [x for x in r.get("Errors", ()) if x.get("Code") not in _ABSENT]
            if errors:
                raise S3Error(f"S3 DELETE {errors[0].get('Key')} failed on {self.where}: {errors[0].get('Code')}")
