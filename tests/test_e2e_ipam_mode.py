"""moor as the IPAM plugin under Debian's reference `bridge`, `macvlan` and `ipvlan` (CNI 1.1.1 plugins).

The reference plugin is the main plugin; it finds `moor` on CNI_PATH and delegates IPAM to it, so
this proves the abbreviated IPAM result, the IPAM DEL and the IPAM CHECK against real consumers, not
against our own reading of the spec. Every case runs through direct exec of the reference plugin and
through the Go libcni driver, with cniVersion 1.0.0 and 0.4.0 (and 0.3.1 for bridge).

Kernel state is asserted through tests/helpers/oracle.py (iproute2), IPAM state through
`moorctl status --json`.

Names: daemon "mim" on 10.246.0.0/16 (its own bridge mimbr0 is unused here), reference bridge
"mimref0", macvlan/ipvlan masters "mimdummy0"/"mimdummy1". The masters are veth pairs (peers
"mimdummy0p"/"mimdummy1p"), not dummy links: a kernel without the dummy module (like this CI's) can
still run the tests, and macvlan/ipvlan treat both the same. All are removed in finalizers.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_daemon
from tests.helpers import oracle
from tests.helpers.moor import Daemon, ExecRuntime, LibcniRuntime, Outcome, plugin_config

pytestmark = pytest.mark.netns

REFERENCE = Path("/usr/lib/cni")
REF_BRIDGE = "mimref0"
MACVLAN_MASTER = "mimdummy0"
IPVLAN_MASTER = "mimdummy1"
HOST_LINKS = (REF_BRIDGE, MACVLAN_MASTER, IPVLAN_MASTER, "mimprobe0")

Runtime = ExecRuntime | LibcniRuntime


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _delete_host_links() -> None:
    for name in HOST_LINKS:
        if oracle.link(name) is not None:
            _ip("link", "del", name, check=False)


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The node daemon whose IPAM the reference plugins delegate to."""
    d = start_daemon(tmp_path_factory.mktemp("mim"), "mim", "10.246.0.0/16", "mimbr0")
    try:
        yield d
    finally:
        d.cleanup_host()


@pytest.fixture(scope="module")
def host_links(mim: Daemon) -> Iterator[dict[str, bool]]:
    """macvlan/ipvlan masters on the host; removes them and the reference bridge afterwards.

    Returns which link kinds the kernel supports ({"ipvlan": bool}).
    """
    _delete_host_links()  # a previous run that was killed
    try:
        for master in (MACVLAN_MASTER, IPVLAN_MASTER):
            _ip("link", "add", master, "type", "veth", "peer", "name", f"{master}p")
            _ip("link", "set", f"{master}p", "up")
            _ip("link", "set", master, "up")
        probe = _ip(
            "link",
            "add",
            "link",
            IPVLAN_MASTER,
            "name",
            "mimprobe0",
            "type",
            "ipvlan",
            "mode",
            "l2",
            check=False,
        )
        _ip("link", "del", "mimprobe0", check=False)
        yield {"ipvlan": probe.returncode == 0}
    finally:
        _delete_host_links()


# ---- helpers -------------------------------------------------------------------------------------


def reference_plugin(kind: str, daemon: Daemon, **ipam: Any) -> dict[str, Any]:
    """A reference plugin object whose IPAM is moor."""
    section = daemon.ipam_section(**ipam)
    if kind == "bridge":
        return {"type": "bridge", "bridge": REF_BRIDGE, "isGateway": True, "ipam": section}
    if kind == "macvlan":
        return {"type": "macvlan", "master": MACVLAN_MASTER, "mode": "bridge", "ipam": section}
    if kind == "ipvlan":
        return {"type": "ipvlan", "master": IPVLAN_MASTER, "mode": "l2", "ipam": section}
    raise ValueError(kind)


def needs_kind(kind: str, support: dict[str, bool]) -> None:
    """ipvlan is a kernel module, not a capability of the test run: a kernel without it skips, even
    in CI (this machine's kernel has none and cannot load modules)."""
    if kind == "ipvlan" and not support["ipvlan"]:
        pytest.skip("the kernel has no ipvlan support (ip link add ... type ipvlan fails)")


def cni(rt: Runtime, verb: str, conf: dict[str, Any], netns_path: str, cid: str) -> Outcome:
    """Run `verb` through `rt`; the exec runtime execs the reference plugin binary itself."""
    kw: dict[str, Any] = {"plugin_path": REFERENCE / conf["type"]} if rt.kind == "exec" else {}
    return getattr(rt, verb)(conf, netns_path, cid, **kw)


def new_cid() -> str:
    return f"mim-{uuid.uuid4().hex[:16]}"


