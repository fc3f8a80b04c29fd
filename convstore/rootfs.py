"""Unpack an image's flattened root filesystem, safely.

Layers are applied in order with OCI whiteout semantics (``.wh.NAME`` deletes
a lower entry, ``.wh..wh..opq`` hides a directory's lower children).  Nothing
is ever written outside the target: entry paths that are absolute or contain
``..`` are refused; a symlink met as a parent directory is resolved inside
the root as a chroot would, and refused if it climbs above it; hardlink
targets are resolved the same way.  The tree is built in a temporary sibling
directory and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import CorruptLayer, SourceError, UnsafePathError
from .manifest import LayerRecord, Manifest
from .paths import NotADirectory, RootEscape, Step, components, resolve_dir
from .progress import NoProgress, Progress
from .store import Store
from .tarsplit import TarEntry
from .unpack import iter_content

WH = ".wh."
OPAQUE = ".wh..wh..opq"


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


def entry_components(path: str) -> list[str]:
    """Split a layer entry path; refuse absolute paths and ``..``."""
    if path.startswith("/"):
        raise UnsafePathError(f"layer entry {path!r} has an absolute path")
    parts = components(path)
    if ".." in parts:
        raise UnsafePathError(f"layer entry {path!r} climbs out of the root with '..'")
    return parts


class _Content:
    """Sequential reader over a layer's content stream."""

    def __init__(self, it: Any):
        self._it = it
        self._buf = memoryview(b"")

    def copy_to(self, fd: int, n: int) -> None:
        while n:
            if not self._buf:
                try:
                    self._buf = memoryview(next(self._it))
                except StopIteration:
                    raise CorruptLayer("content stream ends early") from None
            take = min(n, len(self._buf))
            view = self._buf[:take]
            while view:
                view = view[os.write(fd, view):]
            self._buf = self._buf[take:]
            n -= take


class RootfsWriter:
    """Applies layers into ``root`` (which must exist)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.is_root = os.geteuid() == 0
        self.warnings: list[str] = []
        self.dir_times: dict[str, int] = {}
        self.files = 0
        self.bytes = 0

    # -- path resolution --------------------------------------------------
    def _resolve_dir(self, comps: list[str]) -> str:
        """Resolve directory components inside the root, following symlinks
        as if chrooted; create missing directories.  Returns an absolute path."""

        def step(d: str, name: str) -> Step:
            p = os.path.join(d, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                os.mkdir(p, 0o755)
                return "dir", p
            if stat.S_ISLNK(st.st_mode):
                return "link", os.readlink(p)
            return ("dir", p) if stat.S_ISDIR(st.st_mode) else ("notdir", None)

        try:
            return resolve_dir(self.root, comps, step)
        except RootEscape:
            raise UnsafePathError(f"path {'/'.join(comps)!r} resolves outside the root through a symlink") from None
        except NotADirectory as e:
            raise CorruptLayer(f"{'/'.join(comps)!r}: {e} is not a directory") from None

    def _target_path(self, comps: list[str]) -> str:
        return os.path.join(self._resolve_dir(comps[:-1]), comps[-1])

    # -- layers -----------------------------------------------------------
    def apply_layer(self, layer: LayerRecord, content: _Content) -> None:
        created: set[str] = set()
        for e in layer.entries:
            comps = entry_components(e.path)
            if not comps:
                if e.type == "5":  # the root itself
                    self._set_meta(self.root, e, is_dir=True)
                continue
            base = comps[-1]
            if base == OPAQUE:
                d = self._resolve_dir(comps[:-1])
                for child in os.listdir(d):
                    if os.path.join(d, child) not in created:
                        _remove(os.path.join(d, child))
                continue
            if base.startswith(WH):
                name = base[len(WH):]
                if not name or name in (".", ".."):
                    raise CorruptLayer(f"invalid whiteout {e.path!r}")
                _remove(os.path.join(self._resolve_dir(comps[:-1]), name))
                continue
            path = self._target_path(comps)
            created.add(path)
            self._create(path, e, content)

    def _create(self, path: str, e: TarEntry, content: _Content) -> None:
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if e.type == "5" and stat.S_ISDIR(existing.st_mode):
                self._set_meta(path, e, is_dir=True)
                return
            _remove(path)
        t = e.type
        if t == "5":
            os.mkdir(path, 0o700)
            self._set_meta(path, e, is_dir=True)
        elif e.is_file:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                content.copy_to(fd, e.size)
            finally:
                os.close(fd)
            self.files += 1
            self.bytes += e.size
            self._set_meta(path, e)
        elif t == "2":
            os.symlink(e.linkname, path)
            self._set_meta(path, e, is_link=True)
        elif t == "1":
            comps = entry_components(e.linkname)
            if not comps:
                raise CorruptLayer(f"hardlink {e.path!r} has an empty target")
            src = self._target_path(comps)
            try:
                os.link(src, path, follow_symlinks=False)
            except FileNotFoundError:
                raise CorruptLayer(f"hardlink {e.path!r} points to missing {e.linkname!r}") from None
            except OSError as err:
                raise CorruptLayer(f"hardlink {e.path!r} -> {e.linkname!r}: {err.strerror}") from None
        elif t in ("3", "4", "6"):
            kind = {"3": stat.S_IFCHR, "4": stat.S_IFBLK, "6": stat.S_IFIFO}[t]
            try:
                if t == "6":
                    os.mkfifo(path, 0o600)
                else:
                    os.mknod(path, 0o600 | kind, os.makedev(e.devmajor, e.devminor))
            except PermissionError:
                self.warnings.append(f"skipped device {e.path} (needs root)")
                return
            self._set_meta(path, e)
        else:
            self.warnings.append(f"skipped {e.path}: unsupported entry type {t!r}")

    def _set_meta(self, path: str, e: TarEntry, is_dir: bool = False, is_link: bool = False) -> None:
        if self.is_root:
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, stat.S_IMODE(e.mode))
        for k, v in e.xattrs.items():
            try:
                os.setxattr(path, k, v, follow_symlinks=False)
            except OSError as err:
                self.warnings.append(f"xattr {k} on {e.path}: {err.strerror}")
        if is_dir:
            self.dir_times[path] = e.mtime_ns
        else:
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Directory times last (writing into a directory changes its mtime)."""
        for path in sorted(self.dir_times, key=len, reverse=True):
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(self.dir_times[path], self.dir_times[path]))


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply_manifest(store: Store, manifest: Manifest, root: str, progress: Progress | None = None) -> RootfsWriter:
    progress = progress or NoProgress()
    w = RootfsWriter(root)
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="convstore-rootfs") as pool:
        for layer in manifest.layers:
            it = iter_content(store, manifest, layer, pool)
            w.apply_layer(layer, _Content(it))
            for _rest in it:  # a well-formed manifest has nothing left
                raise CorruptLayer("layer content is longer than its files")
            progress.advance(layer.uncompressed_size)
    w.finish()
    return w


def unpack_rootfs(store: Store, ref: str, dest: str, *, progress: Progress | None = None) -> RootfsResult:
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
