"""Master key providers, selected by a ``--key`` spec."""

from __future__ import annotations

import os

import platformdirs

from ..errors import InvalidReference
from .base import KeyProvider, canonical_context
from .local import LocalKeyFile


def default_key_spec() -> str:
    """``$CONVSTORE_KEY``, else a key file in the user's config directory."""
    env = os.environ.get("CONVSTORE_KEY")
    if env:
        return env
    return "file:" + os.path.join(platformdirs.user_config_dir("convstore"), "master.key")


def open_key(spec: str | None = None) -> KeyProvider:
    """Open the provider named by ``spec`` (``file:PATH``)."""
    spec = spec or default_key_spec()
    scheme, sep, arg = spec.partition(":")
    if scheme == "file" and sep and arg:
        return LocalKeyFile(os.path.expanduser(arg))
    raise InvalidReference(f"unknown key spec {spec!r} (expected file:PATH)")


__all__ = ["KeyProvider", "LocalKeyFile", "open_key", "default_key_spec", "canonical_context"]
