"""``convstore containerd-load``: make an image of a convstore store a containerd image whose layers
come from ``convstore snapshotter`` (convstore.engines.snapshotter), lazily.

``ctr images pull`` in containerd 1.6 fetches every blob and unpacks without the remote-snapshot label,
so this does containerd's calls itself over its gRPC API: the image's manifest and config into the
content store, a ``Prepare`` of each layer by its chain ID carrying ``containerd.io/snapshot.ref`` (the
snapshotter answers ALREADY_EXISTS for its own layers, and starts opening the image and prefetching its
start-up profile then), and the image record.  Its own module, apart from the snapshotter's: a command
that runs once per start imports only what it uses (grpc and the message schema, not FUSE, the layer
store or metrics).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import TYPE_CHECKING, Any

from ..errors import ConvstoreError
from ..oci.media import chain_ids
from ..oci.policy import Policy
from ..oci.policy import require as require_policy
from . import containerd_api as api
from .containerd_api import REF_LABEL, grpc_module

if TYPE_CHECKING:
    from ..core.repository import Repository


def load_into_containerd(store: Repository, ref: str, address: str, *, name: str | None = None,
                         namespace: str = "default", snapshotter: str = "convstore",
                         policy: Policy | None = None) -> str:
    """Make image ``ref`` of ``store`` an image of the containerd at
    ``address`` whose layers are the convstore snapshotter's (registered as
    ``snapshotter``): no layer blob is written or fetched.  Returns the
    image name in containerd: ``name``, else the registry reference the
    image was packed from, else ``convstore.local/NAME:TAG``."""
    grpc = grpc_module()
    entry, manifest = store.open_image(ref)
    require_policy(policy, manifest, ref)  # the node's trust policy
    mbytes = manifest.source_manifest_bytes
    mdigest = "sha256:" + hashlib.sha256(mbytes).hexdigest()
    source = str(manifest.source.get("ref") or "")
    image_name = name or (source.removeprefix("docker://") if source.startswith("docker://")
                          else f"convstore.local/{entry.ref}")
    meta = (("containerd-namespace", namespace),)
    with grpc.insecure_channel(f"unix://{os.path.abspath(address)}") as ch:
        def call(service: str, method: str, req: Any, resp: Any) -> Any:
            fn = ch.unary_unary(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=resp.FromString)
            return fn(req, metadata=meta, timeout=60)

        write = ch.stream_stream(f"/{api.CONTENT}/Write", request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=api.WriteContentResponse.FromString)
        try:
            chains = [c for c, _ in chain_ids([lr.diff_id for lr in manifest.layers])]
            # containerd's garbage collector keeps an image's snapshots through this label on its config
            gc_label = f"containerd.io/gc.ref.snapshot.{snapshotter}"
            for data, digest, labels in (
                    (manifest.config_bytes, manifest.config_digest, {gc_label: chains[-1]} if chains else {}),
                    (mbytes, mdigest, {"containerd.io/gc.ref.content.config": manifest.config_digest})):
                req = api.WriteContentRequest(action=api.COMMIT, ref=f"convstore-load-{digest}", total=len(data),
                                              expected=digest, offset=0, data=data, labels=labels)
                try:
                    for _ in write(iter([req]), metadata=meta, timeout=60):
                        pass
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    call(api.CONTENT, "Update", api.ContentUpdateRequest(
                        info=api.ContentInfo(digest=digest, labels=labels),
                        update_mask={"paths": [f"labels.{k}" for k in labels]}), api.ContentUpdateResponse)
            parent = ""
            for layer, chain in zip(manifest.layers, chains):
                try:
                    call(api.SNAPSHOTS, "Stat", api.StatSnapshotRequest(snapshotter=snapshotter, key=chain),
                         api.StatSnapshotResponse)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    key = f"convstore-load-{secrets.token_hex(6)} {chain}"
                    try:
                        call(api.SNAPSHOTS, "Prepare", api.PrepareSnapshotRequest(
                            snapshotter=snapshotter, key=key, parent=parent, labels={REF_LABEL: chain}),
                            api.PrepareSnapshotResponse)
                    except grpc.RpcError as e2:
                        if e2.code() != grpc.StatusCode.ALREADY_EXISTS:
                            raise
                    else:  # the snapshotter does not hold this layer: undo, and say so
                        call(api.SNAPSHOTS, "Remove", api.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                             api.Empty)
                        raise ConvstoreError(f"snapshotter {snapshotter!r} did not provide layer {layer.digest} "
                                             f"of {entry.ref} (is it convstore's, on the same store?)")
                parent = chain
            img = api.Image(name=image_name, target=api.Descriptor(
                media_type=manifest.source_manifest_media_type, digest=mdigest, size=len(mbytes)))
            try:
                call(api.IMAGES, "Create", api.CreateImageRequest(image=img), api.CreateImageResponse)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                call(api.IMAGES, "Update", api.UpdateImageRequest(image=img), api.UpdateImageResponse)
        except grpc.RpcError as e:
            raise ConvstoreError(f"containerd at {address}: {e.code().name}: {e.details()}") from None
    return image_name
