"""Which engine for the site tier: ranged blob GETs through a docker-registry
pull-through mirror and through nginx (contrib/site-tier/nginx.conf), counted
at the origin (docs/architecture.md, "Site tier").

    .venv/bin/python -m benchmarks.site_tier_probe

An 8 MiB blob is pushed to an origin docker-registry on 127.0.0.1 behind a
counting proxy; then through each candidate tier, cold: one 64 KiB range;
the same range again; 10 clients at once, a different 64 KiB range each.
Printed: what the clients got (status, bytes) and what the origin served.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from kms_fixtures import Registry, wait_for_port  # noqa: E402
from netproxy import DelayProxy  # noqa: E402
from site_tier import SiteTier, free_port  # noqa: E402

REPO = "probe/blob"


def get(host: str, digest: str, start: int, n: int) -> tuple[int, int]:
    c = http.client.HTTPConnection(host, timeout=60)
    c.request("GET", f"/v2/{REPO}/blobs/{digest}", headers={"Range": f"bytes={start}-{start + n - 1}"})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, len(body)


def mirror(root: Path, origin: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    root.mkdir(parents=True)
    (root / "config.yml").write_text(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: "
                                     f"{root / 'data'}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n"
                                     f"proxy: {{remoteurl: http://{origin}}}\n")
    p = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for_port(port, p, "docker-registry mirror")
    return p, f"127.0.0.1:{port}"


def main() -> None:
    w = Path(tempfile.mkdtemp(prefix="convstore-tier-probe-"))
    reg = Registry(w / "origin")
    proxy = DelayProxy(reg.host)
    digests = []
    for _ in range(2):  # one blob for the single client, one for the crowd: each cold in each fresh tier
        data = os.urandom(8 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        c = http.client.HTTPConnection(reg.host)
        c.request("POST", f"/v2/{REPO}/blobs/uploads/")
        loc = c.getresponse().getheader("Location") or ""
        c.close()
        c = http.client.HTTPConnection(reg.host)
        c.request("PUT", f"{loc}{'&' if '?' in loc else '?'}digest={digest}", body=data)
        assert c.getresponse().status == 201
        c.close()
        digests.append(digest)
    print("| tier | first 64 KiB range, cold | same range again | 10 clients at once, cold |")
    print("|---|---|---|---|")
    try:
        for name in ("docker-registry mirror", "nginx, range key", "nginx, 256k slices"):
            if name == "docker-registry mirror":
                p, host = mirror(w / "mirror", proxy.host)
                stop = p.kill
            else:
                t = SiteTier(w / name.replace(" ", "_").replace(",", ""), proxy.host,
                             mode="slice" if "slice" in name else "range")
                host, stop = t.host, t.stop
            try:
                proxy.reset()
                first = get(host, digests[0], 1 << 20, 65536)
                o1 = (proxy.counts["GET blob"], proxy.sent_bytes)
                again = get(host, digests[0], 1 << 20, 65536)
                o2 = (proxy.counts["GET blob"] - o1[0], proxy.sent_bytes - o1[1])
                proxy.reset()
                res: list[tuple[int, int]] = []
                ts = [threading.Thread(target=lambda i=i: res.append(get(host, digests[1], 2_000_000 + i * 100_000,
                                                                         65536))) for i in range(10)]
                for th in ts:
                    th.start()
                for th in ts:
                    th.join()
                o3 = (proxy.counts["GET blob"], proxy.sent_bytes)
            finally:
                stop()
            crowd = sorted(set(res))
            print(f"| {name} | HTTP {first[0]}, {first[1]:,} B; origin {o1[0]} GETs, {o1[1] / 1e6:.1f} MB "
                  f"| HTTP {again[0]}, {again[1]:,} B; origin {o2[0]} GETs | {crowd}; origin {o3[0]} GETs, "
                  f"{o3[1] / 1e6:.1f} MB |")
    finally:
        proxy.stop()
        reg.stop()


if __name__ == "__main__":
    main()
