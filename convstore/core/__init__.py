"""The store's core: its state and parts below the operations.

:class:`~convstore.core.repository.Repository` holds one opened store (its
object and chunk stores, identity, catalog, domains, manifests, chunks,
trust state and audit) and the methods that span parts (the lifecycle
calls, the read gate).  Operations (pack, unpack, rootfs, maintenance,
rekey, transfer) and the reader take a Repository; the public
:class:`convstore.Store` facade sits on top of it.
"""

from .repository import Repository

__all__ = ["Repository"]
