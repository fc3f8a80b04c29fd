"""The containerd snapshotter's state: its snapshots, in ``ROOT/metadata.db``.

One SQLite database (the standard library's ``sqlite3``), format version 1
in ``PRAGMA user_version`` (docs/format.md), one row per snapshot::

    snapshots(key TEXT PRIMARY KEY, kind INTEGER, parent TEXT, id TEXT,
              remote TEXT, created REAL, updated REAL, labels TEXT)   -- labels: a JSON object

Every change is one transaction that writes only the rows it touches
(journal_mode=WAL, synchronous=FULL: a change is on disk when the call
returns, and a crash leaves the state before or after it).  Every row is
checked when it is loaded (kind, the id and digest that name directories,
the labels' types and bounds); a damaged database is refused in one line.
The ``metadata.json`` of earlier versions (the whole state rewritten on
every change) is imported once and renamed ``metadata.json.imported``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import ConvstoreError, StoreFormatError
from . import containerd_api as api

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: containerd's labels.Validate: a label's key and value together
MAX_LABEL = 4096
#: all the labels of one snapshot together (containerd sets a handful of short ones)
MAX_LABELS = 64 << 10
#: a snapshot key (containerd's are "NAMESPACE/SEQ/NAME", NAME a chain ID or a short random key)
MAX_KEY = 4096

_ID = re.compile(r"[0-9a-f]{16}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass
class Snap:
    kind: int
    parent: str
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    id: str = ""  # local directory (active snapshots, and layers containerd unpacked)
    remote: str = ""  # blob digest of a convstore layer


def label_problem(labels: Mapping[str, str]) -> str | None:
    """Why a label set is over the bounds, or None."""
    total = 0
    for k, v in labels.items():
        size = len(k.encode()) + len(v.encode())
        if size > MAX_LABEL:
            return f"label {k[:64]!r}: key and value are {size} bytes, more than {MAX_LABEL}"
        total += size
    if total > MAX_LABELS:
        return f"the labels are {total} bytes together, more than {MAX_LABELS}"
    return None


def _check(key: object, s: Snap) -> bool:
    return (isinstance(key, str) and 0 < len(key.encode()) <= MAX_KEY
            and s.kind in (api.VIEW, api.ACTIVE, api.COMMITTED)
            and isinstance(s.parent, str) and isinstance(s.labels, dict)
            and all(isinstance(k, str) and isinstance(x, str) for k, x in s.labels.items())
            and label_problem(s.labels) is None
            and isinstance(s.created, (int, float)) and isinstance(s.updated, (int, float))
            and isinstance(s.id, str) and isinstance(s.remote, str)
            and (s.id == "" or _ID.fullmatch(s.id) is not None)
            and (s.remote == "" or _DIGEST.fullmatch(s.remote) is not None) and bool(s.id) != bool(s.remote))


class SnapshotDB:
    """The snapshots of one snapshotter root; writes are proportional to the change."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "metadata.db")
        self._lock = threading.Lock()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._create(os.path.join(root, "metadata.json"))
            elif version != FORMAT_VERSION:
                raise StoreFormatError(f"{self.path}: snapshotter metadata format {version} is not supported "
                                       f"(this convstore reads {FORMAT_VERSION})")
        except sqlite3.Error as e:
            raise ConvstoreError(f"{self.path} is damaged ({type(e).__name__}); move it away to start empty") \
                from None

    def _create(self, legacy: str) -> None:
        imported: dict[str, Snap] = {}
        if os.path.exists(legacy):
            imported = _load_json(legacy)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("CREATE TABLE IF NOT EXISTS snapshots (key TEXT PRIMARY KEY, kind INTEGER NOT NULL, "
                             "parent TEXT NOT NULL, id TEXT NOT NULL, remote TEXT NOT NULL, created REAL NOT NULL, "
                             "updated REAL NOT NULL, labels TEXT NOT NULL)")
            self._db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?,?,?,?)",
                                 [_row(k, s) for k, s in imported.items()])
            self._db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        if imported or os.path.exists(legacy):
            os.replace(legacy, legacy + ".imported")

    def load(self) -> dict[str, Snap]:
        out: dict[str, Snap] = {}
        try:
            for key, kind, parent, sid, remote, created, updated, labels in self._db.execute(
                    "SELECT key, kind, parent, id, remote, created, updated, labels FROM snapshots"):
                s = Snap(kind, parent, json.loads(labels), created, updated, sid, remote)
                if not _check(key, s):
                    raise ValueError(key)
                out[key] = s
        except (sqlite3.Error, ValueError, TypeError) as e:
            raise ConvstoreError(f"{self.path} is damaged ({type(e).__name__}); move it away to start empty") \
                from None
        return out

    def write(self, put: Mapping[str, Snap] | None = None, delete: Iterable[str] = ()) -> None:
        """Store ``put`` and drop ``delete``, in one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM snapshots WHERE key=?", [(k,) for k in delete])
            self._db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?,?,?,?)",
                                 [_row(k, s) for k, s in (put or {}).items()])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(key: str, s: Snap) -> tuple[object, ...]:
    return (key, s.kind, s.parent, s.id, s.remote, s.created, s.updated, json.dumps(s.labels, sort_keys=True))


def _load_json(path: str) -> dict[str, Snap]:
    """The metadata.json of earlier versions, each snapshot checked."""
    try:
        with open(path) as f:
            doc = json.load(f)
        out = {}
        for key, v in doc.items():
            s = Snap(**v)
            if isinstance(s.labels, dict) and label_problem(s.labels):
                log.warning("%s: dropping the over-sized labels of snapshot %.100s", path, key)
                s.labels = {}
            if not _check(key, s):
                raise ValueError(key)
            out[key] = s
        return out
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConvstoreError(f"{path} is damaged ({type(e).__name__}); move it away to start empty") from None
