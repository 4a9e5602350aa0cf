"""Run tests/cnidrv, the cnitool-compatible driver built on Debian's Go libcni.

`build()` compiles it once per test session (offline, see tests/cnidrv/build.sh); `run()` invokes
`cnidrv VERB NET NETNS` with a clean CNI environment: any CNI_*, NETCONFPATH or CAP_ARGS variable of
the calling process is dropped, so only what the test passes reaches libcni and the plugins.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

DRIVER_DIR = Path(__file__).resolve().parent.parent / "cnidrv"
LIBCNI_SRC = Path("/usr/share/gocode/src/github.com/containernetworking/cni")

PathLike = str | os.PathLike[str]


def available() -> tuple[bool, str]:
    """Whether the driver can be built here, and why not."""
    if not (DRIVER_DIR / "cnidrv").exists():
        if shutil.which("go") is None:
            return False, "Go toolchain missing (apt-get install golang-go)"
        if not (LIBCNI_SRC / "libcni" / "api.go").exists():
            return False, "libcni sources missing (apt-get install golang-github-appc-cni-dev)"
    return True, ""


@functools.cache
def build() -> Path:
    """Build the driver if needed (once per session) and return the binary's path."""
    proc = subprocess.run(
        [str(DRIVER_DIR / "build.sh")], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests/cnidrv/build.sh failed ({proc.returncode}):\n{proc.stderr}")
    return DRIVER_DIR / "cnidrv"


def _cni_args(args: str | Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    if isinstance(args, str):
        return args
    pairs = args.items() if isinstance(args, Mapping) else args
    return ";".join(f"{k}={v}" for k, v in pairs)


def run(
    verb: str,
    net: str,
    netns_path: PathLike,
    *,
    netconf_dir: PathLike,
    cni_path: PathLike | Sequence[PathLike],
    cache_dir: PathLike,
    ifname: str = "eth0",
    cni_args: str | Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    cap_args: Mapping[str, Any] | str | None = None,
    container_id: str | None = None,
    valid_attachments: Sequence[Mapping[str, str]] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run `cnidrv VERB NET NETNS_PATH`; never raises on a non-zero exit status.

    `cni_args` is a "K=V;K=V" string or key/value pairs, `cap_args` a dict (or JSON text) of
    capability args, `container_id` overrides cnitool's netns-hash container ID, and
    `valid_attachments` ([{"containerID": ..., "ifname": ...}]) is sent with `gc`.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CNI_") and k not in ("NETCONFPATH", "CAP_ARGS")
    }
    paths = [cni_path] if isinstance(cni_path, str | os.PathLike) else list(cni_path)
    env.update(
        NETCONFPATH=str(netconf_dir),
        CNI_PATH=os.pathsep.join(str(p) for p in paths),
        CNI_CACHE_DIR=str(cache_dir),
        CNI_IFNAME=ifname,
    )
    if cni_args is not None:
        env["CNI_ARGS"] = _cni_args(cni_args)
    if cap_args is not None:
        env["CAP_ARGS"] = cap_args if isinstance(cap_args, str) else json.dumps(cap_args)
    if container_id is not None:
        env["CNI_CONTAINERID"] = container_id
    if valid_attachments is not None:
        env["CNI_VALID_ATTACHMENTS"] = json.dumps(list(valid_attachments))
    return subprocess.run(
        [str(build()), verb, net, str(netns_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cnitool_container_id(netns_path: PathLike) -> str:
    """The container ID cnitool (and cnidrv) derive from a netns path."""
    digest = hashlib.sha512(os.path.abspath(os.fspath(netns_path)).encode()).digest()
    return "cnitool-" + digest[:10].hex()
