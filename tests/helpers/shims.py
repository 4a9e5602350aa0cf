"""The two builds of moor's CNI shim, which must behave identically.

- `bin/moor`: the Python shim (`#!/usr/bin/python3 -SE`, interpreter built-ins only); the tests,
  the demo and the simulated cluster exec it.
- `build/moor`: the same forwarder as one static Go binary (sources in shim/, built offline by
  shim/build.sh with Debian's golang-go, CGO off), for hosts without Python. It is what the node
  image installs as /opt/cni/bin/moor.

`path(kind)` gives the executable of a kind, building the static one when its sources are newer
(once per session), so a test never runs a stale binary.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON_SHIM = REPO / "bin" / "moor"
STATIC_SHIM = REPO / "build" / "moor"
BUILD_SCRIPT = REPO / "shim" / "build.sh"
KINDS = ("python", "static")


def available() -> tuple[bool, str]:
    """Whether the static shim can be built (or is built) here, and why not."""
    if not STATIC_SHIM.exists() and shutil.which("go") is None:
        return False, "Go toolchain missing for the static shim (apt-get install golang-go)"
    return True, ""


def build(output: Path = STATIC_SHIM, tags: str = "") -> Path:
    """Run shim/build.sh (idempotent: it does nothing while the binary is current)."""
    args = [str(BUILD_SCRIPT), str(output), *([tags] if tags else [])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"shim/build.sh failed ({proc.returncode}):\n{proc.stderr}")
    return output


@functools.cache
def static_shim() -> Path:
    """build/moor, current with shim/ (built at most once per session)."""
    return build()


def path(kind: str) -> Path:
    if kind == "python":
        return PYTHON_SHIM
    if kind == "static":
        return static_shim()
    raise ValueError(f"no shim kind {kind!r}")


def go_version(binary: Path) -> str:
    """The Go release a binary was built with ("go1.19.8"), from `go version`; "?" without go."""
    try:
        proc = subprocess.run(
            ["go", "version", str(binary)], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return "?"
    return proc.stdout.rsplit(":", 1)[-1].strip() or "?"


def describe(binary: Path) -> str:
    """One line for reports: which shim, and what runs it."""
    if binary.resolve() == PYTHON_SHIM.resolve():
        first = PYTHON_SHIM.read_text().splitlines()[0][2:].strip()
        proc = subprocess.run(
            [first.split()[0], "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return f"`bin/moor` on `{first}` (Python {proc.stdout.strip() or '?'})"
    size = os.path.getsize(binary) / 1e6
    return f"`build/moor`, the static Go binary ({go_version(binary)}, {size:.1f} MB)"
