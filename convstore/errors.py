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
    │   ├── FuseSessionError   a held FUSE session cannot be taken over (other image, holder refuses)
    │   ├── KernelFuseError    the low-level FUSE server cannot mount (mount(2) refused)
    │   ├── ErofsUnsupported   an image tree EROFS cannot hold (an xattr namespace, a name too long)
    │   ├── StoreFormatError   unknown or future on-disk format version
    │   ├── S3Error            an S3 store's object store refused or failed
    │   │   ├── S3NoSuchBucket the bucket does not exist
    │   │   ├── S3AccessDenied no credentials, or they are refused
    │   │   └── S3Unreachable  the endpoint cannot be reached
    │   └── RegistryError      a registry refused, failed, or could not be reached
    │       ├── RegistryUnavailable   no answer: what offline mode serves from the node cache
    │       │   ├── RegistryUnreachable  connection refused, reset or unresolvable
    │       │   └── RegistryTimeout      silent past the deadline (stalled)
    │       │       └── RegistryTooSlow  an answer not whole by its deadline (a trickle)
    │       ├── RegistryTLSError      the TLS handshake failed
    │       │   └── RegistryPlainHTTP the registry speaks plain HTTP (say --insecure)
    │       ├── RegistryAuthError     credentials refused, missing, or a malformed token answer
    │       ├── RegistryHTTPError     an HTTP error status (a refused request)
    │       │   └── RegistryServerError  5xx or 429 after retries (also a RegistryUnavailable)
    │       ├── RegistryResponseTooLarge  an answer past the cap for its kind
    │       ├── RegistryRangesRefused  no multi-range answer with the ranges asked for (read one by one)
    │       └── RegistryCorrupt       a blob that does not match its digest (also a CorruptObject)
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
    ├── KeptMountUnusable      a kept image mount cannot serve this run (none, another uid's, refuses, hung)
    ├── ServiceError           a --background service did not become ready
    │   ├── ServiceStartFailed  it exited first (its error, and its log file)
    │   └── ServiceStartTimeout not ready in time (stopped)
    ├── ConfigError            the config file is unreadable, unknown keys, wrong types, newer version
    │                          (the CLI's usage error: exit status 2)
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


class StoreIdentityLost(StoreError):
    """The store this operation began in was created at the same moment by another client, who won
    (a registry has no atomic create): nothing of this operation is published under the lost identity."""


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


class S3Error(StoreError):
    """An S3 store's object store refused or failed a request (after retries)."""


class S3NoSuchBucket(S3Error):
    """The bucket an ``s3://BUCKET/PREFIX`` store names does not exist."""


class S3AccessDenied(S3Error):
    """No AWS credentials were found, or the object store refuses them."""


class S3Unreachable(S3Error):
    """The S3 endpoint cannot be reached (connection refused, DNS, timeout)."""


class RegistryError(StoreError):
    """The registry refused, failed, or could not be reached."""


class RegistryUnavailable(RegistryError):
    """No answer from the registry (after retries, or within a read's deadline): the one kind of
    registry failure that offline mode answers from the node cache (docs/robustness.md)."""


class RegistryUnreachable(RegistryUnavailable):
    """The registry's address refuses or resets connections, or does not resolve."""


class RegistryTimeout(RegistryUnavailable):
    """The registry accepted the request but did not answer within the deadline (stalled)."""


class RegistryTooSlow(RegistryTimeout):
    """The registry's answer did not arrive whole by its deadline (final: not retried)."""


class RegistryTLSError(RegistryError):
    """The TLS handshake with the registry failed."""


class RegistryPlainHTTP(RegistryTLSError):
    """The registry answered the TLS handshake in plain HTTP: it needs ``--insecure``."""


class RegistryAuthError(RegistryError):
    """The registry refused the credentials, wants some, or sent a malformed token answer."""


class RegistryHTTPError(RegistryError):
    """The registry answered with an HTTP error status (a refused request; 5xx or 429 after retries)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class RegistryServerError(RegistryHTTPError, RegistryUnavailable):
    """The registry kept answering 5xx or 429 (after retries): up, but not serving."""


class RegistryResponseTooLarge(RegistryError):
    """The registry sent more than convstore reads for that kind of answer (final: not retried)."""


class RegistryCorrupt(RegistryError, CorruptObject):
    """The registry returned a blob that does not match its digest."""


class RegistryRangesRefused(RegistryError):
    """The registry does not answer a multi-range read with the ranges asked for (read them one by one)."""


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


class FuseSessionError(StoreError):
    """A FUSE session kept by a holder (failover) cannot be taken over: it serves another image, or its
    holder refuses or is unreadable."""


class KernelFuseError(StoreError):
    """The low-level FUSE server cannot mount or serve (mount(2) refused, /dev/fuse unusable)."""


class ErofsUnsupported(StoreError):
    """An image tree the EROFS writer (convstore.reader.erofs) cannot represent: an xattr outside
    user./trusted./security./POSIX ACLs, a name or xattr too long, an image over 16 TiB."""


class ExposedMountpoint(ConvstoreError):
    """A FUSE mount made for every user (``allow_other``) whose mount point other users could reach:
    its parent directory is not this user's (or root's) alone."""


class ServiceError(ConvstoreError):
    """A service (``layerstore``, ``snapshotter``, ``mount``) started with ``--background`` did not become ready."""


class ServiceStartFailed(ServiceError):
    """The background service exited before it was ready; its error is in the message (and its log)."""


class ServiceStartTimeout(ServiceError):
    """The background service was not ready in time (it was stopped; its log says how far it got)."""


class ConfigError(ConvstoreError):
    """The config file (``--config``, ``$CONVSTORE_CONFIG``, ``/etc/convstore/config.toml``) cannot be used:
    unreadable, not TOML, an unknown section or key, a value of the wrong type, or a newer version."""


#: why a read failed, by exception class (the first of an error's classes, most derived first, found here);
#: the bounded set of causes the metrics and the stats file count read errors under
READ_ERROR_CAUSES = {
    "ChunkMissing": "missing",
    "RegistryCorrupt": "corrupt",  # the store has no such chunk (removed, or a hint and the index both stale)
    "CorruptObject": "corrupt",  # the chunk does not authenticate against its manifest (tampered, damaged)
    "RegistryTooSlow": "timeout",
    "TimeoutError": "timeout",
    "ConnectionError": "unreachable",  # refused, reset, no route (requests' and the built-in one alike)
    "RegistryError": "registry",  # any other registry answer (HTTP error, oversized, ...)
    "OSError": "io",
}


def error_cause(exc: BaseException) -> str:
    """The cause a failed read is counted under: one of READ_ERROR_CAUSES' values, else "other"."""
    for cls in type(exc).__mro__:
        cause = READ_ERROR_CAUSES.get(cls.__name__)
        if cause is not None:
            return cause
    return "other"


class BackgroundConfigError(ConvstoreError):
    """A background-fetch setting (option or environment) that does not parse."""


class KeptMountUnusable(ConvstoreError):
    """A kept image mount (convstore.engines.keeper) cannot serve this run: none is there, it belongs to
    another user, its keeper is dead, hung or refuses, or it cannot prove it holds the image's key.
    ``convstore run`` then mounts the image itself."""
