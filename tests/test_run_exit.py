"""``convstore run`` in its own process ends without the interpreter's finalization (convstore.__main__):
what the command and its container said, its exit status and its start-up profile must all be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CORPUS_DIR, run_cli

SCRIPT = "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; echo to-stderr >&2; exit 7"


def _own_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # `python -m convstore` (the entry point a user runs), never a daemon
    return subprocess.run([sys.executable, "-m", "convstore", *args], env={**env, "CONVSTORE_DAEMON": "0"},
                          capture_output=True, text=True, timeout=300)


def test_run_in_its_own_process_keeps_status_output_and_profile(tmp_path: Path, corpus: dict) -> None:
    env = dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}")
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    p = _own_process(env, "run", "--json", "app1:latest", "--", "/bin/sh", "-c", SCRIPT)
    assert p.returncode == 7, p.stderr
    assert p.stdout.splitlines() == [f"line{i}" for i in range(3000)]
    lines = p.stderr.splitlines()
    assert "to-stderr" in lines
    summary = json.loads(lines[-1])  # the run's summary, written by the CLI just before it ends
    assert summary["exit_code"] == 7 and summary["profile"].startswith("recorded")
    # the profile that run saved is there for the next start
    p = _own_process(env, "run", "--json", "app1:latest")
    assert p.returncode == 0 and p.stdout == "hello\n", p.stderr
    state = json.loads(p.stderr.splitlines()[-1])["profile"]
    assert state.startswith("prefetched") or "(profile " in state, state
