"""Checklist §8 'Runtime integration': what a real runtime library does around moor.

Chains with the reference portmap (prevResult passing, CAP_ARGS), cnitool-style gc and status,
and disableCheck, all through the Go libcni driver.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.helpers import cnidrv, oracle
from tests.helpers.moor import REFERENCE_PLUGINS, Daemon, ExecRuntime, LibcniRuntime, plugin_config

pytestmark = [pytest.mark.netns, pytest.mark.libcni]
NetnsFactory = Callable[[], tuple[str, str]]


def write_list(
    rt: LibcniRuntime, name: str, version: str, plugins: list[dict[str, Any]], **top: Any
) -> None:
    conflist = {"cniVersion": version, "name": name, "plugins": plugins, **top}
    (rt.netconf_dir / f"{name}.conflist").write_text(json.dumps(conflist))


def drive(
    rt: LibcniRuntime, verb: str, name: str, path: str, **kw: Any
) -> subprocess.CompletedProcess:
    return cnidrv.run(
        verb,
        name,
        path,
        netconf_dir=rt.netconf_dir,
        cni_path=[str(rt.bin_dir), REFERENCE_PLUGINS],
        cache_dir=rt.cache_dir,
        **kw,
    )


def owned(daemon: Daemon, network: str) -> list[dict[str, Any]]:
    return [a for a in daemon.status()["allocations"] if a["network"] == network]


def _nat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "-t", "nat", *args], capture_output=True, text=True)


def _nat_chain_exists(chain: str) -> bool:
    return _nat("-S", chain).returncode == 0


def remove_portmap_leftovers(network: str, hostport_chain_existed: bool) -> None:
    """Debian's portmap 1.1.1 DEL exits 0 but leaves its DNAT chain under iptables-nft; remove it."""
    for line in _nat("-S", "CNI-HOSTPORT-DNAT").stdout.splitlines():
        if f'dnat name: \\"{network}\\"' in line and line.startswith("-A "):
            parts = shlex.split(line)
            _nat("-D", *parts[1:])
            _nat("-F", parts[-1])
            _nat("-X", parts[-1])
    if (
        not hostport_chain_existed
        and _nat("-S", "CNI-HOSTPORT-DNAT").stdout.strip() == "-N CNI-HOSTPORT-DNAT"
    ):
        for hook in ("PREROUTING", "OUTPUT"):
            _nat("-D", hook, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
        _nat("-X", "CNI-HOSTPORT-DNAT")


def test_chain_with_portmap_and_cap_args(
    daemon: Daemon, netns: NetnsFactory, tmp_path: Path
) -> None:
    rt = LibcniRuntime(tmp_path)
    _, path = netns()
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False}
    write_list(rt, "chainnet", "1.0.0", [daemon.plugin(), portmap])
    caps = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}
    hostport_chain_existed = _nat_chain_exists("CNI-HOSTPORT-DNAT")
    try:
        add = drive(rt, "add", "chainnet", path, cap_args=caps)
        assert add.returncode == 0, add.stderr
        result = json.loads(add.stdout)
        pod_ip = result["ips"][0]["address"].split("/")[0]
        assert result["interfaces"][2]["name"] == "eth0"  # moor's result passed through portmap
        nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert f"{pod_ip}:80" in nat and "18080" in nat
        # Without CAP_ARGS: Debian's portmap 1.1.1 CHECK then looks for an IPv6 DNAT chain it never
        # made for an IPv4-only pod, a reference-plugin quirk.
        assert drive(rt, "check", "chainnet", path).returncode == 0
        assert (
            drive(rt, "del", "chainnet", path, cap_args=caps).returncode == 0
        )  # runtimes resend them
    finally:
        drive(rt, "del", "chainnet", path, cap_args=caps)
        remove_portmap_leftovers("chainnet", hostport_chain_existed)
    assert owned(daemon, "chainnet") == []


