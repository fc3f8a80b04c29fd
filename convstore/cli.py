"""The ``convstore`` command line.

Exit status: 0 success, 1 operational error (one line on stderr), 2 usage
error.  Progress bars appear only when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

import typer

from . import cli_base
from ._version import __version__
from .cli_base import (BadValue, _background_fetch, _fail, _mb, _n, _open, _options, _policy,  # noqa: F401
                       _print_fetch_stats, _State, _store, err, out, state)
from .errors import ConfigError, ConvstoreError

if TYPE_CHECKING:
    from rich.progress import Progress

# Start-up time is part of every command (a warm `convstore run` is budgeted
# at 0.3 s): modules beyond typer are imported where a command needs them,
# rich included (docs/benchmarks.md, "Start latency").

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts as written: "[default: ...]" or "[proxy_plugins]" are not rich markup tags
    help="Store OCI images as convergent-encrypted, deduplicated chunks; unpack them back exactly.",
)


def _version_flag(value: bool) -> None:
    if value:
        sys.stdout.write(f"convstore {__version__}\n")
        raise typer.Exit()


def _config_flag(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """Options from the config file become defaults (click's default_map): the command line still wins."""
    from .service import config

    path = config.find(value)
    if path:
        ctx.default_map = {**config.defaults(path, ctx.command), **(ctx.default_map or {})}
    return value


@app.callback()
def _global(
    version: bool = typer.Option(False, "--version", callback=_version_flag, is_eager=True,
                                 help="Print the version and exit"),
    config_file: Optional[str] = typer.Option(None, "--config", metavar="PATH", callback=_config_flag, is_eager=True,
                                              help="Options of the services from this TOML file [default: "
                                                   "$CONVSTORE_CONFIG, else /etc/convstore/config.toml (root) or "
                                                   "~/.config/convstore/config.toml, if it exists]"),
    store: Optional[str] = typer.Option(None, "--store", metavar="PATH|oci://HOST/REPO|s3://BUCKET/PREFIX",
                                        help="The store: a local folder, a registry repository oci://HOST[:PORT]/REPO "
                                             "or an S3 bucket s3://BUCKET/PREFIX "
                                             "[default: $CONVSTORE_STORE, else ~/.local/share/convstore/store]"),
    key: Optional[str] = typer.Option(None, "--key", metavar="SPEC",
                                      help="Master key: file:PATH, pkcs11:token=T;object=K?module-path=..., or "
                                           "awskms:KEY [default: $CONVSTORE_KEY, else ~/.config/convstore/master.key, "
                                           "created on first use]; a key named here must exist (unless the store is new)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars"),
    latency: float = typer.Option(0.0, "--simulate-latency", metavar="MS", min=0,
                                  help="Add this per-request latency to store reads (measurement)"),
    bandwidth: float = typer.Option(0.0, "--simulate-bandwidth", metavar="MB/S", min=0,
                                    help="Cap store reads at this bandwidth (measurement)"),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP to registries, stores and docker:// sources alike (loopback too)"),
    username: Optional[str] = typer.Option(None, "--username", help="Registry user"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the registry password from stdin"),
    cache: Optional[str] = typer.Option(None, "--cache", metavar="DIR",
                                        help="Local cache for a registry store [default: user cache dir]"),
    cache_size: float = typer.Option(2048.0, "--cache-size", metavar="MB", min=1, help="Cache bound in MB"),
    timeout: float = typer.Option(60.0, "--timeout", metavar="S", min=0.1,
                                  help="Registry silence before a request is retried (4 attempts)"),
    site_cache: Optional[str] = typer.Option(None, "--site-cache", metavar="URL",
                                             help="A shared site tier http[s]://HOST[:PORT] chunk reads of a registry "
                                                  "store go through first; skipped while down, never trusted "
                                                  "[default: $CONVSTORE_SITE_CACHE]"),
    read_deadline: float = typer.Option(10.0, "--read-deadline", metavar="S", min=0.1,
                                        help="Seconds a read from a registry store may wait with nothing arriving "
                                             "(no byte of any answer), retries included, before it fails "
                                             "(EIO under a mount)"),
    offline_max_age: str = typer.Option("1d", "--offline-max-age", metavar="DURATION",
                                        help="While the registry is unreachable, serve the node cache's copy of "
                                             "the catalog if the registry confirmed it this recently (0: never)"),
    kms_endpoint: Optional[str] = typer.Option(None, "--kms-endpoint", metavar="URL",
                                               help="KMS endpoint for awskms: keys [default: $CONVSTORE_KMS_ENDPOINT]"),
    inactive_after: Optional[str] = typer.Option(None, "--inactive-after", metavar="DURATION",
                                                 help="Unread this long, an image is INACTIVE (e.g. 14d, 12h) "
                                                      "[default: $CONVSTORE_INACTIVE_AFTER or 14d]"),
    allow_rollback: bool = typer.Option(False, "--allow-rollback",
                                        help="Accept a tag or domain older than one this client has seen"),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", metavar="URL",
                                              help="S3 endpoint of s3:// stores [default: $CONVSTORE_S3_ENDPOINT, "
                                                   "else AWS]; credentials and region as the AWS tools take them "
                                                   "(AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, ...)"),
) -> None:
    try:
        cli_base.set_globals(store=store, key=key, quiet=quiet, latency=latency, bandwidth=bandwidth,
                             insecure=insecure, username=username, password_stdin=password_stdin, cache=cache,
                             cache_size=cache_size, timeout=timeout, site_cache=site_cache,
                             read_deadline=read_deadline, offline_max_age=offline_max_age, kms_endpoint=kms_endpoint,
                             inactive_after=inactive_after, allow_rollback=allow_rollback, s3_endpoint=s3_endpoint)
    except BadValue as e:
        raise typer.BadParameter(str(e)) from None


def _duration(spec: str) -> float:
    try:
        return cli_base.duration(spec)
    except BadValue as e:
        raise typer.BadParameter(str(e)) from None


class _RichProgress:
    """Adapts the library's progress protocol to a rich bar on stderr."""

    def __init__(self) -> None:
        self._p: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None) -> None:
        if state.quiet or not sys.stderr.isatty():
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=err.get(), transient=True)
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def finish(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


_POLICY_HELP = ("Trust policy (containers-policy.json) [default: ~/.config/containers/policy.json, else "
                "/etc/containers/policy.json, else accept everything]")


def _policy_option() -> Any:
    return typer.Option(None, "--policy", metavar="PATH", help=_POLICY_HELP)


_BACKGROUND_HELP = "Return once it serves (its log goes to --log-file); unmount with fusermount3 -u"


def _log_file_option() -> Any:
    return typer.Option(None, "--log-file", metavar="PATH",
                        help="With --background: append the service's log here (0600) [default: "
                             "SERVICE@MOUNTPOINT.log in $CONVSTORE_LOG_DIR, else /var/log/convstore for root, "
                             "else ~/.local/state/convstore/log]")


def _metrics_option() -> Any:
    return typer.Option(None, "--metrics-address", metavar="HOST:PORT",
                        help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; it names the "
                             "images served: keep it on loopback or a trusted network)")


def _memory_budget_option() -> Any:
    return typer.Option(128.0, "--memory-budget", metavar="MIB", min=1,
                        help="Plaintext chunks kept in memory, shared by every image this process serves")


def _stats_file_option() -> Any:
    return typer.Option(None, "--stats-file", metavar="PATH",
                        help="Keep what was fetched, per image, and errors, caches and starts in this JSON file "
                             "(added to across restarts)")


def _metrics_address(spec: str | None) -> str | None:
    """``--metrics-address`` checked before anything is mounted (a usage error if malformed)."""
    if spec is not None:
        from .metrics import parse_address

        try:
            parse_address(spec)
        except ValueError as e:
            raise typer.BadParameter(f"--metrics-address: {e}") from None
    return spec


@app.command()
def pack(
    source: str = typer.Argument(..., metavar="SOURCE",
                                 help="oci:DIR[:TAG], docker-archive:FILE[:NAME:TAG] or docker://HOST[:PORT]/REPO[:TAG]"),
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    level: int = typer.Option(3, "--level", min=0, max=19, help="zstd level per chunk (0 = no compression)"),
    domain: str = typer.Option("default", "--domain", metavar="NAME", help="Convergence domain (dedup scope)"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    policy: Optional[str] = _policy_option(),
) -> None:
    """Pack an image into the store, if the trust policy accepts it (docs/security.md)."""
    r = _store(create=True).pack(source, ref, level=level, domain=domain, progress=_RichProgress(),
                                 insecure=state.insecure, policy=_policy(policy))
    if json_out:
        _emit_json(r.to_json())
        return
    if r.up_to_date:
        out.print(f"{r.ref} is up to date: it was packed from this source, and its {_n(r.chunks, 'chunk')} "
                  f"{'is' if r.chunks == 1 else 'are all'} present "
                  f"({_n(r.layers, 'layer')}, {_mb(r.logical_bytes)}); nothing written", highlight=False)
        return
    rate = r.logical_bytes / 1e6 / r.seconds if r.seconds else 0.0
    out.print(f"packed {r.ref}: {_n(r.layers, 'layer')}, {_mb(r.logical_bytes)} in {r.seconds:.2f} s ({rate:.0f} MB/s); "
              f"{r.new_chunks} new of {_n(r.chunks, 'chunk')}, {_mb(r.new_stored_bytes)} stored")


@app.command()
def unpack(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    dest: Optional[str] = typer.Argument(None, metavar="oci:DIR[:TAG]"),
    rootfs: Optional[str] = typer.Option(None, "--rootfs", metavar="DIR", help="Write the flattened root filesystem to DIR"),
    compress: Optional[str] = typer.Option(None, "--compress", metavar="none|gzip|zstd",
                                           help="Layer compression [default: as in the original]"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Write an image back as an OCI image layout, or as a root filesystem."""
    if (dest is None) == (rootfs is None):
        raise typer.BadParameter("give either oci:DIR[:TAG] or --rootfs DIR")
    from .oci.media import COMPRESSIONS

    if compress is not None and compress not in COMPRESSIONS:
        raise typer.BadParameter(f"--compress must be one of {', '.join(COMPRESSIONS)}")
    store = _store()
    if rootfs is not None:
        r: Any = store.unpack_rootfs(ref, rootfs, progress=_RichProgress())
        for w in r.warnings:
            err.print(f"warning: {w}", highlight=False)
        msg = f"unpacked {r.ref} to {r.dest}: {_n(r.files, 'file')}, {_mb(r.bytes_written)} in {r.seconds:.2f} s"
    else:
        assert dest is not None
        r = store.unpack_oci(ref, dest, compress=compress, progress=_RichProgress())
        msg = f"unpacked {r.ref} to {r.dest}: {_n(r.layers, 'layer')}, {_mb(r.written_bytes)} in {r.seconds:.2f} s"
    if json_out:
        _emit_json(r.to_json())
    else:
        out.print(msg, highlight=False)


@app.command()
def images(json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """List the images in the store."""
    entries = _store().images()
    if json_out:
        _emit_json([e.public() for e in entries])
        return
    rows = [("NAME", "TAG", "STATE", "LAYERS", "SIZE", "CREATED", "MANIFEST")]
    rows += [(e.ref.name, e.ref.tag, e.display_state(), str(e.layers), _mb(e.logical_bytes), e.created,
              (e.manifest_digest or "")[:19]) for e in entries]
    _print_columns(rows)


def _print_columns(rows: Sequence[tuple[str, ...]]) -> None:
    """Aligned columns, plain (rich's Table measures every cell: 1.6 s for 1,000 rows)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


@app.command()
def inspect(ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
            json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """Show an image's catalog entry, layers and chunking."""
    doc = _store().inspect(ref).to_json()
    from .core.domains import describe as describe_domain

    if json_out:
        _emit_json(doc)
        return
    out.print(f"{doc['name']}:{doc['tag']}  state={doc['state']}  manifest={doc['manifest']}", highlight=False)
    out.print(f"source: {doc['source']}\ncreated: {doc['created']}\nkey: {doc['key_id']}  "
              f"domain: {describe_domain(doc['domain'])}", highlight=False)
    from .oci.policy import describe

    out.print(f"verification: {describe(doc.get('verification'))}", highlight=False, markup=False, soft_wrap=True)
    c = doc["chunking"]
    out.print(f"chunking: {c['algorithm']} min/avg/max {c['min_size']}/{c['avg_size']}/{c['max_size']}, "
              f"zstd level {doc['compression_level']}, {_n(doc['chunks'], 'unique chunk')}", highlight=False)
    from rich.table import Table

    t = Table("#", "MEDIA TYPE", "DIFF ID", "SIZE", "FILES", "CHUNKS", box=None)
    for i, l in enumerate(doc["layers"]):
        t.add_row(str(i), l["media_type"].rsplit(".", 1)[-1], l["diff_id"][:19], _mb(l["uncompressed_size"]),
                  str(l["files"]), str(l["chunks"]))
    out.print(t)


@app.command()
def stats(json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """Logical bytes, unique chunk bytes, stored bytes and the dedup ratio."""
    s = _store().stats().to_json()
    if json_out:
        _emit_json(s)
        return
    out.print(f"images:                 {s['images']}\n"
              f"logical bytes:          {_mb(s['logical_bytes'])}\n"
              f"unique plaintext bytes: {_mb(s['unique_plaintext_bytes'])} in {s['unique_chunks']} chunks\n"
              f"stored bytes:           {_mb(s['stored_bytes'])} "
              f"(chunks {_mb(s['stored_chunk_bytes'])}, manifests {_mb(s['stored_manifest_bytes'])})\n"
              f"dedup ratio:            {s['dedup_ratio']}x", highlight=False)


domain_app = typer.Typer(help="Convergence domains: the scope inside which identical chunks dedup.",
                         no_args_is_help=True)
app.add_typer(domain_app, name="domain")


@domain_app.command("create")
def domain_create(name: str = typer.Argument(...)) -> None:
    """Create a domain with a fresh secret (pack into it with --domain NAME)."""
    rec = _store(create=True).create_domain(name)
    from .core.domains import describe as describe_domain

    out.print(f"created domain {describe_domain(rec)}, key {rec['key_id']}", highlight=False)


@domain_app.command("list")
def domain_list(json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """List the domains, their current epoch and master key."""
    ds = _store().domains()
    if json_out:
        _emit_json(ds)
        return
    from rich.table import Table

    t = Table("NAME", "EPOCH", "ID", "KEY", "CREATED", box=None)
    for d in ds:
        t.add_row(d["name"], str(d["epoch"]), str(d.get("id") or "")[:16], d["key_id"], d["created"])
    out.print(t)


@domain_app.command("rotate")
def domain_rotate(name: str = typer.Argument("default")) -> None:
    """Start a new epoch: new chunks stop deduplicating with older ones; old images stay readable."""
    rec = _store().rotate_domain(name)
    out.print(f"domain {rec['name']} is now at epoch {rec['epoch']}", highlight=False)


@app.command()
def push(ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
         url: str = typer.Argument(..., metavar="oci://HOST[:PORT]/REPO|s3://BUCKET/PREFIX|PATH"),
         json_out: bool = typer.Option(False, "--json", help="Print the result as JSON")) -> None:
    """Copy an image to another store (a registry, an S3 bucket, a folder), sending only the chunks it lacks."""
    from .transfer import copy_image

    r = copy_image(_store(), _open(url, create=True), ref, progress=_RichProgress())
    _copy_report(r, json_out, "pushed", url)


@app.command()
def pull(url: str = typer.Argument(..., metavar="oci://HOST[:PORT]/REPO|s3://BUCKET/PREFIX|PATH"),
         ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
         json_out: bool = typer.Option(False, "--json", help="Print the result as JSON")) -> None:
    """Copy an image from another store (a registry, an S3 bucket, a folder) into this one, fetching only missing chunks."""
    from .transfer import copy_image

    r = copy_image(_open(url), _store(create=True), ref, progress=_RichProgress())
    _copy_report(r, json_out, "pulled", url)


def _copy_report(r: Any, json_out: bool, verb: str, url: str) -> None:
    if json_out:
        _emit_json(r.to_json())
        return
    moved = "sent" if verb == "pushed" else "fetched"
    if r.domain_note:
        err.print(f"convstore: note: {r.domain_note}", highlight=False)
    out.print(f"{verb} {r.ref} ({url}): {moved} {r.chunks_sent} of {_n(r.chunks, 'chunk')}, {_mb(r.bytes_sent)} in "
              f"{r.seconds:.2f} s", highlight=False)


@app.command()
def rekey(to: str = typer.Option(..., "--to", metavar="SPEC",
                                  help="The new master key: file:PATH (created if missing), "
                                       "'pkcs11:token=T;object=K?module-path=...' (quote it: ; ends a shell "
                                       "command) or awskms:KEY"),
          json_out: bool = typer.Option(False, "--json", help="Print the report as JSON")) -> None:
    """Re-wrap every data key and domain secret under a new master key (chunks untouched; resumable)."""
    r = _store().rekey(to, kms_endpoint=state.kms_endpoint)
    if json_out:
        _emit_json(r.to_json())
        return
    out.print(f"re-wrapped {_n(r.images, 'image')}, {_n(r.domains, 'domain')}, {_n(r.layer_records, 'layer record')} under "
              f"{r.new_key_id} ({r.skipped} already done) in {r.seconds:.2f} s; the old key {r.old_key_id} "
              f"is no longer needed", highlight=False)


@app.command()
def audit(since: Optional[str] = typer.Option(None, "--since", metavar="ISO-TIME", help="e.g. 2026-11-26T18:00"),
          image: Optional[str] = typer.Option(None, "--image", metavar="NAME"),
          json_out: bool = typer.Option(False, "--json", help="Print JSON lines")) -> None:
    """Show every use of the master key recorded in the store's audit log."""
    from .store import read_audit_log

    recs = read_audit_log(_options(state.store_path), since, image)  # reading the log needs no key
    if json_out:
        for r in recs:
            sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
        return
    rows = [("TIME", "OP", "OUTCOME", "PURPOSE", "IMAGE/DOMAIN", "KEY", "PID", "USER")]
    rows += [(r["time"], r["op"], r["outcome"], r["purpose"], r.get("image") or r.get("domain", ""),
              r["key_id"], str(r["pid"]), r["user"]) for r in recs]
    _print_columns(rows)  # whole cells, on a terminal or a pipe


@app.command()
def rm(ref: str = typer.Argument(..., metavar="NAME[:TAG]")) -> None:
    """Remove an image from the catalog (its chunks are freed by gc)."""
    e = _store().rm(ref)
    if e is None:
        out.print(f"removed the damaged catalog entry {ref}", highlight=False)
        return
    out.print(f"removed {e.ref}; run convstore gc to free its unshared chunks", highlight=False)


@app.command("gc")
def gc_cmd(dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be freed, change nothing"),
           json_out: bool = typer.Option(False, "--json", help="Print the report as JSON")) -> None:
    """Free chunks and manifests no live image uses (waits for packs in progress)."""
    r = _store().gc(dry_run=dry_run)
    if json_out:
        _emit_json(r.to_json())
        return
    verb = "would free" if dry_run else "freed"
    out.print(f"{verb} {r.chunks_removed} of {_n(r.chunks_total, 'chunk')} ({_mb(r.chunk_bytes_freed)}), "
              f"{_n(r.manifests_removed, 'manifest')} ({_mb(r.manifest_bytes_freed)}), "
              f"{_n(r.other_files_removed, 'other file')}; {_n(r.live_images, 'live image')}" + (f", reclaimed inactive: {', '.join(r.reclaimed_images)}"
                                                  if r.reclaimed_images else "")
              + ("" if dry_run else f"; store {_mb(r.store_bytes_before)} -> {_mb(r.store_bytes_after)}"),
              highlight=False)


@app.command()
def verify(ref: Optional[str] = typer.Argument(None, metavar="[NAME[:TAG]]"),
           repair: bool = typer.Option(False, "--repair", help="Re-pack affected images from their sources"),
           repair_from: Optional[str] = typer.Option(None, "--from", metavar="STORE",
                                                     help="With --repair: copy good chunks from this store first"),
           json_out: bool = typer.Option(False, "--json", help="Print the report as JSON")) -> None:
    """Check the catalog and every chunk of every (or one) image: present, decrypts, right content.
    A corrupt chunk is quarantined (so the next pack of its content stores it again)."""
    if repair_from and not repair:
        raise typer.BadParameter("--from needs --repair")
    r = _store().verify(ref, repair=repair, repair_from=_open(repair_from) if repair_from else None)
    if json_out:
        _emit_json(r.to_json())
    else:
        out.print(f"checked {_n(r.chunks_checked, 'chunk')} of {_n(r.images, 'image')} in {r.seconds:.2f} s: "
                  + ("clean" if r.clean else f"{len(r.missing)} missing, {len(r.corrupt)} corrupt"), highlight=False)
        for kind, d in (("missing", r.missing), ("corrupt", r.corrupt)):
            for cid, imgs in sorted(d.items()):
                out.print(f"  {kind} chunk {cid} used by {', '.join(sorted(set(imgs)))}", highlight=False)
        for img, why in r.unreadable.items():
            out.print(f"  unreadable image {img}: {why}", highlight=False)
        for cid, why in sorted(r.errors.items()):
            out.print(f"  could not read chunk {cid} (retry later): {why}", highlight=False)
        for line in r.index_problems:
            out.print(f"  damaged index file {line} (verify --repair rebuilds it)", highlight=False)
        for img in r.repaired:
            out.print(f"  repaired {img}", highlight=False)
        for img, why in r.not_repaired.items():
            out.print(f"  could not repair {img}: {why}", highlight=False)
    if not r.clean and (r.errors or set(r.repaired) != set(r.affected)):
        raise typer.Exit(1)


@app.command()
def refresh(ref: Optional[str] = typer.Argument(None, metavar="[NAME[:TAG]]"),
            json_out: bool = typer.Option(False, "--json", help="Print the changes as JSON")) -> None:
    """Re-check sources and keys (FAILED/ACTIVE), age unread images to INACTIVE."""
    changes = _store().refresh(ref)
    if json_out:
        _emit_json([c.__dict__ for c in changes])
        return
    if not changes:
        out.print("no changes", highlight=False)
    for c in changes:
        out.print(f"{c.ref}: {c.old.upper()} -> {c.new.upper()} ({c.reason})", highlight=False)


def _mode_string(mode: int) -> str:
    import stat as st

    return st.filemode(mode)


@app.command("ls")
def ls_cmd(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    path: str = typer.Argument("/", help="Directory or file inside the image"),
    long: bool = typer.Option(False, "-l", help="Long listing"),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON"),
) -> None:
    """List a directory of an image (reads the manifest only, no chunk)."""
    from .reader import ImageFS

    with ImageFS.from_store(_store(), ref) as fs, _image_path_errors(ref, path):
        import stat as st

        s = fs.stat(path, follow=True)
        names = sorted(fs.listdir(path)) if st.S_ISDIR(s.st_mode) else [path.rstrip("/").rsplit("/", 1)[-1]]
        base = path if st.S_ISDIR(s.st_mode) else path.rstrip("/").rsplit("/", 1)[0] or "/"
        rows = []
        for n in names:
            p = base.rstrip("/") + "/" + n
            e = fs.stat(p)
            link = fs.readlink(p) if st.S_ISLNK(e.st_mode) else None
            rows.append((n, e, link))
    if json_out:
        _emit_json([{"name": n, "mode": e.st_mode, "uid": e.st_uid, "gid": e.st_gid, "size": e.st_size,
                     "mtime_ns": e.st_mtime_ns, "nlink": e.st_nlink, "linkname": link} for n, e, link in rows])
        return
    import time as _t

    for n, e, link in rows:
        if long:
            when = _t.strftime("%Y-%m-%d %H:%M", _t.gmtime(e.st_mtime_ns / 1e9))
            out.print(f"{_mode_string(e.st_mode)} {e.st_nlink:3d} {e.st_uid:5d} {e.st_gid:5d} {e.st_size:10d} "
                      f"{when} {n}" + (f" -> {link}" if link else ""), highlight=False, markup=False)
        else:
            out.print(n, highlight=False, markup=False)


@contextlib.contextmanager
def _image_path_errors(ref: str, path: str) -> Iterator[None]:
    """An OSError of a path inside an image, said in words with the image and the path."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno is None or isinstance(e, (BrokenPipeError, ConnectionError)):
            raise
        why = {errno.ENOENT: "no such file or directory", errno.EISDIR: "is a directory (use convstore ls)",
               errno.ENOTDIR: "a parent is not a directory", errno.ELOOP: "too many levels of symbolic links"}
        raise ConvstoreError(f"{ref}: {path}: {why.get(e.errno) or os.strerror(e.errno).lower()}") from None


@app.command()
def cat(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    path: str = typer.Argument(..., help="File inside the image"),
    show_stats: bool = typer.Option(False, "--stats", help="Print what was fetched to stderr"),
) -> None:
    """Write a file of an image to stdout, fetching only its chunks."""
    from .reader import ImageFS

    with ImageFS.from_store(_store(), ref) as fs, _image_path_errors(ref, path):
        with fs.open(path) as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                sys.stdout.buffer.write(b)
        sys.stdout.buffer.flush()
        if show_stats:
            _print_fetch_stats(fs.fetcher.refresh_requests().to_json())


@app.command()
def mount(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    mountpoint: str = typer.Argument(..., metavar="MOUNTPOINT"),
    background: bool = typer.Option(False, "--background", "-b", help=_BACKGROUND_HELP),
    log_file: Optional[str] = _log_file_option(),
    policy: Optional[str] = _policy_option(),
    metrics_address: Optional[str] = _metrics_option(),
    memory_budget: float = _memory_budget_option(),
    stats_file: Optional[str] = _stats_file_option(),
    background_fetch: Optional[bool] = typer.Option(None, "--background-fetch/--no-background-fetch",
                                                    help="Fetch the rest of each image in the background after "
                                                         "its start [default: on, or $CONVSTORE_BACKGROUND_FETCH]"),
    background_rate: Optional[str] = typer.Option(None, "--background-rate", metavar="BYTES/S",
                                                  help="Bandwidth bound of the background fetch, e.g. 50M "
                                                       "[default: unbounded, or $CONVSTORE_BACKGROUND_RATE]"),
) -> None:
    """Mount an image read-only with FUSE (foreground until Ctrl-C / SIGTERM / unmount)."""
    _prepare_mountpoint(mountpoint)
    node_policy = _policy(policy)
    fetch = _background_fetch(background_fetch, background_rate)
    report = {"metrics_address": _metrics_address(metrics_address), "memory_budget": int(memory_budget * (1 << 20)),
              "stats_file": os.path.abspath(stats_file) if stats_file else None, "background": fetch.to_json()}
    if background:
        _serve_in_background({"op": "mount", "ref": ref, "mountpoint": os.path.abspath(mountpoint),
                              "policy": node_policy.path, **report}, "mount", mountpoint, ref, log_file)
        return
    from .worker import run_mount

    _service_logging()
    run_mount(_store(), ref, mountpoint, node_policy, report)


@app.command()
def layerstore(
    mountpoint: str = typer.Argument(..., metavar="MOUNTPOINT"),
    background: bool = typer.Option(False, "--background", "-b", help=_BACKGROUND_HELP),
    log_file: Optional[str] = _log_file_option(),
    stats_file: Optional[str] = _stats_file_option(),
    policy: Optional[str] = _policy_option(),
    metrics_address: Optional[str] = _metrics_option(),
    memory_budget: float = _memory_budget_option(),
    background_fetch: Optional[bool] = typer.Option(None, "--background-fetch/--no-background-fetch",
                                                    help="Fetch the rest of each image in the background after "
                                                         "its start [default: on, or $CONVSTORE_BACKGROUND_FETCH]"),
    background_rate: Optional[str] = typer.Option(None, "--background-rate", metavar="BYTES/S",
                                                  help="Bandwidth bound of the background fetch, e.g. 50M "
                                                       "[default: unbounded, or $CONVSTORE_BACKGROUND_RATE]"),
) -> None:
    """Serve the store's layers to podman / CRI-O as an additional layer store (docs/engines.md)."""
    _prepare_mountpoint(mountpoint)
    stats = os.path.abspath(stats_file) if stats_file else None
    node_policy = _policy(policy)
    address, budget = _metrics_address(metrics_address), int(memory_budget * (1 << 20))
    fetch = _background_fetch(background_fetch, background_rate)
    if background:
        _serve_in_background({"op": "layerstore", "mountpoint": os.path.abspath(mountpoint), "stats_file": stats,
                              "policy": node_policy.path, "metrics_address": address, "memory_budget": budget,
                              "background": fetch.to_json()}, "layerstore", mountpoint, "the layer store", log_file)
        return
    from .engines.layerstore import LayerStore, serve_layerstore
    from .reader.chunkcache import ChunkCache

    _service_logging()
    serve_layerstore(LayerStore(_store(), policy=node_policy, cache=ChunkCache(budget), background=fetch), mountpoint,
                     stats, address)


@app.command()
def snapshotter(
    root: str = typer.Argument(..., metavar="ROOT", help="Snapshot state and directories"),
    socket: str = typer.Option("/run/convstore/snapshotter.sock", "--socket", metavar="PATH",
                               help="The unix socket containerd's [proxy_plugins] entry names"),
    stats_file: Optional[str] = _stats_file_option(),
    background: bool = typer.Option(False, "--background", "-b", help="Return once it serves (stop it with kill PID)"),
    log_file: Optional[str] = _log_file_option(),
    policy: Optional[str] = _policy_option(),
    metrics_address: Optional[str] = _metrics_option(),
    memory_budget: float = _memory_budget_option(),
    background_fetch: Optional[bool] = typer.Option(None, "--background-fetch/--no-background-fetch",
                                                    help="Fetch the rest of each image in the background after "
                                                         "its start [default: on, or $CONVSTORE_BACKGROUND_FETCH]"),
    background_rate: Optional[str] = typer.Option(None, "--background-rate", metavar="BYTES/S",
                                                  help="Bandwidth bound of the background fetch, e.g. 50M "
                                                       "[default: unbounded, or $CONVSTORE_BACKGROUND_RATE]"),
) -> None:
    """Serve containerd's snapshots API (a proxy snapshotter) with the store's layers (docs/engines.md)."""
    stats = os.path.abspath(stats_file) if stats_file else None
    node_policy = _policy(policy)
    address, budget = _metrics_address(metrics_address), int(memory_budget * (1 << 20))
    fetch = _background_fetch(background_fetch, background_rate)
    if background:
        _serve_in_background({"op": "snapshotter", "root": os.path.abspath(root), "socket": os.path.abspath(socket),
                              "stats_file": stats, "policy": node_policy.path, "metrics_address": address,
                              "memory_budget": budget, "background": fetch.to_json()}, "snapshotter", root,
                             "the snapshotter", log_file)
        return
    from .engines.layerstore import LayerStore
    from .engines.snapshotter import serve_snapshotter
    from .reader.chunkcache import ChunkCache

    _service_logging()
    serve_snapshotter(LayerStore(_store(), policy=node_policy, cache=ChunkCache(budget), background=fetch), root,
                      socket, stats, address)


@app.command("containerd-load")
def containerd_load(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    address: str = typer.Option("/run/containerd/containerd.sock", "--address", "-a", metavar="PATH",
                                help="containerd's socket"),
    name: Optional[str] = typer.Option(None, "--name", metavar="REF",
                                       help="Image name in containerd [default: the image's source reference]"),
    namespace: str = typer.Option("default", "--namespace", "-n", help="containerd namespace"),
    snapshotter_name: str = typer.Option("convstore", "--snapshotter", metavar="NAME",
                                         help="The [proxy_plugins] name of `convstore snapshotter`"),
    policy: Optional[str] = _policy_option(),
) -> None:
    """Make an image of the store a containerd image whose layers come from `convstore snapshotter`, lazily."""
    from .engines.containerd_load import load_into_containerd

    got = load_into_containerd(_store(), ref, address, name=name, namespace=namespace, snapshotter=snapshotter_name,
                               policy=_policy(policy))
    out.print(f"loaded {ref} into containerd as {got} (snapshotter {snapshotter_name}); "
              f"run it with: ctr run --snapshotter {snapshotter_name} {got} ID", highlight=False)


def _prepare_mountpoint(mountpoint: str) -> None:
    from .reader.fdholder import held
    from .reader.fuse import recover_stale_mount

    if held(mountpoint):
        return  # a killed server's session, kept for this successor (a look at the mount would wait for it)
    recover_stale_mount(mountpoint)  # a mount whose process was killed: detached, then mounted again
    if not os.path.isdir(mountpoint):
        raise typer.BadParameter(f"{mountpoint} is not a directory")


def _service_logging() -> None:
    """A service in the foreground logs to stderr: the terminal, or systemd's journal."""
    from .service.logs import setup_service_logging

    setup_service_logging()


def _serve_in_background(task: dict[str, Any], service: str, where: str, what: str, log_file: str | None) -> None:
    """Run ``task`` (a service) in a child, its log in a file, and return once it says READY=1
    (systemd's protocol on a socket of this process), or fail with its error line."""
    import time as _t

    from .service.background import ReadyWaiter, default_log_file, open_log
    from .worker import spawn

    log_path = os.path.abspath(log_file) if log_file else default_log_file(service, where)
    fd, offset = open_log(log_path)
    try:
        os.write(fd, f"{_t.strftime('%Y-%m-%dT%H:%M:%S%z')} convstore {service} --background: starting\n".encode())
        with ReadyWaiter() as waiter:
            # library code in a child that inherits the store options on a pipe (a PIN never reaches argv)
            p = spawn(task, _options(state.store_path), stderr=fd, env={"NOTIFY_SOCKET": waiter.path})
            waiter.wait(p, what, log_path, offset)
    finally:
        os.close(fd)
    if service == "snapshotter":
        out.print(f"{what} serves on {task['socket']} (pid {p.pid}); stop it with: kill {p.pid}; log: {log_path}",
                  highlight=False)
    else:
        out.print(f"mounted {what} at {where} (pid {p.pid}); unmount with: fusermount3 -u {where}; log: {log_path}",
                  highlight=False)


@app.command()
def run(
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    command: Optional[list[str]] = typer.Argument(None, metavar="[-- CMD ARG...]"),
    runtime: str = typer.Option("auto", "--runtime", metavar="auto|runc|chroot"),
    show_stats: bool = typer.Option(False, "--stats", help="Print what was fetched to stderr"),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", help="Prefetch the recorded start-up profile"),
    record: Optional[bool] = typer.Option(None, "--record-profile/--no-record-profile",
                                          help="Merge what this start reads into the start-up profile "
                                               "[default: yes]"),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stderr"),
    policy: Optional[str] = _policy_option(),
    background_fetch: Optional[bool] = typer.Option(None, "--background-fetch/--no-background-fetch",
                                                    help="Fetch the rest of each image in the background after "
                                                         "its start [default: on, or $CONVSTORE_BACKGROUND_FETCH]"),
    background_rate: Optional[str] = typer.Option(None, "--background-rate", metavar="BYTES/S",
                                                  help="Bandwidth bound of the background fetch, e.g. 50M "
                                                       "[default: unbounded, or $CONVSTORE_BACKGROUND_RATE]"),
    keep_mount: Optional[str] = typer.Option(None, "--keep-mount", metavar="DURATION",
                                             help="Keep the image mounted this long after the run, for the "
                                                  "next runs of it (e.g. 10m; 0: a mount of its own, removed "
                                                  "at once) [default: $CONVSTORE_KEEP_MOUNT, else 5m through "
                                                  "the daemon; alone: none kept, a kept one used]"),
) -> None:
    """Run an image's Entrypoint/Cmd (or CMD) from a lazy read-only mount; exit with its code."""
    try:
        code = cli_base.run_command(ref=ref, command=command, runtime=runtime, show_stats=show_stats,
                                    prefetch=prefetch, record=record, json_out=json_out, policy=policy,
                                    background_fetch=background_fetch, background_rate=background_rate,
                                    keep_mount=keep_mount)
    except BadValue as e:
        raise typer.BadParameter(str(e)) from None
    raise typer.Exit(code)


# What a daemon imports before it forks its first command: every command's modules.
_PRELOAD = ("convstore.pack", "convstore.unpack", "convstore.maintenance", "convstore.core.lifecycle",
            "convstore.engines.run", "convstore.reader.fuse", "convstore.engines.layerstore", "convstore.stores.registry",
            "convstore.stores.cache", "convstore.worker", "rich.console", "rich.progress", "rich.table",
            "platformdirs")
# ... and those of the extras where installed: the remote stores' clients (oras-py, and boto3: the aws extra),
# containerd-load's (grpc and the message schema: the containerd extra)
_PRELOAD_IF_INSTALLED = ("oras.provider", "boto3", "convstore.stores.s3", "convstore.engines.containerd_load", "grpc")


@app.command()
def daemon(
    socket_path: Optional[str] = typer.Option(
        None, "--socket", metavar="PATH",
        help="[default: $CONVSTORE_DAEMON_SOCKET, $XDG_RUNTIME_DIR/convstore/cli.sock, /run/convstore/cli.sock "
             "for root, or ~/.cache/convstore-daemon/cli.sock]"),
    background: bool = typer.Option(False, "--background", "-b", help="Return once it listens"),
    status: bool = typer.Option(False, "--status", help="Print the running daemon's state as JSON"),
    stop: bool = typer.Option(False, "--stop", help="Stop the running daemon (after its running commands)"),
) -> None:
    """Keep convstore loaded, so later commands start 0.15-0.2 s faster.

    Later commands of this user fork from it instead of starting Python.  Set CONVSTORE_DAEMON=0 to run a
    command without it."""
    import importlib

    from .daemon import server as d

    path = socket_path or d.socket_path()
    if status or stop:
        try:
            info = d.request(path, "stop" if stop else "status")
        except d.DaemonError as e:
            if stop:  # no daemon answers: the keepers it (or a run) started are stopped all the same
                from .engines.keeper import stop_keepers

                stop_keepers(wait=0)
            raise ConvstoreError(str(e)) from None
        if stop:
            from .engines.keeper import stop_keepers

            stop_keepers(wait=0)  # this user's kept image mounts too (each after its running containers)
            running = int(info.get("running") or 0)  # type: ignore[call-overload]
            out.print(f"stopping the convstore daemon (pid {info.get('pid')}) on {path}"
                      + (f": it exits after its {_n(running, 'running command')}" if running else ""),
                      highlight=False)
        else:
            out.print(json.dumps(info), highlight=False, soft_wrap=True)
        return
    from typer.main import get_command

    # re-executes itself: no secret of its launcher in any command's /proc/PID/environ or cmdline
    try:
        d.scrub_environment(path, [*(["--socket", os.path.abspath(path)] if socket_path else []),
                                   *(["--background"] if background else [])])
    except d.DaemonError as e:
        raise ConvstoreError(str(e)) from None
    from .hardening import no_core_dumps

    no_core_dumps()  # its clients' requests carry their environments (a PIN may be among them)
    d.close_inherited()  # what started it must not be held open by every command it forks
    command = get_command(app)
    server = d.Daemon(path, lambda prog: main(lambda: command(prog_name=prog)), __version__)
    try:
        server.bind()
    except d.DaemonError as e:
        raise ConvstoreError(str(e)) from None
    for name in _PRELOAD:
        importlib.import_module(name)
    for name in _PRELOAD_IF_INSTALLED:
        try:
            importlib.import_module(name)
        except (ImportError, ConvstoreError):
            pass  # an extra not installed: its command fails as it would without the daemon
    from .stores.s3.client import warm_up

    warm_up()  # the S3 API's model, parsed once for every command
    if background:
        r, w = os.pipe()
        if os.fork():
            os.close(w)
            os.read(r, 1)  # the child is detached and serving
            where = f" --socket {socket_path}" if socket_path else ""
            out.print(f"convstore daemon listening on {path} (stop it with: convstore daemon{where} --stop)",
                      highlight=False)
            return
        os.close(r)
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.close(w)
        try:
            server.serve()
            d.restart_if_stale(server)  # its loaded code changed on disk: again, on the new code
        finally:
            os._exit(0)
    # plain: a rich console made here would be inherited by every command
    sys.stderr.write(f"convstore daemon listening on {path}; Ctrl-C stops it\n")
    server.serve()
    d.restart_if_stale(server)


def main(command: Callable[[], object] | None = None) -> None:
    """Entry point: usage errors exit 2 (click), operational errors exit 1.
    ``command``: the command tree already built (a daemon's forked child)."""
    state.in_daemon = command is not None

    def typer_main() -> object:
        argv = sys.argv[1:]
        tree = _app_for(argv)
        if tree is not app:
            from . import cli_fast

            cli_fast.remember(tree, argv)  # what `convstore run`'s fast path parses from now on
        return tree()

    try:
        cli_base.guarded(command or typer_main)
    except BadValue as e:  # raised under typer, a BadValue is its BadParameter; never reaches here
        _fail(f"error: {e}", 2)


def _app_for(argv: Sequence[str]) -> typer.Typer:
    """The command tree to build for ``argv``.  typer makes a click command of every command on each start
    (~10 ms of a `convstore run`); a command line that names one command after the global options gets a tree
    of that command, and the services if a config file is read (its sections name them, service/config.py).
    Anything else (no command, an unknown one, --help, --): the whole tree, which answers as always."""
    import copy

    from typer.core import TyperOption
    from typer.main import get_command_name, get_params_convertors_ctx_param_name_from_function

    from .service import config

    assert app.registered_callback is not None
    params = get_params_convertors_ctx_param_name_from_function(app.registered_callback.callback)[0]
    opts = [p for p in params if isinstance(p, TyperOption)]
    flags = {o for p in opts if p.is_flag or p.count for o in [*p.opts, *p.secondary_opts]}
    valued = {o for p in opts if not (p.is_flag or p.count) for o in [*p.opts, *p.secondary_opts]}
    i = 0
    while i < len(argv) and (argv[i] in flags or argv[i] in valued or argv[i].partition("=")[0] in valued):
        i += 2 if argv[i] in valued else 1
    if i >= len(argv):
        return app

    def name(info: Any) -> str:
        return info.name or get_command_name(info.callback.__name__)

    try:
        read = any(a.partition("=")[0] == "--config" for a in argv[:i]) or config.find(None) is not None
    except ConfigError:
        read = True  # the callback says what is wrong, as always
    keep = {argv[i], *(config.SERVICES if read else ())}
    commands = [c for c in app.registered_commands if name(c) in keep]
    groups = [g for g in app.registered_groups if g.name in keep]
    if argv[i] not in {name(c) for c in commands} | {g.name for g in groups}:
        return app
    tree = copy.copy(app)
    tree.registered_commands, tree.registered_groups = commands, groups
    return tree


if __name__ == "__main__":
    main()
