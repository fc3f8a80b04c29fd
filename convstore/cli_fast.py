"""``convstore run``'s fast path: a plain ``run`` command line without typer, click or rich (issue 24).

Importing typer and building its click command is ~40-50 ms of a warm ``convstore run`` of ~0.2 s.  The
options stay declared once, in :mod:`convstore.cli` (typer); what this module parses is derived from that
declaration: each time typer runs a ``run`` command line, :func:`remember` writes a table of the global
options and ``run``'s (tokens, kinds, defaults, ranges, arguments), taken from the click command typer
built, to the user's cache dir (0600, keyed by the sizes and modification times of the modules that
declare the options, typer's and the interpreter's version).  :func:`run_fast` parses with that table
and runs the command through the same functions typer calls (:mod:`convstore.cli_base`).

Anything it does not know exactly hands the command line to typer, untouched: no table or a stale one, an
option it has no entry for (``--help``, ``--version``, ``--config``, a typo, ``-qv``), a missing or extra
value, a value typer would refuse (not a number, out of range, a bad duration or ``--runtime``), a config
file (its defaults), a shell-completion request.  So every usage error and help text is typer's, word for
word, and the command line means the same on both paths (tests/test_cli_fast.py).

Table format, version 1 (JSON): ``{"version": 1, "key": str, "global": SECTION, "run": SECTION}``;
SECTION = ``{"tokens": {TOKEN: [PARAM, KIND, X]}, "defaults": {PARAM: value}, "args": [[PARAM, NARGS]]}``,
KIND ``flag`` (X: the value it sets), ``text`` or ``float`` (X: ``[min, max, min_open, max_open]``, null
for no bound).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

TABLE_VERSION = 1
#: options with a callback the fast path knows: absent, they do nothing it must do (``--config``: it
#: checks for a config file itself); present, typer runs the command line
_KNOWN_CALLBACKS = {"version", "config_file"}
#: the modules whose text declares or reads the options (the table is stale when one changes)
_DECLARED_IN = ("cli.py", "cli_base.py", "cli_fast.py")
_TEXT = ("text", "str")  # click's STRING (typer's own copy of click names it "str")


#: the table's file name in the user's cache dir; a table is a few KiB: anything larger is not one
TABLE_NAME, MAX_TABLE = "cli-run-options.json", 1 << 18


def _table_path() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("convstore"), TABLE_NAME)


def _cache_dir() -> int | None:
    """The cache dir, open, if it is a folder of this user's that no one else can write (not a symlink): the
    table is then read and written in it and nowhere else, whatever is renamed around it (``su`` keeps the
    user's XDG_CACHE_HOME: root's cache dir can be in someone else's home)."""
    try:
        fd = os.open(os.path.dirname(_table_path()), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def _key(typer_file: str) -> str | None:
    """What the table depends on: these modules, typer's, the interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [f"{TABLE_VERSION}", sys.version, sys.prefix]
    try:
        for f in (*(os.path.join(here, n) for n in _DECLARED_IN), typer_file):
            st = os.stat(f)
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return "\n".join(parts)


def _load() -> dict[str, Any] | None:
    """The table, if it is a regular file of this user's in a folder of this user's, unwritable by others,
    well-formed and current."""
    dfd = _cache_dir()
    if dfd is None:
        return None
    try:  # O_NONBLOCK: a FIFO put in its place does not hang the command (it is no regular file: refused)
        fd = os.open(TABLE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > MAX_TABLE):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            table: dict[str, Any] = json.loads(f.read(MAX_TABLE + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not _well_formed(table):
        return None
    typer_file = table.get("typer")
    if not isinstance(typer_file, str) or table.get("key") != _key(typer_file):
        return None
    return table


_SCALAR = (bool, int, float, str, type(None))


def _well_formed(table: dict[str, Any]) -> bool:
    """Whether ``table`` has the shape :func:`parse` reads (version 1), whatever wrote it: a malformed
    one is no table (typer runs the command line), never a traceback."""
    for name in ("global", "run"):
        sec = table.get(name)
        if not isinstance(sec, dict) or not isinstance(sec.get("tokens"), dict) \
                or not isinstance(sec.get("defaults"), dict) or not isinstance(sec.get("args"), list):
            return False
        for token, kind in sec["tokens"].items():
            if not (token.startswith("-") and isinstance(kind, list) and len(kind) == 3
                    and isinstance(kind[0], str)):
                return False
            if kind[1] == "flag":
                if not isinstance(kind[2], bool):
                    return False
            elif kind[1] == "text":
                if kind[2] is not None:
                    return False
            elif kind[1] == "float":
                b = kind[2]
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(x, (int, float, type(None)))
                                                                    and not isinstance(x, bool) for x in b[:2])
                        and all(isinstance(x, bool) for x in b[2:])):
                    return False
            else:
                return False
        for value in sec["defaults"].values():
            if not isinstance(value, _SCALAR) and not (isinstance(value, list)
                                                       and all(isinstance(x, str) for x in value)):
                return False
        for arg in sec["args"]:
            if not (isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], str) and arg[1] in (1, -1)
                    and not isinstance(arg[1], bool)):
                return False
    return True


def _params(fn: Any) -> set[str] | None:
    """The keyword-only parameter names of ``fn`` (what set_globals and run_command take); None if it takes
    any (``**kw``)."""
    code = fn.__code__
    if code.co_flags & 0x08:  # CO_VARKEYWORDS
        return None
    return set(code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount])


def _matches(table: dict[str, Any], set_globals: Any, run_command: Any) -> bool:
    """Whether the table names exactly the parameters of the functions it feeds (each once, by a default
    or an argument; options only for those)."""
    for name, fn in (("global", set_globals), ("run", run_command)):
        sec = table[name]
        names = set(sec["defaults"]) | {a[0] for a in sec["args"] if a[1] == 1}
        expected = _params(fn)
        if expected is not None and names != expected or not {k[0] for k in sec["tokens"].values()} <= names:
            return False
    return True


# ---------------------------------------------------------------- the table, from typer's click command


def _section(params: Sequence[Any], callbacks: set[str] = frozenset()) -> dict[str, Any] | None:  # type: ignore[assignment]
    """A command's options and arguments (click parameters), or None if one is of a kind not handled here."""
    tokens: dict[str, list[Any]] = {}
    defaults: dict[str, Any] = {}
    args: list[list[Any]] = []
    for p in params:
        if p.param_type_name == "argument":
            if p.callback is not None or p.envvar or p.is_eager or not p.expose_value or p.type.name not in _TEXT:
                return None
            if p.nargs not in (1, -1) or p.nargs == 1 and not p.required or p.nargs == -1 and p.required:
                return None
            if args and args[-1][1] == -1:
                return None  # nothing after a variadic argument
            args.append([p.name, p.nargs])
            if p.nargs == -1:
                defaults[p.name] = p.default
            continue
        if p.param_type_name != "option":
            return None
        if p.callback is not None:
            if p.name not in callbacks:
                return None
            continue  # no token: present, typer runs the command line
        if (p.multiple or p.count or p.nargs != 1 or p.envvar or p.prompt or p.required or p.is_eager
                or not p.expose_value or callable(p.default)):
            return None
        if p.default is not None and not isinstance(p.default, (bool, int, float, str)):
            return None
        defaults[p.name] = p.default
        if p.is_flag:
            if not getattr(p, "is_bool_flag", False) or getattr(p, "flag_value", True) is not True:
                return None  # a flag that sets anything but True (--x) or False (--no-x)
            for t in p.opts:
                tokens[t] = [p.name, "flag", True]
            for t in p.secondary_opts:
                tokens[t] = [p.name, "flag", False]
            continue
        if p.secondary_opts:
            return None
        if p.type.name in _TEXT:
            kind: list[Any] = [p.name, "text", None]
        elif p.type.name in ("float", "float range"):
            if getattr(p.type, "clamp", False):
                return None
            kind = [p.name, "float", [getattr(p.type, "min", None), getattr(p.type, "max", None),
                                      getattr(p.type, "min_open", False), getattr(p.type, "max_open", False)]]
        else:
            return None
        for t in p.opts:
            tokens[t] = kind
    return {"tokens": tokens, "defaults": defaults, "args": args}


def describe(group: Any) -> dict[str, Any] | None:
    """The table of a click group (typer's command tree) and its ``run`` command; None if either has a
    parameter of a kind the fast path does not handle (then typer runs every command line)."""
    run = getattr(group, "commands", {}).get("run")
    if run is None or group.allow_interspersed_args or not run.allow_interspersed_args:
        return None
    if getattr(group, "context_settings", None) or getattr(run, "context_settings", None):
        return None  # help option names, token normalisation, ...: typer's to apply
    g = _section(group.params, _KNOWN_CALLBACKS)
    r = _section(run.params)
    if g is None or r is None or g["args"]:
        return None
    return {"version": TABLE_VERSION, "global": g, "run": r}


def remember(tree: Any, argv: Sequence[str]) -> None:
    """Under typer, for a command line that names ``run``: write the table if it is missing or stale."""
    if "run" not in argv:
        return
    import typer
    from typer.main import get_command

    key = _key(typer.__file__ or "")
    if key is None or _load() is not None:
        return
    try:
        table = describe(get_command(tree))
    except Exception:  # noqa: BLE001 - no table: typer runs every command line, as it always could
        return
    if table is None:
        return
    table.update(key=key, typer=typer.__file__)
    tmp = f"{TABLE_NAME}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(_table_path()), mode=0o700, exist_ok=True)
    except OSError:
        return
    dfd = _cache_dir()  # written only into a folder of this user's (not through a symlink someone put there)
    if dfd is None:
        return
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        os.replace(tmp, TABLE_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- the parse


def _value(kind: list[Any], text: str) -> Any:
    """``text`` converted as click would; None if click would refuse it (or might)."""
    if kind[1] == "text":
        return text
    try:
        v = float(text)
    except ValueError:
        return None
    lo, hi, lo_open, hi_open = kind[2]
    if v != v or (lo is not None and (v < lo or lo_open and v == lo)) or (
            hi is not None and (v > hi or hi_open and v == hi)):
        return None  # NaN or out of range: typer says so (or takes it)
    return v


def _option(section: dict[str, Any], argv: Sequence[str], i: int, into: dict[str, Any]) -> int | None:
    """Parse the option at ``argv[i]`` into ``into``; the index after it, or None (typer's to parse)."""
    token, eq, text = argv[i].partition("=") if argv[i].startswith("--") else (argv[i], "", "")
    kind = section["tokens"].get(token)
    if kind is None:
        return None
    if kind[1] == "flag":
        if eq:
            return None
        into[kind[0]] = kind[2]
        return i + 1
    if not eq:
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            return None
        text, i = argv[i + 1], i + 1
    v = _value(kind, text)
    if v is None:
        return None
    into[kind[0]] = v
    return i + 1


def parse(table: dict[str, Any], argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The global options' and ``run``'s parameters of ``argv`` as typer would pass them, or None."""
    gs, rs = table["global"], table["run"]
    g: dict[str, Any] = dict(gs["defaults"])
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        n = _option(gs, argv, i, g)
        if n is None:
            return None
        i = n
    if i >= len(argv) or argv[i] != "run":
        return None
    i += 1
    r: dict[str, Any] = dict(rs["defaults"])
    positional: list[str] = []
    while i < len(argv):
        if argv[i] == "--":
            positional.extend(argv[i + 1:])
            break
        if argv[i].startswith("-") and argv[i] != "-":
            n = _option(rs, argv, i, r)
            if n is None:
                return None
            i = n
            continue
        positional.append(argv[i])
        i += 1
    for name, nargs in rs["args"]:
        if nargs == 1:
            if not positional:
                return None
            r[name] = positional.pop(0)
        elif positional:
            r[name], positional = positional, []
    if positional:
        return None
    return g, r


# ---------------------------------------------------------------- the command


def run_fast(argv: Sequence[str]) -> None:
    """Run ``convstore run`` from ``argv`` without typer, ending with SystemExit; returns (having done
    nothing) when typer must run the command line."""
    if os.environ.get("CONVSTORE_NO_FAST_RUN") or any(k.startswith("_") and k.endswith("_COMPLETE")
                                                      for k in os.environ):
        return
    table = _load()
    parsed = None if table is None else parse(table, argv)
    if parsed is None:
        return
    from . import cli_base
    from .errors import ConfigError
    from .service import config

    try:
        if config.find(None) is not None:
            return  # its defaults: typer's default_map
    except ConfigError:
        return  # typer's callback says what is wrong
    assert table is not None
    if not _matches(table, cli_base.set_globals, cli_base.run_command):
        return  # a table for other functions than these: typer runs the command line
    g, r = parsed
    for name in _KNOWN_CALLBACKS:
        g.pop(name, None)

    def command() -> None:
        try:
            cli_base.set_globals(**g)
            code = cli_base.run_command(**r)
        except KeyboardInterrupt:
            code = 130  # as typer's main
        except EOFError:
            from typer import rich_utils

            sys.stderr.write("\n")
            rich_utils.rich_abort_error()
            code = 1
        except BrokenPipeError:
            from typer._click.utils import PacifyFlushWrapper

            sys.stdout = PacifyFlushWrapper(sys.stdout)
            sys.stderr = PacifyFlushWrapper(sys.stderr)
            code = 1
        sys.exit(code)

    try:
        cli_base.guarded(command)
    except cli_base.BadValue:
        return  # a value typer refuses, before anything was done: typer says so