def allocations(daemon: Daemon, cid: str) -> list[dict[str, Any]]:
    return [a for a in daemon.status()["allocations"] if a["containerID"] == cid]


def error_text(o: Outcome) -> str:
    """The error message: the JSON error's msg (exec) or libcni's one-line stderr (cnidrv)."""
    return f"{o.out.get('msg', '')} {o.stderr}"


def explain(o: Outcome) -> str:
    return f"rc={o.rc} out={o.out} stderr={o.stderr!r}"


def assert_ipam_result(daemon: Daemon, result: dict[str, Any], version: str) -> str:
    """One IPv4 address from one of the daemon's subnets, with that subnet's gateway; returns it."""
    assert result.get("cniVersion") == version, result
    ips = result.get("ips") or []
    assert len(ips) == 1, result
    address = ip_interface(ips[0]["address"])
    subnets = {
        ip_network(s["subnet"]): ip_address(s["gateway"]) for s in daemon.status()["subnets"]
    }
    owner = [net for net in subnets if address.ip in net]
    assert owner, f"{address} is in none of the daemon's subnets {sorted(map(str, subnets))}"
    assert address.network == owner[0], f"{address} has the wrong prefix length for {owner[0]}"
    assert ip_address(ips[0]["gateway"]) == subnets[owner[0]], result
    return str(address)


def release_quietly(
    rt: Runtime, conf: dict[str, Any], netns_path: str, cid: str, daemon: Daemon
) -> None:
    """Finalizer: a failed test must not leave its IP to the next one."""
    if allocations(daemon, cid):
        cni(rt, "delete", conf, netns_path, cid)


CASES = [
    ("bridge", "1.0.0"),
    ("bridge", "0.4.0"),
    ("bridge", "0.3.1"),
    ("macvlan", "1.0.0"),
    ("macvlan", "0.4.0"),
    ("ipvlan", "1.0.0"),
    ("ipvlan", "0.4.0"),
]


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "version"), CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_add_check_del_under_reference_plugin(
    mim: Daemon, host_links: dict[str, bool], netns, runtime: Runtime, kind: str, version: str
) -> None:
    """ADD gives a daemon IP + gateway that the kernel shows on eth0; CHECK passes; DEL releases."""
    needs_kind(kind, host_links)
    name, path = netns()
    cid = new_cid()
    conf = plugin_config(
        f"mim-{kind}-{version.replace('.', '')}", version, reference_plugin(kind, mim)
    )
    try:
        added = cni(runtime, "add", conf, path, cid)
        assert added.rc == 0, explain(added)
        address = assert_ipam_result(mim, added.out, version)
        gateway = added.out["ips"][0]["gateway"]

        assert address in oracle.addresses("eth0", netns=name)
        default = [r for r in oracle.routes(netns=name) if r["dst"] == "default"]
        assert [(r.get("gateway"), r.get("dev")) for r in default] == [(gateway, "eth0")]

        held = allocations(mim, cid)
        assert len(held) == 1, held
        assert (held[0]["ip"], held[0]["network"], held[0]["ifname"]) == (
            address,
            conf["name"],
            "eth0",
        )

        if version >= "0.4.0":
            checked = cni(runtime, "check", conf, path, cid)
            assert checked.rc == 0, explain(checked)

        deleted = cni(runtime, "delete", conf, path, cid)
        assert deleted.rc == 0, explain(deleted)
        assert allocations(mim, cid) == []
        again = cni(runtime, "delete", conf, path, cid)
        assert again.rc == 0, explain(again)
        assert allocations(mim, cid) == []
    finally:
        release_quietly(runtime, conf, path, cid, mim)


@pytest.mark.parametrize("kind", ["bridge", "macvlan", "ipvlan"])
def test_del_without_netns_releases(
    mim: Daemon, host_links: dict[str, bool], netns, kind: str
) -> None:
    """DEL with an empty CNI_NETNS (the sandbox is already gone) still releases the IP."""
    needs_kind(kind, host_links)
    rt = ExecRuntime()
    _, path = netns()
    cid = new_cid()
    conf = plugin_config(f"mim-nons-{kind}", "1.0.0", reference_plugin(kind, mim))
    try:
        added = cni(rt, "add", conf, path, cid)
        assert added.rc == 0, explain(added)
        assert len(allocations(mim, cid)) == 1
        deleted = cni(rt, "delete", conf, "", cid)
        assert deleted.rc == 0, explain(deleted)
        assert allocations(mim, cid) == []
        again = cni(rt, "delete", conf, "", cid)
        assert again.rc == 0, explain(again)
    finally:
        release_quietly(rt, conf, path, cid, mim)


