"""A newcomer's mistakes (issue 26): every one gets one line that says what to
do, the documented exit status (1 operational, 2 usage), and nothing is
created or lost on the way.  Real registry (Debian's docker-registry on
127.0.0.1), real key files, real SoftHSM2 token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convstore.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def one_line(p: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The command failed with ``status`` and exactly one stderr line holding every one of ``words``."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == status, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("convstore: error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def small_image(tmp_path: Path, name: str = "img") -> str:
    root = tmp_path / name
    if not root.exists():
        write_oci(str(root), [make_tar([Entry("etc", kind="dir"), Entry("etc/hello", data=b"hello\n")])])
    return f"oci:{root}"


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def catalog(registry) -> list[str]:
    with urllib.request.urlopen(f"http://{registry.host}/v2/_catalog") as r:
        return json.load(r)["repositories"]


# -- --store and $CONVSTORE_STORE ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["oci:/127.0.0.1:5500/store", "ocl://127.0.0.1:5500/store",
                                   "https://127.0.0.1:5500/store", "docker://127.0.0.1:5500/store"])
@pytest.mark.parametrize("via", ["--store", "CONVSTORE_STORE"])
def test_store_url_typo_is_a_usage_error_and_creates_nothing(tmp_path, cli_env, value, via):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(cli_env)
    args: list[str] = ["images"]
    if via == "--store":
        args = ["--store", value, *args]
    else:
        env["CONVSTORE_STORE"] = value
    p = cli(env, *args, cwd=cwd)
    one_line(p, 2, repr(value), "is not a store", "oci://HOST[:PORT]/REPO", "PATH")
    assert tree(cwd) == [] and not Path(cli_env["CONVSTORE_KEY"][5:]).exists()


def test_registry_store_without_repository_is_a_usage_error(cli_env):
    p = run_cli(cli_env, "--store", "oci://127.0.0.1:5500", "images", check=False)
    one_line(p, 2, "names no repository", "oci://HOST[:PORT]/REPO")
    p = run_cli(dict(cli_env, CONVSTORE_STORE="oci://127.0.0.1:5500/"), "images", check=False)
    one_line(p, 2, "$CONVSTORE_STORE", "names no repository")


def test_convstore_store_takes_a_registry_url(tmp_path, cli_env, registry):
    """$CONVSTORE_STORE=oci://... packs into the registry, as --store does, not into a local folder `oci:`."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    src = small_image(tmp_path)
    env = dict(cli_env, CONVSTORE_STORE=f"oci://{registry.host}/envstore")
    p = cli(env, "--insecure", "--cache", str(tmp_path / "cache"), "pack", src, "img:1", cwd=cwd)
    assert p.returncode == 0, p.stderr
    assert tree(cwd) == []
    assert "envstore" in catalog(registry)
    p = run_cli(cli_env, "--insecure", "--cache", str(tmp_path / "cache2"), "--store",
                f"oci://{registry.host}/envstore", "images", "--json")
    assert [e["name"] for e in json.loads(p.stdout)] == ["img"]


# -- read-only commands never create a store ----------------------------------------------------------------------

def test_read_only_command_does_not_create_a_registry_store(tmp_path, cli_env, registry):
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")  # the key exists: only the store is missing
    before = catalog(registry)
    for args in (["images"], ["stats"], ["inspect", "img:1"], ["cat", "img:1", "/etc/hello"]):
        p = run_cli(cli_env, "--insecure", "--cache", str(tmp_path / "cache"), "--store",
                    f"oci://{registry.host}/nosuchrepo", *args, check=False)
        one_line(p, 1, f"no convstore store at oci://{registry.host}/nosuchrepo", "pack, pull or push")
    p = run_cli(cli_env, "--insecure", "--cache", str(tmp_path / "cache"), "pull",
                f"oci://{registry.host}/nosuchrepo", "img:1", check=False)
    one_line(p, 1, f"no convstore store at oci://{registry.host}/nosuchrepo")
    assert catalog(registry) == before and "nosuchrepo" not in before


@pytest.mark.parametrize("args", [["images"], ["stats"], ["inspect", "x:1"], ["ls", "x:1"], ["verify"], ["gc"],
                                  ["refresh"], ["rm", "x:1"], ["domain", "list"], ["audit"]])
def test_read_only_command_does_not_create_a_local_store(tmp_path, cli_env, args):
    where = tmp_path / "nostore"
    p = run_cli(dict(cli_env, CONVSTORE_STORE=str(where)), *args, check=False)
    one_line(p, 1, f"no {'convstore ' if args != ['audit'] else ''}store at {where}")
    assert not where.exists() and not Path(cli_env["CONVSTORE_KEY"][5:]).exists()


