"""The exception tree of convstore.

Every failure the library can report on purpose is a :class:`ConvstoreError`;
the CLI prints its message as one line and exits 1.  Messages never contain
key material.

::

    ConvstoreError
    ├── SourceError            the source image cannot be read
    │   ├── SourceNotFound     path, tag or blob missing
    │   ├── DigestMismatch     a blob or diff_id does not hash to its digest
    │   ├── CorruptLayer       truncated or malformed compression or tar
    │   ├── SourceChanged      a re-pack's source no longer serves what was packed
    │   └── UnsupportedMediaType
    ├── StoreError             the store cannot be used
    │   ├── ImageNotFound      no such name:tag in the catalog
    │   ├── ImagePending       being packed; not readable yet
    │   ├── ImageChanged       packed again (or removed) while a re-pack of it ran
    │   ├── ImageInactive      unused too long; a read starts its re-pack
    │   ├── ImageFailed        source gone or key denied
    │   ├── ChunkMissing       a chunk the manifest names is absent
    │   ├── CorruptObject      an object fails authentication or its hash
    │   │   └── TamperedObject a metadata object was edited, renamed, moved or forged
    │   ├── RollbackDetected   a tag or domain went back to a version older than this client saw
    │   ├── DomainConflict     a store already has another convergence domain of the same name
    │   ├── StoreBusy          a registry store's lease refuses (gc while a pack is in flight, or the reverse)
    │   │   └── LeaseUnreadable  a lease is listed but cannot be read: it counts as a live exclusive one
    │   └── StoreFormatError   unknown or future on-disk format version
    ├── KeyProviderError       key provider failures
    │   ├── KeyAccessDenied    the provider refuses (wrong key, revoked, moved wrapped key)
    │   ├── KeyNotFound        the master key does not exist
    │   │   └── KeyFileMissing a named key file does not exist (and is not created)
    │   ├── KeyProviderUnavailable  the provider cannot be reached or is not installed
    │   └── KeyFileError       the key file is unusable
    ├── PolicyError            the trust policy (containers-policy.json) cannot be used or refuses
    │   ├── PolicyInvalid      the policy file is missing, malformed, or names a requirement not supported
    │   └── PolicyDenied       the policy refuses the image (reject; no signature verifies)
    │       ├── SignatureRequired  a signature is required and none exists (or none was recorded)
    │       └── SignatureInvalid   a signature fails (bad signature, other digest or identity, malformed)
    ├── UnsafePathError        an entry would be written outside its target
    ├── ExposedMountpoint      a mount of decrypted files that other users could reach
    └── InvalidReference       a malformed NAME[:TAG], SOURCE, --store or --key string
                               (the CLI's usage error: exit status 2)
"""

from __future__ import annotations


class ConvstoreError(Exception):
    """Base class of every error convstore raises on purpose."""


class InvalidReference(ConvstoreError, ValueError):
    """A NAME[:TAG], SOURCE or store/key spec that cannot be parsed."""


class SourceError(ConvstoreError):
    """The source image cannot be read."""


class SourceNotFound(SourceError):
    """A source path, tag or blob does not exist."""


class DigestMismatch(SourceError):
    """A blob or an uncompressed layer does not hash to its recorded digest."""


class CorruptLayer(SourceError):
    """A layer's compression stream or tar stream is truncated or malformed."""


class SourceChanged(SourceError):
    """A re-pack (repair, reactivation) found that the recorded source now serves another image than
    the one packed (a moved tag), or cannot show it serves the same; the image goes FAILED, never
    to the new content."""


class UnsupportedMediaType(SourceError):
    """A manifest, config or layer media type convstore does not handle."""


class StoreError(ConvstoreError):
    """The store cannot carry out the request."""


class ImageNotFound(StoreError):
    """No image of that name and tag is in the catalog."""


class ImagePending(StoreError):
    """The image is being packed (PENDING) and cannot be used yet."""


class ImageChanged(StoreError):
    """A re-pack (repair, reactivation) found the name packed again, copied into or removed after it
    read the entry: it publishes nothing, and the name keeps what was put there last."""


class ImageInactive(StoreError):
    """The image is INACTIVE; the read that met it started its reactivation."""


class ImageFailed(StoreError):
    """The image is FAILED (source gone or key access denied)."""


class ChunkMissing(StoreError):
    """A chunk named by a manifest is not in the store."""


class CorruptObject(StoreError):
    """A stored object fails authentication, or decrypts to the wrong bytes."""


class TamperedObject(CorruptObject):
    """A metadata object (catalog entry, domain record, layer-index record)
    fails authentication under the store's metadata key: it was edited, or
    moved from another name, domain or store, or written without the key."""


class RollbackDetected(StoreError):
    """A catalog entry or domain record is older than one this client has
    already seen (a store writer put back an old version)."""


class DomainConflict(StoreError):
    """A copy would bring a convergence domain into a store that already has a
    *different* domain (another id, so another secret) of the same name: two
    domains never share a name in one store (images would silently stop
    deduplicating)."""


class StoreBusy(StoreError):
    """A store without locks (a registry) holds a live lease that excludes this
    operation: gc while a pack or copy into it is in flight, or a pack while gc
    runs.  Nothing was changed; run it again after the other one finished."""


class LeaseUnreadable(StoreBusy):
    """A lease is listed but cannot be read (the store failed): it may be a live
    holder's, so it excludes everyone (never taken for absent or forged)."""


class StoreFormatError(StoreError):
    """The store or an object in it has an unknown or newer format version."""


class KeyProviderError(ConvstoreError):
    """A key provider failed."""


class KeyAccessDenied(KeyProviderError):
    """The key provider refuses to unwrap: wrong key, revoked key, or a
    wrapped key moved to a context it was not made for."""


class KeyNotFound(KeyProviderError):
    """The master key named by the spec does not exist in the provider."""


class KeyProviderUnavailable(KeyProviderError):
    """The provider cannot be reached, or its optional dependency is missing."""


class KeyFileError(KeyProviderError):
    """The local key file is missing, malformed or has unsafe permissions."""


class PolicyError(ConvstoreError):
    """The trust policy cannot be used, or it refuses the image."""


class PolicyInvalid(PolicyError):
    """The policy file is missing, malformed, or uses a requirement convstore
    does not implement (e.g. ``signedBy``, ``sigstoreSigned`` with Fulcio):
    refused, never ignored."""


class PolicyDenied(PolicyError):
    """The policy refuses the image: a ``reject`` requirement, or no signature
    satisfies a ``sigstoreSigned`` requirement (wrong key, other digest,
    other identity, malformed signature)."""


class SignatureRequired(PolicyDenied):
    """A ``sigstoreSigned`` requirement applies and the image has no signature
    (at pack: none attached in the registry; at start: none recorded)."""


class SignatureInvalid(PolicyDenied):
    """A signature fails: malformed, a bad cryptographic signature, or a
    payload that names another manifest digest or identity."""


class KeyFileMissing(KeyFileError, KeyNotFound):
    """A key file named explicitly does not exist: only the default key file,
    a new store's key and a rekey target are created."""


class UnsafePathError(ConvstoreError):
    """A layer entry would be written outside the target directory."""


class ExposedMountpoint(ConvstoreError):
    """A FUSE mount made for every user (``allow_other``) whose mount point other users could reach:
    its parent directory is not this user's (or root's) alone."""
