"""Programs convstore runs that are not convstore (runc here) never get a secret from its environment:
no key spec (``CONVSTORE_KEY``, which can carry a PIN), no cloud credentials (``AWS_*``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS_DIR, run_cli


def test_runc_gets_no_key_spec_and_no_cloud_credentials(tmp_path: Path, corpus: dict) -> None:
    runc = shutil.which("runc")
    if runc is None or os.geteuid() != 0:
        pytest.skip("needs runc and root")
    # the real runc, behind a wrapper that first writes down the environment it was given
    seen = tmp_path / "runc-env"
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "runc").write_text(f'#!/bin/sh\ncat /proc/self/environ >> {seen}\nprintf "\\n--\\n" >> {seen}\n'
                                f'exec {runc} "$@"\n')
    (tools / "runc").chmod(0o755)
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    env = dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}",
               AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=secret + "-token",
               PATH=f"{tools}:{os.environ['PATH']}", CONVSTORE_DAEMON="0", CONVSTORE_KEEP_MOUNT="0")
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    p = subprocess.run([sys.executable, "-m", "convstore", "run", "--runtime", "runc", "app1:latest"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout == "hello\n", p.stderr
    given = seen.read_bytes()
    assert b"PATH=" in given  # the wrapper ran: runc was started through it
    for name in (b"CONVSTORE_KEY=", b"CONVSTORE_STORE=", b"AWS_ACCESS_KEY_ID=", b"AWS_SECRET_ACCESS_KEY=",
                 b"AWS_SESSION_TOKEN="):
        assert name not in given, f"runc was given {name.decode()}"
    assert secret.encode() not in given and str(tmp_path / "key").encode() not in given
