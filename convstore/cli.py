"""The ``convstore`` command line.

Exit status: 0 success, 1 operational error (one line on stderr), 2 usage
error.  Progress bars appear only when stderr is a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .errors import ConvstoreError
from .oci.media import COMPRESSIONS
from .store import Store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Store OCI images as convergent-encrypted, deduplicated chunks; unpack them back exactly.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True)


class _State:
    store_path: str | None = None
    key_spec: str | None = None
    quiet: bool = False


state = _State()


@app.callback()
def _global(
    store: Optional[str] = typer.Option(None, "--store", metavar="PATH",
                                        help="Store directory [default: $CONVSTORE_STORE or the user data dir]"),
    key: Optional[str] = typer.Option(None, "--key", metavar="SPEC",
                                      help="Master key: file:PATH [default: $CONVSTORE_KEY or a key file in the user config dir]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars"),
) -> None:
    state.store_path = store
    state.key_spec = key
    state.quiet = quiet


def _store() -> Store:
    return Store.open(state.store_path, state.key_spec)


class _RichProgress:
    """Adapts the library's progress protocol to a rich bar on stderr."""

    def __init__(self) -> None:
        self._p: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None) -> None:
        if state.quiet or not err.is_terminal:
            return
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=err, transient=True)
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


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@app.command()
def pack(
    source: str = typer.Argument(..., help="oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]"),
    ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
    level: int = typer.Option(3, "--level", min=0, max=19, help="zstd level per chunk (0 = no compression)"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON"),
) -> None:
    """Pack an image into the store."""
    r = _store().pack(source, ref, level=level, progress=_RichProgress())
    if json_out:
        _emit_json(r.to_json())
        return
    rate = r.logical_bytes / 1e6 / r.seconds if r.seconds else 0.0
    out.print(f"packed {r.ref}: {r.layers} layers, {_mb(r.logical_bytes)} in {r.seconds:.2f} s ({rate:.0f} MB/s); "
              f"{r.new_chunks} new of {r.chunks} chunks, {_mb(r.new_stored_bytes)} stored")


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
    if compress is not None and compress not in COMPRESSIONS:
        raise typer.BadParameter(f"--compress must be one of {', '.join(COMPRESSIONS)}")
    store = _store()
    if rootfs is not None:
        r: Any = store.unpack_rootfs(ref, rootfs, progress=_RichProgress())
        for w in r.warnings:
            err.print(f"warning: {w}", highlight=False)
        msg = f"unpacked {r.ref} to {r.dest}: {r.files} files, {_mb(r.bytes_written)} in {r.seconds:.2f} s"
    else:
        r = store.unpack_oci(ref, dest, compress=compress, progress=_RichProgress())
        msg = f"unpacked {r.ref} to {r.dest}: {r.layers} layers, {_mb(r.written_bytes)} in {r.seconds:.2f} s"
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
    t = Table("NAME", "TAG", "STATE", "LAYERS", "SIZE", "CREATED", "MANIFEST", box=None)
    for e in entries:
        t.add_row(e.ref.name, e.ref.tag, e.state, str(e.layers), _mb(e.logical_bytes), e.created,
                  e.manifest_digest[:19])
    out.print(t)


@app.command()
def inspect(ref: str = typer.Argument(..., metavar="NAME[:TAG]"),
            json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """Show an image's catalog entry, layers and chunking."""
    doc = _store().inspect(ref)
    if json_out:
        _emit_json(doc)
        return
    out.print(f"{doc['name']}:{doc['tag']}  state={doc['state']}  manifest={doc['manifest']}", highlight=False)
    out.print(f"source: {doc['source']}\ncreated: {doc['created']}\nkey: {doc['key_id']}  "
              f"domain: {doc['domain']['name']} (epoch {doc['domain']['epoch']})", highlight=False)
    c = doc["chunking"]
    out.print(f"chunking: {c['algorithm']} min/avg/max {c['min_size']}/{c['avg_size']}/{c['max_size']}, "
              f"zstd level {doc['compression_level']}, {doc['chunks']} unique chunks", highlight=False)
    t = Table("#", "MEDIA TYPE", "DIFF ID", "SIZE", "FILES", "CHUNKS", box=None)
    for i, l in enumerate(doc["layers"]):
        t.add_row(str(i), l["media_type"].rsplit(".", 1)[-1], l["diff_id"][:19], _mb(l["uncompressed_size"]),
                  str(l["files"]), str(l["chunks"]))
    out.print(t)


@app.command()
def stats(json_out: bool = typer.Option(False, "--json", help="Print as JSON")) -> None:
    """Logical bytes, unique chunk bytes, stored bytes and the dedup ratio."""
    s = _store().stats()
    if json_out:
        _emit_json(s)
        return
    out.print(f"images:                 {s['images']}\n"
              f"logical bytes:          {_mb(s['logical_bytes'])}\n"
              f"unique plaintext bytes: {_mb(s['unique_plaintext_bytes'])} in {s['unique_chunks']} chunks\n"
              f"stored bytes:           {_mb(s['stored_bytes'])} "
              f"(chunks {_mb(s['stored_chunk_bytes'])}, manifests {_mb(s['stored_manifest_bytes'])})\n"
              f"dedup ratio:            {s['dedup_ratio']}x", highlight=False)


def main() -> None:
    """Entry point: usage errors exit 2 (click), operational errors exit 1."""
    try:
        app()
    except ConvstoreError as e:
        err.print(f"convstore: error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except OSError as e:
        err.print(f"convstore: error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:
        if os.environ.get("CONVSTORE_DEBUG"):
            raise
        err.print(f"convstore: internal error: {type(e).__name__}: {e} (set CONVSTORE_DEBUG=1 for a traceback)",
                  highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