def test_gc_dels_cached_attachments(daemon: Daemon, netns: NetnsFactory, tmp_path: Path) -> None:
    """cnitool gc: DEL every cached attachment of the network (libcni 1.1.2 cannot send GC itself)."""
    rt = LibcniRuntime(tmp_path)
    write_list(rt, "gcdrv", "1.0.0", [daemon.plugin()])
    paths = [netns()[1] for _ in range(2)]
    for p in paths:
        assert drive(rt, "add", "gcdrv", p).returncode == 0
    assert len(owned(daemon, "gcdrv")) == 2
    keep = [{"containerID": cnidrv.cnitool_container_id(paths[0]), "ifname": "eth0"}]
    gc = drive(rt, "gc", "gcdrv", paths[0], valid_attachments=keep)
    assert gc.returncode == 0, gc.stderr
    assert [a["containerID"] for a in owned(daemon, "gcdrv")] == [keep[0]["containerID"]]
    assert drive(rt, "gc", "gcdrv", paths[0]).returncode == 0
    assert owned(daemon, "gcdrv") == []
    assert oracle.gone(host_veth_name(keep[0]["containerID"], "eth0"))


def test_gc_verb_on_a_110_list_releases_what_runtime_no_longer_has(
    daemon: Daemon, netns: NetnsFactory, tmp_path: Path
) -> None:
    """The driver sends GC with cni.dev/valid-attachments to a 1.1.0 list, as libcni >= 1.2 does."""
    rt = LibcniRuntime(tmp_path)
    exec_rt = ExecRuntime()
    conf = plugin_config("gc110", "1.1.0", daemon.plugin())
    write_list(rt, "gc110", "1.1.0", [daemon.plugin()])
    _, a = netns()
    _, b = netns()
    assert exec_rt.add(conf, a, "gc110-a").rc == 0  # libcni 1.1.2 cannot parse a 1.1.0 ADD result
    assert exec_rt.add(conf, b, "gc110-b").rc == 0
    keep = [{"containerID": "gc110-a", "ifname": "eth0"}]
    assert drive(rt, "gc", "gc110", a, valid_attachments=keep).returncode == 0
    assert [x["containerID"] for x in owned(daemon, "gc110")] == ["gc110-a"]
    assert exec_rt.delete(conf, a, "gc110-a").rc == 0


def test_status_through_the_driver(daemon: Daemon, netns: NetnsFactory, tmp_path: Path) -> None:
    rt = LibcniRuntime(tmp_path)
    _, path = netns()
    write_list(rt, "st110", "1.1.0", [daemon.plugin()])
    assert drive(rt, "status", "st110", path).returncode == 0
    daemon.stop()
    try:
        down = drive(rt, "status", "st110", path)
        assert down.returncode == 1 and "not reachable" in down.stderr
    finally:
        daemon.start()


def test_disable_check_skips_the_plugin(
    daemon: Daemon, netns: NetnsFactory, tmp_path: Path
) -> None:
    rt = LibcniRuntime(tmp_path)
    ns, path = netns()
    write_list(rt, "nocheck", "1.0.0", [daemon.plugin()], disableCheck=True)
    assert drive(rt, "add", "nocheck", path).returncode == 0
    subprocess.run(["ip", "-n", ns, "link", "del", "eth0"], check=True)  # CHECK would fail now
    assert drive(rt, "check", "nocheck", path).returncode == 0
    assert drive(rt, "del", "nocheck", path).returncode == 0
    assert owned(daemon, "nocheck") == []


def test_ipam_route_without_gw_goes_via_the_gateway(
    daemon: Daemon, netns: NetnsFactory, tmp_path: Path
) -> None:
    rt = LibcniRuntime(tmp_path)
    ns, path = netns()
    plugin = daemon.plugin(
        isDefaultGateway=False, ipam={"type": "moor", "routes": [{"dst": "198.51.100.0/24"}]}
    )
    write_list(rt, "rtnet", "1.0.0", [plugin])
    add = drive(rt, "add", "rtnet", path)
    assert add.returncode == 0, add.stderr
    result = json.loads(add.stdout)
    assert result["routes"] == [{"dst": "198.51.100.0/24"}]
    (route,) = [r for r in oracle.routes(netns=ns) if r["dst"] == "198.51.100.0/24"]
    assert route["gateway"] == result["ips"][0]["gateway"]
    assert [r for r in oracle.routes(netns=ns) if r["dst"] == "default"] == []
    assert drive(rt, "check", "rtnet", path).returncode == 0
    assert drive(rt, "del", "rtnet", path).returncode == 0
