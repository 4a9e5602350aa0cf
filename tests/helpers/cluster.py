"""A simulated multi-node moor cluster (issue 13), the one home for tests, `demo/` and `bench/`.

`with Cluster(backend="host-gw") as c:` builds the netns topology of `underlay.py`, starts etcd
inside the infra netns (on 192.168.201.1:2379), starts one `moor-ipamd` per node inside that
node's netns (`--network ""`: they wait for the config), writes the network config once with
`moorctl network init`, and returns when every node says ready. Pods are netns networked by the
real exec path: `ip netns exec <node> bin/moor` with CNI_* env and a plugin conf on stdin.

On exit, also after a failure or a half-built cluster: echo servers, daemons and etcd are
stopped by PID, every netns the cluster made is deleted (their links go with them), and the
temp dir is removed. On a failure the daemons' log tails go to stderr first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import REFERENCE_PLUGINS, SHIM, Daemon, Outcome
from tests.helpers.traffic import EchoServer, start_echo_servers
from tests.helpers.underlay import Addresses, Underlay

NETWORK = "10.201.0.0/16"
SUBNET_LEN = 24
CNI_NETWORK = "mcnet"
BRIDGE = "moor0"
READY_TIMEOUT = 30.0


@dataclass
class Node:
    name: str  # "n1": its node name, and its netns is "<prefix>-n1"
    netns: str
    public_ip: str
    daemon: Daemon


@dataclass(frozen=True)
class Pod:
    name: str  # its netns, e.g. "mc3fa1-n1p1"
    node: str
    ip: str
    container_id: str
    result: dict[str, Any]


class Cluster:
    daemon_type: type[Daemon] = Daemon  # the bench's types make their processes die with it
    etcd_type: type[EtcdServer] = EtcdServer

    def __init__(
        self,
        *,
        backend: str = "host-gw",
        routed: bool = False,
        nodes: int = 3,
        vni: int | None = None,
        vxlan_port: int | None = None,
        reconcile_interval: float | None = None,
        lease_ttl: float | None = None,
        daemon_args: tuple[str, ...] = (),
        init_network: bool = True,
        fixed_ranges: tuple[str, ...] = (),
        prefix: str = "mc",
        addresses: Addresses | None = None,
        network: str = NETWORK,
    ) -> None:
        self.run_id = secrets.token_hex(3)
        self.prefix = f"{prefix}{self.run_id}"  # of its netns, temp dir and etcd member
        self.key_prefix = f"/{prefix}-{self.run_id}"
        self.network = network
        self.addresses = addresses or Addresses()
        self.backend = backend
        self.vni, self.vxlan_port = vni, vxlan_port
        self.reconcile_interval, self.lease_ttl = reconcile_interval, lease_ttl
        self.daemon_args = daemon_args
        self.init_network = init_network
        self.fixed_ranges = fixed_ranges
        self.underlay = Underlay(self.prefix, nodes, routed, self.addresses)
        self.workdir = Path(tempfile.gettempdir()) / self.prefix  # made by build()
        self._own_workdir = False  # only a dir this cluster made is removed
        self.etcd = self.etcd_type(self.workdir / "etcd", name=self.prefix, client_port=2379,
                                   peer_port=2380, host=self.addresses.infra_ip,
                                   netns=self.underlay.infra)  # fmt: skip
        self.nodes: dict[str, Node] = {}
        self._pod_numbers: dict[str, itertools.count] = {}
        self.pods: list[Pod] = []
        self.servers: list[EchoServer] = []
        self.processes: list[subprocess.Popen] = []  # everything ever started, for the checks

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.build()
        except BaseException:
            self.dump_logs()
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.dump_logs()
        self.close()

    def build(self) -> None:
        self.workdir.mkdir(mode=0o700)
        self._own_workdir = True
        self.underlay.build()
        self.etcd.start()
        self.processes.append(self.etcd.proc)  # type: ignore[arg-type]
        for name in self.underlay.node_names():
            netns, ip = self.underlay.ns(name), self.underlay.node_ip(name)
            daemon = self.daemon_type(workdir=self.workdir / name, name=name, network="",
                                      bridge=BRIDGE, store_url=self.etcd.url,
                                      key_prefix=self.key_prefix, netns=netns)  # fmt: skip
            self.nodes[name] = Node(name, netns, ip, daemon)
        self.start(*self.nodes, wait=False)
        if self.init_network:
            self.network_init()
            self.wait_ready(*self.nodes)

    def close(self) -> None:
        """Stop what runs, delete what was made; each step runs even if one before it failed."""
        steps = [
            lambda: [server.stop() for server in self.servers],
            self._stop_daemons,
            self.etcd.stop,
            self.underlay.destroy,
            lambda: self._own_workdir and shutil.rmtree(self.workdir, ignore_errors=True),
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # the next steps must still run
                print(f"cluster {self.prefix}: teardown step failed: {exc!r}", file=sys.stderr)

    def _stop_daemons(self) -> None:
        live = [n.daemon.proc for n in self.nodes.values() if n.daemon.proc is not None]
        for proc in live:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused one must run to handle SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # ---- daemons -------------------------------------------------------------------------
    def _args(self, node: Node) -> list[str]:
        args = ["--public-ip", node.public_ip]
        if self.reconcile_interval is not None:
            args += ["--reconcile-interval", f"{self.reconcile_interval:g}"]
        if self.lease_ttl is not None:
            args += ["--lease-ttl", f"{self.lease_ttl:g}"]
        return [*args, *self.daemon_args]

    def start(self, *names: str, wait: bool = True, extra_args: tuple[str, ...] = ()) -> None:
        """Start these nodes' daemons side by side (spawned from this thread); with `wait`, until
        each says ready. `extra_args` go after the cluster's own, for this start only."""
        for name in names:
            node = self.nodes[name]
            for sock in (node.daemon.cni_socket, node.daemon.grpc_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)  # left by a killed daemon: it would look started
            node.daemon.extra_args = [*self._args(node), *extra_args]
            node.daemon.spawn()
            self.processes.append(node.daemon.proc)  # type: ignore[arg-type]
        for name in names:
            self.nodes[name].daemon.wait_started()
        if wait:
            self.wait_ready(*names)

    def stop(self, name: str) -> None:
        """SIGTERM the node's daemon (SIGKILL after 10 s) and wait for it."""
        self.nodes[name].daemon.stop()

    def kill(self, name: str) -> None:
        """SIGKILL: a crash; its routes, lease and sockets stay behind."""
        proc = self.nodes[name].daemon.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def signal(self, name: str, sig: int) -> None:
        proc = self.nodes[name].daemon.proc
        assert proc is not None and proc.poll() is None, f"{name}'s daemon is not running"
        proc.send_signal(sig)

    def restart(self, name: str, public_ip: str = "") -> None:
        """Stop the node's daemon; with `public_ip`, readdress its eth0 to it; start it again."""
        self.stop(name)
        if public_ip:
            self.set_public_ip(name, public_ip)
        self.start(name)

    def set_public_ip(self, name: str, ip: str) -> None:
        """Readdress the node's eth0; its daemon gets `--public-ip IP` from its next start."""
        self.underlay.readdress(name, ip)
        self.nodes[name].public_ip = ip

    def moorctl(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return self.nodes[name].daemon.moorctl(*args)

    def network_init(self) -> None:
        args = ["--network", self.network, "--subnet-len", str(SUBNET_LEN)]
        args += ["--backend", self.backend]
        args += ["--vni", str(self.vni)] if self.vni is not None else []
        args += ["--vxlan-port", str(self.vxlan_port)] if self.vxlan_port is not None else []
        for fixed in self.fixed_ranges:
            args += ["--fixed-range", fixed]
        proc = self.moorctl(next(iter(self.nodes)), "network", "init", *args)
        if proc.returncode != 0:
            raise RuntimeError(f"moorctl network init failed: {proc.stderr.strip()}")

    def status(self, name: str) -> dict[str, Any] | None:
        """`moorctl status --json` of the node, or None when its daemon does not answer."""
        proc = self.moorctl(name, "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def subnets(self, name: str) -> list[dict[str, Any]]:
        """`moorctl subnets --json` as the node answers it."""
        proc = self.moorctl(name, "subnets", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def wait_ready(self, *names: str, timeout: float = READY_TIMEOUT) -> None:
        """Until every named node's status says ready; RuntimeError naming the ones that don't."""

        def one(name: str) -> str:
            deadline, status = time.monotonic() + timeout, None
            while time.monotonic() < deadline:
                proc = self.nodes[name].daemon.proc
                if proc is None or proc.poll() is not None:
                    return f"{name}: daemon exited"
                status = self.status(name)
                if status is not None and status["ready"]:
                    return ""
                time.sleep(0.1)
            return f"{name}: not ready in {timeout} s ({status})"

        with ThreadPoolExecutor(len(names)) as pool:
            problems = [p for p in pool.map(one, names) if p]
        if problems:
            raise RuntimeError("; ".join(problems))

    def subnet_of(self, name: str) -> str:
        """The subnet the node leased, from its own status."""
        status = self.status(name)
        assert status is not None and status["subnets"], f"{name} has no subnet: {status}"
        return status["subnets"][0]["subnet"]

    def log(self, name: str) -> str:
        try:
            return self.nodes[name].daemon.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def dump_logs(self, lines: int = 40) -> None:
        """The last `lines` of each daemon's log (pyroute2's debug chatter left out) and etcd's."""
        for name in self.nodes:
            own = [line for line in self.log(name).splitlines() if " pyroute2." not in line]
            print(f"---- {name} moor-ipamd log ----", *own[-lines:], sep="\n", file=sys.stderr)
        print(f"---- etcd log ----\n{self.etcd.log_tail()}", file=sys.stderr)

    # ---- etcd ----------------------------------------------------------------------------
    def restart_store(self) -> None:
        """Stop etcd and start it again on the same data: every client's streams break."""
        self.etcd.stop()
        self.etcd.start()
        self.processes.append(self.etcd.proc)  # type: ignore[arg-type]

    def etcdctl(self, *args: str) -> str:
        return self.etcd.etcdctl(*args)

    def compact_store(self) -> int:
        """Compact etcd's history up to its current revision and defragment; the revision."""
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        revision = int(status[0]["Status"]["header"]["revision"])
        self.etcdctl("compact", str(revision), "--physical")
        self.etcdctl("defrag")
        return revision

    # ---- pods ----------------------------------------------------------------------------
    def conf(self, name: str) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": CNI_NETWORK, **self.nodes[name].daemon.plugin()}

    def cni(
        self, command: str, node: str, pod_netns: str, container_id: str, cni_args: str = ""
    ) -> dict[str, Any]:
        """One CNI call through bin/moor run inside the node's netns; the parsed result. The pod
        identity is `mc/<netns>` unless `cni_args` says otherwise."""
        outcome = self.cni_exec(command, node, pod_netns, container_id, cni_args)
        if outcome.rc != 0:
            raise RuntimeError(
                f"CNI {command} {pod_netns} on {node}: {outcome.out or outcome.stderr!r}"
            )
        return outcome.out

    def cni_exec(
        self, command: str, node: str, pod_netns: str, container_id: str, cni_args: str = ""
    ) -> Outcome:
        """`cni` without the check: exit code, parsed stdout and stderr, failure or not."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.nodes[node].netns, str(SHIM)],
            input=json.dumps(self.conf(node)).encode(),
            env={
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": container_id,
                "CNI_NETNS": f"/run/netns/{pod_netns}",
                "CNI_IFNAME": "eth0",
                "CNI_ARGS": cni_args
                or f"IgnoreUnknown=1;K8S_POD_NAMESPACE=mc;K8S_POD_NAME={pod_netns}",
                "CNI_PATH": f"{SHIM.parent}:{REFERENCE_PLUGINS}",
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            },
            capture_output=True,
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return Outcome(proc.returncode, out, proc.stderr.decode(errors="replace"))

    def add_pods(self, per_node: int = 1, nodes: list[str] | None = None) -> list[Pod]:
        """`per_node` new pods on each of `nodes` (default all), made side by side."""
        specs = []
        for node in nodes or list(self.nodes):
            numbers = self._pod_numbers.setdefault(node, itertools.count(1))
            specs += [(node, f"{self.prefix}-{node}p{next(numbers)}") for _ in range(per_node)]
        self.underlay.add_netns([netns for _, netns in specs])

        def add(spec: tuple[str, str]) -> Pod:
            node, netns = spec
            result = self.cni("ADD", node, netns, netns)
            ip = result["ips"][0]["address"].split("/")[0]
            return Pod(netns, node, ip, netns, result)

        with ThreadPoolExecutor(len(specs)) as pool:
            made = list(pool.map(add, specs))
        self.pods += made
        return made

    def add_pod(self, node: str, cni_args: str) -> Pod:
        """One new pod on `node` with these CNI_ARGS (a pod identity, a requested IP)."""
        numbers = self._pod_numbers.setdefault(node, itertools.count(1))
        netns = f"{self.prefix}-{node}p{next(numbers)}"
        self.underlay.add_netns([netns])
        result = self.cni("ADD", node, netns, netns, cni_args)
        pod = Pod(netns, node, result["ips"][0]["address"].split("/")[0], netns, result)
        self.pods.append(pod)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        self.cni("DEL", pod.node, pod.name, pod.container_id)
        self.pods.remove(pod)
        subprocess.run(["ip", "netns", "del", pod.name], capture_output=True)

    def echo(self, *namespaces: str) -> list[EchoServer]:
        """Echo servers in these netns (stopped by PID at exit)."""
        servers = start_echo_servers(list(namespaces))
        self.servers += servers
        self.processes += [s.proc for s in servers]
        return servers
