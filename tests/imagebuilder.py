"""Builds small synthetic OCI images and docker archives with tarfile, for tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

import zstandard

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass
class Entry:
    """One tar member.  ``kind``: file, dir, symlink, hardlink, fifo, chr, blk."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def make_tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.pax_headers = dict(e.pax)
            data = None
            if e.kind == "file":
                ti.type, ti.size, data = tarfile.REGTYPE, len(e.data), io.BytesIO(e.data)
                ti.mode = 0o644 if e.mode is None else e.mode
            elif e.kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755 if e.mode is None else e.mode
            elif e.kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.linkname, 0o777
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.linkname
                ti.mode = 0o644 if e.mode is None else e.mode
            elif e.kind == "fifo":
                ti.type, ti.mode = tarfile.FIFOTYPE, 0o644 if e.mode is None else e.mode
            elif e.kind in ("chr", "blk"):
                ti.type = tarfile.CHRTYPE if e.kind == "chr" else tarfile.BLKTYPE
                ti.mode = 0o600 if e.mode is None else e.mode
                ti.devmajor, ti.devminor = e.devmajor, e.devminor
            else:
                raise ValueError(e.kind)
            tf.addfile(ti, data)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _put_blob(root: str, data: bytes) -> str:
    d = sha(data)
    p = os.path.join(root, "blobs", "sha256", d[7:])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    return d


def write_oci(root: str, layers: list[bytes], tag: str = "latest", compression: str | list[str] = "gzip",
              config_extra: dict[str, Any] | None = None, layer_media: list[str] | None = None) -> dict[str, Any]:
    """Write an OCI layout with the given uncompressed layer tars.  Returns
    the descriptors (for tests that corrupt them)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    comps = compression if isinstance(compression, list) else [compression] * len(layers)
    descs = []
    for i, (tar, how) in enumerate(zip(layers, comps)):
        blob = compress(tar, how)
        mt = layer_media[i] if layer_media else MEDIA[how]
        descs.append({"mediaType": mt, "digest": _put_blob(root, blob), "size": len(blob)})
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/bin/sh", "-c", "echo hello"], "Env": ["PATH=/usr/bin:/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}, **(config_extra or {})}
    cbytes = json.dumps(config, indent=3).encode()  # unusual formatting: must survive byte-exact
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _put_blob(root, cbytes),
             "size": len(cbytes)}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": descs}
    mbytes = json.dumps(manifest).encode()
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _put_blob(root, mbytes),
             "size": len(mbytes), "annotations": {"org.opencontainers.image.ref.name": tag}}
    ipath = os.path.join(root, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(ipath):
        with open(ipath) as f:
            index = json.load(f)
    index["manifests"].append(mdesc)
    with open(ipath, "w") as f:
        json.dump(index, f)
    return {"layers": descs, "config": cdesc, "config_bytes": cbytes, "manifest": mdesc}


def write_docker_archive(path: str, layers: list[bytes], repotag: str = "test/img:latest") -> bytes:
    """A ``docker save`` archive (legacy layout: <id>/layer.tar).  Returns the config bytes."""
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
              "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}}
    cbytes = json.dumps(config).encode()
    cname = hashlib.sha256(cbytes).hexdigest() + ".json"
    members: list[tuple[str, bytes]] = [(cname, cbytes)]
    lpaths = []
    for t in layers:
        lp = f"{hashlib.sha256(t).hexdigest()}/layer.tar"
        lpaths.append(lp)
        members.append((lp, t))
    members.append(("manifest.json", json.dumps([{"Config": cname, "RepoTags": [repotag], "Layers": lpaths}]).encode()))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return cbytes


def rich_layer() -> bytes:
    """A layer with every entry kind convstore must round-trip."""
    long = "d/" + "x" * 150 + "/" + "y" * 120 + ".txt"
    return make_tar([
        Entry("d", "dir"),
        Entry("d/empty", data=b""),
        Entry("d/small.txt", data=b"hello world\n"),
        Entry("d/big.bin", data=os.urandom(300_000) + b"\0" * 200_000),
        Entry(long, data=b"long name content"),
        Entry("d/link", "symlink", linkname="small.txt"),
        Entry("d/abs-link", "symlink", linkname="/d/small.txt"),
        Entry("d/hard", "hardlink", linkname="d/small.txt"),
        Entry("d/fifo", "fifo"),
        Entry("d/null", "chr", devmajor=1, devminor=3),
        Entry("d/loop", "blk", devmajor=7, devminor=0),
        Entry("d/suid", data=b"#!/bin/sh\n", mode=0o4755),
        Entry("d/sgid-dir", "dir", mode=0o2775),
        Entry("d/owned", data=b"x", uid=1234, gid=5678),
        Entry("d/xattr", data=b"x", pax={"SCHILY.xattr.user.test": "value",
                                         "SCHILY.xattr.user.other": "é\x01"}),
        Entry("d/unicodé-名前", data=b"utf8 name"),
        Entry("d/hiresmtime", data=b"t", pax={"mtime": "1700000000.123456789"}),
    ])
