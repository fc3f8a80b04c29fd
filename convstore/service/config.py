"""The config file: every option of the services from one TOML file.

The one place for the rule.  Where it is: ``--config PATH``, else
``$CONVSTORE_CONFIG`` (empty: none), else ``/etc/convstore/config.toml`` for
root (``$XDG_CONFIG_HOME/convstore/config.toml``, default
``~/.config/convstore/config.toml``, for other users) when it exists.  What
it holds (docs/format.md, "Config file")::

    version = 1                       # required; a newer version is refused

    [global]                          # the global options, for every command
    store = "oci://127.0.0.1:5000/store"
    insecure = true
    cache = "/var/cache/convstore"

    [layerstore]                      # the options and arguments of one service
    mountpoint = "/var/lib/convstore/layers"
    stats-file = "/run/convstore/layers.json"

    [snapshotter]
    root = "/var/lib/convstore/snapshotter"

    [mount]
    policy = "/etc/containers/policy.json"

A key is an option's long name without its dashes (``stats-file``,
``cache-size``) or an argument's name (``mountpoint``, ``root``, ``ref``);
values have the option's type (``insecure = true``, ``cache-size = 4096``).
Precedence, as in click: the command line, then an option's environment
variable (``$CONVSTORE_STORE``, ``$CONVSTORE_KEY``, ...), then the file, then
the built-in default.  Anything it does not know (a section, a key, a type)
is refused with :class:`~convstore.errors.ConfigError` naming it: a typo
never silently serves with a default.  The file decides which store and key
a service serves, so it must not be writable by anyone but its owner (root
or the user running convstore).

The command tree is read duck-typed (click's ``params``, ``opts``,
``commands``): this module imports no third-party package.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError

VERSION = 1
ENV = "CONVSTORE_CONFIG"
#: sections besides [global]: the services
SERVICES = ("layerstore", "snapshotter", "mount")
#: parameters a config file never sets: they ask a question, act once, read a secret, or name this file
NOT_CONFIGURABLE = frozenset({"version", "config", "help", "password_stdin", "background", "status", "stop"})
#: options that have an environment variable of their own, which overrides the file
ENV_OF = {"store": "CONVSTORE_STORE", "key": "CONVSTORE_KEY", "kms_endpoint": "CONVSTORE_KMS_ENDPOINT",
          "inactive_after": "CONVSTORE_INACTIVE_AFTER"}


def default_path() -> str:
    if os.geteuid() == 0:
        return "/etc/convstore/config.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "convstore", "config.toml")


def find(explicit: str | None) -> str | None:
    """The config file to read: ``explicit`` (must exist), else ``$CONVSTORE_CONFIG`` (must exist; empty:
    none), else the default path if it exists."""
    if explicit is None and ENV in os.environ:
        explicit = os.environ[ENV] or None
        if explicit is None:
            return None
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise ConfigError(f"config file {explicit}: no such file")
        return explicit
    path = default_path()
    return path if os.path.isfile(path) else None


def load(path: str) -> dict[str, Any]:
    """The parsed file, its version checked and its owner and mode too."""
    import tomllib

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise ConfigError(f"config file {path}: others may write it (mode {st.st_mode & 0o777:04o}, owner uid "
                          f"{st.st_uid}) and would choose what the services serve; fix: chmod go-w {path}")
    version = doc.get("version")
    if version is None:
        raise ConfigError(f"config file {path}: 'version = {VERSION}' is missing")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"config file {path}: version must be a positive integer, not {version!r}")
    if version > VERSION:
        raise ConfigError(f"config file {path}: version {version} is newer than this convstore reads "
                          f"({VERSION}); upgrade convstore")
    return doc


def _key(param: Any) -> str:
    """A parameter's name in the file: its first long option without dashes, else its own name."""
    longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return longs[0][2:] if longs and param.param_type_name == "option" else param.name.replace("_", "-")


def _check_type(path: str, where: str, param: Any, value: Any) -> Any:
    kind = "boolean" if getattr(param, "is_flag", False) else str(getattr(param.type, "name", "text")).split()[0]
    ok = {"boolean": lambda v: isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)}.get(kind, lambda v: isinstance(v, str))
    if not ok(value):
        want = {"boolean": "true or false", "float": "a number", "integer": "an integer"}.get(kind, "a string")
        raise ConfigError(f"config file {path}: {where}: expected {want}, not {value!r}")
    return value


def _section(path: str, name: str, table: Any, params: list[Any], global_keys: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{name}] must be a table")
    by_key = {_key(p): p for p in params if p.name not in NOT_CONFIGURABLE and not getattr(p, "is_eager", False)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        param = by_key.get(key)
        if param is None:
            hint = (" (a global option: put it in [global])" if key in global_keys and name != "global"
                    else f" (known: {', '.join(sorted(by_key))})")
            raise ConfigError(f"config file {path}: [{name}]: unknown key {key!r}{hint}")
        if param.name in ENV_OF and os.environ.get(ENV_OF[param.name]):
            continue  # its environment variable is set, and wins
        out[param.name] = _check_type(path, f"[{name}] {key}", param, value)
    return out


def defaults(path: str, group: Any) -> dict[str, Any]:
    """click's ``default_map`` for ``group`` (the command tree) from the file at ``path``."""
    doc = load(path)
    global_keys = {_key(p) for p in group.params}
    result: dict[str, Any] = {}
    for name, table in doc.items():
        if name == "version":
            continue
        if name == "global":
            result.update(_section(path, name, table, list(group.params), global_keys))
        elif name in SERVICES and name in group.commands:
            result[name] = _section(path, name, table, list(group.commands[name].params), global_keys)
        else:
            raise ConfigError(f"config file {path}: unknown section [{name}] (known: [global], "
                              + ", ".join(f"[{s}]" for s in SERVICES) + ")")
    return result
