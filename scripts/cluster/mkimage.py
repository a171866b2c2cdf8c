#!/usr/bin/env python3
"""Write a FROM-scratch container image as a `docker save`-style archive, without a
registry or a container engine.

    mkimage.py --name localhost/parley/pause:1.0 --out pause.tar \
        --file target/cluster/pause:/pause --entrypoint /pause --user 65535:65535

The archive (manifest.json, the image config, one uncompressed layer) is what
`docker load` and `ctr images import` read. Everything in it is deterministic: the same
inputs give the same bytes, so the same image ID.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def layer(files: list[tuple[str, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for src, dest in files:
            with open(src, "rb") as f:
                data = f.read()
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
            add_bytes(tar, dest.lstrip("/"), data, mode)
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="image reference, e.g. localhost/parley/pause:1.0")
    p.add_argument("--out", required=True, help="archive to write")
    p.add_argument("--file", action="append", default=[], metavar="SRC:DEST",
                   help="put file SRC at DEST in the image (repeatable)")
    p.add_argument("--entrypoint", action="append", default=[], help="entrypoint word (repeatable)")
    p.add_argument("--user", default="", help="user[:group] to run as")
    a = p.parse_args()
    files = []
    for spec in a.file:
        src, sep, dest = spec.partition(":")
        if not sep or not dest.startswith("/"):
            print(f"mkimage: --file {spec!r}: want SRC:/absolute/dest", file=sys.stderr)
            return 2
        if not os.path.isfile(src):
            print(f"mkimage: --file {spec!r}: {src} is not a file", file=sys.stderr)
            return 2
        files.append((src, dest))
    if ":" not in a.name.rsplit("/", 1)[-1]:
        print(f"mkimage: --name {a.name!r}: want a tag, e.g. {a.name}:1.0", file=sys.stderr)
        return 2

    layer_tar = layer(files)
    diff_id = hashlib.sha256(layer_tar).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": a.entrypoint, "User": a.user, "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/cluster/mkimage.py"}],
    }
    config_json = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_id = hashlib.sha256(config_json).hexdigest()
    manifest = [{"Config": config_id + ".json", "RepoTags": [a.name], "Layers": [diff_id + "/layer.tar"]}]

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_bytes(tar, config_id + ".json", config_json)
        add_bytes(tar, diff_id + "/layer.tar", layer_tar)
        add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        add_bytes(tar, "repositories", json.dumps(
            {a.name.rsplit(":", 1)[0]: {a.name.rsplit(":", 1)[1]: diff_id}}).encode())
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
