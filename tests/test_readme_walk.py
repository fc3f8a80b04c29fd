"""README.md, executed: every command of its CLI tour, in order, then its
Python API snippet, against the real corpus (``app1`` is ``./layout``) and a
real registry (Debian's docker-registry on 127.0.0.1 stands for
``127.0.0.1:5000``), in a private HOME so the defaults the README describes
(store, key file, cache) are the ones used.  A command that fails, or whose
output no longer says what the README's comment on it claims, fails the test.

What runs as written and what is shortened (the rest runs in full):

* ``[...]`` parts are optional: the command runs without them;
* paths outside the working folder map to temporary ones (``/mnt/app``,
  ``/var/lib/convstore/...``, ``/run/convstore/...``);
* ``layerstore --background`` is started and unmounted (start + stop), and
  ``snapshotter`` is started until its socket answers, then stopped:
  podman and containerd on them are covered by tests/test_engines.py;
* ``containerd-load`` needs a running containerd: only ``--help`` runs here
  (a full load and ``ctr run`` are in tests/test_engines.py);
* the PKCS#11 token is the tests' SoftHSM2 token (label ``convstore``, the
  README's); its key label ``master`` maps to one this test creates.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, REPO, need_tool

README = Path(os.environ.get("CONVSTORE_README", REPO / "README.md"))
KEY_LABEL = "readme-walk-master"


def fenced_block(text: str, heading: str, lang: str) -> tuple[int, str]:
    """The first ```lang block after ``heading``: (line number of its first line, its text)."""
    start = text.index(heading)
    m = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(text, start)
    assert m, f"README: no ```{lang} block after {heading!r}"
    return text.count("\n", 0, m.start(1)) + 1, m.group(1)


def drop_optional(tokens: list[str]) -> list[str]:
    """Without the ``[...]`` parts (nested ones included)."""
    out, depth = [], 0
    for t in tokens:
        opening = depth == 0 and t.startswith("[")
        depth += t.count("[") if t.startswith("[") else 0
        if depth == 0 and not opening:
            out.append(t)
        depth -= len(t) - len(t.rstrip("]")) if depth else 0
    return out


@dataclass
class Command:
    line: int  #: README line number
    text: str  #: the command as the README writes it
    argv: list[str] = field(default_factory=list)


def tour_commands(text: str) -> list[Command]:
    """Each command of the CLI tour: comments dropped, ``a; b`` split, quotes as a shell reads them."""
    first, block = fenced_block(text, "## CLI tour", "sh")
    cmds = []
    for n, raw in enumerate(block.splitlines(), first):
        lex = shlex.shlex(raw, posix=True, punctuation_chars=";")
        lex.whitespace_split = True
        tokens = list(lex)
        parts: list[list[str]] = [[]]
        for t in tokens:
            if t == ";":
                parts.append([])
            else:
                parts[-1].append(t)
        for p in parts:
            if p:
                src = raw.split("#", 1)[0].strip() if len(parts) == 1 else " ".join(map(shlex.quote, p))
                cmds.append(Command(n, src, drop_optional(p)))
    return cmds


class Walk:
    """The state of one walk: folders, environment, and what the claims need."""

    def __init__(self, tmp: Path, registry_host: str, softhsm_env: dict[str, str], pin: str):
        self.tmp = tmp
        self.work = tmp / "work"
        self.home = tmp / "home"
        for d in (self.work, self.home, tmp / "xdg", tmp / "mnt-app", tmp / "layers", tmp / "snapshots",
                  tmp / "run"):
            d.mkdir(mode=0o700)
        (self.work / "layout").symlink_to(CORPUS_DIR / "app1")
        self.registry = registry_host
        self.map = {"127.0.0.1:5000": registry_host, "/mnt/app": str(tmp / "mnt-app"),
                    "/var/lib/convstore/layers": str(tmp / "layers"),
                    "/var/lib/convstore/snapshots": str(tmp / "snapshots"),
                    "/run/convstore/snapshotter.sock": str(tmp / "run" / "snapshotter.sock"),
                    "object=master": f"object={KEY_LABEL}"}
        keep = {"PATH", "LANG", "LC_ALL", "TERM", "TMPDIR"}
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env.update(HOME=str(self.home), XDG_RUNTIME_DIR=str(tmp / "xdg"), PKCS11_PIN=pin, **softhsm_env)
        self.env.pop("CONVSTORE_DAEMON", None)

    def concrete(self, argv: list[str]) -> list[str]:
        out = []
        for t in argv:
            for a, b in self.map.items():
                t = t.replace(a, b)
            out.append(t)
        if out[0] == "convstore":
            out = [sys.executable, "-m", "convstore", *out[1:]]
        return out

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.concrete(argv), cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=300, **kw)


