"""One node run from the node image: moor-ipamd in a podman container, as a DaemonSet would run it.

The container gets the host network, NET_ADMIN (links, routes, iptables) and SYS_ADMIN (setns
into pod netns), and the two host directories a node shares with its daemon: `run/` at
/run/moor (the sockets: the host's shim and moorctl talk to them) and `state/` at /var/lib/moor
(local state, and the DEL spool the shim writes while the daemon is down). podman's rootful
defaults hold neither capability (they are CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, MKNOD,
NET_BIND_SERVICE, NET_RAW, SETFCAP, SETGID, SETPCAP, SETUID, SYS_CHROOT, AUDIT_WRITE).

/proc/sys is read-only in a container, whatever its capabilities; the bridge datapath writes
sysctls (a new bridge's accept_ra, ip_forward, proxy_arp for fixed pods), so `writable_sysctls`
unmasks it, which is what a privileged pod gets. Without it moorctl status is ready but an ADD
that creates the bridge fails.

podman's state is this node's own (image/engine.py: storage, run root, config, locks under
`workdir/pm`); the image is read from the cache's store in place (an additional image store),
never copied.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image.engine import Engine
from tests.helpers.moor import REPO, free_port
from tests.helpers.podman import mounts_under

CAPS = ("NET_ADMIN", "SYS_ADMIN")


@dataclass
class ImageNode:
    workdir: Path
    image: str  # a tag in `image_store`
    image_store: Path
    container: str  # the container's name
    node_name: str
    store_url: str
    key_prefix: str
    network: str
    masq_chain: str
    writable_sysctls: bool = True
    metrics_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.run_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        for d in (self.run_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.engine = Engine(
            root=self.workdir / "pm" / "root",
            state=self.workdir / "pm",  # podman refuses a run root path over 50 characters
            image_stores=(self.image_store,),
        )

    @property
    def grpc_socket(self) -> str:
        return str(self.run_dir / "ipamd.sock")

    @property
    def cni_socket(self) -> str:
        return str(self.run_dir / "cni.sock")

    @property
    def spool_dir(self) -> str:
        return str(self.state_dir / "spool")

    def run_args(self) -> list[str]:
        return [
            "run", "--detach", "--pull=never", "--name", self.container,
            "--network", "host", "--cap-add", ",".join(CAPS),
            *(["--security-opt", "unmask=/proc/sys"] if self.writable_sysctls else []),
            "--volume", f"{self.run_dir}:/run/moor",
            "--volume", f"{self.state_dir}:/var/lib/moor",
            self.image,
            "--node-name", self.node_name,
            "--store", self.store_url,
            "--key-prefix", self.key_prefix,
            "--network", self.network,
            "--masq-chain", self.masq_chain,
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
        ]  # fmt: skip

    def start(self) -> None:
        """`podman run` and return: the daemon starts in the background."""
        self.engine.ok(*self.run_args())

    def moorctl(self, *args: str) -> subprocess.CompletedProcess:
        """moorctl of this checkout, on the host, through the mounted socket."""
        return subprocess.run(
            [sys.executable, "-m", "ipamd.cli", "--socket", self.grpc_socket, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> dict[str, Any] | None:
        """`moorctl status --json`, or None while it does not answer."""
        proc = self.moorctl("status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.05) -> dict[str, Any]:
        """Until moorctl status answers ready; RuntimeError with the container's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect()["State"]
            if not state.get("Running"):
                raise RuntimeError(f"container exited {state.get('ExitCode')}:\n{self.logs()}")
            status = self.status() if Path(self.grpc_socket).exists() else None
            if status and status.get("ready"):
                return status
            time.sleep(poll)
        raise RuntimeError(f"not ready in {timeout} s:\n{self.logs()}")

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.engine.ok("container", "inspect", self.container))[0]

    def logs(self) -> str:
        proc = self.engine("logs", self.container)
        return (proc.stdout + proc.stderr)[-4000:]

    def image_file(self, path: str) -> bytes:
        """A file's bytes as the image holds it (a throwaway container without network)."""
        proc = self.engine("run", "--rm", "--pull=never", "--network", "none",
                           "--entrypoint", "cat", self.image, path, text=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return proc.stdout

    def cleanup(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after 10 s), remove every container, anything
        podman left mounted under the work dir, its storage, and the node's masquerade chain."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.engine("rm", "--all", "--force", "--time", "10", timeout=120)
        for mount in reversed(mounts_under(self.workdir)):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.workdir / "pm", ignore_errors=True)
        with contextlib.suppress(Exception):
            from cni_plugin.datapath.masq import MasqueradeRules

            MasqueradeRules(self.masq_chain).remove()
