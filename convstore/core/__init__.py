"""The store's core: its state and parts, below the operations.

=================  ============================================================
``repository.py``  :class:`Repository`: one opened store (object and chunk
                   stores, key, clock, options) wiring the parts below, with
                   what spans them: the lifecycle calls of a pack, the read
                   gate, the gc guard, the audit log
``identity.py``    ``store.json``: the store id and the metadata key
``authmeta.py``    the MACs on catalog entries, domain and layer records
``trust.py``       this client's rollback protection
``catalog.py``     ``refs/``: authenticated name:tag entries and their states
``lifecycle.py``   every state transition of an entry, as a pure function
``domains.py``     ``domains/``: convergence domains and their secrets
``manifests.py``   ``manifests/``, ``profiles/``, ``layers/``: sealed
                   manifests, start-up profiles, the layer index
``chunks.py``      the chunk seam (encrypt->store, fetch->decrypt->check) and
                   ``quarantine/``
=================  ============================================================

Each kind of stored object has its one owner here.  Operations (pack,
unpack, rootfs, maintenance, rekey, transfer, info) and the reader take a
:class:`~convstore.core.repository.Repository`; the public
:class:`convstore.Store` facade sits on top.  Nothing here imports an
operation, the reader or the facade (``tests/test_imports.py``), and nothing
here starts a process.  This ``__init__`` imports nothing, so importing one
part (say the chunk seam, for the reader's fetcher) costs only that part.
"""
