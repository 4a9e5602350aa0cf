"""The simulated cluster's wires: network namespaces and veths only, every address a private one.

    outside 192.168.203.2 ---- 192.168.203.1 [infra: bridge ul0 192.168.201.1/24, etcd] ----+
                                                  |             |             |            |
                                       n1 eth0 .11   n2 eth0 .12   n3 eth0 .13   (routed: router)
    routed: router 192.168.201.2 on ul0, 192.168.202.1 toward the last node (192.168.202.13)

Every netns is `<prefix>-<role>`; links are made straight into their netns (`ip link add ... netns
X type veth peer ... netns Y`), so none ever shows on the host, and the infra end of a node's veth
is named after the node's netns. Building is one host `ip -batch` (netns and veths), then one batch
per netns, run side by side. Deleting the netns removes every link in them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

UNDERLAY = "192.168.201"  # the L2 segment on infra's bridge ul0
ROUTED = "192.168.202"  # the routed variant: the last node's subnet behind the router
OUTSIDE = "192.168.203"  # infra <-> outside
INFRA_IP = f"{UNDERLAY}.1"
ROUTER_IP = f"{UNDERLAY}.2"


@dataclass(frozen=True)
class Addresses:
    """The three /24s of one cluster's wires (first three octets each); the defaults above unless
    a caller needs others (the bench uses its own, to stay apart from tests in parallel)."""

    underlay: str = UNDERLAY
    routed: str = ROUTED
    outside: str = OUTSIDE

    @property
    def infra_ip(self) -> str:
        return f"{self.underlay}.1"

    @property
    def router_ip(self) -> str:
        return f"{self.underlay}.2"


def run_batch(commands: Iterable[str], netns: str = "") -> subprocess.Popen:
    """Start `ip [-n NETNS] -batch -` on `commands`; the caller waits (batches run side by side)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    proc.stdin.write("".join(f"{c}\n" for c in commands))
    proc.stdin.close()
    return proc


def finish(procs: list[subprocess.Popen], what: str) -> None:
    """Wait for every batch; RuntimeError naming the ones that failed."""
    errors = []
    for proc in procs:
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
        if proc.wait(30) != 0:
            errors.append(f"{' '.join(proc.args)}: {err.strip()}")  # type: ignore[arg-type]
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))


