"""The image's base: a minimal Debian bookworm rootfs from mmdebstrap, then `podman import`ed.

No image is pulled from a registry. The only inputs are Debian packages (from the mirrors below,
the ones apt on this machine uses) and the recipe here, so the base is as trustworthy as the
Debian archive and rebuilds anywhere apt works. The rootfs is the `essential` variant (no apt: the
image is never updated in place, it is rebuilt) plus what the node daemon needs:
- python3 runs moor-ipamd; python3-venv brings ensurepip's wheels for the venv the build makes;
- libstdc++6: grpcio's extension links it (the manylinux wheel does not bundle it);
- iptables: the masquerade chain is written with `iptables-restore` (Debian's default, nf_tables);
- iproute2: `ip` for whoever debugs a node from inside the container.
merged-/usr comes from mmdebstrap's hook (the usr-is-merged package), not from `usrmerge`, which
would pull in perl (45 MB). Man pages, docs (copyright files kept), locales and info are left out.

The tarball is cached as <cache>/base-bookworm-<key>.tar, the key a hash of the recipe, so a change
of packages or options makes a new one; written to a temp name and renamed (runs may race).
Debian security updates do not change the key: delete the tarball to take them in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "libstdc++6", "iptables", "iproute2")
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
OPTIONS = (
    "--variant=essential",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
)
IMAGE = "localhost/moor-base"


def available() -> tuple[bool, str]:
    missing = [b for b in ("mmdebstrap", "podman", "runc", "conmon") if shutil.which(b) is None]
    if missing:
        return False, f"missing {', '.join(missing)} (apt packages; `make apt` installs them)"
    return True, ""


def recipe_key() -> str:
    """12 hex digits of the recipe: suite, packages, mirrors and mmdebstrap options."""
    recipe = json.dumps([SUITE, PACKAGES, MIRRORS, OPTIONS]).encode()
    return hashlib.sha256(recipe).hexdigest()[:12]


def image_tag() -> str:
    """The base image's name for this recipe (the Dockerfile's BASE build argument)."""
    return f"{IMAGE}:{SUITE}-{recipe_key()}"


def tarball(cache: Path) -> Path:
    """The rootfs tarball for this recipe, made by mmdebstrap when missing (~25 s, needs root
    and the Debian mirror)."""
    path = cache / f"base-{SUITE}-{recipe_key()}.tar"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".base-{os.getpid()}.tar"
    argv = ["mmdebstrap", "--quiet", *OPTIONS, f"--include={','.join(PACKAGES)}", SUITE,
            str(partial), *MIRRORS]  # fmt: skip
    try:
        # stdin not a terminal makes mmdebstrap read extra sources from it: give it nothing
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr[-3000:]}")
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    for old in cache.glob(f"base-{SUITE}-*.tar"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
