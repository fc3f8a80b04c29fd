"""``convstore run``'s fast path (convstore/cli_fast.py): a plain ``run`` command line without typer.

It must mean what typer makes of the same command line (the same parameters reach the same functions),
hand everything else to typer untouched (every usage error and help text word for word), and really
skip typer, click and rich.  Its option table is derived from typer's own command and trusted only if
this user wrote it and no one else can."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import CORPUS_DIR, run_cli

UI = ("typer", "click", "rich", "convstore.cli")

#: command lines the fast path parses: (global options, run's options and arguments)
PLAIN = [
    ["run", "app:1"],
    ["--store", "/s", "--key=file:/k", "-q", "run", "app:1", "--", "sh", "-c", "exit 3"],
    ["--simulate-latency", "5", "--cache-size=10", "--timeout", "2.5", "run", "--no-prefetch", "--keep-mount",
     "10m", "app:1", "ls", "-"],
    ["run", "app:1", "--stats", "--record-profile", "--runtime", "chroot", "--json"],
    ["run", "--policy", "/p.json", "--background-rate", "5M", "--no-background-fetch", "app:1", "x", "y"],
    ["--insecure", "--allow-rollback", "--inactive-after", "3d", "--offline-max-age", "0", "--username", "u",
     "--site-cache", "http://127.0.0.1:1", "--s3-endpoint=http://127.0.0.1:2", "run", "app:1"],
    ["run", "--runtime", "runc", "--runtime", "auto", "app:1", "--no-record-profile", "--record-profile"],
    ["--inactive-after", "", "run", "app:1"],
    ["--read-deadline=0.5", "--simulate-bandwidth", "1e3", "--cache", "/c", "--kms-endpoint", "http://k", "run",
     "--background-fetch", "--keep-mount=0", "app:1", "--", "--stats"],
]

#: command lines it hands to typer: help, errors of every kind, what it has no entry for
UNUSUAL = [
    ["run", "--help"],
    ["--help"],
    ["run"],
    ["run", "app:1", "--bogus"],
    ["--bogus", "run", "app:1"],
    ["--simulate-latency", "-1", "run", "app:1"],
    ["--simulate-latency", "abc", "run", "app:1"],
    ["--cache-size=0.5", "run", "app:1"],
    ["run", "--runtime", "docker", "app:1"],
    ["run", "--keep-mount", "5x", "app:1"],
    ["--offline-max-age", "zz", "run", "app:1"],
    ["-qx", "run", "app:1"],
    ["run", "app:1", "--stats=1"],
    ["--version", "run"],
    ["run", "--keep-mount"],
    ["--store", "run"],
    ["--config", "/nonexistent.toml", "run", "app:1"],
    ["--", "run", "app:1"],
    ["run", "app:1", "-x"],
]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, CONVSTORE_DAEMON="0", CONVSTORE_CONFIG="", XDG_CACHE_HOME=str(tmp_path / "cache"),
                CONVSTORE_KEEP_DIR=str(tmp_path / "keep"), **extra)


_PROBE = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from convstore.__main__ import main
main()
"""


