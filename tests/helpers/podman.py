"""podman as a real CNI runtime: Debian's podman 4.3 with its CNI backend, runc and cgroupfs.

Everything podman keeps is private to one test directory (`../shared/research/probe.md` §7):
storage (`--root`/`--runroot`), its engine state and locks (`tmp_dir`, file locks instead of the
host-wide /dev/shm/libpod_lock), its event log, and its CNI config dir (the podman package drops
/etc/cni/net.d/87-podman-bridge.conflist; nothing here reads /etc/cni/net.d). The settings that make
it run here at all: runc (crun refuses this host's hybrid cgroups), cgroupfs (no systemd), and
ulimits below the hard limits (podman's defaults need CAP_SYS_RESOURCE). conmon inherits
CONTAINERS_CONF, so the `podman container cleanup` it runs when a container exits on its own
reads this config too and finds the plugin for its DEL.

The plugin directory holds a recorder named `moor`: it writes each call's CNI_* env and stdin to
`calls/` and execs bin/moor on the same input, so a test can assert on what podman really sends.

The image is busybox-static's binary plus its applet links, imported with `podman import`. The
tarball is cached under /var/tmp, keyed by the busybox-static version, and rebuilt when missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.moor import SHIM

BUSYBOX = Path("/bin/busybox")
IMAGE_CACHE = Path("/var/tmp/moor-podman")
IMAGE = "localhost/moor-busybox:latest"
RECIPE = "r1"  # the rootfs layout below: a change of it must not reuse an old tarball
LIBCNI_RESULTS = Path("/var/lib/cni/results")  # libcni's cache; podman 4.3 cannot move it
RECORDER = """#!/bin/sh
# A CNI call as podman made it: env and stdin kept for the test, then the real plugin runs.
f="{calls}/$(date +%s%N)-$$"
env | grep '^CNI_' > "$f.env"
cat > "$f.stdin"
exec {shim} < "$f.stdin"
"""


def available() -> tuple[bool, str]:
    missing = [b for b in ("podman", "runc", "conmon") if shutil.which(b) is None]
    if not BUSYBOX.exists():
        missing.append(str(BUSYBOX))
    if missing:
        return False, f"missing {', '.join(missing)} (apt packages podman, runc, busybox-static)"
    return True, ""


def busybox_version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "busybox-static"], capture_output=True, text=True
    ).stdout.strip()
    return "".join(c if c.isalnum() or c in ".-+" else "_" for c in out) or "unknown"


def busybox_tarball() -> Path:
    """The image's rootfs as a tarball: /bin/busybox and a link per applet (sh, ip, nc, netstat,
    sleep ...). Built once per busybox-static version, atomically (another run may race)."""
    tarball = IMAGE_CACHE / f"busybox-{busybox_version()}-{RECIPE}.tar"
    if tarball.exists():
        return tarball
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    staging = IMAGE_CACHE / f".build-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "bin").mkdir(parents=True)
        (staging / "tmp").mkdir()
        (staging / "tmp").chmod(0o1777)
        shutil.copy2(BUSYBOX, staging / "bin" / "busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (staging / "bin" / applet).symlink_to("busybox")
        partial = staging.with_suffix(".tar")
        subprocess.run(["tar", "-C", str(staging), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tarball


@dataclass
class Podman:
    """One private podman whose only network is `network`, a conflist holding `plugin`."""

    workdir: Path
    network: str
    plugin: dict[str, Any]

    def __post_init__(self) -> None:
        self.calls_dir = self.workdir / "calls"
        self.bin_dir = self.workdir / "cni-bin"
        self.net_dir = self.workdir / "net.d"
        self.conf_path = self.workdir / "containers.conf"
        for d in (self.calls_dir, self.bin_dir, self.net_dir):
            d.mkdir(parents=True, exist_ok=True)
        recorder = self.bin_dir / "moor"
        recorder.write_text(RECORDER.format(calls=self.calls_dir, shim=SHIM))
        recorder.chmod(0o755)
        conflist = {"cniVersion": "1.0.0", "name": self.network, "plugins": [self.plugin]}
        (self.net_dir / f"{self.network}.conflist").write_text(json.dumps(conflist, indent=2))
        dirs = [str(self.bin_dir), str(SHIM.parent), "/usr/lib/cni"]
        self.conf_path.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f"cni_plugin_dirs = {json.dumps(dirs)}\n"
            f'network_config_dir = "{self.net_dir}"\n'
            f'default_network = "{self.network}"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            'lock_type = "file"\n'
            f'tmp_dir = "{self.workdir / "engine"}"\n'
        )

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`podman ARGS` on the private storage; never raises on a failing podman."""
        argv = ["podman", "--root", str(self.workdir / "root")]
        argv += ["--runroot", str(self.workdir / "runroot"), *args]
        env = {**os.environ, "CONTAINERS_CONF": str(self.conf_path)}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)

    def ok(self, *args: str) -> str:
        """`podman ARGS` that must succeed; its stdout."""
        proc = self(*args)
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def import_image(self) -> None:
        self.ok("import", str(busybox_tarball()), IMAGE)

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.ok("inspect", container))[0]

    def calls(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        """Every CNI call podman made so far, in order: (CNI_* env, stdin as JSON)."""
        out = []
        for env_file in sorted(
            self.calls_dir.glob("*.env"), key=lambda p: int(p.stem.split("-")[0])
        ):
            env = dict(
                line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
            )
            stdin = env_file.with_suffix(".stdin").read_text()
            out.append((env, json.loads(stdin) if stdin.strip() else {}))
        return out

    def cleanup(self) -> None:
        """Remove every container (their DELs run), then what podman may leave behind: its
        mounts under the work dir, a netns or libcni cache entry of a container whose DEL failed,
        and the storage."""
        netns = {env.get("CNI_NETNS", "") for env, _ in self.calls()}
        with contextlib.suppress(subprocess.TimeoutExpired):
            self("rm", "--all", "--force", "--time", "0", timeout=120)
        for mount in reversed(mounts_under(self.workdir)):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        for path in netns:
            if path.startswith("/run/netns/netns-") and os.path.exists(path):
                subprocess.run(["ip", "netns", "del", Path(path).name], capture_output=True)
        for cached in LIBCNI_RESULTS.glob(f"{self.network}-*"):
            cached.unlink(missing_ok=True)
        for tree in ("root", "runroot", "engine"):
            shutil.rmtree(self.workdir / tree, ignore_errors=True)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, in mount order (so reversed unmounts children
    first)."""
    prefix = str(directory.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found
