"""A real site tier on 127.0.0.1: Debian's nginx with the project's config
(contrib/site-tier/nginx.conf: proxy_cache + slice + proxy_cache_lock) in
front of an origin ``host:port``, in ``mode`` "range" (keyed on the nodes'
ranges) or "slice" (fixed slices); stopped by its PID.  ``log()`` reads its
access log (method, uri, range, status, bytes, cache status per request)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "contrib" / "site-tier" / "nginx.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SiteTier:
    def __init__(self, root: Path, origin: str, mode: str = "range", slice_size: str = "256k",
                 max_size: str = "4g"):
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(exe):
            raise RuntimeError("nginx is not installed; scripts/setup.sh installs nginx-light")
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        for d in ("cache", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        conf = TEMPLATE.read_text()
        for k, v in {"DIR": str(root), "LISTEN": self.host, "ORIGIN": origin, "SLICE": slice_size,
                     "MAX_SIZE": max_size,
                     "KEY": "$slice_range" if mode == "slice" else "$http_range",
                     "SLICE_ON": "" if mode == "slice" else "#", "USER": "user root;" if os.geteuid() == 0 else ""}.items():
            conf = conf.replace(f"@@{k}@@", v)
        (root / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([exe, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {err[-2000:]}") from None
                time.sleep(0.05)

    def log(self) -> list[list[str]]:
        """One row per request: method, uri, "range", status, bytes, cache status."""
        p = self.root / "access.log"
        return [line.split() for line in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
