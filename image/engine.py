"""A private podman: Debian's podman 4.3 with its own storage, run state, config and locks.

The settings that make podman run on these machines at all (tests/helpers/podman.py, and
shared/research/probe.md §7): runc (crun refuses the host's hybrid cgroups), cgroupfs (no
systemd), ulimits below the hard limits (podman's defaults need CAP_SYS_RESOURCE), an events file
and file locks in our own directory instead of the journal and the host-wide /dev/shm lock. Its
CNI config dir is an empty one of its own: the podman package drops a bridge conflist in
/etc/cni/net.d, and nothing here must read or change the host's. Builds and containers here use
the host network, so no CNI plugin ever runs.

`image_stores` are read-only stores podman takes images from without copying them: the test
runs the cached image from its own throwaway storage that way.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Engine:
    """podman with graph root `root` and everything else (run root, engine temp dir, config files)
    under `state`."""

    root: Path
    state: Path
    image_stores: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        (self.state / "net.d").mkdir(parents=True, exist_ok=True)
        self.conf = self.state / "containers.conf"
        self.storage_conf = self.state / "storage.conf"
        self.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{self.state / "net.d"}"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            'lock_type = "file"\n'
            f'tmp_dir = "{self.state / "engine"}"\n'
        )
        stores = json.dumps([str(s) for s in self.image_stores])
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root}"\n'
            f'runroot = "{self.state / "run"}"\n'
            "[storage.options]\n"
            f"additionalimagestores = {stores}\n"
        )

    def __call__(
        self, *args: str, timeout: float = 120, text: bool = True
    ) -> subprocess.CompletedProcess:
        """`podman ARGS` here; never raises on a failing podman."""
        # No --root/--runroot: podman drops storage.conf's driver options (the additional image
        # stores) when they are given; storage.conf names both roots instead.
        argv = ["podman"]
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
        }
        return subprocess.run(
            [*argv, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=text,
            env=env,
            timeout=timeout,
        )

    def ok(self, *args: str, timeout: float = 120) -> str:
        """`podman ARGS` that must succeed; its stdout."""
        proc = self(*args, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {proc.stderr.strip()[-3000:]}")
        return proc.stdout

    def exists(self, image: str) -> bool:
        return self("image", "exists", image).returncode == 0
