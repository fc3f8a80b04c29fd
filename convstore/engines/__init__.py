"""The container engines' seams over the lazy reader: ``convstore run`` (runc
or chroot), the additional layer store (podman, CRI-O) and the containerd
proxy snapshotter with its state and gRPC schema (docs/engines.md)."""