# -- what the README says of each command, checked on its output (p) -------------------------------------------------

Check = Callable[[Walk, subprocess.CompletedProcess[str]], None]


def _pack(w: Walk, p) -> None:
    assert p.stdout.startswith("packed myapp:1.0: 2 layers,"), p.stdout
    assert "convstore: created a new master key at " + str(w.home / ".config/convstore/master.key") in p.stderr
    again = w.run(["convstore", "pack", "oci:./layout:latest", "myapp:1.0"])  # "again: a no-op if unchanged"
    assert again.returncode == 0 and "myapp:1.0 is up to date" in again.stdout and "nothing written" in again.stdout


def _images(w: Walk, p) -> None:
    head = p.stdout.splitlines()[0].split()
    assert head[:5] == ["NAME", "TAG", "STATE", "LAYERS", "SIZE"], head
    assert p.stdout.splitlines()[1].split()[:4] == ["myapp", "1.0", "ACTIVE", "2"]


def _inspect(w: Walk, p) -> None:
    for word in ("chunking:", "domain: default", "key: file:", "MEDIA TYPE"):
        assert word in p.stdout, word


def _stats(w: Walk, p) -> None:
    for word in ("logical bytes:", "unique plaintext bytes:", "stored bytes:", "dedup ratio:"):
        assert word in p.stdout, word


