"""Test harness for the real thing: a moor-ipamd subprocess, real netns, and two CNI runtimes.

- `Daemon` starts `python -m ipamd` with its own sockets, SQLite store, spool, bridge, network and
  masquerade chain, so several can run side by side (one per simulated node); with `netns` set it
  runs inside that network namespace (tests/helpers/cluster.py's nodes).
- `ExecRuntime` execs bin/moor directly with CNI_* env and stdin, and keeps results the way libcni
  does, so CHECK and DEL get the ADD result as prevResult.
- `LibcniRuntime` goes through the Go libcni driver (tests/cnidrv), the real runtime library.
Both return a `Outcome` so one test body runs through either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import cnidrv

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "bin" / "moor"
REFERENCE_PLUGINS = "/usr/lib/cni"


@dataclass
class Outcome:
    rc: int
    out: dict[str, Any]
    stderr: str
    via: str = "exec"

    @property
    def code(self) -> int | None:
        return self.out.get("code")

    def failed_with(self, code: int, text: str = "") -> bool:
        """A failure with CNI `code` whose message has `text`.

        Direct exec sees the error JSON; libcni turns it into one line on stderr that carries the
        message but not the code, so only the message is checked there.
        """
        if self.rc != 1:
            return False
        if self.via == "exec":
            return self.code == code and text in self.out.get("msg", "")
        return text in self.stderr


def run_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def make_netns(name: str) -> str:
    run_cmd("ip", "netns", "add", name)
    run_cmd("ip", "-n", name, "link", "set", "lo", "up")
    return f"/run/netns/{name}"


def delete_netns(name: str) -> None:
    run_cmd("ip", "netns", "del", name, check=False)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (daemons run in parallel across tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    """One moor-ipamd, as one simulated node."""

    workdir: Path
    name: str
    network: str
    bridge: str
    subnet_len: int = 24
    cooldown: float = 60.0
    extra_args: list[str] = field(default_factory=list)
    log_level: str = "debug"
    fault_injection: bool = True
    store_url: str | None = None  # None: a SQLite file of its own; else e.g. an etcd://, shared
    key_prefix: str = "/moor"
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    # Run under `ip netns exec NETNS` (it execs, so `proc.pid` is the daemon's): its bridge,
    # routes and masquerade chain are then that netns's, and its sockets are still plain files.
    netns: str = ""

    @property
    def cni_socket(self) -> str:
        return str(self.workdir / "run" / "cni.sock")

    @property
    def grpc_socket(self) -> str:
        return str(self.workdir / "run" / "ipamd.sock")

    @property
    def spool_dir(self) -> str:
        return str(self.workdir / "spool")

    @property
    def masq_chain(self) -> str:
        return f"{self.name.upper()}-MASQ"[:28]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ipamd.log"

    def argv(self) -> list[str]:
        return [
            *(["ip", "netns", "exec", self.netns] if self.netns else []),
            sys.executable,
            "-m",
            "ipamd",
            "--node-name",
            self.name,
            "--store",
            self.store_url or f"sqlite://{self.workdir}/store.db",
            "--key-prefix",
            self.key_prefix,
            "--network",
            self.network,
            "--subnet-len",
            str(self.subnet_len),
            "--cni-socket",
            self.cni_socket,
            "--grpc-socket",
            self.grpc_socket,
            "--spool-dir",
            self.spool_dir,
            "--state-dir",
            str(self.workdir / "state"),
            "--masq-chain",
            self.masq_chain,
            "--cooldown",
            str(self.cooldown),
            "--log-level",
            self.log_level,
            *(["--enable-fault-injection"] if self.fault_injection else []),
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> None:
        self.spawn()
        self.wait_started(timeout)

    def spawn(self) -> None:
        """Start the process and return at once (several nodes then start side by side)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=REPO, stdout=log, stderr=log)

    def wait_started(self, timeout: float = 15.0) -> None:
        """Until both sockets exist; RuntimeError with the log when it exits or takes too long."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moor-ipamd exited {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            if os.path.exists(self.cni_socket) and os.path.exists(self.grpc_socket):
                return
            time.sleep(0.05)
        raise RuntimeError(f"moor-ipamd not ready in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def cleanup_host(self) -> None:
        """Remove what this daemon's node left on the host: bridge, masquerade chain."""
        self.stop()
        if self.netns:
            return  # they are in its netns, which goes with the cluster
        run_cmd("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            from cni_plugin.datapath.masq import MasqueradeRules

            MasqueradeRules(self.masq_chain).remove()

    def plugin(self, **options: Any) -> dict[str, Any]:
        """A moor plugin object for a conflist."""
        conf: dict[str, Any] = {
            "type": "moor",
            "bridge": self.bridge,
            "isGateway": True,
            "isDefaultGateway": True,
            "ipMasq": True,
            "daemonSocket": self.cni_socket,
            "spoolDir": self.spool_dir,
        }
        conf.update(options)
        return {k: v for k, v in conf.items() if v is not None}

    def ipam_section(self, **options: Any) -> dict[str, Any]:
        return {
            "type": "moor",
            "daemonSocket": self.cni_socket,
            "spoolDir": self.spool_dir,
            **options,
        }

    def moorctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ipamd.cli", "--socket", self.grpc_socket, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> dict[str, Any]:
        proc = self.moorctl("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def add_as_nobody(conf: dict[str, Any], netns: str, container_id: str) -> Outcome:
    """An ADD through bin/moor run as uid/gid 65534: what a non-root caller gets."""
    proc = subprocess.run(
        [str(SHIM)],
        input=json.dumps(conf).encode(),
        env={
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
        },
        capture_output=True,
        timeout=10,
        user=65534,
        group=65534,
    )
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return Outcome(proc.returncode, out, proc.stderr.decode(errors="replace"))


def plugin_config(name: str, version: str, plugin: dict[str, Any]) -> dict[str, Any]:
    """The per-plugin stdin a runtime derives from a one-plugin list (name and version injected)."""
    return {"cniVersion": version, "name": name, **plugin}


class ExecRuntime:
    """Direct exec of the CNI executable, caching results like libcni for CHECK/DEL prevResult."""

    kind = "exec"

    def __init__(self, plugin_path: Path = SHIM) -> None:
        self.plugin_path = plugin_path
        self.cache: dict[tuple[str, str, str], dict[str, Any]] = {}

    def call(
        self,
        command: str,
        conf: dict[str, Any],
        *,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        cni_args: str = "",
        plugin_path: Path | None = None,
        extra_env: dict[str, str] | None = None,
        cap_args: dict[str, Any] | None = None,
    ) -> Outcome:
        if cap_args:  # what libcni does: runtimeConfig holds the declared capabilities only
            declared = conf.get("capabilities") or {}
            runtime_config = {k: v for k, v in cap_args.items() if declared.get(k)}
            if runtime_config:
                conf = {**conf, "runtimeConfig": runtime_config}
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": cni_args,
            "CNI_PATH": f"{SHIM.parent}:{REFERENCE_PLUGINS}",
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            **(extra_env or {}),
        }
        proc = subprocess.run(
            [str(plugin_path or self.plugin_path)],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return Outcome(proc.returncode, out, proc.stderr.decode(errors="replace"))

    def _with_prev(self, conf: dict[str, Any], key: tuple[str, str, str]) -> dict[str, Any]:
        prev = self.cache.get(key)
        if prev is not None and conf["cniVersion"] >= "0.4.0":
            return {**conf, "prevResult": prev}
        return conf

    def add(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        outcome = self.call(
            "ADD", conf, container_id=container_id, netns=netns, ifname=ifname, **kw
        )
        if outcome.rc == 0:
            self.cache[(conf["name"], container_id, ifname)] = outcome.out
        return outcome

    def check(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        full = self._with_prev(conf, (conf["name"], container_id, ifname))
        return self.call("CHECK", full, container_id=container_id, netns=netns, ifname=ifname, **kw)

    def delete(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        key = (conf["name"], container_id, ifname)
        outcome = self.call(
            "DEL",
            self._with_prev(conf, key),
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            **kw,
        )
        if outcome.rc == 0:
            self.cache.pop(key, None)
        return outcome


class LibcniRuntime:
    """The Go libcni driver: conflists in a NETCONFPATH, results cached by libcni itself."""

    kind = "libcni"

    def __init__(self, workdir: Path) -> None:
        self.binary = cnidrv.build()
        self.netconf_dir = workdir / "net.d"
        self.cache_dir = workdir / "cni-cache"
        self.bin_dir = workdir / "cni-bin"
        self.netconf_dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        link = self.bin_dir / "moor"
        if not link.exists():
            link.symlink_to(SHIM)

    def _write(self, conf: dict[str, Any]) -> str:
        plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        conflist = {"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [plugin]}
        (self.netconf_dir / f"{conf['name']}.conflist").write_text(json.dumps(conflist))
        return conf["name"]

    def _run(
        self,
        verb: str,
        conf: dict[str, Any],
        netns: str,
        container_id: str,
        ifname: str,
        cni_args: str = "",
        cap_args: dict[str, Any] | None = None,
    ) -> Outcome:
        proc = cnidrv.run(
            verb,
            self._write(conf),
            netns,
            netconf_dir=self.netconf_dir,
            cni_path=[str(self.bin_dir), REFERENCE_PLUGINS],
            cache_dir=self.cache_dir,
            ifname=ifname,
            cni_args=cni_args or None,
            cap_args=cap_args,
            container_id=container_id,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return Outcome(proc.returncode, out, proc.stderr, via="libcni")

    def add(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        return self._run("add", conf, netns, container_id, ifname, **kw)

    def check(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        return self._run("check", conf, netns, container_id, ifname, **kw)

    def delete(
        self, conf: dict[str, Any], netns: str, container_id: str, ifname: str = "eth0", **kw: Any
    ) -> Outcome:
        return self._run("del", conf, netns, container_id, ifname, **kw)
