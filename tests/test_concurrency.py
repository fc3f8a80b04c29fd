"""Two real `convstore pack` processes writing into one store at once."""

from __future__ import annotations

import os
import subprocess
import sys

from imagebuilder import Entry, make_tar, write_oci

import convstore


def test_two_packs_at_once(tmp_path, cli_env, keyfile):
    shared = [Entry(f"shared{i}", data=os.urandom(150_000)) for i in range(20)]
    for name in ("a", "b"):
        own = [Entry(f"{name}{i}", data=os.urandom(120_000)) for i in range(10)]
        write_oci(str(tmp_path / name), [make_tar(shared + own)])
    procs = [subprocess.Popen([sys.executable, "-m", "convstore.cli", "pack", f"oci:{tmp_path / n}", f"img:{n}"],
                              env=cli_env, stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
    for p in procs:
        _, errs = p.communicate(timeout=300)
        assert p.returncode == 0, errs
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], f"file:{keyfile}")
    assert sorted(str(e.ref) for e in store.images()) == ["img:a", "img:b"]
    for n in ("a", "b"):
        store.unpack_oci(f"img:{n}", f"oci:{tmp_path / 'out'}:{n}", compress="none")
    assert not os.listdir(os.path.join(cli_env["CONVSTORE_STORE"], "tmp"))
