"""Master key providers, selected by a ``--key`` spec."""

from __future__ import annotations

import os

import platformdirs

from ..errors import InvalidReference
from ..hardening import protect_process
from .base import KeyProvider, canonical_context
from .local import LocalKeyFile


KEY_FORMS = "file:PATH, pkcs11:token=T;object=K?module-path=..., or awskms:KEY"


def default_key_path() -> str:
    """The default key file: ``master.key`` in the user's config directory."""
    return os.path.join(platformdirs.user_config_dir("convstore"), "master.key")


def default_key_spec() -> str:
    """``$CONVSTORE_KEY``, else a key file in the user's config directory."""
    env = os.environ.get("CONVSTORE_KEY")
    if env:
        return env
    return "file:" + default_key_path()


def open_key(spec: str | None = None, *, kms_endpoint: str | None = None, create_file: bool = False) -> KeyProvider:
    """Open the provider named by ``spec``: ``file:PATH``,
    ``pkcs11:token=..;object=..?module-path=..&pin-source=..`` or ``awskms:KEY``.
    A missing key file is created only at the default path, or when
    ``create_file`` (a new store's key, a rekey target); any other named key
    file must exist (:class:`KeyFileMissing`)."""
    spec = spec or default_key_spec()
    protect_process()  # key material is loaded from here on: no core dump, no same-user ptrace
    scheme, sep, arg = spec.partition(":")
    # never echo the spec itself: it may carry a PIN
    if not sep or not arg:
        raise InvalidReference(f"bad key spec (expected {KEY_FORMS})")
    if scheme == "file":
        path = os.path.abspath(os.path.expanduser(arg))
        return LocalKeyFile(path, create=create_file or path == os.path.abspath(default_key_path()))
    if scheme == "pkcs11":
        from .pkcs11 import PKCS11Key

        return PKCS11Key(spec)
    if scheme == "awskms":
        from .awskms import AWSKMSKey

        return AWSKMSKey(arg, endpoint=kms_endpoint)
    raise InvalidReference(f"unknown key spec scheme {scheme[:20]!r} (expected {KEY_FORMS})")


__all__ = ["KeyProvider", "LocalKeyFile", "open_key", "default_key_path", "default_key_spec", "canonical_context",
           "KEY_FORMS"]