def test_a_file_is_not_a_store(tmp_path, cli_env):
    f = tmp_path / "hostname"
    f.write_text("host\n")
    p = run_cli(cli_env, "--store", str(f), "images", check=False)
    line = one_line(p, 1, f"{f} is not a folder, so not a store")
    assert "cannot create" not in line and f.read_text() == "host\n"


def test_pack_still_creates_its_store(tmp_path, cli_env):
    p = run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    assert "packed img:1: 1 layer," in p.stdout
    assert "created a new master key at " + cli_env["CONVSTORE_KEY"][5:] in p.stderr


# -- keys ---------------------------------------------------------------------------------------------------------

def test_a_key_created_by_a_failing_command_is_named_in_its_one_error_line(tmp_path, cli_env):
    p = run_cli(cli_env, "--insecure", "pack", "docker://127.0.0.1:9/x:1", "x:1", check=False)
    key = cli_env["CONVSTORE_KEY"][5:]
    one_line(p, 1, "cannot reach the registry at 127.0.0.1:9", f"(a new master key was created at {key})")
    assert Path(key).exists()

def test_named_key_file_must_exist(tmp_path, cli_env):
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    wrong = tmp_path / "wrong" / "path" / "master.key"
    for args in (["--key", f"file:{wrong}", "images"], ["--key", f"file:{wrong}", "pack", small_image(tmp_path),
                                                        "img:2"]):
        p = run_cli(cli_env, *args, check=False)
        one_line(p, 1, f"key file {wrong} does not exist", "must exist")
        assert "created a new master key" not in p.stderr
    assert not wrong.exists() and not wrong.parent.exists()
    p = run_cli(dict(cli_env, CONVSTORE_KEY=f"file:{wrong}"), "images", check=False)
    one_line(p, 1, f"key file {wrong} does not exist")
    assert not wrong.exists()
    assert "img" in run_cli(cli_env, "images").stdout  # nothing lost


def test_default_key_is_created_at_the_default_path_and_said(tmp_path, cli_env):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in cli_env.items() if not k.startswith("XDG_") and k != "CONVSTORE_KEY"}
    env["HOME"] = str(home)
    key = home / ".config" / "convstore" / "master.key"
    p = run_cli(env, "pack", small_image(tmp_path), "img:1")
    assert f"convstore: created a new master key at {key} (mode 0600); keep a copy" in p.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    p = run_cli(env, "images")
    assert "created a new master key" not in p.stderr


def test_pkcs11_without_pin_says_so(tmp_path, cli_env, softhsm):
    spec = softhsm.add_key("nopin-check")
    nopin = spec.split("&pin-source=")[0]
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    p = run_cli(cli_env, "rekey", "--to", nopin, check=False)
    one_line(p, 1, "no AES key labelled 'nopin-check'", "no PIN was given", "pin-source=")
    assert "1234" not in p.stderr


# -- registries: down vs plain HTTP -------------------------------------------------------------------------------

def test_plain_http_registry_says_use_insecure(tmp_path, cli_env, registry):
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    url = f"oci://{registry.host}/store"
    msg = f"the registry at {registry.host} speaks plain HTTP; use --insecure"
    one_line(run_cli(cli_env, "push", "img:1", url, check=False), 1, msg)
    one_line(run_cli(cli_env, "--store", url, "images", check=False), 1, msg)
    one_line(run_cli(cli_env, "verify", "--repair", "--from", url, check=False), 1, msg)
    # a source on loopback follows the same rule as a store
    run_cli(cli_env, "--insecure", "push", "img:1", url)
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", small_image(tmp_path, "src"),
                    f"docker://{registry.host}/src/a:1"], check=True, capture_output=True)
    one_line(run_cli(cli_env, "pack", f"docker://{registry.host}/src/a:1", "a:1", check=False), 1, msg)
    run_cli(cli_env, "--insecure", "pack", f"docker://{registry.host}/src/a:1", "a:1")
    # a registry that is down is still said to be unreachable
    registry.stop()
    one_line(run_cli(cli_env, "--insecure", "push", "img:1", url, check=False), 1,
             f"cannot reach the registry at {registry.host}")


# -- usage errors exit 2 ------------------------------------------------------------------------------------------

