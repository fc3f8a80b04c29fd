"""Real key providers for tests: a SoftHSM2 token and a moto KMS server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4321"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


class SoftHSM:
    """A token in a private directory with non-extractable AES-256 keys."""

    def __init__(self, root: Path, label: str = "convstore"):
        if not os.path.exists(SOFTHSM_MODULE) or not shutil.which("softhsm2-util"):
            pytest.fail("softhsm2 is not installed; scripts/setup.sh installs it")
        (root / "tokens").mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        self.env = {"SOFTHSM2_CONF": str(self.conf), "CONVSTORE_TEST_PIN": PIN}
        os.environ.update(self.env)
        self.label = label
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "9999"],
                       check=True, capture_output=True)

    def add_key(self, name: str) -> str:
        """Create a non-extractable AES-256 key, as an administrator would (in
        another process: a PKCS#11 login is per process)."""
        code = (
            "import pkcs11, sys\n"
            "from pkcs11 import Attribute, KeyType\n"
            f"tok = pkcs11.lib({SOFTHSM_MODULE!r}).get_token(token_label={self.label!r})\n"
            f"with tok.open(user_pin={PIN!r}, rw=True) as s:\n"
            "    s.generate_key(KeyType.AES, 256, label=sys.argv[1], store=True,\n"
            "                   template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True})\n"
        )
        subprocess.run([sys.executable, "-c", code, name], check=True, env=dict(os.environ, **self.env))
        return self.spec(name)

    def set_usage(self, name: str, allowed: bool) -> None:
        """Revoke (or restore) the key's use for encrypt/decrypt inside the
        token, as an HSM administrator would (CKA_ENCRYPT / CKA_DECRYPT)."""
        code = (
            "import pkcs11, sys\n"
            "from pkcs11 import Attribute, KeyType, ObjectClass\n"
            f"tok = pkcs11.lib({SOFTHSM_MODULE!r}).get_token(token_label={self.label!r})\n"
            f"with tok.open(user_pin={PIN!r}, rw=True) as s:\n"
            "    k = s.get_key(key_type=KeyType.AES, label=sys.argv[1], object_class=ObjectClass.SECRET_KEY)\n"
            "    k[Attribute.ENCRYPT] = k[Attribute.DECRYPT] = sys.argv[2] == '1'\n"
        )
        subprocess.run([sys.executable, "-c", code, name, "1" if allowed else "0"], check=True,
                       env=dict(os.environ, **self.env))

    def spec(self, name: str) -> str:
        return (f"pkcs11:token={self.label};object={name}?module-path={SOFTHSM_MODULE}"
                f"&pin-source=env:CONVSTORE_TEST_PIN")


class MotoKMS:
    """``moto_server`` on 127.0.0.1 as the KMS endpoint, stopped by its PID."""

    def __init__(self) -> None:
        exe = str(Path(sys.executable).parent / "moto_server")  # the one of this venv, never a stray copy
        if not os.path.exists(exe):
            pytest.fail("moto[server] is not installed; scripts/setup.sh installs it")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "CONVSTORE_KMS_ENDPOINT": self.endpoint}
        os.environ.update(self.env)
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, "moto_server")
        import boto3

        self.kms = boto3.client("kms", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_key(self) -> str:
        return "awskms:" + self.kms.create_key(Description="convstore test")["KeyMetadata"]["KeyId"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Registry:
    """Debian's docker-registry on 127.0.0.1 with a temporary storage
    directory; stopped (and restartable) by its PID."""

    def __init__(self, root: Path, htpasswd: str | None = None, access_log: Path | None = None):
        exe = shutil.which("docker-registry")
        if exe is None:
            pytest.fail("docker-registry is not installed; scripts/setup.sh installs it")
        self.exe = exe
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        auth = f"auth: {{htpasswd: {{realm: convstore, path: {htpasswd}}}}}\n" if htpasswd else ""
        self.access_log = access_log  # the registry's own log of every request (info level)
        (root / "config.yml").write_text(
            f"version: 0.1\nlog: {{level: {'info' if access_log else 'error'}}}\n"
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.host}}}\n" + auth)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cmd = [self.exe, "serve", str(self.root / "config.yml")]
        if self.access_log:
            with open(self.access_log, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, "docker-registry")

    def requests(self) -> list[str]:
        """``METHOD PATH`` of every request the registry logged (its access log lines)."""
        import re

        assert self.access_log is not None
        text = self.access_log.read_text(errors="replace")
        return [f"{m} {p}" for m, p in re.findall(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[0-9.]+"', text)]

    def garbage_collect(self) -> str:
        """The registry's own garbage collection (``registry garbage-collect``, run while the registry is
        stopped, as its documentation asks), then the registry again on the same port; its output."""
        self.stop()
        p = subprocess.run([self.exe, "garbage-collect", "--delete-untagged", str(self.root / "config.yml")],
                           capture_output=True, text=True, timeout=300)
        self.start()
        if p.returncode != 0:
            raise AssertionError(f"registry garbage-collect failed: {p.stderr}")
        return p.stdout

    def stored_bytes(self) -> int:
        """Bytes of the blobs the registry stores (its filesystem storage)."""
        root = self.root / "data"
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name == "data")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
