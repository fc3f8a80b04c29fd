"""Attacks on ``convstore run``'s option table (convstore/cli_fast.py): a cache dir someone else controls
(``su`` keeps the user's XDG_CACHE_HOME), a FIFO or a symlink in the table's place, a table that passes the
ownership checks but has the wrong shape or names other parameters.  Each must leave the command line to
typer: the same answer, one line, never a hang, a traceback or a file written elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

NOBODY = 65534
ARGV = ["run", "nope:1"]


def _env(tmp_path: Path, cache: Path) -> dict[str, str]:
    return dict(os.environ, CONVSTORE_DAEMON="0", CONVSTORE_CONFIG="", XDG_CACHE_HOME=str(cache),
                CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}",
                CONVSTORE_KEEP_DIR=str(tmp_path / "keep"))


def _convstore(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "convstore", *ARGV], env={**env, **extra},
                              capture_output=True, text=True, timeout=60, cwd="/")
    except subprocess.TimeoutExpired:
        pytest.fail("convstore run hung on the table in its cache dir")


def _as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd], check=True)


def _typer_answer(env: dict[str, str]) -> tuple[int, str]:
    p = _convstore(env, CONVSTORE_NO_FAST_RUN="1")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    return p.returncode, p.stderr


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another uid's files: needs root")


@pytest.fixture
def shared():
    """A folder uid 65534 can reach (pytest's tmp_path is under a 0700 folder of root's)."""
    d = Path(tempfile.mkdtemp(prefix="convstore-attack-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d)


@needs_root
def test_a_fifo_in_another_users_cache_dir_does_not_hang_root(tmp_path: Path, shared: Path) -> None:
    """Root's cache dir is in a folder uid 65534 owns; it puts a FIFO where the table goes."""
    cache = shared / "home-of-nobody"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    _as_nobody("mkdir", "-p", str(cache / "convstore"))
    _as_nobody("mkfifo", str(cache / "convstore" / "cli-run-options.json"))
    env = _env(tmp_path, cache)
    p = _convstore(env)
    assert (p.returncode, p.stderr) == _typer_answer(env)


@needs_root
def test_root_writes_no_table_through_another_users_symlink_or_folder(tmp_path: Path, shared: Path) -> None:
    """uid 65534 makes root's cache folder a symlink to a folder of its choice (then a folder of its own):
    root writes its table in neither, and uses none."""
    cache, victim = shared / "home-of-nobody", tmp_path / "etc"
    cache.mkdir()
    victim.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    _as_nobody("ln", "-s", str(victim), str(cache / "convstore"))
    env = _env(tmp_path, cache)
    answer = _typer_answer(env)
    for _ in range(2):  # typer's run writes the table, the next would read it
        p = _convstore(env)
        assert (p.returncode, p.stderr) == answer
    assert list(victim.iterdir()) == []
    os.unlink(cache / "convstore")
    _as_nobody("mkdir", str(cache / "convstore"))
    for _ in range(2):
        p = _convstore(env)
        assert (p.returncode, p.stderr) == answer
    assert list((cache / "convstore").iterdir()) == []


def _good_table(tmp_path: Path) -> tuple[dict[str, str], Path, dict]:
    cache = tmp_path / "cache"
    env = _env(tmp_path, cache)
    _convstore(env)  # typer's run writes the table
    path = cache / "convstore" / "cli-run-options.json"
    return env, path, json.loads(path.read_text())


def _broken(good: dict) -> dict[str, dict]:
    def edit(f):
        t = json.loads(json.dumps(good))
        f(t)
        return t

    return {
        "no global section": edit(lambda t: t.pop("global")),
        "tokens a list": edit(lambda t: t["run"].__setitem__("tokens", [])),
        "a kind it does not know": edit(lambda t: t["run"]["tokens"].__setitem__("--stats", ["show_stats", "int", 1])),
        "a bound not a number": edit(lambda t: t["global"]["tokens"].__setitem__(
            "--timeout", ["timeout", "float", ["0", None, False, False]])),
        "args not pairs": edit(lambda t: t["run"].__setitem__("args", [["ref"]])),
        "a parameter run does not take": edit(lambda t: t["run"]["defaults"].__setitem__("bogus", 1)),
        "a parameter missing": edit(lambda t: t["global"]["defaults"].pop("quiet") and
                                    [t["global"]["tokens"].pop(k) for k in ("-q", "--quiet")]),
        "an option for an unknown parameter": edit(lambda t: t["run"]["tokens"].__setitem__(
            "--rm", ["rm", "flag", True])),
    }


def test_a_malformed_table_of_this_user_is_no_table(tmp_path: Path) -> None:
    """A table that passes the file checks (0600, this user's, current key) but has the wrong shape or
    names other parameters than set_globals/run_command take: typer's answer, one line, no traceback."""
    env, path, good = _good_table(tmp_path)
    answer = _typer_answer(env)
    for what, table in _broken(good).items():
        path.write_text(json.dumps(table))
        os.chmod(path, 0o600)
        p = _convstore(env)
        assert "Traceback" not in p.stderr and "internal error" not in p.stderr, (what, p.stderr)
        assert (p.returncode, p.stderr) == answer, what


def test_a_fifo_in_this_users_cache_dir_is_no_table(tmp_path: Path) -> None:
    env, path, _good = _good_table(tmp_path)
    path.unlink()
    os.mkfifo(path, 0o600)
    p = _convstore(env)
    assert (p.returncode, p.stderr) == _typer_answer(env)