def test_usage_errors_exit_2(tmp_path, cli_env):
    src = small_image(tmp_path)
    run_cli(cli_env, "pack", src, "img:1")
    one_line(run_cli(cli_env, "--key", "nonsense", "images", check=False), 2, "bad key spec", "file:PATH")
    one_line(run_cli(cli_env, "--key", "vault:x", "images", check=False), 2, "unknown key spec scheme", "awskms:KEY")
    one_line(run_cli(cli_env, "pack", str(tmp_path / "img"), "x:1", check=False), 2, "a source is oci:DIR[:TAG]",
             "docker://")
    one_line(run_cli(cli_env, "pack", src, "BAD Name", check=False), 2, "invalid image name 'BAD Name'")
    one_line(run_cli(cli_env, "push", "img:1", "oci://127.0.0.1:5500", check=False), 2, "names no repository")
    assert [e["name"] for e in json.loads(run_cli(cli_env, "images", "--json").stdout)] == ["img"]


# -- errors name the image and the path ---------------------------------------------------------------------------

def test_cat_missing_path_is_said_in_words(tmp_path, cli_env):
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    line = one_line(run_cli(cli_env, "cat", "img:1", "/etc/nosuch", check=False), 1)
    assert line == "convstore: error: img:1: /etc/nosuch: no such file or directory"
    line = one_line(run_cli(cli_env, "cat", "img:1", "/etc", check=False), 1)
    assert line == "convstore: error: img:1: /etc: is a directory (use convstore ls)"
    line = one_line(run_cli(cli_env, "ls", "img:1", "/nowhere", check=False), 1)
    assert line == "convstore: error: img:1: /nowhere: no such file or directory"
    assert run_cli(cli_env, "cat", "img:1", "/etc/hello").stdout == "hello\n"


# -- help texts and output wording --------------------------------------------------------------------------------

def test_help_texts_name_every_form(cli_env):
    env = dict(cli_env, COLUMNS="200", TERM="dumb")
    top = run_cli(env, "--help").stdout
    assert "oci://HOST[:PORT]/REPO" in top and "pkcs11:token=T;object=K" in top and "awskms:KEY" in top
    assert "Store directory" not in top
    daemon_line = next(line for line in top.splitlines() if " daemon " in line)
    assert "Keep convstore loaded, so later commands start 0.15-0.2 s faster." in daemon_line
    assert "docker://HOST[:PORT]/REPO[:TAG]" in run_cli(env, "pack", "--help").stdout
    rk = run_cli(env, "rekey", "--help").stdout
    assert "pkcs11:token=T;object=K" in rk and "awskms:KEY" in rk and "file:PATH" in rk
    assert "containerd's [proxy_plugins] entry names" in run_cli(env, "snapshotter", "--help").stdout
    assert "The [proxy_plugins] name of" in run_cli(env, "containerd-load", "--help").stdout


def test_output_wording(tmp_path, cli_env, registry):
    run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    p = run_cli(cli_env, "pack", small_image(tmp_path), "img:1")
    assert "(1 layer, " in p.stdout
    v = run_cli(cli_env, "verify").stdout
    assert " of 1 image in " in v and "1 images" not in v
    url = f"oci://{registry.host}/store"
    assert " sent " in run_cli(cli_env, "--insecure", "--cache", str(tmp_path / "c"), "push", "img:1", url).stdout
    env2 = dict(cli_env, CONVSTORE_STORE=str(tmp_path / "store2"))
    pulled = run_cli(env2, "--insecure", "--cache", str(tmp_path / "c"), "pull", url, "img:1").stdout
    assert "fetched 1 of 1 chunk," in pulled and "sent" not in pulled
    # audit on a pipe: whole cells (the full key id and the full time)
    key_id = json.loads(run_cli(cli_env, "inspect", "--json", "img:1").stdout)["key_id"]
    recs = [json.loads(line) for line in run_cli(cli_env, "audit", "--json").stdout.splitlines()]
    table = run_cli(dict(cli_env, COLUMNS="80"), "audit").stdout
    assert key_id in table and recs[0]["time"] in table and "…" not in table


def test_daemon_stop_confirms(tmp_path, cli_env):
    sock = str(tmp_path / "run" / "cli.sock")
    os.makedirs(tmp_path / "run", mode=0o700)
    env = dict(cli_env, CONVSTORE_DAEMON="1")
    started = run_cli(env, "daemon", "--socket", sock, "--background")
    try:
        assert "convstore daemon listening on" in started.stdout
        pid = json.loads(run_cli(env, "daemon", "--socket", sock, "--status").stdout)["pid"]
        p = run_cli(env, "daemon", "--socket", sock, "--stop")
        assert p.stdout.strip() == f"stopping the convstore daemon (pid {pid}) on {sock}"
        assert "stopping\": false" not in p.stdout
    finally:
        if os.path.exists(sock):
            subprocess.run([sys.executable, "-m", "convstore.cli", "daemon", "--socket", sock, "--stop"], env=env,
                           capture_output=True, timeout=60)
