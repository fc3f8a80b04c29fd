"""What the command line's commands share, without typer: the global options' state, the store they open,
output, and how an error becomes an exit status.

``convstore run``'s fast path (:mod:`convstore.cli_fast`) runs a command through this module without
importing typer, click or rich; :mod:`convstore.cli` declares the options and runs every other command line
through typer, on the same functions.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from .errors import ConfigError, ConvstoreError, InvalidReference
from .options import StoreOptions, is_registry_url, is_s3_url, resolve_store_location

if TYPE_CHECKING:
    from rich.console import Console

    from .store import Store


class _LazyConsole:
    """A rich Console made on first use.  Plain text bound for a pipe or a
    file is written as it is, without importing rich (30-40 ms of every
    scripted command) and without reading it as rich markup."""

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        return self._console

    def print(self, obj: Any = "", **kw: Any) -> None:
        stream = sys.stderr if self._kw.get("stderr") else sys.stdout
        if isinstance(obj, str) and self._console is None and not stream.isatty():
            stream.write(obj + "\n")
            stream.flush()
        else:
            self.get().print(obj, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


out = _LazyConsole(soft_wrap=True)
err = _LazyConsole(stderr=True)


class _State:
    store_path: str | None = None
    key_spec: str | None = None
    quiet: bool = False
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    inactive_after: float | None = None
    kms_endpoint: str | None = None
    insecure: bool = False
    username: str | None = None
    password_stdin: bool = False
    cache: str | None = None
    cache_size: float = 2048.0
    site_cache: str | None = None
    site_cache_flag: bool = False
    # the command's work is done and on disk when it ends: its own process may skip the interpreter's
    # finalization (__main__; 40-65 ms of a `convstore run`)
    exit_without_finalizing: bool = False
    timeout: float = 60.0
    read_deadline: float = 10.0
    offline_max_age: float = 86400.0
    allow_rollback: bool = False
    s3_endpoint: str | None = None
    in_daemon: bool = False  # a daemon's forked child runs this command


state = _State()
#: ``run --keep-mount``'s default through the daemon (a long-lived per-user service already; docs/architecture.md)
KEEP_MOUNT_IN_DAEMON = 300.0


class BadValue(ValueError):
    """A malformed option value: the command line's usage error (typer.BadParameter in :mod:`convstore.cli`,
    exit 2).  Raised before the command has done anything."""


def duration(spec: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        if spec[-1] in units:
            return float(spec[:-1]) * units[spec[-1]]
        return float(spec)
    except (ValueError, IndexError):
        raise BadValue(f"bad duration {spec!r} (use e.g. 30s, 12h, 14d)") from None


_password: list[str | None] = []


def _options(url: str | None, create: bool = False) -> StoreOptions:
    """The store options the global flags describe (the registry password is read once).
    ``url``: ``--store`` or another store argument (None: $CONVSTORE_STORE or the default);
    ``create``: whether the command may create the store (read-only commands never do)."""
    reg: dict[str, Any] = {}
    url = resolve_store_location(url)
    if is_registry_url(url):
        if state.password_stdin and not _password:
            _password.append(sys.stdin.readline().rstrip("\n"))
        reg = {"username": state.username,
               "password": _password[0] if _password else None, "cache_dir": state.cache,
               "cache_bytes": int(state.cache_size * 1e6), "timeout": state.timeout,
               "site_cache": state.site_cache, "read_deadline": state.read_deadline,
               "offline_max_age": state.offline_max_age}
    elif is_s3_url(url):
        reg = {"cache_dir": state.cache, "cache_bytes": int(state.cache_size * 1e6), "timeout": state.timeout,
               "s3_endpoint": state.s3_endpoint}
        if state.site_cache_flag:  # refused when it is opened: a site tier fronts registry stores
            reg["site_cache"] = state.site_cache
    elif state.site_cache_flag:  # named for a local store: refused when it is opened ($CONVSTORE_SITE_CACHE is not)
        reg = {"site_cache": state.site_cache}
    now = os.environ.get("CONVSTORE_NOW")  # a fixed clock (epoch seconds) for tests and what-if runs
    return StoreOptions(path=url, key=state.key_spec, kms_endpoint=state.kms_endpoint,
                        inactive_after=state.inactive_after, latency_ms=state.latency_ms,
                        bandwidth_mbps=state.bandwidth_mbps, allow_rollback=state.allow_rollback,
                        now=float(now) if now else None, create=create, insecure=state.insecure, **reg)


#: key files this command created: said once it ends (in its error line if it fails)
_created_keys: list[str] = []


def _open(url: str | None, create: bool = False) -> Store:
    from .keys import LocalKeyFile
    from .store import Store

    s = Store.open_with(_options(url, create))

    key = getattr(s.key, "inner", s.key)
    if isinstance(key, LocalKeyFile) and key.created:
        _created_keys.append(key.path)
    return s


def _store(create: bool = False) -> Store:
    """The store ``--store`` names; only commands that write images (pack, pull, domain create) create it."""
    return _open(state.store_path, create)


def _print_fetch_stats(stats: dict[str, Any], extra: str = "") -> None:
    err.print(f"fetched {stats['chunks_fetched']} chunks, {_mb(stats['bytes_fetched'])} from the store "
              f"({_mb(stats['plain_bytes_fetched'])} plaintext); {_mb(stats['bytes_read'])} read; "
              f"cache hits {stats['cache_hits']}, misses {stats['cache_misses']}, "
              f"prefetched {stats['prefetched_chunks']}; waited {stats['wait_seconds']:.3f} s on the store"
              + (f"; {stats['requests']} requests to the registry" if stats.get("requests") else "")
              + (f"; {extra}" if extra else ""), highlight=False, soft_wrap=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _policy(path: str | None) -> Any:
    """The trust policy at ``path`` (must exist), else the one the containers tools find."""
    from .oci.policy import load_policy

    return load_policy(path)


def _n(count: int, noun: str) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{count} {noun if count == 1 else noun + 's'}"


def _background_fetch(enabled: Optional[bool], rate: Optional[str]) -> Any:
    """The node's background-fetch setting: the options over the environment (convstore.reader.background)."""
    from .reader.background import BackgroundConfig

    return BackgroundConfig.from_env(enabled, rate)