def test_two_pods_under_one_reference_bridge_get_distinct_ips(
    mim: Daemon, host_links: dict[str, bool], netns, runtime: Runtime
) -> None:
    conf = plugin_config("mim-two", "1.0.0", reference_plugin("bridge", mim))
    pods = [(netns(), new_cid()) for _ in range(2)]
    try:
        addresses = []
        for (name, path), cid in pods:
            added = cni(runtime, "add", conf, path, cid)
            assert added.rc == 0, explain(added)
            address = assert_ipam_result(mim, added.out, "1.0.0")
            assert address in oracle.addresses("eth0", netns=name)
            assert [a["ip"] for a in allocations(mim, cid)] == [address]
            addresses.append(address)
        assert addresses[0] != addresses[1]
        for (_, path), cid in pods:
            deleted = cni(runtime, "delete", conf, path, cid)
            assert deleted.rc == 0, explain(deleted)
            assert allocations(mim, cid) == []
    finally:
        for (_, path), cid in pods:
            release_quietly(runtime, conf, path, cid, mim)


@pytest.mark.parametrize("kind", ["bridge", "macvlan"])
def test_failure_after_ipam_add_does_not_leak(
    mim: Daemon, host_links: dict[str, bool], netns, runtime: Runtime, kind: str
) -> None:
    """The reference plugin fails after moor allocated (a route via an off-link gateway cannot be
    added in the pod), calls IPAM DEL itself, and the runtime's DEL is then a clean no-op."""
    _, path = netns()
    cid = new_cid()
    unreachable = [{"dst": "203.0.113.0/24", "gw": "198.51.100.1"}]
    conf = plugin_config(
        f"mim-fail-{kind}", "1.0.0", reference_plugin(kind, mim, routes=unreachable)
    )
    before = len(mim.status()["allocations"])
    try:
        added = cni(runtime, "add", conf, path, cid)
        assert added.rc != 0, explain(added)
        assert "198.51.100.1" in error_text(added), explain(added)
        # The reference plugin's own rollback (ipam.ExecDel) already released the address.
        assert allocations(mim, cid) == []
        deleted = cni(runtime, "delete", conf, path, cid)
        assert deleted.rc == 0, explain(deleted)
        assert allocations(mim, cid) == []
        assert len(mim.status()["allocations"]) == before
    finally:
        release_quietly(runtime, conf, path, cid, mim)


def test_macvlan_with_missing_master_allocates_nothing(
    mim: Daemon, host_links: dict[str, bool], netns, runtime: Runtime
) -> None:
    """macvlan fails before it delegates (it looks its master up first): moor allocates nothing,
    and the runtime's DEL leaves nothing behind either."""
    _, path = netns()
    cid = new_cid()
    plugin = {**reference_plugin("macvlan", mim), "master": "mimnomaster0"}
    conf = plugin_config("mim-nomaster", "1.0.0", plugin)
    before = len(mim.status()["allocations"])
    try:
        added = cni(runtime, "add", conf, path, cid)
        assert added.rc != 0, explain(added)
        assert "not found" in error_text(added).lower(), explain(added)
        assert allocations(mim, cid) == []
        deleted = cni(runtime, "delete", conf, path, cid)
        # Debian's macvlan 1.1.1 looks the master up on DEL too and fails with its own "Link not
        # found" before reaching IPAM; a newer one may succeed. Either way: no moor error, no leak.
        assert deleted.rc == 0 or "not found" in error_text(deleted).lower(), explain(deleted)
        assert allocations(mim, cid) == []
        assert len(mim.status()["allocations"]) == before
    finally:
        release_quietly(runtime, conf, path, cid, mim)


def test_bad_ipam_config_fails_add_without_allocating(
    mim: Daemon, host_links: dict[str, bool], netns, runtime: Runtime
) -> None:
    _, path = netns()
    cid = new_cid()
    conf = plugin_config("mim-badipam", "1.0.0", reference_plugin("bridge", mim, routes="nope"))
    before = len(mim.status()["allocations"])
    try:
        added = cni(runtime, "add", conf, path, cid)
        assert added.rc != 0, explain(added)
        if runtime.kind == "exec":  # libcni's error line carries the message, not the code
            assert added.code == 7, explain(added)  # invalid network config, passed on by bridge
        assert "ipam.routes must be a list" in error_text(added), explain(added)
        assert allocations(mim, cid) == []
        assert len(mim.status()["allocations"]) == before
    finally:
        # DEL re-reads the same broken config and is refused with the same code 7; nothing to free.
        cni(runtime, "delete", conf, path, cid)
        assert allocations(mim, cid) == []
