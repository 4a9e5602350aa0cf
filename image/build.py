"""Build the node image from the repo's Dockerfile, or reuse the one built from the same inputs.

The cache (MOOR_IMAGE_CACHE, default /var/tmp/moor-image) holds the base rootfs tarball
(image/base.py), a private podman storage (`storage/`, with its run state in `state/`) that keeps
the base image, the node images and the build's layer cache between runs, and `make image`'s
archive. The node image is tagged localhost/moor-node:<key> (and :latest), the key a hash of
everything the build reads: the base recipe and each file of the build context (path, mode,
bytes). Same key, same image: nothing is built. A change of moor's sources rebuilds only the
layers after the dependencies (the Dockerfile installs those from setup.cfg alone). The newest
KEEP node images stay; older ones are removed. One build at a time per cache (a file lock).

The context is staged from the files the key covers, so the key is exactly what was built; a
repo-root `podman build .` reads the same paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from image import base
from image.engine import Engine

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOOR_IMAGE_CACHE", "/var/tmp/moor-image"))
CONTEXT = ("Dockerfile", "setup.cfg", "pyproject.toml", "README.md", "cni_plugin", "ipamd",
           "build/moor", "conf")  # fmt: skip  # build/moor: the static shim (`make shim`)
IMAGE = "localhost/moor-node"
KEY_LABEL = "io.moor.context-key"
KEEP = 3
BUILD_CA = "/run/moor-build/ca.crt"


@dataclass
class Built:
    tag: str  # localhost/moor-node:<key>
    key: str
    store: Path  # the podman graph root that holds it
    cached: bool  # reused, nothing built
    seconds: float  # wall time of this call (base included when it was made)
    size: int  # bytes, as `podman image inspect` reports


def context_files(repo: Path = REPO) -> list[Path]:
    """Every file of the build context, relative to `repo`, sorted; bytecode left out."""
    found = []
    for name in CONTEXT:
        path = repo / name
        if path.is_file():
            found.append(Path(name))
            continue
        for f in path.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                found.append(f.relative_to(repo))
    return sorted(found)


def context_key(repo: Path = REPO) -> str:
    """16 hex digits over the base recipe and each context file's path, mode and bytes."""
    h = hashlib.sha256(base.recipe_key().encode())
    for rel in context_files(repo):
        data = (repo / rel).read_bytes()
        mode = (repo / rel).stat().st_mode & 0o777
        h.update(f"\0{rel}\0{mode:o}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def engine(cache: Path = CACHE) -> Engine:
    """The cache's podman: its storage keeps the images and the layer cache."""
    return Engine(root=cache / "storage", state=cache / "state")


@contextmanager
def locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def image_size(podman: Engine, tag: str) -> int:
    return int(json.loads(podman.ok("image", "inspect", tag))[0]["Size"])


def ensure_image(repo: Path = REPO, cache: Path = CACHE, *, rebuild: bool = False) -> Built:
    """The node image for `repo` as it is now: reused when built before, else built (the base
    tarball and base image too when missing). `rebuild` builds without the layer cache."""
    start = time.monotonic()
    key = context_key(repo)
    tag = f"{IMAGE}:{key}"
    with locked(cache):
        podman = engine(cache)
        if podman.exists(tag) and not rebuild:
            podman.ok("tag", tag, f"{IMAGE}:latest")
            elapsed = time.monotonic() - start
            return Built(tag, key, podman.root, True, elapsed, image_size(podman, tag))
        base_tag = base.image_tag()
        if not podman.exists(base_tag):
            podman.ok("import", str(base.tarball(cache)), base_tag)
        with tempfile.TemporaryDirectory(prefix="moor-image-", dir=cache) as tmp:
            context = Path(tmp)
            for rel in context_files(repo):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / rel, context / rel)
            podman.ok("build", "--network", "host", "--pull=never", "--layers", "--force-rm",
                      *(["--no-cache"] if rebuild else []), *pip_trust(),
                      "--build-arg", f"BASE={base_tag}", "--label", f"{KEY_LABEL}={key}",
                      "--tag", tag, "--tag", f"{IMAGE}:latest", str(context),
                      timeout=1800)  # fmt: skip
        prune(podman, keep=tag)
        return Built(
            tag, key, podman.root, False, time.monotonic() - start, image_size(podman, tag)
        )


def pip_trust() -> list[str]:
    """Build options that make pip in the build trust what pip on the host trusts: the host's CA
    bundle (PIP_CERT, else the system's), mounted read-only for the RUN steps only."""
    bundle = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if not os.path.isfile(bundle):
        return []
    return ["--volume", f"{bundle}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]


def prune(podman: Engine, keep: str) -> None:
    """Remove all but the newest KEEP node images (never `keep`), and base images of other
    recipes once no node image stands on them; the layer cache stays."""
    listed = json.loads(podman.ok("images", "--format", "json", IMAGE))
    unique = {i["Id"]: i for i in listed}  # one entry per tag: the same image comes twice
    newest = sorted(unique.values(), key=lambda i: i.get("Created", 0), reverse=True)
    for old in newest[KEEP:]:
        names = [n for n in old.get("Names") or [] if not n.endswith(":latest")]
        if names and keep not in names:
            podman("rmi", *names)
    for old in json.loads(podman.ok("images", "--format", "json", base.IMAGE)):
        names = old.get("Names") or []
        if names and base.image_tag() not in names:
            podman("rmi", *names)  # refused while a kept node image stands on it: fine


def save_archive(built: Built, cache: Path = CACHE) -> Path:
    """The image as a docker-archive tarball (`podman load`, `docker load`, `ctr images import`),
    <cache>/moor-node-<key>.tar; older archives are removed."""
    path = cache / f"moor-node-{built.key}.tar"
    with locked(cache):
        if not path.exists():
            partial = cache / f".moor-node-{os.getpid()}.tar"
            partial.unlink(missing_ok=True)
            engine(cache).ok("save", "--format", "docker-archive", "-o", str(partial), built.tag,
                             timeout=600)  # fmt: skip
            partial.rename(path)
        for old in cache.glob("moor-node-*.tar"):
            if old != path:
                old.unlink(missing_ok=True)
    return path