def _convstore(env: dict[str, str], args: list[str], modules: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m convstore ARGS`` (with the modules it had loaded at its end written to ``modules``)."""
    cmd = [sys.executable, "-c", _PROBE, str(modules)] if modules else [sys.executable, "-m", "convstore"]
    os.makedirs(env["XDG_CACHE_HOME"], exist_ok=True)
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=env["XDG_CACHE_HOME"])


def _table(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "convstore" / "cli-run-options.json"


# -- the same parameters as typer ---------------------------------------------------------------------


def _recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    from convstore import cli_base

    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli_base, "set_globals", lambda **kw: calls.append(("globals", kw)))
    monkeypatch.setattr(cli_base, "run_command", lambda **kw: calls.append(("run", kw)) or 0)
    return calls


def test_the_fast_parse_passes_what_typer_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plain command line: the global options and run's parameters typer hands to the command's
    functions, and the fast path the same, value for value and type for type."""
    from convstore import cli, cli_fast

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    calls = _recorded(monkeypatch)
    for argv in PLAIN:
        monkeypatch.setattr(sys, "argv", ["convstore", *argv])
        calls.clear()
        with pytest.raises(SystemExit) as typer_exit:
            cli.main()  # typer (and it writes the table the fast path reads)
        by_typer = list(calls)
        assert [c for c, _ in by_typer] == ["globals", "run"], (argv, by_typer)
        calls.clear()
        with pytest.raises(SystemExit) as fast_exit:
            cli_fast.run_fast(argv)  # returns, without raising, only if typer must run it
        assert calls == by_typer, argv
        assert [{k: type(v) for k, v in kw.items()} for _, kw in calls] == [
            {k: type(v) for k, v in kw.items()} for _, kw in by_typer], argv  # 0.0 is not 0, [] not ()
        assert fast_exit.value.code == typer_exit.value.code == 0
    assert _table(tmp_path).stat().st_mode & 0o777 == 0o600


def test_what_it_does_not_know_is_left_to_typer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Help, a usage error of any kind, an unknown option: run_fast does nothing at all."""
    from convstore import cli, cli_fast

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with monkeypatch.context() as m:
        _recorded(m)
        m.setattr(sys, "argv", ["convstore", "run", "app:1"])
        with pytest.raises(SystemExit):
            cli.main()  # the table
    assert _table(tmp_path).exists()
    for argv in UNUSUAL:  # had it run anything, it would end with SystemExit (at the latest: no store)
        assert cli_fast.run_fast(argv) is None, argv


# -- the same answers, word for word ------------------------------------------------------------------


def test_typer_answers_the_unusual_command_lines_word_for_word(tmp_path: Path) -> None:
    """Each unusual command line, and a plain one naming a missing image: the same exit status, output
    and error as with the fast path off."""
    env = _env(tmp_path, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}")
    run_cli(env, "domain", "create", "default")  # a store (and its key), without images
    assert _convstore(env, ["run", "nope:1"]).returncode == 1  # typer's first run writes the table
    assert _table(tmp_path).exists()
    for argv in [*UNUSUAL, ["run", "nope:1"], ["run", "--json", "nope:1", "--", "x"],
                 ["--store", str(tmp_path / "nostore"), "run", "app:1"]]:
        fast = _convstore(env, argv)
        slow = _convstore({**env, "CONVSTORE_NO_FAST_RUN": "1"}, argv)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), argv
        assert fast.returncode != 0 or argv in (["run", "--help"], ["--help"], ["--version", "run"]), argv
        if "zz" in argv or "5x" in argv or "docker" in argv:  # a value typer refuses (was its BadParameter)
            assert fast.returncode == 2 and "Invalid value: " in fast.stderr, (argv, fast.stderr)


def test_a_missing_image_fails_alike_and_without_typer(tmp_path: Path) -> None:
    env = _env(tmp_path, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}")
    run_cli(env, "domain", "create", "default")
    first = _convstore(env, ["run", "nope:1"], tmp_path / "m1.json")
    second = _convstore(env, ["run", "nope:1"], tmp_path / "m2.json")
    assert first.returncode == second.returncode == 1 and first.stderr == second.stderr
    assert "nope:1" in second.stderr and len(second.stderr.splitlines()) == 1, second.stderr
    assert {"typer", "convstore.cli"} <= set(json.loads((tmp_path / "m1.json").read_text())), "typer ran it"
    loaded = set(json.loads((tmp_path / "m2.json").read_text()))
    assert not loaded & set(UI), sorted(loaded & set(UI))


# -- a real run ---------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="convstore run needs root (FUSE, runc)")
def test_a_plain_run_starts_the_image_without_typer(tmp_path: Path, corpus: dict) -> None:
    """A real ``convstore run`` of a corpus image on a kept mount: the same output and exit status on both
    paths, and the second (the table written by the first, typer's) imports no typer, click or rich."""
    from convstore.engines import keeper

    env = _env(tmp_path, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}",
               CONVSTORE_KEEP_MOUNT="1m")
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'base'}:latest", "img:1")
    argv = ["-q", "run", "img:1", "--", "/bin/sh", "-c", "echo hi $0; exit 3"]
    try:
        runs = [_convstore(env, argv, tmp_path / f"m{i}.json") for i in range(3)]
    finally:
        os.environ["CONVSTORE_KEEP_DIR"] = env["CONVSTORE_KEEP_DIR"]
        try:
            keeper.stop_keepers()
        finally:
            del os.environ["CONVSTORE_KEEP_DIR"]
    assert [(r.returncode, r.stdout) for r in runs] == [(3, "hi /bin/sh\n")] * 3, [r.stderr for r in runs]
    loaded = [set(json.loads((tmp_path / f"m{i}.json").read_text())) for i in range(3)]
    assert {"typer", "convstore.cli"} <= loaded[0]  # no table yet: typer ran it (and wrote one)
    assert not loaded[1] & set(UI) and not loaded[2] & set(UI), sorted(loaded[2] & set(UI))
    assert "convstore.engines.run" in loaded[2], "the probe did not see the run's modules"


# -- the table ----------------------------------------------------------------------------------------


def test_a_table_others_could_write_or_a_stale_one_is_not_used(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that lies (``--store`` feeding the key) is used by no one if it is writable by others, or
    if it was made for other code (its key); the table typer wrote is."""
    from convstore import cli, cli_fast

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    _recorded(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["convstore", "run", "app:1"])
    with pytest.raises(SystemExit):
        cli.main()
    path = _table(tmp_path)
    good = json.loads(path.read_text())
    assert cli_fast._load() == good
    lie = json.loads(path.read_text())
    lie["global"]["tokens"]["--store"][0] = "key"
    path.write_text(json.dumps(lie))
    assert cli_fast._load() == lie  # 0600, this user's, current: used (what the next two checks refuse)
    os.chmod(path, 0o622)
    assert cli_fast._load() is None
    os.chmod(path, 0o600)
    path.write_text(json.dumps({**lie, "key": lie["key"].replace("cli.py:", "cli.py:1")}))
    assert cli_fast._load() is None
    path.write_text(json.dumps({**good, "version": 2}))
    assert cli_fast._load() is None
