"""The local key file provider: creation, permissions, wrapping, no leaks."""

from __future__ import annotations

import os
import stat

import pytest

import convstore
from convstore.errors import KeyAccessDenied, KeyFileError, StoreError
from convstore.keys import LocalKeyFile, open_key


def test_created_0600_in_0700_dir(tmp_path):
    p = tmp_path / "cfg" / "master.key"
    k = LocalKeyFile(str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
    assert LocalKeyFile(str(p)).key_id == k.key_id  # reopened, same key


def test_refuses_world_readable(tmp_path):
    p = tmp_path / "k"
    LocalKeyFile(str(p))
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        LocalKeyFile(str(p))


def test_refuses_garbage(tmp_path):
    p = tmp_path / "k"
    p.write_text("not a key")
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError):
        LocalKeyFile(str(p))


def test_wrap_bound_to_context(tmp_path):
    k = LocalKeyFile(str(tmp_path / "k"))
    w = k.wrap(b"d" * 32, {"image": "a", "store": "s"})
    assert k.unwrap(w, {"store": "s", "image": "a"}) == b"d" * 32
    with pytest.raises(KeyAccessDenied):
        k.unwrap(w, {"image": "b", "store": "s"})
    with pytest.raises(KeyAccessDenied):
        LocalKeyFile(str(tmp_path / "other")).unwrap(w, {"image": "a", "store": "s"})


def test_no_key_material_in_repr_or_errors(tmp_path):
    p = tmp_path / "k"
    k = LocalKeyFile(str(p))
    import base64
    import json
    raw = base64.b64decode(json.loads(p.read_text())["key"])
    texts = [repr(k), str(k.key_id)]
    try:
        k.unwrap(b"CSW\x01" + b"\0" * 40, {})
    except KeyAccessDenied as e:
        texts.append(str(e))
    for t in texts:
        assert raw.hex() not in t and base64.b64encode(raw).decode() not in t


def test_key_inside_store_refused(tmp_path):
    with pytest.raises(StoreError, match="inside the store"):
        convstore.Store.open(str(tmp_path / "s"), f"file:{tmp_path / 's' / 'master.key'}")


def test_unknown_spec():
    with pytest.raises(convstore.InvalidReference):
        open_key("vault:xyz")
