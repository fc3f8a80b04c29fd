"""systemd's notification protocol (sd_notify(3)), client side.

A service started with ``Type=notify`` tells its manager how it is doing by
sending datagrams such as ``READY=1``, ``STATUS=...``, ``STOPPING=1`` and
``WATCHDOG=1`` to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or
``@NAME`` in the abstract namespace), and may hand it file descriptors to
keep across a restart (``FDSTORE=1`` with SCM_RIGHTS; systemd keeps up to
the unit's ``FileDescriptorStoreMax=``).  ``convstore ... --background``
speaks the same protocol to its own parent (:mod:`.background`).

Hand-written: the ``sdnotify`` package on PyPI cannot pass file
descriptors, and ``systemd-python`` needs libsystemd at build time.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and anything else systemd may add: not spoken here


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` assignments) to
    ``$NOTIFY_SOCKET``, with ``fds`` attached (SCM_RIGHTS); whether it was
    sent.  Without ``$NOTIFY_SOCKET`` (not started by a service manager)
    nothing is sent; a send that fails is logged, never raised: a service
    keeps serving when its manager cannot be told."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s: only a path or an abstract @name is supported", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            s.sendmsg([state.encode()], ancillary)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", value, e.strerror or e)
        return False
    return True


def ready(status: str) -> bool:
    """``READY=1`` with a ``STATUS=`` line: call it once the service answers."""
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def stopping(status: str = "stopping") -> bool:
    return notify(f"STOPPING=1\nSTATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings the manager wants from this
    process (half its ``WatchdogSec=``), or None: none asked for, or asked
    of another process (``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def start_watchdog(alive: Callable[[], bool], stop: threading.Event | None = None) -> threading.Thread | None:
    """Ping ``WATCHDOG=1`` at half the manager's ``WatchdogSec=`` while
    ``alive()`` says the service still answers (for a mount: a statfs that
    went through the FUSE server).  A check that hangs or fails stops the
    pings, and the manager restarts the service.  None when no watchdog was
    asked for."""
    interval = watchdog_interval()
    if interval is None:
        return None
    done = stop or threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                ok = alive()
            except Exception as e:  # any failure of the check is a missed ping
                log.error("watchdog check failed: %s", e)
                ok = False
            if ok:
                notify("WATCHDOG=1")
            done.wait(interval)

    t = threading.Thread(target=loop, name="convstore-watchdog", daemon=True)
    t.start()
    return t


def serving(status: str, alive: Callable[[], bool], logger: logging.Logger = log) -> None:
    """The service answers: log it (on the service's ``logger``), tell the
    manager (``READY=1``) and keep its watchdog fed while ``alive()``."""
    logger.info("%s", status)
    ready(status)
    start_watchdog(alive)