def _unpack_oci(w: Walk, p) -> None:
    index = json.loads((w.work / "out" / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((w.work / "out" / "blobs" / "sha256" / digest).read_text())
    corpus = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"]["app1"]
    # "default: each layer as it came": the corpus layers are gzip; their diff_ids match
    assert [l["mediaType"] for l in manifest["layers"]] == [l["mediaType"] for l in corpus["layers"]]
    config = json.loads((w.work / "out" / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["rootfs"]["diff_ids"] == [l["diff_id"] for l in corpus["layers"]]


def _unpack_rootfs(w: Walk, p) -> None:
    assert "bookworm" in (w.work / "rootfs" / "etc" / "os-release").read_text()
    assert (w.work / "rootfs" / "usr" / "bin" / "python3").exists()


def _ls(w: Walk, p) -> None:
    assert re.search(r"^l\S+ .* python3 -> ", p.stdout, re.M), p.stdout[:500]


def _cat(w: Walk, p) -> None:
    assert "bookworm" in p.stdout
    m = re.search(r"fetched (\d+) chunks", p.stderr)
    assert m and 1 <= int(m.group(1)) <= 2, p.stderr  # "fetches only that file's chunks"


def _mount(w: Walk, p) -> None:
    mnt = w.tmp / "mnt-app"
    assert "mounted myapp:1.0 at" in p.stdout and os.path.ismount(mnt)
    assert "bookworm" in (mnt / "etc" / "os-release").read_text()
    assert stat.S_ISLNK(os.lstat(mnt / "usr" / "bin" / "python3").st_mode)


def _unmount(w: Walk, p) -> None:
    assert not os.path.ismount(w.tmp / "mnt-app")


def _run(w: Walk, p) -> None:
    assert p.stdout == "hello\n" and "fetched " in p.stderr, (p.stdout, p.stderr)


def _layerstore(w: Walk, p) -> None:
    layers = w.tmp / "layers"
    try:
        assert "mounted the layer store at" in p.stdout and os.path.ismount(layers)
    finally:
        subprocess.run(["fusermount3", "-u", str(layers)], capture_output=True)
    assert not os.path.ismount(layers)


def _containerd_load(w: Walk, p) -> None:
    assert "containerd" in p.stdout and "--snapshotter" in p.stdout


def _pack_docker(w: Walk, p) -> None:
    assert p.stdout.startswith("packed myapp:2.0: 2 layers,") and "0 new of" in p.stdout  # same content as 1.0


def _push(w: Walk, p) -> None:
    assert p.stdout.startswith(f"pushed myapp:1.0 (oci://{w.registry}/store): sent "), p.stdout
    again = w.run(["convstore", "--insecure", "push", "myapp:1.0", "oci://127.0.0.1:5000/store"])
    assert again.returncode == 0 and ": sent 0 of " in again.stdout, again.stdout  # "only missing chunks travel"


def _pull(w: Walk, p) -> None:
    assert p.stdout.startswith(f"pulled myapp:1.0 (oci://{w.registry}/store): fetched 0 of "), p.stdout


def _registry_run(w: Walk, p) -> None:
    assert p.stdout == "hello\n"
    assert os.listdir(w.home / ".cache" / "convstore" / "registry")  # "via a local cache"


def _registry_pack(w: Walk, p) -> None:
    assert p.stdout.startswith("packed myapp:1.1: 2 layers,"), p.stdout
    assert not (w.work / "oci:").exists()  # straight into the registry, not a local folder


def _domain(w: Walk, p) -> None:
    assert p.stdout.startswith("created domain tenant-a (epoch 1")


def _domain_pack(w: Walk, p) -> None:
    m = re.search(r"(\d+) new of (\d+) chunks", p.stdout)
    assert m and m.group(1) == m.group(2), p.stdout  # another dedup scope: nothing shared with default


def _rekey(w: Walk, p) -> None:
    assert p.stdout.startswith("re-wrapped 3 images, 2 domains,") and f"under pkcs11:" in p.stdout, p.stdout


def _audit(w: Walk, p) -> None:
    assert p.stdout.split()[:8] == ["TIME", "OP", "OUTCOME", "PURPOSE", "IMAGE/DOMAIN", "KEY", "PID", "USER"]
    assert re.search(rf"pkcs11:\S+/{KEY_LABEL}", p.stdout) and re.search(r"file:[0-9a-f]{24}", p.stdout)


def _rm(w: Walk, p) -> None:
    assert p.stdout.startswith("removed myapp:1.0;")


def _gc(w: Walk, p) -> None:
    assert p.stdout.startswith("freed ") and "2 live images" in p.stdout, p.stdout


def _verify(w: Walk, p) -> None:
    assert p.stdout.startswith("checked ") and "of 2 images" in p.stdout and p.stdout.rstrip().endswith("clean")


def _daemon(w: Walk, p) -> None:
    assert "convstore daemon listening on " + str(w.tmp / "xdg" / "convstore" / "cli.sock") in p.stdout


def _daemon_status(w: Walk, p) -> None:
    assert json.loads(p.stdout)["stopping"] is False


def _daemon_stop(w: Walk, p) -> None:
    assert p.stdout.startswith("stopping the convstore daemon (pid "), p.stdout


#: (pattern matching one README command, the check of its output); every pattern must match exactly one command
CLAIMS: list[tuple[str, Check]] = [
    (r"^convstore pack oci:\./layout:latest myapp:1\.0", _pack),
    (r"^convstore images", _images),
    (r"^convstore inspect myapp:1\.0", _inspect),
    (r"^convstore stats", _stats),
    (r"^convstore unpack myapp:1\.0 oci:\./out:1\.0", _unpack_oci),
    (r"^convstore unpack myapp:1\.0 --rootfs \./rootfs", _unpack_rootfs),
    (r"^convstore ls -l myapp:1\.0 /usr/bin", _ls),
    (r"^convstore cat --stats myapp:1\.0 /etc/os-release", _cat),
    (r"^convstore mount --background myapp:1\.0 /mnt/app", _mount),
    (r"^fusermount3 -u /mnt/app", _unmount),
    (r"^convstore run --stats myapp:1\.0", _run),
    (r"^convstore layerstore --background", _layerstore),
    (r"^convstore containerd-load", _containerd_load),
    (r"^convstore --insecure pack docker://127\.0\.0\.1:5000/app:1\.0 myapp:2\.0", _pack_docker),
    (r"^convstore --insecure push myapp:1\.0 oci://127\.0\.0\.1:5000/store", _push),
    (r"^convstore --insecure pull oci://127\.0\.0\.1:5000/store myapp:1\.0", _pull),
    (r"^convstore --insecure --store oci://127\.0\.0\.1:5000/store run myapp:1\.0", _registry_run),
    (r"^convstore --insecure --store oci://127\.0\.0\.1:5000/store pack oci:\./layout:latest myapp:1\.1",
     _registry_pack),
    (r"^convstore domain create tenant-a$", _domain),
    (r"^convstore pack --domain tenant-a ", _domain_pack),
    (r"^convstore rekey --to 'pkcs11:", _rekey),
    (r"^convstore audit --since ", _audit),
    (r"^convstore rm myapp:1\.0$", _rm),
    (r"^convstore gc", _gc),
    (r"^convstore verify", _verify),
    (r"^convstore daemon --background", _daemon),
    (r"^convstore daemon --status$", _daemon_status),
    (r"^convstore daemon --stop$", _daemon_stop),
]

#: commands run with a minimal check only (see the module's docstring), by their README text
MINIMAL = {"containerd-load": ["--help"]}


def start_snapshotter(w: Walk, cmd: Command) -> None:
    """Start it as written, wait (bounded) until its socket exists, stop it."""
    sock = w.tmp / "run" / "snapshotter.sock"
    proc = subprocess.Popen(w.concrete(cmd.argv), cwd=w.work, env=w.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), f"README line {cmd.line}: {cmd.text}: no socket ({proc.poll()}, " \
                              f"{proc.stderr.read() if proc.poll() is not None and proc.stderr else ''})"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def api_snippet(text: str) -> str:
    return fenced_block(text, "## Python API", "python")[1]


API_CLAIMS = '''
# -- the test's checks of what the snippet's comments say --
import stat as _st
assert r.chunks > 0 and r.seconds > 0 and r.new_chunks == r.chunks
with ImageFS.from_store(store, "app:1") as fs:
    assert _st.S_ISREG(fs.stat("/usr/bin/python3", follow=True).st_mode)   # follow=True: the file
    assert _st.S_ISLNK(fs.stat("/usr/bin/python3").st_mode)                 # default: the link's own stat
    with fs.open("/etc/os-release") as f:
        f.seek(5)
        assert b"bookworm" in f.read()
import os as _os
assert _os.path.isfile("./rootfs-api/etc/os-release") and _os.path.isfile("./out-zstd/index.json")
print("API-WALK-OK")
'''


def walk(w: Walk, text: str) -> list[str]:
    """Run the tour, then the API snippet; return what ran (for the log)."""
    cmds = tour_commands(text)
    matched = {pat: [c for c in cmds if re.search(pat, c.text)] for pat, _ in CLAIMS}
    for pat, hits in matched.items():
        assert len(hits) == 1, f"README's CLI tour: {len(hits)} commands match {pat!r} (the walk expects one)"
    checks = {id(matched[pat][0]): chk for pat, chk in CLAIMS}
    done = []
    for c in cmds:
        where = f"README line {c.line}: {c.text}"
        if c.argv[0] == "export":
            k, _, v = c.argv[1].partition("=")
            w.env[k] = w.concrete([v])[0]
            continue
        if c.argv[:2] == ["convstore", "snapshotter"]:
            start_snapshotter(w, c)
            done.append(c.text + "  [started until its socket answered, then stopped]")
            continue
        argv = c.argv
        if c.argv[1] in MINIMAL:
            argv = c.argv[:2] + MINIMAL[c.argv[1]]
        p = w.run(argv)
        assert p.returncode == 0, f"{where}\nexited {p.returncode}: {p.stderr.strip()}"
        assert "Traceback" not in p.stderr, f"{where}\n{p.stderr}"
        chk = checks.get(id(c))
        if chk is not None:
            try:
                chk(w, p)
            except AssertionError as e:
                raise AssertionError(f"{where}\nthe output no longer matches the README: {e}\n"
                                     f"stdout: {p.stdout[-800:]}\nstderr: {p.stderr[-800:]}") from None
        done.append(" ".join(argv) if argv is not c.argv else c.text)
    # the API snippet, in a HOME of its own (its Store.open() makes the default store and key)
    api_home = w.tmp / "api-home"
    api_home.mkdir()
    script = w.work / "readme_api.py"
    script.write_text(api_snippet(text) + API_CLAIMS)
    p = subprocess.run([sys.executable, str(script)], cwd=w.work, env=dict(w.env, HOME=str(api_home)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "API-WALK-OK" in p.stdout, f"README's Python API snippet failed:\n{p.stderr[-2000:]}"
    assert "chunks_fetched" in p.stdout  # print(fs.fetcher.stats)
    return done


def test_readme_walk(tmp_path, corpus, registry, softhsm):
    from kms_fixtures import PIN

    for tool in ("skopeo", "fusermount3", "runc"):
        need_tool(tool)
    softhsm.add_key(KEY_LABEL)
    # what the README presumes: an image in the registry at 127.0.0.1:5000/app:1.0
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{CORPUS_DIR / 'app1'}:latest",
                    f"docker://{registry.host}/app:1.0"], check=True, capture_output=True)
    w = Walk(tmp_path, registry.host, softhsm.env, PIN)
    text = README.read_text()
    t0 = time.monotonic()
    try:
        done = walk(w, text)
    finally:
        for mnt in (tmp_path / "mnt-app", tmp_path / "layers"):
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        sock = tmp_path / "xdg" / "convstore" / "cli.sock"
        if sock.exists():
            w.run(["convstore", "daemon", "--stop"])
    print(f"\nREADME walk: {len(done)} commands and the API snippet in {time.monotonic() - t0:.1f} s")
    assert len(done) >= len(CLAIMS)


def test_tour_parser():
    """The walk's reading of the README: optional parts, quoting, `;`, comments."""
    text = ("## CLI tour\n\n```sh\n"
            "convstore gc [--dry-run]   # c\n"
            "convstore verify [x:1] [--repair [--from STORE]]  # c\n"
            "convstore a; convstore b 'p;q' c  # d\n"
            "                           # only a comment\n```\n")
    assert [c.argv for c in tour_commands(text)] == [["convstore", "gc"], ["convstore", "verify"], ["convstore", "a"],
                                                     ["convstore", "b", "p;q", "c"]]
