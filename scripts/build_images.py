#!/usr/bin/env python3
"""Build convstore's corpus of real Debian-based OCI images.

Usage:  python3 scripts/build_images.py [--out DIR] [--force] [IMAGE ...]
        (default DIR: $CONVSTORE_CORPUS, else ~/.cache/convstore-corpus;
        default images: all five)

    name          layers                                   layer compression
    base          L0 = bookworm minbase (+updates +security)   gzip
    app1          L0 (same blob as base) + L1 = python3        gzip
    app2          L0 (same diff_id, recompressed) + L1 = curl  zstd
    app1-rebuilt  app1 rebuilt from scratch (new L0', L1')     gzip
    base-prev     bookworm point release only (no -security)   none (plain tar)

Each image is an OCI image layout ``DIR/NAME`` with the tag ``latest`` whose
command prints ``hello``.  ``DIR/corpus.json`` describes them (digests,
diff_ids, sizes) and the dedup potential across them (file-level optimum),
which the tests compare convstore's numbers with.

How: mmdebstrap builds each root filesystem from the Debian mirror that apt
on this machine already uses (read with ``apt-get indextargets``, so no host
name is written here); umoci turns a rootfs tarball into a layer and computes
an app layer as a real diff (whiteouts included); skopeo writes the final
layouts (gzip or zstd); the plain-tar variant is written here.  No Docker.

Idempotent: an image whose recipe and layout are unchanged is kept, so a
second run only re-verifies.  Needs root and the Debian packages mmdebstrap,
umoci, skopeo (scripts/setup.sh installs them).  Standard library only, so
it runs with any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, BinaryIO, Iterator

RECIPE_VERSION = 1
SUITE = os.environ.get("CORPUS_SUITE", "bookworm")
ALL = ["base", "app1", "app2", "app1-rebuilt", "base-prev"]
NEEDS = {"app1": ["base"], "app2": ["base"]}
PKGS = {"app1": "python3", "app1-rebuilt": "python3", "app2": "curl ca-certificates"}
COMP = {"base": "gzip", "app1": "gzip", "app2": "zstd", "app1-rebuilt": "gzip", "base-prev": "none"}
CMD = {
    "app1": ["/usr/bin/python3", "-c", "print('hello')"],
    "app1-rebuilt": ["/usr/bin/python3", "-c", "print('hello')"],
    "app2": ["/bin/sh", "-c", "curl --version >/dev/null && echo hello"],
    "base": ["/bin/sh", "-c", "echo hello"],
    "base-prev": ["/bin/sh", "-c", "echo hello"],
}
DESC = {
    "base": f"{SUITE} minbase (+updates +security), one layer",
    "app1": "base + layer: apt-get install python3",
    "app2": "base + layer: apt-get install curl ca-certificates (zstd layers)",
    "app1-rebuilt": "app1 rebuilt from scratch (new base and app layer, same packages)",
    "base-prev": f"{SUITE} point release only, no -security/-updates (uncompressed)",
}
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
# like debian:*-slim: no docs, man pages or locales (copyright files kept)
SLIM = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "locale", "doc", "info", "groff", "lintian")] + [
    "--dpkgopt=path-include=/usr/share/doc/*/copyright"]
APT_OPTS = ['--aptopt=Acquire::Check-Valid-Until "false"', '--aptopt=Acquire::Check-Date "false"']
# the runtime provides these; images must not carry the builder host's copies
NOHOST = ['--customize-hook=rm -f "$1/etc/resolv.conf" "$1/etc/hostname"']


def log(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    pass


def run(*cmd: str, stdout: Any = None, logfile: str | None = None) -> None:
    err = open(logfile, "wb") if logfile else subprocess.DEVNULL
    try:
        p = subprocess.run(list(cmd), stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=err,
                           stdin=subprocess.DEVNULL)
    finally:
        if logfile:
            err.close()  # type: ignore[union-attr]
    if p.returncode != 0:
        tail = ""
        if logfile:
            with open(logfile, "rb") as f:
                tail = "\n" + f.read()[-2000:].decode(errors="replace")
        raise BuildError(f"{cmd[0]} failed (exit {p.returncode}){tail}")


# ---------------------------------------------------------------- sources
def apt_sources() -> tuple[list[str], list[str]]:
    """(full, point) source lines for mmdebstrap, from apt's own configuration."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(ORIGIN)",
                          "Identifier: Packages"], capture_output=True, text=True).stdout
    targets = sorted({tuple(line.split()) for line in out.splitlines() if len(line.split()) >= 2})
    mirror = os.environ.get("CORPUS_MIRROR") or next(
        (t[0] for t in targets if not t[1].endswith(("-security", "/updates")) and "debian" in t[0]), None)
    if not mirror:
        raise BuildError("no Debian mirror in apt's sources (/etc/apt/sources.list*); set CORPUS_MIRROR=URI")
    security = os.environ.get("CORPUS_SECURITY_MIRROR")
    if security is None:
        security = next((t[0] for t in targets if t[1].endswith("-security")), "")
    updates = any(t[0] == mirror and t[1].endswith("-updates") for t in targets)
    full = [f"deb {mirror} {SUITE} main"]
    if updates:
        full.append(f"deb {mirror} {SUITE}-updates main")
    if security:
        full.append(f"deb {security} {SUITE}-security main")
    return full, [f"deb {mirror} {SUITE} main"]


