"""convstore: OCI images in a convergent-encrypted, deduplicated chunk store.

Quick start::

    import convstore
    store = convstore.Store.open()                 # default local store and key file
    store.pack("oci:/path/to/layout:latest", "myapp:1.0")
    store.unpack_oci("myapp:1.0", "oci:/tmp/out:1.0")
    store.unpack_rootfs("myapp:1.0", "/tmp/rootfs")
"""

from __future__ import annotations

from .chunking import ChunkParams
from .errors import (
    ChunkMissing,
    ConvstoreError,
    CorruptLayer,
    CorruptObject,
    DigestMismatch,
    ImageFailed,
    ImageInactive,
    ImageNotFound,
    ImagePending,
    InvalidReference,
    KeyAccessDenied,
    KeyFileError,
    KeyProviderError,
    RollbackDetected,
    SourceError,
    SourceNotFound,
    StoreError,
    StoreFormatError,
    TamperedObject,
    UnsafePathError,
    UnsupportedMediaType,
)
from .keys import KeyProvider, LocalKeyFile, open_key
from .catalog import CatalogEntry
from .options import StoreOptions
from .store import ImageInfo, Store, StoreStats, default_store_path

__version__ = "0.1.0"

__all__ = [
    "Store", "StoreOptions", "StoreStats", "ImageInfo", "CatalogEntry", "ChunkParams", "KeyProvider", "LocalKeyFile",
    "open_key", "default_store_path", "TamperedObject", "RollbackDetected",
    "ConvstoreError", "SourceError", "SourceNotFound", "DigestMismatch", "CorruptLayer", "UnsupportedMediaType",
    "StoreError", "ImageNotFound", "ImagePending", "ImageInactive", "ImageFailed", "ChunkMissing", "CorruptObject", "StoreFormatError", "KeyProviderError",
    "KeyAccessDenied", "KeyFileError", "UnsafePathError", "InvalidReference",
]
