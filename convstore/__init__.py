"""convstore: OCI images in a convergent-encrypted, deduplicated chunk store.

Quick start::

    import convstore
    store = convstore.Store.open()                 # default local store and key file
    store.pack("oci:/path/to/layout:latest", "myapp:1.0")
    store.unpack_oci("myapp:1.0", "oci:/tmp/out:1.0")
    store.unpack_rootfs("myapp:1.0", "/tmp/rootfs")
"""

from __future__ import annotations

from ._version import __version__

# not ``typing.TYPE_CHECKING``: importing typing costs every command 3 ms before it is handed to a daemon
TYPE_CHECKING = False

# Names are imported on first use (PEP 562): ``import convstore`` and the
# command line's start-up pay only for what they touch.
_EXPORTS = {
    "ChunkParams": "chunking", "KeyProvider": "keys", "LocalKeyFile": "keys", "open_key": "keys",
    "CatalogEntry": "core.catalog", "StoreOptions": "options",
    "ImageInfo": "store", "Store": "store", "StoreStats": "store", "default_store_path": "store",
    **{name: "errors" for name in (
        "ChunkMissing", "ConvstoreError", "CorruptLayer", "CorruptObject", "DigestMismatch", "ImageChanged", "ImageFailed",
        "ImageInactive", "ImageNotFound", "ImagePending", "InvalidReference", "KeyAccessDenied", "KeyFileError",
        "KeyProviderError", "RollbackDetected", "SourceChanged", "SourceError", "SourceNotFound", "StoreError", "StoreFormatError",
        "TamperedObject", "UnsafePathError", "UnsupportedMediaType", "PolicyError", "PolicyInvalid",
        "PolicyDenied", "SignatureRequired", "DomainConflict", "StoreBusy")},
    "Policy": "oci.policy", "load_policy": "oci.policy",
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'convstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from typing import Any

    from .core.catalog import CatalogEntry
    from .chunking import ChunkParams
    from .errors import (
        ChunkMissing,
        ConvstoreError,
        CorruptLayer,
        CorruptObject,
        DigestMismatch,
        DomainConflict,
        ImageChanged,
        ImageFailed,
        ImageInactive,
        ImageNotFound,
        ImagePending,
        InvalidReference,
        KeyAccessDenied,
        KeyFileError,
        KeyProviderError,
        PolicyDenied,
        PolicyError,
        PolicyInvalid,
        RollbackDetected,
        SignatureRequired,
        SourceChanged,
        SourceError,
        SourceNotFound,
        StoreBusy,
        StoreError,
        StoreFormatError,
        TamperedObject,
        UnsafePathError,
        UnsupportedMediaType,
    )
    from .keys import KeyProvider, LocalKeyFile, open_key
    from .oci.policy import Policy, load_policy
    from .options import StoreOptions
    from .store import ImageInfo, Store, StoreStats, default_store_path


__all__ = [
    "__version__", "Store", "StoreOptions", "StoreStats", "ImageInfo", "CatalogEntry", "ChunkParams", "KeyProvider", "LocalKeyFile",
    "open_key", "default_store_path", "TamperedObject", "RollbackDetected",
    "ConvstoreError", "SourceError", "SourceNotFound", "SourceChanged", "DigestMismatch", "CorruptLayer",
    "UnsupportedMediaType", "StoreError", "ImageNotFound", "ImagePending", "ImageChanged", "ImageInactive", "ImageFailed", "ChunkMissing", "CorruptObject", "StoreFormatError", "KeyProviderError",
    "KeyAccessDenied", "KeyFileError", "UnsafePathError", "InvalidReference",
    "PolicyError", "PolicyInvalid", "PolicyDenied", "SignatureRequired", "Policy", "load_policy",
    "DomainConflict", "StoreBusy",
]
