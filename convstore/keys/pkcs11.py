"""Master key in a PKCS#11 token (an HSM; SoftHSM2 in tests), via python-pkcs11.

Spec (RFC 7512 style)::

    pkcs11:token=LABEL;object=KEYLABEL?module-path=/path/to/module.so&pin-source=env:VAR

``pin-source`` is ``env:VAR`` or ``file:PATH`` (``pin-value=`` works but puts
the PIN on the command line).  ``module-path`` defaults to
``$PKCS11_MODULE``.  The key is a non-extractable AES-256 key; wrapping is
AES-256-GCM inside the token with the encryption context as AAD, so the key
never leaves the token.  Wrapped form: ``b"CSP" | version | nonce 12 | ct+tag``.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidReference, KeyAccessDenied, KeyNotFound, KeyProviderUnavailable, StoreFormatError
from ..hardening import take_secret_env
from .base import KeyProvider, canonical_context

MAGIC = b"CSP"
VERSION = 1
# PKCS#11 login is per application, not per session: one logged-in session
# per (module, token) serves every provider object of this process.
_SESSIONS: dict[tuple[str, str], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def parse_spec(spec: str) -> dict[str, str]:
    body = spec.removeprefix("pkcs11:")
    path, _, query = body.partition("?")
    attrs = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    for part in filter(None, path.split(";")):
        k, sep, v = part.partition("=")
        if not sep:
            raise InvalidReference(f"bad pkcs11 spec part {part!r}")
        attrs[k] = urllib.parse.unquote(v)
    if "token" not in attrs or "object" not in attrs:
        raise InvalidReference("a pkcs11 spec needs token=LABEL;object=KEYLABEL")
    return attrs


def _pin(attrs: dict[str, str]) -> str | None:
    src = attrs.get("pin-source")
    if src:
        kind, _, arg = src.partition(":")
        if kind == "env":
            pin = take_secret_env(arg)  # gone from os.environ and /proc/PID/environ once read
            if pin is None:
                raise KeyProviderUnavailable(f"pkcs11 PIN variable {arg} is not set")
            return pin
        if kind == "file":
            with open(arg) as f:
                return f.read().strip()
        raise InvalidReference(f"pin-source must be env:VAR or file:PATH, not {src!r}")
    return attrs.get("pin-value")


class PKCS11Key(KeyProvider):
    scheme = "pkcs11"

    def __init__(self, spec: str):
        try:
            import pkcs11
        except ImportError:
            raise KeyProviderUnavailable("the pkcs11 provider needs python-pkcs11: pip install 'convstore[pkcs11]'") \
                from None
        self._p11 = pkcs11
        self._spec = spec
        attrs = parse_spec(spec)
        module = attrs.get("module-path") or os.environ.get("PKCS11_MODULE")
        if not module:
            raise InvalidReference("pkcs11 spec needs module-path= (or set PKCS11_MODULE)")
        try:
            lib = pkcs11.lib(module)
            self._token = lib.get_token(token_label=attrs["token"])
        except pkcs11.exceptions.NoSuchToken:
            raise KeyNotFound(f"no PKCS#11 token labelled {attrs['token']!r}") from None
        except (RuntimeError, OSError) as e:
            raise KeyProviderUnavailable(f"cannot load PKCS#11 module {module}: {e}") from None
        self._label = attrs["object"]
        self._lock = _SESSIONS_LOCK
        try:
            with _SESSIONS_LOCK:
                self._session = _SESSIONS.get((module, attrs["token"]))
                if self._session is None:
                    self._session = _SESSIONS[(module, attrs["token"])] = self._token.open(user_pin=_pin(attrs))
            self._key = self._session.get_key(key_type=pkcs11.KeyType.AES, label=self._label,
                                              object_class=pkcs11.ObjectClass.SECRET_KEY)
        except pkcs11.exceptions.NoSuchKey:
            # a private (CKA_PRIVATE) key is invisible to a session that has not logged in
            hint = "" if _pin(attrs) is not None else \
                " (no PIN was given, so only public objects are visible: add pin-source=env:VAR or file:PATH)"
            raise KeyNotFound(f"no AES key labelled {self._label!r} in token {attrs['token']!r}{hint}") from None
        except pkcs11.exceptions.PinIncorrect:
            raise KeyAccessDenied(f"PKCS#11 PIN for token {attrs['token']!r} is incorrect") from None
        except pkcs11.exceptions.PKCS11Error as e:
            raise KeyAccessDenied(f"PKCS#11 token {attrs['token']!r} refused: {type(e).__name__}") from None
        self._key_id = f"pkcs11:{self._token.serial.decode(errors='replace').strip()}/{self._label}"

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def spec(self) -> str:
        return self._spec

    def _gcm(self, nonce: bytes, aad: bytes) -> Any:
        return self._p11.GCMParams(nonce, aad, 128)

    def wrap(self, plaintext_key: bytes, context: Mapping[str, str]) -> bytes:
        if not hasattr(self._key, "encrypt"):  # CKA_ENCRYPT withdrawn by the token's administrator
            raise KeyAccessDenied(f"PKCS#11 key {self.key_id} denied wrapping (its use for encryption is revoked)")
        nonce = os.urandom(12)
        header = MAGIC + bytes((VERSION,)) + nonce
        try:
            with self._lock:
                ct = self._key.encrypt(plaintext_key, mechanism=self._p11.Mechanism.AES_GCM,
                                       mechanism_param=self._gcm(nonce, header + canonical_context(context)))
        except self._p11.exceptions.PKCS11Error as e:
            raise KeyAccessDenied(f"PKCS#11 key {self.key_id} denied wrapping ({type(e).__name__})") from None
        return header + ct

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if len(wrapped) < 16 + 16 or wrapped[:3] != MAGIC:
            raise KeyAccessDenied("wrapped key is not a PKCS#11 wrapped key")
        if wrapped[3] != VERSION:
            raise StoreFormatError(f"PKCS#11 wrapped key version {wrapped[3]} is not supported")
        header = wrapped[:16]
        if not hasattr(self._key, "decrypt"):  # CKA_DECRYPT withdrawn by the token's administrator
            raise KeyAccessDenied(f"PKCS#11 key {self.key_id} denied unwrapping (its use for decryption is revoked)")
        try:
            with self._lock:
                return bytes(self._key.decrypt(wrapped[16:], mechanism=self._p11.Mechanism.AES_GCM,
                                               mechanism_param=self._gcm(wrapped[4:16],
                                                                         header + canonical_context(context))))
        except self._p11.exceptions.GeneralError:  # SoftHSM's answer to a failed GCM tag
            raise KeyAccessDenied(f"key {self.key_id} cannot unwrap this key: wrong key, or the wrapped key was "
                                  f"moved from another image or store") from None
        except self._p11.exceptions.PKCS11Error as e:
            raise KeyAccessDenied(f"PKCS#11 key {self.key_id} denied unwrapping ({type(e).__name__})") from None
