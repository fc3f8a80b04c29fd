"""Attack on ``convstore run``'s working folders (image mount, runc bundle): root runs it with a TMPDIR another
user can write (``su`` keeps the user's TMPDIR).  If the folders sat there, that user could rename one away and
put their own in its place between convstore writing the bundle's config.json and runc reading it (a config
of theirs: hooks run on the host as root).  They go where no other user can rename them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, run_cli

NOBODY = 65534

#: uid 65534's side: watch TMPDIR and rename every folder convstore makes there (it can: the folder is its)
RACER = r"""
import os, sys, time
tmp, stop = sys.argv[1], sys.argv[2]
while not os.path.exists(stop):
    for name in os.listdir(tmp):
        if name.startswith("convstore-") and not name.endswith(".stolen"):
            try:
                os.rename(os.path.join(tmp, name), os.path.join(tmp, name + ".stolen"))
            except OSError:
                pass
    time.sleep(0.0005)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="convstore run and another uid: needs root")
def test_run_makes_no_folder_another_user_can_swap(tmp_path: Path, corpus: dict) -> None:
    evil_tmp = Path(tempfile.mkdtemp(prefix="convstore-attack-"))  # reachable by 65534 (tmp_path is not)
    try:
        os.chmod(evil_tmp, 0o755)
        os.chown(evil_tmp, NOBODY, NOBODY)
        env = dict(os.environ, CONVSTORE_DAEMON="0", CONVSTORE_CONFIG="", CONVSTORE_STORE=str(tmp_path / "store"),
                   CONVSTORE_KEY=f"file:{tmp_path / 'key'}", CONVSTORE_KEEP_DIR=str(tmp_path / "keep"),
                   XDG_CACHE_HOME=str(tmp_path / "cache"))
        run_cli(env, "pack", f"oci:{CORPUS_DIR / 'base'}:latest", "img:1")
        stop = evil_tmp / "stop"
        racer = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                  sys.executable, "-c", RACER, str(evil_tmp), str(stop)])
        try:
            p = subprocess.run([sys.executable, "-m", "convstore", "-q", "run", "--runtime", "runc", "img:1", "--",
                                "/bin/sh", "-c", "echo ran"], env={**env, "TMPDIR": str(evil_tmp)},
                               capture_output=True, text=True, timeout=300)
        finally:
            stop.touch()
            racer.wait(30)
        stolen = [n for n in os.listdir(evil_tmp) if n.endswith(".stolen")]
        assert stolen == [], f"uid {NOBODY} renamed root's folders {stolen}: {p.stderr}"
        assert (p.returncode, p.stdout) == (0, "ran\n"), p.stderr
    finally:
        for line in Path("/proc/self/mountinfo").read_text().splitlines()[::-1]:
            if str(evil_tmp) in line.split()[4]:
                subprocess.run(["umount", "-l", line.split()[4]], check=False)
        shutil.rmtree(evil_tmp, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a folder of another uid: needs root")
def test_a_services_notify_socket_is_not_made_where_another_user_can_swap_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # a background service's READY socket: in another user's TMPDIR, that user could rename the folder and bind
    # a socket of theirs at the path the child is given (the parent then waits for a READY that never comes)
    from convstore.service.background import ReadyWaiter

    evil_tmp = Path(tempfile.mkdtemp(prefix="convstore-attack-"))
    try:
        os.chown(evil_tmp, NOBODY, NOBODY)
        monkeypatch.setenv("TMPDIR", str(evil_tmp))
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
        assert tempfile.gettempdir() == str(evil_tmp)  # the attack's premise: this is where mkdtemp goes
        with ReadyWaiter() as w:
            assert not w.path.startswith(str(evil_tmp) + "/"), w.path
            assert os.stat(os.path.dirname(w.path)).st_uid == 0
    finally:
        shutil.rmtree(evil_tmp, ignore_errors=True)
