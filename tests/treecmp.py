"""Describe a directory tree (types, modes, owners, times, contents, links,
devices, xattrs) so two unpacks can be compared exactly."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def walk(root: str | Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            fmt = stat.S_IFMT(st.st_mode)
            rec: tuple = (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                          0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    rec += (st.st_size, hashlib.sha256(f.read()).hexdigest(), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(p),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec += (st.st_rdev,)
            try:
                rec += (tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                     for k in os.listxattr(p, follow_symlinks=False))),)
            except OSError:
                pass
            out[rel] = rec
    return out
