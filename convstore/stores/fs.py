"""No-follow file-system helpers of the local stores (the directory store, its
pack files, the read cache, a registry's index cache): every folder a store
opens is walked component by component with ``O_NOFOLLOW`` from a descriptor,
and created 0700, so that a symlink planted in a store is refused, never
followed."""

from __future__ import annotations

import errno
import os
import stat

from ..errors import StoreError


def makedirs_private(d: str) -> None:
    """``os.makedirs`` with every directory it creates 0700 (store objects are
    not for other users, whatever the umask)."""
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    if parent and parent != d:
        makedirs_private(parent)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass


def open_dir_at(fd: int, rel: str, *, create: bool, where: str) -> int:
    """Walk ``rel`` from the folder descriptor ``fd`` (which this takes over)
    component by component with ``O_NOFOLLOW``, creating missing folders 0700
    if ``create`` (else FileNotFoundError): a symlink planted in a store is
    refused, never followed.  ``where`` names the root in the error."""
    try:
        for part in filter(None, rel.split("/")):
            if create:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StoreError(f"{os.path.join(where, rel)}: a store folder is a symlink or not a folder; "
                                     f"refusing to follow it") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_dir(root: str, rel: str) -> int:
    """A descriptor of ``root/rel`` (created 0700 as needed), opened without
    following symlinks.  Work relative to it, so that a folder swapped later
    changes nothing."""
    makedirs_private(root)
    return open_dir_at(os.open(root, os.O_RDONLY | os.O_DIRECTORY), rel, create=True, where=root)


def open_regular(name: str, dir_fd: int) -> int | None:
    """A read-only descriptor of the regular file ``name`` in ``dir_fd``; None
    if it is a symlink, a FIFO, a device or a folder (planted, never followed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd



def append_line(path: str, line: str) -> None:
    """One ``write`` with O_APPEND: lines from several processes never interleave.
    The file itself is never a symlink (O_NOFOLLOW)."""
    makedirs_private(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)