def sysctl(netns: str, setting: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", setting],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Underlay:
    """The netns and links of one simulated cluster; `made` lists every netns it created."""

    prefix: str  # e.g. "mc3fa1": every netns name starts with it
    nodes: int = 3
    routed: bool = False  # the last node sits behind the router, on another L3 subnet
    addresses: Addresses = field(default_factory=Addresses)
    made: list[str] = field(default_factory=list)

    # ---- names and addresses -------------------------------------------------------------
    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def infra(self) -> str:
        return self.ns("infra")

    @property
    def outside(self) -> str:
        return self.ns("out")

    @property
    def router(self) -> str:
        return self.ns("rtr")

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def behind_router(self, node: str) -> bool:
        return self.routed and node == f"n{self.nodes}"

    def node_ip(self, node: str) -> str:
        """The node's address on its eth0 when the cluster is built (its `--public-ip`)."""
        a = self.addresses
        return f"{a.routed if self.behind_router(node) else a.underlay}.{10 + int(node[1:])}"

    def gateway(self, node: str) -> str:
        a = self.addresses
        return f"{a.routed}.1" if self.behind_router(node) else a.infra_ip

    # ---- building ------------------------------------------------------------------------
    def build(self) -> None:
        nodes = self.node_names()
        roles = ["infra", "out", *(["rtr"] if self.routed else []), *nodes]
        names = [self.ns(r) for r in roles]
        host = [f"netns add {n}" for n in names]
        self.made += names  # before the batch runs: a half-built cluster is torn down too
        host.append(f"link add eth0 netns {self.outside} type veth peer name {self.outside} "
                    f"netns {self.infra}")  # fmt: skip
        if self.routed:
            host.append(f"link add eth0 netns {self.router} type veth peer name {self.router} "
                        f"netns {self.infra}")  # fmt: skip
        for node in nodes:
            if self.behind_router(node):
                host.append(f"link add eth0 netns {self.ns(node)} type veth peer name eth1 "
                            f"netns {self.router}")  # fmt: skip
            else:
                host.append(f"link add eth0 netns {self.ns(node)} type veth peer name "
                            f"{self.ns(node)} netns {self.infra}")  # fmt: skip
        finish([run_batch(host)], "creating the netns and veths")

        batches = {self.infra: self._infra_commands(), self.outside: self._outside_commands()}
        if self.routed:
            batches[self.router] = self._router_commands()
        for node in nodes:
            batches[self.ns(node)] = ["link set lo up", *self.node_commands(node)]
        finish([run_batch(cmds, ns) for ns, cmds in batches.items()], "configuring the netns")
        forwarding = [self.infra, *([self.router] if self.routed else [])]
        forwarding += [self.ns(n) for n in nodes]
        finish([sysctl(ns, "net.ipv4.ip_forward=1") for ns in forwarding], "ip_forward")

    def _infra_commands(self) -> list[str]:
        a = self.addresses
        cmds = ["link set lo up", "link add ul0 type bridge", f"addr add {a.infra_ip}/24 dev ul0",
                "link set ul0 up", f"addr add {a.outside}.1/24 dev {self.outside}",
                f"link set {self.outside} up"]  # fmt: skip
        ports = [self.ns(n) for n in self.node_names() if not self.behind_router(n)]
        ports += [self.router] if self.routed else []
        for port in ports:
            cmds += [f"link set {port} master ul0", f"link set {port} up"]
        if self.routed:
            cmds.append(f"route add {a.routed}.0/24 via {a.router_ip}")
        return cmds

    def _outside_commands(self) -> list[str]:
        """Outside routes back to the node addresses only, never to the pod network: a reply to
        a pod IP that was not masqueraded is lost."""
        a = self.addresses
        cmds = ["link set lo up", f"addr add {a.outside}.2/24 dev eth0", "link set eth0 up",
                f"route add {a.underlay}.0/24 via {a.outside}.1"]  # fmt: skip
        if self.routed:
            cmds.append(f"route add {a.routed}.0/24 via {a.outside}.1")
        return cmds

    def _router_commands(self) -> list[str]:
        a = self.addresses
        return ["link set lo up", f"addr add {a.router_ip}/24 dev eth0", "link set eth0 up",
                f"addr add {a.routed}.1/24 dev eth1", "link set eth1 up",
                f"route add default via {a.infra_ip}"]  # fmt: skip

    def node_commands(self, node: str, ip: str = "") -> list[str]:
        """Address eth0 (with `ip`, default the node's own) and route: default via infra (or the
        router), and the other L3 subnet via the router."""
        ip, a = ip or self.node_ip(node), self.addresses
        cmds = [f"addr add {ip}/24 dev eth0", "link set eth0 up",
                f"route replace default via {self.gateway(node)}"]  # fmt: skip
        if self.routed and not self.behind_router(node):
            cmds.append(f"route replace {a.routed}.0/24 via {a.router_ip}")
        return cmds

    def readdress(self, node: str, ip: str) -> None:
        """Give the node's eth0 the address `ip` instead of its current one (same /24)."""
        cmds = ["addr flush dev eth0", *self.node_commands(node, ip)]
        finish([run_batch(cmds, self.ns(node))], f"readdressing {node}")

    def add_netns(self, names: list[str]) -> None:
        self.made += names
        finish([run_batch([f"netns add {n}" for n in names])], "creating pod netns")

    # ---- teardown ------------------------------------------------------------------------
    def destroy(self) -> None:
        """Delete every netns this cluster made (their links go with them), errors ignored."""
        names, self.made = self.made, []
        if names:
            subprocess.run(  # a netns never made is fine: `leftovers()` is the check
                ["ip", "-force", "-batch", "-"],
                input="".join(f"netns del {n}\n" for n in names),
                capture_output=True,
                text=True,
            )

    def leftovers(self) -> list[str]:
        """Netns on the machine whose name starts with this cluster's prefix."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [
            line.split()[0]
            for line in out.splitlines()
            if line.strip() and line.split()[0].startswith(f"{self.prefix}-")
        ]
