"""Master key providers, selected by a ``--key`` spec."""

from __future__ import annotations

import os

import platformdirs

from ..errors import InvalidReference
from ..hardening import protect_process
from .base import KeyProvider, canonical_context
from .local import LocalKeyFile


def default_key_spec() -> str:
    """``$CONVSTORE_KEY``, else a key file in the user's config directory."""
    env = os.environ.get("CONVSTORE_KEY")
    if env:
        return env
    return "file:" + os.path.join(platformdirs.user_config_dir("convstore"), "master.key")


def open_key(spec: str | None = None, *, kms_endpoint: str | None = None) -> KeyProvider:
    """Open the provider named by ``spec``: ``file:PATH``,
    ``pkcs11:token=..;object=..?module-path=..&pin-source=..`` or ``awskms:KEY``."""
    spec = spec or default_key_spec()
    protect_process()  # key material is loaded from here on: no core dump, no same-user ptrace
    scheme, sep, arg = spec.partition(":")
    # never echo the spec itself: it may carry a PIN
    if not sep or not arg:
        raise InvalidReference("bad key spec (expected file:PATH, pkcs11:..., or awskms:KEY)")
    if scheme == "file":
        return LocalKeyFile(os.path.expanduser(arg))
    if scheme == "pkcs11":
        from .pkcs11 import PKCS11Key

        return PKCS11Key(spec)
    if scheme == "awskms":
        from .awskms import AWSKMSKey

        return AWSKMSKey(arg, endpoint=kms_endpoint)
    raise InvalidReference(f"unknown key spec scheme {scheme[:20]!r} (file:PATH, pkcs11:..., or awskms:KEY)")


__all__ = ["KeyProvider", "LocalKeyFile", "open_key", "default_key_spec", "canonical_context"]
