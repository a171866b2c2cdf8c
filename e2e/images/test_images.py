"""What every image is: FROM scratch with one static binary, no shell, non-root, OCI
labels, a CA bundle without this machine's local CAs, `--version`, small, and runnable
with a read-only root filesystem."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import DOCKER, REPO, RESTRICTED, docker, free_port, wait_for

RUST_IMAGES = {"gateway": "parley-gateway", "operator": "parley-operator", "mock-llm": "parley-mock-llm"}
PRODUCT = ("gateway", "operator")
# The ceiling for the product images.
MAX_PRODUCT_BYTES = 30_000_000


def app_version() -> str:
    m = re.search(r'^appVersion:\s*"?([^"\s]+)"?', (REPO / "charts/parley/Chart.yaml").read_text(), re.M)
    assert m, "no appVersion in charts/parley/Chart.yaml"
    return m.group(1)


def image_files(tag: str) -> dict[str, tarfile.TarInfo]:
    """The image's filesystem exactly as built: the union of its layers, from `docker save`
    (no file the engine adds to a running container)."""
    data = subprocess.run([DOCKER, "save", tag], capture_output=True, check=True, timeout=120).stdout
    files: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        manifest_member = outer.extractfile("manifest.json")
        assert manifest_member is not None
        manifest = json.load(manifest_member)
        for layer in manifest[0]["Layers"]:
            blob = outer.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=io.BytesIO(blob.read())) as tar:
                for m in tar.getmembers():
                    name = m.name.removeprefix("./").rstrip("/")
                    if name.split("/")[-1].startswith(".wh."):
                        raise AssertionError(f"{tag}: a layer deletes {name}: every layer should only add")
                    if name:
                        files[name] = m
    return files


def file_content(tag: str, path: str) -> bytes:
    data = subprocess.run([DOCKER, "save", tag], capture_output=True, check=True, timeout=120).stdout
    found = None
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        manifest_member = outer.extractfile("manifest.json")
        assert manifest_member is not None
        for layer in json.load(manifest_member)[0]["Layers"]:
            blob = outer.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=io.BytesIO(blob.read())) as tar:
                for m in tar.getmembers():
                    if m.name.removeprefix("./") == path and m.isfile():
                        f = tar.extractfile(m)
                        assert f is not None
                        found = f.read()
    assert found is not None, f"{tag} has no {path}"
    return found


def inspect(tag: str) -> dict:
    return json.loads(docker("image", "inspect", tag).stdout)[0]


@pytest.mark.parametrize("name", sorted(RUST_IMAGES))
def test_version_answers_as_non_root_on_a_read_only_root(images, name):
    p = docker("run", "--rm", *RESTRICTED, images[name], "--version")
    assert p.stdout.strip() == f"{RUST_IMAGES[name]} {app_version()}", p.stdout + p.stderr


def test_product_tags_are_the_charts_defaults(images):
    values = (REPO / "charts/parley/values.yaml").read_text()
    for name, repo in (("gateway", "ghcr.io/parley-dev/parley-gateway"), ("operator", "ghcr.io/parley-dev/parley-operator")):
        assert f"repository: {repo}\n" in values, f"charts/parley/values.yaml no longer names {repo}"
        assert images[name] == f"{repo}:{app_version()}"


@pytest.mark.parametrize("name", ["gateway", "operator", "mock-llm", "redis"])
def test_runs_as_65532_with_oci_labels(images, name):
    cfg = inspect(images[name])["Config"]
    assert cfg["User"] == "65532:65532"
    labels = cfg["Labels"] or {}
    assert labels.get("org.opencontainers.image.source") == "https://github.com/parley-dev/parley"
    if name == "redis":
        debian = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "redis-server"], capture_output=True, text=True)
        assert labels.get("org.opencontainers.image.version") == debian.stdout.strip()
        return
    assert labels.get("org.opencontainers.image.version") == app_version()
    rev = labels.get("org.opencontainers.image.revision", "")
    assert re.fullmatch(r"[0-9a-f]{40}", rev), f"revision label {rev!r} is not a commit"
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True)
    assert known.returncode == 0, f"revision label {rev} is not a commit of this repository"


@pytest.mark.parametrize("name", sorted(RUST_IMAGES))
def test_holds_one_static_binary_and_no_shell(images, name, tmp_path):
    files = image_files(images[name])
    binary = f"usr/local/bin/{RUST_IMAGES[name]}"
    executables = sorted(n for n, m in files.items() if m.isfile() and m.mode & 0o111)
    assert executables == [binary]
    assert not any(n in files for n in ("bin/sh", "usr/bin/sh", "bin/busybox", "bin", "usr/bin"))
    p = docker("run", "--rm", "--entrypoint", "/bin/sh", images[name], "-c", "true", check=False)
    assert p.returncode != 0
    # Only what the Dockerfile put there.
    ours = {"etc", "etc/passwd", "etc/group", "etc/ssl", "etc/ssl/certs", "etc/ssl/certs/ca-certificates.crt",
            "usr", "usr/local", "usr/local/bin", binary}
    assert set(files) == ours
    # Owned by root, readable (and the binary executable) by the user the image runs as.
    for n in ours:
        m = files[n]
        assert m.uid == 0 and m.gid == 0, f"{n} is owned by {m.uid}:{m.gid}"
        assert m.mode & 0o444 == 0o444 and not m.mode & 0o022, f"{n} has mode {oct(m.mode)}"
        if m.isdir() or n == binary:
            assert m.mode & 0o111 == 0o111, f"{n} has mode {oct(m.mode)}"
    # Static: the binary names no dynamic loader and no shared library.
    out = tmp_path / RUST_IMAGES[name]
    out.write_bytes(file_content(images[name], binary))
    out.chmod(0o755)
    ldd = subprocess.run(["ldd", str(out)], capture_output=True, text=True)
    assert "statically linked" in ldd.stdout + ldd.stderr or "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd.stdout
    assert b"/lib64/ld-linux" not in out.read_bytes()[:4096], "the binary asks for a dynamic loader"


def _pem_blocks(text: str) -> set[str]:
    return {"".join(b.split()) for b in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)}


def test_ca_bundle_is_debians_mozilla_set_without_local_cas(images):
    text = file_content(images["gateway"], "etc/ssl/certs/ca-certificates.crt").decode()
    ours = _pem_blocks(text)
    mozilla = set()
    for f in Path("/usr/share/ca-certificates/mozilla").glob("*.crt"):
        mozilla |= _pem_blocks(f.read_text())
    assert len(ours) > 100, f"only {len(ours)} CA certificates"
    assert ours <= mozilla, "the bundle holds certificates that are not Debian's Mozilla roots"
    local = set()
    for f in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        local |= _pem_blocks(f.read_text())
    assert not (ours & local), "the bundle ships this machine's locally added CAs"


@pytest.mark.parametrize("name", PRODUCT)
def test_product_images_are_small(images, name):
    size = int(inspect(images[name])["Size"])
    print(f"{images[name]}: {size / 1e6:.1f} MB")
    assert size < MAX_PRODUCT_BYTES, f"{images[name]} is {size / 1e6:.1f} MB"


def test_mock_image_serves_and_stops_on_docker_stop(start_mock):
    mock = start_mock()
    r = mock.http.post(f"{mock.base}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                       headers={"authorization": "Bearer sk-upstream-imgtest"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    mock.container.stop(timeout=10)
    assert mock.container.exit_code() == 0


def _redis(port: int, *cmd: str) -> bytes:
    """One RESP command over a plain socket; the raw reply."""
    payload = f"*{len(cmd)}\r\n".encode() + b"".join(f"${len(c.encode())}\r\n{c}\r\n".encode() for c in cmd)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(4096)


def test_redis_image_holds_redis_server_and_exactly_the_libraries_ldd_lists(images):
    files = image_files(images["redis"])
    regular = {n for n, m in files.items() if m.isfile()}
    ldd = subprocess.run(["ldd", "/usr/bin/redis-server"], capture_output=True, text=True, check=True).stdout
    libs = set(re.findall(r"=> (/\S+)", ldd)) | set(re.findall(r"^\s*(/\S+) \(", ldd, re.M))
    assert "/lib64/ld-linux-x86-64.so.2" in libs
    assert regular == {"usr/bin/redis-server", "etc/passwd", "etc/group"} | {lib.lstrip("/") for lib in libs}
    assert not any(n in files for n in ("bin/sh", "usr/bin/sh", "bin/bash"))


def test_redis_image_serves_on_a_read_only_root_and_stops(images, run):
    port = free_port()
    # The image's default flags, with the port and address a test on the host network needs.
    c = run(images["redis"], "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--bind", "127.0.0.1", "--port", str(port))
    wait_for(lambda: _redis(port, "PING") == b"+PONG\r\n", 20, f"redis to answer (logs: {c.logs()})")
    assert _redis(port, "SET", "parley:imgtest", "ok") == b"+OK\r\n"
    assert _redis(port, "GET", "parley:imgtest") == b"$2\r\nok\r\n"
    assert b"redis_version:" in _redis(port, "INFO", "server")
    c.stop(timeout=10)
    assert c.exit_code() == 0, c.logs()
    assert "ready to exit" in c.logs().lower() or "bye" in c.logs().lower(), c.logs()


def test_redis_tags_include_local(images):
    ids = {docker("image", "inspect", "-f", "{{.Id}}", t).stdout.strip() for t in (images["redis"], "parley-test/redis:local")}
    assert len(ids) == 1
