#!/usr/bin/env python3
"""Writes the filter as an OCI image layout that Istio's WasmPlugin can pull, without a container engine.

    python3 k8s/image/oci-image.py --wasm dist/circuit_breaker.wasm --out dist/oci/circuit-breaker --tag 0.1.0
    python3 k8s/image/oci-image.py --native dist/libcircuit_breaker.so --out dist/oci/circuit-breaker-native --tag 0.1.0

With --native it writes instead an image whose single layer holds `libcircuit_breaker.so` at its
root, for Kubernetes image volumes: the native module's forms in k8s/ mount it into the proxy
(`make image-native`). Everything below about layout and reproducibility holds for both.

(`make image` runs it; k8s/README.md shows how to push the result.) The image is Istio's "compat" Wasm image variant: an ordinary OCI image whose
single layer is a gzip'd tar holding one file, `plugin.wasm`. Istio's image fetcher tries this variant
first; registries, `crane`, `oras` and `skopeo` handle it like any other image. (The alternative "oci"
variant, a raw layer of media type application/vnd.module.wasm.content.layer.v1+wasm, needs a second
config layer in Istio's fetcher and is less widely supported by registries, so it is not used.)

The output is an OCI image layout (image-spec `image-layout.md`): `oci-layout`, `index.json` naming the
manifest by tag (`org.opencontainers.image.ref.name`), and content-addressed `blobs/sha256/<digest>`.
It is reproducible: fixed timestamps, owners and file modes, so the same .wasm gives the same digests.

Prints the manifest digest: the value for the WasmPlugin's `sha256` field (or `url: ...@sha256:<it>`).
Python standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# The file name Istio's fetcher looks for in the layer (solo-io/wasm spec-compat.md).
PLUGIN_FILE = "plugin.wasm"
WASM_MAGIC = b"\0asm"


# The file Envoy looks up for `dynamic_module_config.name: circuit_breaker`.
NATIVE_FILE = "libcircuit_breaker.so"
ELF_MAGIC = b"\x7fELF"


def layer_tar(wasm: bytes, name: str = PLUGIN_FILE) -> bytes:
    """A tar with `name` alone, every header field fixed so the bytes depend on the module only."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return out.getvalue()


def gzip_fixed(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name in the header (like `gzip -n`)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: str):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")

    def reset(self) -> None:
        if os.path.isdir(self.root):
            shutil.rmtree(self.root)
        os.makedirs(self.blobs)

    def add_blob(self, media_type: str, data: bytes, annotations=None) -> dict:
        """Stores `data` under its digest and returns its descriptor."""
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest), "wb") as f:
            f.write(data)
        descriptor = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def write_json(self, name: str, value) -> None:
        with open(os.path.join(self.root, name), "wb") as f:
            f.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def build(wasm: bytes, out: str, tag: str, source: str, native: bool = False) -> dict:
    name = NATIVE_FILE if native else PLUGIN_FILE
    tar = layer_tar(wasm, name)
    layout = Layout(out)
    layout.reset()
    layer = layout.add_blob(LAYER, gzip_fixed(tar), {"org.opencontainers.image.title": name})
    config = {
        # The node pulls an image volume for its own platform: the module's (linux x86-64).
        "architecture": "amd64" if native else "wasm",
        "os": "linux" if native else "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
        "history": [{"created_by": "k8s/image/oci-image.py", "comment": name}],
    }
    config_descriptor = layout.add_blob(CONFIG, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_descriptor,
        "layers": [layer],
        "annotations": {
            "org.opencontainers.image.title": "circuit-breaker-native" if native else "circuit-breaker",
            "org.opencontainers.image.description": (
                "Circuit breaker HTTP filter for Envoy, as a native dynamic module (libcircuit_breaker.so)"
                if native
                else "Circuit breaker proxy-wasm HTTP filter for Envoy and Istio"
            ),
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.licenses": "Apache-2.0",
        },
    }
    if source:
        manifest["annotations"]["org.opencontainers.image.source"] = source
    manifest_descriptor = layout.add_blob(
        MANIFEST, canonical_json(manifest), {"org.opencontainers.image.ref.name": tag}
    )
    layout.write_json("oci-layout", {"imageLayoutVersion": "1.0.0"})
    layout.write_json("index.json", {"schemaVersion": 2, "mediaType": INDEX, "manifests": [manifest_descriptor]})
    return manifest_descriptor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    module = parser.add_mutually_exclusive_group(required=True)
    module.add_argument("--wasm", help="the built filter (dist/circuit_breaker.wasm)")
    module.add_argument("--native", help="the built native module (dist/libcircuit_breaker.so)")
    parser.add_argument("--out", required=True, help="the OCI layout directory to (re)write")
    parser.add_argument("--tag", required=True, help="the tag recorded in index.json, e.g. 0.1.0")
    parser.add_argument("--source", help="the org.opencontainers.image.source annotation (a repository URL)")
    args = parser.parse_args()
    native = args.native is not None
    path = args.native if native else args.wasm
    with open(path, "rb") as f:
        module = f.read()
    if native and not module.startswith(ELF_MAGIC):
        print(f"{path} is not a shared object (no ELF magic)", file=sys.stderr)
        return 1
    if not native and not module.startswith(WASM_MAGIC):
        print(f"{path} is not a WebAssembly module (no \\0asm magic)", file=sys.stderr)
        return 1
    manifest = build(module, args.out, args.tag, args.source, native)
    digest = manifest["digest"]
    repo = "circuit-breaker-native" if native else "circuit-breaker"
    print(f"OCI image layout: {args.out} (tag {args.tag})")
    print(f"manifest digest:  {digest}")
    if native:
        print(f"image volume:     reference: REGISTRY/{repo}@{digest}")
    else:
        print(f"WasmPlugin:       sha256: {digest.removeprefix('sha256:')}")
    print(f"push:             oras cp --from-oci-layout {args.out}:{args.tag} REGISTRY/{repo}:{args.tag}")
    print(f"             or:  crane push {args.out} REGISTRY/{repo}:{args.tag}")
    print(f"             or:  skopeo copy oci:{args.out}:{args.tag} docker://REGISTRY/{repo}:{args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
