from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convstore

sys.path.insert(0, os.path.dirname(__file__))

REPO = Path(__file__).resolve().parent.parent
BUILDER = REPO / "scripts" / "build_images.py"
CORPUS_DIR = Path(os.environ.get("CONVSTORE_CORPUS", Path.home() / ".cache" / "convstore-corpus"))
CORPUS_IMAGES = ["base", "app1", "app2", "app1-rebuilt", "base-prev"]


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rollback-protection state (convstore.core.trust) of this test session, not the user's."""
    os.environ["CONVSTORE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ["CONVSTORE_DAEMON"] = "0"  # a daemon the user runs never serves the tests (test_daemon starts its own)
    os.environ["CONVSTORE_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))  # --background logs, not /var/log's


@pytest.fixture
def keyfile(tmp_path: Path) -> str:
    return str(tmp_path / "keys" / "master.key")


@pytest.fixture
def store(tmp_path: Path, keyfile: str) -> convstore.Store:
    """A local store; its docker:// sources (the tests' loopback registries) speak plain HTTP."""
    return convstore.Store.open(str(tmp_path / "store"), f"file:{keyfile}", insecure=True)


@pytest.fixture
def cli_env(tmp_path: Path, keyfile: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CONVSTORE_STORE"] = str(tmp_path / "store")
    env["CONVSTORE_KEY"] = f"file:{keyfile}"
    return env


def run_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "convstore.cli", *args], env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"convstore {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


@pytest.fixture(scope="session")
def corpus() -> dict:
    """The real five-image corpus, built by the project's own builder on first use (about 2 minutes)."""
    meta = CORPUS_DIR / "corpus.json"
    if not all((CORPUS_DIR / i / "index.json").exists() for i in CORPUS_IMAGES) or not meta.exists():
        p = subprocess.run([sys.executable, str(BUILDER), "--out", str(CORPUS_DIR)], timeout=1800,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.fail(f"cannot build the corpus ({last}); build it with: sudo python3 {BUILDER.relative_to(REPO)}",
                        pytrace=False)
    with open(meta) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def corpus_store(tmp_path_factory: pytest.TempPathFactory, corpus: dict) -> convstore.Store:
    """One store holding all five corpus images, packed once per session."""
    root = tmp_path_factory.mktemp("corpus-store")
    s = convstore.Store.open(str(root / "store"), f"file:{root / 'keys' / 'master.key'}")
    for img in CORPUS_IMAGES:
        s.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
    return s


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/setup.sh installs it")
    return path


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    from kms_fixtures import SoftHSM

    return SoftHSM(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="session")
def moto_kms():
    from kms_fixtures import MotoKMS

    m = MotoKMS()
    yield m
    m.stop()


@pytest.fixture
def registry(tmp_path):
    from kms_fixtures import Registry

    r = Registry(tmp_path / "registry")
    yield r
    r.stop()


@pytest.fixture
def auth_registry(tmp_path):
    """A registry that wants user alice, password s3cret (htpasswd, bcrypt)."""
    import bcrypt
    from kms_fixtures import Registry

    (tmp_path / "htpasswd").write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt()).decode() + "\n")
    r = Registry(tmp_path / "auth-registry", htpasswd=str(tmp_path / "htpasswd"))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """SeaweedFS's S3 gateway on loopback (one per session: it takes a few seconds to start)."""
    from s3_fixtures import SeaweedS3

    s = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    s.bucket = s.new_bucket()  # one bucket (a SeaweedFS collection: volumes of its own), a prefix per test
    yield s
    s.stop()


@pytest.fixture
def s3(seaweed, monkeypatch):
    """``s3://BUCKET/<new prefix>`` on the SeaweedFS server, with its endpoint and credentials in
    this process's environment (as an AWS tool takes them)."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{seaweed.bucket}/t{os.urandom(6).hex()}"
