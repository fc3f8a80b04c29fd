"""Unpack an image's flattened root filesystem, safely.

The merged tree comes from the one layer merge (:mod:`convstore.merge`: OCI
whiteouts, chroot-style parent resolution, and its refusals: absolute paths,
``..``, symlink escapes, hardlinks out of the root), the same tree the lazy
reader serves.  This module only writes it: nothing is ever written outside
the target, only the files that survive the merge are written (a file a later
layer deletes or replaces is never fetched), and the tree is built in a
temporary sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import bisect
import os
import shutil
import stat
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import CorruptLayer, SourceError
from .manifest import LayerRecord, Manifest
from .merge import MergedTree, Node, merge_layers
from .progress import NoProgress, Progress
from .core.repository import Repository


@dataclass
class RootfsResult:
    ref: str
    dest: str
    files: int
    bytes_written: int
    warnings: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Content:
    """Reads wanted byte ranges of one layer's content stream, in increasing
    order, fetching only the chunks that hold them (``lookahead`` in flight)."""

    def __init__(self, store: Repository, manifest: Manifest, layer: LayerRecord, pool: ThreadPoolExecutor,
                 ranges: list[tuple[int, int]], lookahead: int = 16):
        self._starts = [0]
        for i in layer.chunks:
            self._starts.append(self._starts[-1] + manifest.chunks[i].size)
        wanted: list[int] = []
        for off, n in ranges:
            if n == 0:
                continue
            if off + n > self._starts[-1]:
                raise CorruptLayer(f"image {manifest.name}: a file runs past its layer's content")
            first = bisect.bisect_right(self._starts, off) - 1
            last = bisect.bisect_right(self._starts, off + n - 1) - 1
            for k in range(max(first, wanted[-1] + 1 if wanted else 0), last + 1):
                wanted.append(k)
        what = f"image {manifest.name}:{manifest.tag}"
        idents = [manifest.chunks[layer.chunks[k]] for k in wanted]
        hints = [manifest.hint(layer.chunks[k]) for k in wanted]
        self._positions = wanted
        q: deque[Future[bytes]] = deque()
        chunks = store.chunks

        def fetch(j: int) -> bytes:
            return chunks.read(idents[j], what, hints[j])[0]

        def gen() -> Iterator[tuple[int, bytes]]:
            it = iter(range(len(idents)))
            for j in it:
                q.append(pool.submit(fetch, j))
                if len(q) >= lookahead:
                    break
            k = 0
            while q:
                data = q.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    q.append(pool.submit(fetch, nxt))
                yield self._starts[wanted[k]], data
                k += 1

        self._it = gen()
        self._buf = memoryview(b"")
        self._buf_start = 0

    def copy_to(self, fd: int, off: int, n: int) -> None:
        while n:
            end = self._buf_start + len(self._buf)
            if off >= end:
                try:
                    self._buf_start, data = next(self._it)
                except StopIteration:
                    raise CorruptLayer("content stream ends early") from None
                self._buf = memoryview(data)
                continue
            take = min(n, end - off)
            view = self._buf[off - self._buf_start:off - self._buf_start + take]
            while view:
                view = view[os.write(fd, view):]
            off += take
            n -= take


class RootfsWriter:
    """Writes a merged tree under ``root`` (which must exist and be empty)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.is_root = os.geteuid() == 0
        self.warnings: list[str] = []
        self.files = 0
        self.bytes = 0

    def write(self, tree: MergedTree, store: Repository, manifest: Manifest, progress: Progress) -> None:
        self.warnings.extend(tree.warnings)
        first: dict[int, str] = {}  # inode -> the first path written for it (hardlinks link to it)
        files: dict[int, list[tuple[int, str, Node]]] = {}  # layer -> (offset, path, node)
        links: list[tuple[str, str]] = []
        dirs: list[tuple[str, Node]] = []
        meta: list[tuple[str, Node]] = []
        skipped: set[str] = set()
        for rel, node in tree.walk():
            path = os.path.join(self.root, rel) if rel else self.root
            if node.ino in first:
                links.append((path, first[node.ino]))
                continue
            first[node.ino] = path
            if node.is_dir:
                if rel:
                    os.mkdir(path, 0o700)
                dirs.append((path, node))
            elif stat.S_ISLNK(node.mode):
                os.symlink(node.linkname, path)
                meta.append((path, node))
            elif node.is_file:
                files.setdefault(node.layer, []).append((node.offset, path, node))
            else:
                kind = stat.S_IFMT(node.mode)
                try:
                    if kind == stat.S_IFIFO:
                        os.mkfifo(path, 0o600)
                    else:
                        os.mknod(path, 0o600 | kind, node.rdev)
                except PermissionError:
                    self.warnings.append(f"skipped device {rel} (needs root)")
                    skipped.add(path)
                    continue
                meta.append((path, node))
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="convstore-rootfs") as pool:
            for li, layer in enumerate(manifest.layers):
                todo = sorted(files.get(li, []), key=lambda t: t[0])
                content = _Content(store, manifest, layer, pool, [(off, n.size) for off, _p, n in todo])
                for off, path, node in todo:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    try:
                        content.copy_to(fd, off, node.size)
                    finally:
                        os.close(fd)
                    self.files += 1
                    self.bytes += node.size
                    meta.append((path, node))
                progress.advance(layer.uncompressed_size)
        for path, target in links:
            if target in skipped:
                continue
            try:
                os.link(target, path, follow_symlinks=False)
            except OSError as err:
                raise CorruptLayer(f"hardlink {path} -> {target}: {err.strerror}") from None
        for path, node in meta:
            self._set_meta(path, node)
        for path, node in sorted(dirs, key=lambda d: len(d[0]), reverse=True):  # times last, deepest first
            self._set_meta(path, node)

    def _set_meta(self, path: str, node: Node) -> None:
        if node.implicit:  # no entry described it: plain 0755, times left as they are
            os.chmod(path, 0o755)
            return
        is_link = stat.S_ISLNK(node.mode)
        if self.is_root:
            os.chown(path, node.uid, node.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, stat.S_IMODE(node.mode))
        for k, v in node.xattrs.items():
            try:
                os.setxattr(path, k, v, follow_symlinks=False)
            except OSError as err:
                self.warnings.append(f"xattr {k} on {os.path.relpath(path, self.root)}: {err.strerror}")
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def apply_manifest(store: Repository, manifest: Manifest, root: str, progress: Progress | None = None) -> RootfsWriter:
    """Merge ``manifest``'s layers (refusing hostile trees before anything is written) and write the result."""
    tree = merge_layers([layer.entries for layer in manifest.layers])
    w = RootfsWriter(root)
    w.write(tree, store, manifest, progress or NoProgress())
    return w


def unpack_rootfs(store: Repository, ref: str, dest: str, *, progress: Progress | None = None) -> RootfsResult:
    """Write the flattened root filesystem of ``ref`` to ``dest`` (absent or empty)."""
    t0 = time.perf_counter()
    dest = os.path.abspath(dest)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise SourceError(f"{dest} exists and is not an empty directory")
    entry, manifest = store.open_image(ref)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.convstore-tmp-{os.getpid()}")
    os.mkdir(tmp, 0o755)
    progress = progress or NoProgress()
    progress.start(f"unpacking {entry.ref} rootfs", manifest.logical_bytes)
    try:
        w = apply_manifest(store, manifest, tmp, progress)
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.finish()
    return RootfsResult(str(entry.ref), dest, w.files, w.bytes, w.warnings, time.perf_counter() - t0)