# ---------------------------------------------------------------- layout helpers
def blob_path(layout: str, digest: str) -> str:
    algo, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def manifest_of(layout: str, tag: str = "latest") -> tuple[dict[str, Any], dict[str, Any]]:
    for d in read_json(os.path.join(layout, "index.json"))["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return d, read_json(blob_path(layout, d["digest"]))
    raise BuildError(f"{layout}: no tag {tag!r}")


def manifest_digest(layout: str) -> str:
    try:
        return manifest_of(layout)[0]["digest"]
    except (OSError, ValueError, KeyError, BuildError):
        return "none"


def write_blob(layout: str, data: bytes) -> str:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.dirname(blob_path(layout, d)), exist_ok=True)
    with open(blob_path(layout, d), "wb") as f:
        f.write(data)
    return d


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for c in iter(lambda: f.read(1 << 20), b""):
            h.update(c)
    return "sha256:" + h.hexdigest()


def decompress_layout(src: str, tag: str, dst: str) -> None:
    """Copy src:tag to dst:latest with plain-tar layers (skopeo keeps gzip for oci:)."""
    _, man = manifest_of(src, tag)
    os.makedirs(os.path.join(dst, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(dst, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(blob_path(src, man["config"]["digest"]), "rb") as f:
        write_blob(dst, f.read())
    layers = []
    for layer in man["layers"]:
        if not layer["mediaType"].endswith("+gzip"):
            raise BuildError(f"unexpected media type {layer['mediaType']}")
        h, n, tmp = hashlib.sha256(), 0, os.path.join(dst, "blobs", "sha256", ".tmp")
        with gzip.open(blob_path(src, layer["digest"]), "rb") as fi, open(tmp, "wb") as fo:
            for c in iter(lambda: fi.read(1 << 20), b""):
                h.update(c)
                n += len(c)
                fo.write(c)
        d = "sha256:" + h.hexdigest()
        os.replace(tmp, blob_path(dst, d))
        layers.append(dict(layer, mediaType=MT_TAR, digest=d, size=n))
    raw = json.dumps(dict(man, layers=layers), separators=(",", ":")).encode()
    idx = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": write_blob(dst, raw),
        "size": len(raw), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(idx, f)


# ---------------------------------------------------------------- the builder
class Builder:
    def __init__(self, out: str, work: str, force: bool) -> None:
        self.out, self.work, self.force = out, work, force
        self.layout = os.path.join(work, "oci")
        self.full, self.point = apt_sources()
        self.base_loaded = False
        os.makedirs(os.path.join(out, ".stamps"), exist_ok=True)
        os.makedirs(os.path.join(out, ".logs"), exist_ok=True)
        run("umoci", "init", "--layout", self.layout)
        log(f"Debian sources from apt: {'; '.join(self.full)}")

    def recipe(self, name: str) -> str:
        r = json.dumps([RECIPE_VERSION, SUITE, COMP[name], PKGS.get(name, ""), CMD[name],
                        name == "base-prev", self.full if name != "base-prev" else self.point])
        return hashlib.sha256(r.encode()).hexdigest()[:16]

    def stamp(self, name: str) -> dict[str, str]:
        try:
            return read_json(os.path.join(self.out, ".stamps", name + ".json"))
        except (OSError, ValueError):
            return {}

    def up_to_date(self, name: str) -> bool:
        if self.force:
            return False
        st = self.stamp(name)
        if st.get("recipe") != self.recipe(name) or st.get("manifest") != manifest_digest(
                os.path.join(self.out, name)):
            return False
        return all(st.get("base_" + dep) == manifest_digest(os.path.join(self.out, dep)) for dep in NEEDS.get(name, []))

    # -- steps
    def rootfs(self, out_tar: str, sources: list[str], logname: str, base_tar: str | None = None,
               pkgs: str = "") -> None:
        """mmdebstrap a root filesystem tarball (device nodes dropped, like docker build)."""
        logf = os.path.join(self.out, ".logs", logname + ".log")
        if base_tar is None:
            log(f"  mmdebstrap --variant=minbase {SUITE} -> {os.path.basename(out_tar)}")
            cmd = ["mmdebstrap", "--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                   *APT_OPTS, *SLIM, *NOHOST, SUITE, "-", *sources]
        else:
            log(f"  mmdebstrap --variant=custom (base tarball) + apt-get install {pkgs}")
            cmd = ["mmdebstrap", "--variant=custom", f"--setup-hook=tar-in {base_tar} /",
                   f'--customize-hook=chroot "$1" apt-get install --yes --no-install-recommends {pkgs}',
                   *NOHOST, SUITE, "-", *sources]
        with open(out_tar, "wb") as fo, open(logf, "wb") as le:
            mm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=le, stdin=subprocess.DEVNULL)
            filt = subprocess.Popen(["mmtarfilter", "--path-exclude=/dev/*"], stdin=mm.stdout, stdout=fo)
            assert mm.stdout is not None
            mm.stdout.close()
            rc_f, rc_m = filt.wait(), mm.wait()
        if rc_m or rc_f:
            with open(logf, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            raise BuildError(f"mmdebstrap failed (see {logf}):\n{tail}")

    def new_image(self, tag: str, rootfs_tar: str, created_by: str) -> None:
        run("umoci", "new", "--image", f"{self.layout}:{tag}")
        run("umoci", "raw", "add-layer", "--image", f"{self.layout}:{tag}", "--history.created_by", created_by,
            rootfs_tar)

    def add_diff_layer(self, base_tag: str, tag: str, full_tar: str, created_by: str) -> None:
        """A layer holding the difference between base_tag's rootfs and full_tar (umoci computes it)."""
        bundle = os.path.join(self.work, "bundle-" + tag)
        shutil.rmtree(bundle, ignore_errors=True)
        run("umoci", "unpack", "--image", f"{self.layout}:{base_tag}", bundle)
        shutil.rmtree(os.path.join(bundle, "rootfs"))
        os.mkdir(os.path.join(bundle, "rootfs"))
        run("tar", "-xpf", full_tar, "-C", os.path.join(bundle, "rootfs"), "--numeric-owner")
        run("umoci", "repack", "--image", f"{self.layout}:{tag}", "--history.created_by", created_by, bundle)
        shutil.rmtree(bundle)

    def configure(self, tag: str, name: str) -> None:
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
        cmd = [a for part in CMD[name] for a in ("--config.cmd", part)]
        run("umoci", "config", "--image", f"{self.layout}:{tag}", "--no-history", "--os", "linux",
            "--architecture", arch, "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--config.workingdir", "/", *cmd,
            "--config.label", f"org.opencontainers.image.title=convstore-corpus/{name}",
            "--config.label", f"org.opencontainers.image.description={DESC[name]}",
            "--config.label", f"convstore.corpus.version={RECIPE_VERSION}")

    def export(self, tag: str, name: str) -> None:
        """Write OUT/NAME atomically (a sibling temporary directory, then a rename)."""
        tmp = os.path.join(self.out, ".tmp-" + name)
        shutil.rmtree(tmp, ignore_errors=True)
        src = f"oci:{self.layout}:{tag}"
        if COMP[name] == "gzip":
            run("skopeo", "copy", "--quiet", src, f"oci:{tmp}:latest")
        elif COMP[name] == "zstd":
            run("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", src, f"oci:{tmp}:latest")
        else:
            decompress_layout(self.layout, tag, tmp)
        run("skopeo", "inspect", f"oci:{tmp}:latest")
        final = os.path.join(self.out, name)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)

    def load_base(self) -> str:
        """The exported base, as tag ``base`` of the work layout and as a rootfs tarball."""
        tar = os.path.join(self.work, "base.tar")
        if not self.base_loaded:
            run("skopeo", "copy", "--quiet", f"oci:{os.path.join(self.out, 'base')}:latest", f"oci:{self.layout}:base")
            _, man = manifest_of(os.path.join(self.out, "base"))
            (layer,) = man["layers"]
            with gzip.open(blob_path(os.path.join(self.out, "base"), layer["digest"])) as f, open(tar, "wb") as o:
                shutil.copyfileobj(f, o, 1 << 20)
            self.base_loaded = True
        return tar

    def build(self, name: str) -> None:
        w = self.work
        apt = f"apt-get install --no-install-recommends {PKGS.get(name, '')}"
        minbase = f"mmdebstrap --variant=minbase {SUITE}"
        if name == "base":
            tar = os.path.join(w, "base.tar")
            self.rootfs(tar, self.full, "base")
            self.new_image("base", tar, minbase + " (+updates +security)")
            self.configure("base", "base")
            self.export("base", "base")
            self.base_loaded = True  # the work layout's base and base.tar are what was exported
        elif name in ("app1", "app2"):
            base_tar = self.load_base()
            full = os.path.join(w, name + "-full.tar")
            self.rootfs(full, self.full, name, base_tar=base_tar, pkgs=PKGS[name])
            self.add_diff_layer("base", name, full, apt)
            os.unlink(full)
            self.configure(name, name)
            self.export(name, name)
        elif name == "app1-rebuilt":
            base_tar, full = os.path.join(w, "rb-base.tar"), os.path.join(w, "rb-full.tar")
            self.rootfs(base_tar, self.full, "app1-rebuilt-base")
            self.new_image("rb-base", base_tar, minbase + " (+updates +security)")
            self.configure("rb-base", "base")
            self.rootfs(full, self.full, name, base_tar=base_tar, pkgs=PKGS[name])
            self.add_diff_layer("rb-base", name, full, apt)
            os.unlink(base_tar)
            os.unlink(full)
            self.configure(name, name)
            self.export(name, name)
        elif name == "base-prev":
            tar = os.path.join(w, "prev.tar")
            self.rootfs(tar, self.point, "base-prev")
            self.new_image("base-prev", tar, minbase + " (point release only)")
            os.unlink(tar)
            self.configure("base-prev", "base-prev")
            self.export("base-prev", "base-prev")

    def build_all(self, names: list[str]) -> None:
        for name in names:
            if self.up_to_date(name):
                log(f"{name}: up to date")
                continue
            log(f"{name}: building ({DESC[name]})")
            t0 = time.monotonic()
            self.build(name)
            st = {"recipe": self.recipe(name), "manifest": manifest_digest(os.path.join(self.out, name)),
                  "seconds": f"{time.monotonic() - t0:.1f}", "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "description": DESC[name]}
            st.update({"base_" + d: manifest_digest(os.path.join(self.out, d)) for d in NEEDS.get(name, [])})
            with open(os.path.join(self.out, ".stamps", name + ".json"), "w") as f:
                json.dump(st, f)
            log(f"{name}: done in {st['seconds']} s -> oci:{os.path.join(self.out, name)}:latest")


# ---------------------------------------------------------------- verification and report
def layer_reader(path: str, media_type: str) -> tuple[BinaryIO, subprocess.Popen[bytes] | None]:
    if media_type.endswith("+gzip"):
        return gzip.open(path, "rb"), None  # type: ignore[return-value]
    if media_type.endswith("+zstd"):
        p = subprocess.Popen(["zstd", "-dcq", path], stdout=subprocess.PIPE)
        assert p.stdout is not None
        return p.stdout, p
    if media_type == MT_TAR:
        return open(path, "rb"), None
    raise BuildError(f"unknown layer media type {media_type}")


class Hashing:
    """A read-only file wrapper hashing every byte read (the diff_id)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


Member = tuple[str, str, str, int]  # name, kind (f/d/o), sha256 of the content, size


def scan_layer(path: str, media_type: str) -> tuple[str, int, list[Member]]:
    f, proc = layer_reader(path, media_type)
    r = Hashing(f)
    members: list[Member] = []
    with tarfile.open(fileobj=r, mode="r|", bufsize=1 << 20) as tf:  # type: ignore[call-overload]
        for m in tf:
            name = (m.name[2:] if m.name.startswith("./") else m.name).rstrip("/")
            if m.isreg():
                fo = tf.extractfile(m)
                h = hashlib.sha256()
                for c in iter(lambda: fo.read(1 << 20), b""):
                    h.update(c)
                members.append((name, "f", h.hexdigest(), m.size))
            else:
                members.append((name, "d" if m.isdir() else "o", "", 0))
    while r.read(1 << 20):
        pass
    f.close()
    if proc and proc.wait() != 0:
        raise BuildError(f"zstd failed on {path}")
    return "sha256:" + r.h.hexdigest(), r.n, members


def flatten(layers: list[list[Member]]) -> dict[str, tuple[str, int]]:
    """Apply layers with OCI whiteouts -> {path: (sha256, size)} of the regular files."""
    tree: dict[str, tuple[str, int]] = {}

    def drop(prefix: str) -> Iterator[str]:
        return (k for k in list(tree) if k == prefix or k.startswith(prefix + "/"))

    for members in layers:
        for name, kind, sha, size in members:
            d, base = os.path.split(name)
            if base == ".wh..wh..opq":
                for k in [k for k in tree if k.startswith(d + "/" if d else "")]:
                    del tree[k]
            elif base.startswith(".wh."):
                for k in drop(os.path.join(d, base[4:])):
                    del tree[k]
            elif kind == "f":
                tree[name] = (sha, size)
            else:
                tree.pop(name, None)
    return tree


def report(out: str, names: list[str]) -> dict[str, Any]:
    """Verify every digest and diff_id and write OUT/corpus.json (sizes and dedup potential)."""
    images: dict[str, Any] = {}
    scanned: dict[str, tuple[int, list[Member]]] = {}
    for name in names:
        layout = os.path.join(out, name)
        desc, man = manifest_of(layout)
        if sha256_file(blob_path(layout, desc["digest"])) != desc["digest"]:
            raise BuildError(f"{name}: manifest digest mismatch")
        cfgd = man["config"]["digest"]
        if sha256_file(blob_path(layout, cfgd)) != cfgd:
            raise BuildError(f"{name}: config digest mismatch")
        cfg = read_json(blob_path(layout, cfgd))
        diff_ids = cfg["rootfs"]["diff_ids"]
        if len(diff_ids) != len(man["layers"]):
            raise BuildError(f"{name}: {len(diff_ids)} diff_ids for {len(man['layers'])} layers")
        layers = []
        for layer, did in zip(man["layers"], diff_ids):
            p = blob_path(layout, layer["digest"])
            if os.path.getsize(p) != layer["size"] or sha256_file(p) != layer["digest"]:
                raise BuildError(f"{name}: blob {layer['digest']} does not match its descriptor")
            if did not in scanned:
                got, usize, members = scan_layer(p, layer["mediaType"])
                if got != did:
                    raise BuildError(f"{name}: diff_id mismatch {got} != {did}")
                scanned[did] = (usize, members)
            layers.append({"digest": layer["digest"], "mediaType": layer["mediaType"], "size": layer["size"],
                           "diff_id": did, "uncompressed_size": scanned[did][0]})
        st = read_json(os.path.join(out, ".stamps", name + ".json")) if os.path.exists(
            os.path.join(out, ".stamps", name + ".json")) else {}
        images[name] = {"layout": layout, "ref": f"oci:{layout}:latest", "manifest": desc["digest"], "config": cfgd,
                        "cmd": cfg.get("config", {}).get("Cmd"), "description": st.get("description", ""),
                        "build_seconds": float(st["seconds"]) if "seconds" in st else None, "layers": layers}
    all_layers = [layer for im in images.values() for layer in im["layers"]]
    diffs = {layer["diff_id"]: layer["uncompressed_size"] for layer in all_layers}
    blobs = {layer["digest"]: layer["size"] for layer in all_layers}
    files: dict[str, int] = {}
    n_files = file_bytes = 0
    for did in diffs:
        for _, kind, sha, size in scanned[did][1]:
            if kind == "f":
                files[sha] = size
                n_files += 1
                file_bytes += size
    trees = {n: flatten([scanned[layer["diff_id"]][1] for layer in im["layers"]]) for n, im in images.items()}
    for n, t in trees.items():
        images[n]["rootfs_files"] = len(t)
        images[n]["rootfs_file_bytes"] = sum(s for _, s in t.values())
    overlap = {
        "images": len(images),
        "sum_compressed_per_image": sum(layer["size"] for layer in all_layers),
        "unique_blobs": len(blobs), "unique_blob_bytes": sum(blobs.values()),
        "sum_uncompressed_per_image": sum(layer["uncompressed_size"] for layer in all_layers),
        "unique_diff_ids": len(diffs), "unique_diff_id_bytes": sum(diffs.values()),
        "files_in_unique_layers": n_files, "file_bytes_in_unique_layers": file_bytes,
        "unique_file_contents": len(files), "unique_file_bytes": sum(files.values()),
        "rootfs_file_bytes_all_images": sum(im["rootfs_file_bytes"] for im in images.values()),
        "rootfs_unique_file_bytes": sum({sha: s for t in trees.values() for sha, s in t.values()}.values()),
    }
    doc = {"images": images, "overlap": overlap}
    tmp = os.path.join(out, ".corpus.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(out, "corpus.json"))
    mb = lambda n: f"{n / 1e6:8.1f} MB"  # noqa: E731
    print(f"{'image':<13} {'layers':>6} {'compressed':>11} {'uncompressed':>13}")
    for n, im in images.items():
        print(f"{n:<13} {len(im['layers']):>6} {mb(sum(x['size'] for x in im['layers'])):>11} "
              f"{mb(sum(x['uncompressed_size'] for x in im['layers'])):>13}")
    print(f"unique file contents (file-level dedup optimum): {mb(overlap['unique_file_bytes']).strip()} of "
          f"{mb(overlap['sum_uncompressed_per_image']).strip()} uncompressed")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="*", help=f"images to build (default: all of {' '.join(ALL)})")
    ap.add_argument("--out", default=os.environ.get("CONVSTORE_CORPUS") or os.path.expanduser(
        "~/.cache/convstore-corpus"), help="output folder (default: $CONVSTORE_CORPUS or ~/.cache/convstore-corpus)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    a = ap.parse_args(argv)
    unknown = [n for n in a.images if n not in ALL]
    if unknown:
        ap.error(f"unknown image {unknown[0]!r}; choose from {', '.join(ALL)}")
    want = set(a.images or ALL)
    want |= {d for n in list(want) for d in NEEDS.get(n, [])}
    order = [n for n in ALL if n in want]
    if os.geteuid() != 0:
        print("build_images: must run as root (mmdebstrap root mode, umoci unpack)", file=sys.stderr)
        return 1
    missing = [t for t in ("mmdebstrap", "mmtarfilter", "umoci", "skopeo", "zstd") if shutil.which(t) is None]
    if missing:
        print(f"build_images: {', '.join(missing)} not found; run bash scripts/setup.sh", file=sys.stderr)
        return 1
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    with open(os.path.join(out, ".lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)  # a second builder waits, then finds everything up to date
        try:
            with tempfile.TemporaryDirectory(prefix="convstore-images.") as work:
                Builder(out, work, a.force).build_all(order)
            present = [n for n in ALL if os.path.exists(os.path.join(out, n, "index.json"))]
            report(out, present)
        except BuildError as e:
            print(f"build_images: {e}", file=sys.stderr)
            return 1
    log(f"done in {time.monotonic() - t0:.0f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
