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


def test_packs_reads_and_gc_at_once(tmp_path, cli_env, keyfile):
    """Real processes: three packs, two readers and a gc loop on one store."""
    shared = [Entry(f"s{i}", data=os.urandom(120_000)) for i in range(10)]
    for n in ("base", "p1", "p2", "p3", "junk"):
        own = [Entry(f"{n}{i}", data=os.urandom(100_000)) for i in range(6)]
        write_oci(str(tmp_path / n), [make_tar(shared + own)])
    def run(*args):
        return subprocess.run([sys.executable, "-m", "convstore.cli", "--quiet", *args], env=cli_env,
                              capture_output=True, text=True, timeout=300)
    assert run("pack", f"oci:{tmp_path / 'base'}", "base:1").returncode == 0
    assert run("pack", f"oci:{tmp_path / 'junk'}", "junk:1").returncode == 0
    assert run("rm", "junk:1").returncode == 0
    script = (
        "import sys, shutil, convstore;"
        "s = convstore.Store.open(sys.argv[1], sys.argv[2]);"
        "[ (s.unpack_oci('base:1', f'oci:{sys.argv[3]}/r{i}', compress='none'), shutil.rmtree(f'{sys.argv[3]}/r{i}'))"
        " for i in range(6) ]"
    )
    procs = [subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "pack", f"oci:{tmp_path / n}",
                               f"{n}:1"], env=cli_env, stderr=subprocess.PIPE, text=True) for n in ("p1", "p2", "p3")]
    procs += [subprocess.Popen([sys.executable, "-c", script, cli_env["CONVSTORE_STORE"], f"file:{keyfile}",
                                str(tmp_path / f"reader{i}")], stderr=subprocess.PIPE, text=True) for i in range(2)]
    gcs = [subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "gc"], env=cli_env,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs + gcs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], f"file:{keyfile}")
    assert sorted(str(e.ref) for e in store.images()) == ["base:1", "p1:1", "p2:1", "p3:1"]
    assert store.verify().clean
    assert store.gc().chunks_removed == 0  # junk's own chunks went in the concurrent gcs
    for n in ("base", "p1", "p2", "p3"):
        store.unpack_oci(f"{n}:1", f"oci:{tmp_path / 'final'}:{n}")