def _fail(msg: str, status: int) -> None:
    """One line on stderr (naming a key file this command created), and the exit status."""
    if _created_keys:
        msg += f" (a new master key was created at {', '.join(_created_keys)})"
    err.print(f"convstore: {msg}", highlight=False, markup=False, soft_wrap=True)
    sys.exit(status)


def _say_created_keys() -> None:
    for path in _created_keys:
        err.print(f"convstore: created a new master key at {path} (mode 0600); keep a copy of it: "
                  f"without it the store cannot be read", highlight=False, markup=False, soft_wrap=True)
    _created_keys.clear()


def set_globals(*, store: Optional[str], key: Optional[str], quiet: bool, latency: float, bandwidth: float,
                insecure: bool, username: Optional[str], password_stdin: bool, cache: Optional[str],
                cache_size: float, timeout: float, site_cache: Optional[str], read_deadline: float,
                offline_max_age: str, kms_endpoint: Optional[str], inactive_after: Optional[str],
                allow_rollback: bool, s3_endpoint: Optional[str]) -> None:
    """The global options (``convstore --store ... COMMAND``), as every command reads them."""
    state.store_path = store
    state.key_spec = key
    state.quiet = quiet
    state.latency_ms = latency
    state.bandwidth_mbps = bandwidth
    state.kms_endpoint = kms_endpoint
    state.insecure, state.username, state.password_stdin = insecure, username, password_stdin
    state.cache, state.cache_size, state.timeout = cache, cache_size, timeout
    state.site_cache = site_cache or os.environ.get("CONVSTORE_SITE_CACHE") or None
    state.site_cache_flag = site_cache is not None
    state.read_deadline, state.offline_max_age = read_deadline, duration(offline_max_age)
    state.allow_rollback = allow_rollback
    state.s3_endpoint = s3_endpoint
    spec = inactive_after or os.environ.get("CONVSTORE_INACTIVE_AFTER")
    state.inactive_after = duration(spec) if spec else None


def run_command(*, ref: str, command: Optional[list[str]], runtime: str, show_stats: bool, prefetch: bool,
                record: Optional[bool], json_out: bool, policy: Optional[str], background_fetch: Optional[bool],
                background_rate: Optional[str], keep_mount: Optional[str]) -> int:
    """``convstore run``: the container's exit status.  A bad ``--runtime`` or keep duration is a
    :class:`BadValue`, raised before anything is opened."""
    if runtime not in ("auto", "runc", "chroot"):
        raise BadValue("--runtime must be auto, runc or chroot")
    from .engines.run import run_image

    spec = keep_mount if keep_mount is not None else os.environ.get("CONVSTORE_KEEP_MOUNT")
    keep = duration(spec) if spec else (KEEP_MOUNT_IN_DAEMON if state.in_daemon else None)
    r = run_image(_store(), ref, command or None, runtime=runtime, prefetch=prefetch, record=record,
                  policy=_policy(policy), keep=keep,
                  # without options: the environment's, read where a fetch starts (not on a kept mount)
                  background=None if background_fetch is None and background_rate is None
                  else _background_fetch(background_fetch, background_rate))
    if json_out:
        err.print(json.dumps(r.to_json()), highlight=False, soft_wrap=True)
    elif show_stats and r.kept:  # its keeper fetched what it read
        err.print(f"{r.runtime} in {r.seconds:.2f} s on a kept mount ({_n(r.keeper_runs, 'run')} on it)",
                  highlight=False, soft_wrap=True)
    elif show_stats:
        _print_fetch_stats(r.fetch, f"{r.runtime} in {r.seconds:.2f} s; FUSE reads {r.fuse_read_calls} "
                                    f"({_mb(r.fuse_read_bytes)}); profile {r.profile}")
    _State.exit_without_finalizing = True
    return r.exit_code


def guarded(command: Callable[[], object]) -> None:
    """Run ``command`` (it ends with SystemExit, success or not): usage errors exit 2, operational errors 1,
    each one line on stderr.  A :class:`BadValue` is the caller's to report (convstore.cli_fast: typer)."""
    try:
        command()
    except SystemExit:  # typer's end of a command, success or not
        _say_created_keys()
        raise
    except BadValue:
        raise
    except (InvalidReference, ConfigError) as e:  # a malformed NAME, SOURCE, --store, --key or config: usage
        _fail(f"error: {e}", 2)
    except ConvstoreError as e:
        _fail(f"error: {e}", 1)
    except OSError as e:
        _fail(f"error: {e}", 1)
    except Exception as e:
        if os.environ.get("CONVSTORE_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set CONVSTORE_DEBUG=1 for a traceback)", 1)
    _say_created_keys()
