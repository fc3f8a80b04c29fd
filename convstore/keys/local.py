"""The embedded default master key: a 32-byte AES key in a local file.

The file is created on first use with mode 0600 in a 0700 directory, and is
refused if anyone but its owner can read it.  Format (versioned JSON)::

    {"format": "convstore-keyfile", "version": 1, "key": "<base64 32 bytes>"}
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Mapping

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import KeyAccessDenied, KeyFileError, KeyFileMissing, StoreFormatError
from .base import KeyProvider, canonical_context

WRAP_MAGIC = b"CSW"
WRAP_VERSION = 1
KEYFILE_FORMAT = "convstore-keyfile"
KEYFILE_VERSION = 1


class LocalKeyFile(KeyProvider):
    """AES-256-GCM key wrapping under a key read from ``path``."""

    scheme = "file"

    def __init__(self, path: str, *, create: bool = True):
        self.path = os.path.abspath(path)
        #: whether this process created the key file (the CLI says so)
        self.created = False
        self._key = self._load(create)
        self._key_id = "file:" + blake3(self._key, derive_key_context="convstore v1 key id").hexdigest()[:24]

    @property
    def spec(self) -> str:
        return f"file:{self.path}"

    @property
    def key_id(self) -> str:
        return self._key_id

    def _check_folder(self) -> None:
        """The key's folder must be private too: one that others can write lets
        them swap the key file, one they can read or search exposes its names."""
        d = os.path.dirname(self.path)
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return
        if st.st_mode & 0o077:
            raise KeyFileError(f"key folder {d} is open to other users (mode {st.st_mode & 0o777:o}); "
                               f"run chmod 700 on it")
        if st.st_uid not in (os.getuid(), 0):
            raise KeyFileError(f"key folder {d} belongs to another user (uid {st.st_uid})")

    def _load(self, create: bool) -> bytes:
        self._check_folder()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise KeyFileMissing(f"key file {self.path} does not exist (a key named with --key or "
                                     f"$CONVSTORE_KEY must exist; only a new store's key is created)") from None
            return self._create()
        except OSError as e:
            raise KeyFileError(f"key file {self.path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {self.path} is not a regular file")
            if st.st_mode & 0o077:
                raise KeyFileError(f"key file {self.path} is open to other users (mode {st.st_mode & 0o777:o}); "
                                   f"run chmod 600 on it")
            if st.st_uid not in (os.getuid(), 0):
                raise KeyFileError(f"key file {self.path} belongs to another user (uid {st.st_uid})")
            raw = f.read(4096)
        try:
            doc = json.loads(raw)
            if doc.get("format") != KEYFILE_FORMAT:
                raise ValueError
            if doc.get("version") != KEYFILE_VERSION:
                raise StoreFormatError(f"key file {self.path}: version {doc.get('version')} is not supported")
            key = base64.b64decode(doc["key"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyFileError(f"key file {self.path} is not a convstore key file") from None
        if len(key) != 32:
            raise KeyFileError(f"key file {self.path} does not hold a 32-byte key")
        return key

    def _create(self) -> bytes:
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        self._check_folder()
        key = os.urandom(32)
        doc = json.dumps({"format": KEYFILE_FORMAT, "version": KEYFILE_VERSION,
                          "key": base64.b64encode(key).decode()}).encode() + b"\n"
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, doc)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)  # fails if another process created it first
        except FileExistsError:
            os.unlink(tmp)
            return self._load(create=False)
        os.unlink(tmp)
        self.created = True
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return key

    def wrap(self, plaintext_key: bytes, context: Mapping[str, str]) -> bytes:
        if len(plaintext_key) > 64:
            raise ValueError("wrap() is for keys of at most 64 bytes")
        nonce = os.urandom(12)
        header = WRAP_MAGIC + bytes((WRAP_VERSION,)) + nonce
        return header + AESGCM(self._key).encrypt(nonce, plaintext_key, header + canonical_context(context))

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if len(wrapped) < 16 + 16 or wrapped[:3] != WRAP_MAGIC:
            raise KeyAccessDenied("wrapped key is malformed")
        if wrapped[3] != WRAP_VERSION:
            raise StoreFormatError(f"wrapped key version {wrapped[3]} is not supported")
        header = wrapped[:16]
        try:
            return AESGCM(self._key).decrypt(wrapped[4:16], wrapped[16:], header + canonical_context(context))
        except InvalidTag:
            raise KeyAccessDenied(f"key {self.key_id} cannot unwrap this key: wrong master key, "
                                  f"or the wrapped key was moved from another image or store") from None
