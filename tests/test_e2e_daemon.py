"""The node daemon's life: down and back up, leak GC, subnet growth, restarts, access control.

Each test gets its own daemon (own store, sockets, bridge and network), so state never leaks
between them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.conftest import start_daemon
from tests.helpers import oracle
from tests.helpers.moor import REPO, Daemon, ExecRuntime, add_as_nobody, plugin_config
from tests.helpers.wire_client import encode_request

pytestmark = pytest.mark.netns
NetnsFactory = Callable[[], tuple[str, str]]


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    marker = request.node.get_closest_marker("daemon")
    kw = dict(marker.kwargs) if marker else {}
    d = start_daemon(tmp_path / "node", "mtd", kw.pop("network", "10.243.0.0/16"), "mtdbr0", **kw)
    yield d
    d.cleanup_host()


def conf(d: Daemon, version: str = "1.1.0") -> dict:
    return plugin_config("mtdnet", version, d.plugin())


def test_daemon_down_add_11_status_50_del_spooled_then_replayed(
    node: Daemon, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    ns, path = netns()
    c = conf(node)
    assert rt.add(c, path, "down1").rc == 0
    ip = rt.cache[("mtdnet", "down1", "eth0")]["ips"][0]["address"]
    node.stop()

    started = time.monotonic()
    add = rt.add(c, netns()[1], "down2")
    assert time.monotonic() - started < 1.0
    assert add.rc == 1 and add.code == 11 and node.cni_socket in add.out["msg"]
    status = rt.call("STATUS", c)
    assert status.rc == 1 and status.code == 50

    dele = rt.delete(c, path, "down1")
    assert dele.rc == 0 and dele.out == {}
    assert len(os.listdir(node.spool_dir)) == 1

    node.start()
    assert os.listdir(node.spool_dir) == []
    allocs = node.status()["allocations"]
    assert all(a["containerID"] != "down1" for a in allocs)
    assert oracle.gone(host_veth_name("down1", "eth0"))
    assert oracle.gone("eth0", netns=ns)
    assert ip not in [a["ip"] for a in allocs]


def _spool_entry(env: dict[str, str], stdin: bytes, extra: bytes = b"") -> bytes:
    """A spool entry as the shim writes it (the wire request), with raw `extra` env fields."""
    return encode_request(env, stdin).replace(b"\0\0", extra + b"\0\0", 1)


def test_a_spool_of_broken_entries_never_stops_the_daemon(tmp_path: Path) -> None:
    """Every spooled DEL the daemon cannot decode or run moves to failed/, whatever is wrong with
    it, and the daemon starts and serves. The good entries are replayed and removed."""
    work = tmp_path / "node"
    spool = work / "spool"
    spool.mkdir(parents=True, mode=0o700)
    d = Daemon(work, "mfzspool", "10.227.0.0/16", "mfzbr3")
    config = json.dumps(plugin_config("mfzspoolnet", "1.1.0", d.plugin())).encode()
    dele = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "mfzs1", "CNI_IFNAME": "eth0"}
    good = {
        "0010-good": _spool_entry(dele, config),
        # "²".isdigit() is true and int() refuses it: now errno 0, and the DEL runs
        "0011-errno-superscript": _spool_entry(dele, config, "\0MOOR_NETNS_ERRNO=²".encode()),
    }
    bad = {
        "0001-garbage": b"not the wire format",
        "0002-not-utf8": _spool_entry(dele, config, b"\0CNI_ARGS=\xff\xfe"),
        "0003-not-a-del": _spool_entry({**dele, "CNI_COMMAND": "ADD"}, config),
        "0004-deep": _spool_entry(dele, b"[" * 100_000 + b"]" * 100_000),
        "0005-bad-config": _spool_entry(dele, b'{"cniVersion": "1.1.0"}'),
    }
    for name, data in {**good, **bad}.items():
        (spool / name).write_bytes(data)
    os.mkfifo(spool / "0006-fifo")  # opening it would block the start
    (spool / "0007-dir").mkdir()
    (spool / "0008-symlink").symlink_to("/etc/hostname")
    with open(spool / "0009-huge", "wb") as f:
        f.truncate((4 << 20) + 1)  # sparse: one byte over what a request may have
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(spool / "0012-socket"))
    unix.close()
    (spool / "failed").write_text("a regular file where the failed/ directory goes")
    (spool / ".tmp-0013").write_bytes(b"a shim's write in progress: not an entry")
    broken = {*bad, "0006-fifo", "0007-dir", "0008-symlink", "0009-huge", "0012-socket"}

    started = time.monotonic()
    try:
        d.start()
        assert time.monotonic() - started < 15
        assert sorted(os.listdir(spool)) == [".tmp-0013", "failed"]
        assert sorted(os.listdir(spool / "failed")) == sorted({*broken, "failed"})
        assert stat.S_ISFIFO(os.lstat(spool / "failed" / "0006-fifo").st_mode)
        log = d.log_path.read_text(errors="replace")
        for name in broken:
            assert f"spooled DEL {name} failed and was moved to failed/{name}" in log, name
        status = ExecRuntime().call("STATUS", json.loads(config))
        assert status.rc == 0 and d.proc is not None and d.proc.poll() is None
    finally:
        d.cleanup_host()


@pytest.mark.daemon(extra_args=["--leak-gc-interval", "0.2", "--leak-gc-grace", "1"])
def test_leak_gc_releases_after_grace_only_when_netns_and_veth_are_gone(
    node: Daemon, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    ns_leak, path_leak = netns()
    _, path_live = netns()
    c = conf(node)
    assert rt.add(c, path_leak, "leak1").rc == 0
    assert rt.add(c, path_live, "live1").rc == 0
    subprocess.run(
        ["ip", "netns", "del", ns_leak], check=True
    )  # the veth pair dies with it; no DEL

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ids = {a["containerID"] for a in node.status()["allocations"]}
        if "leak1" not in ids:
            break
        time.sleep(0.2)
    assert ids == {"live1"}
    assert "leak GC released" in node.log_path.read_text()
    assert rt.delete(c, path_live, "live1").rc == 0


@pytest.mark.daemon(network="10.243.0.0/27", subnet_len=29)
def test_full_subnet_takes_another_lease_and_full_network_fails_clearly(
    node: Daemon, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    c = conf(node)
    paths = [netns()[1] for _ in range(21)]
    for i in range(6):  # a /29 holds 5 pod IPs (.2-.6): the 6th ADD needs a second lease
        assert rt.add(c, paths[i], f"grow{i}").rc == 0
    assert len(node.status()["subnets"]) == 2
    assert rt.call("STATUS", c).rc == 0
    for i in range(6, 20):
        assert rt.add(c, paths[i], f"grow{i}").rc == 0
    data = node.status()
    assert len(data["subnets"]) == 4 and all(s["free"] == 0 for s in data["subnets"])
    assert len({a["ip"] for a in data["allocations"]}) == 20
    full = rt.add(c, paths[20], "grow20")
    assert full.rc == 1 and full.code == 100 and "no IP addresses available" in full.out["msg"]
    assert oracle.gone(host_veth_name("grow20", "eth0"))
    assert rt.call("STATUS", c).rc == 0  # a full pool must not make the node NotReady
    # A just-released IP is still cooling, but with the whole network full it is the last resort.
    freed = rt.cache[("mtdnet", "grow3", "eth0")]["ips"][0]["address"]
    assert rt.delete(c, paths[3], "grow3").rc == 0
    again = rt.add(c, paths[20], "grow20")
    assert again.rc == 0 and again.out["ips"][0]["address"] == freed
    for i in (*range(3), *range(4, 21)):
        assert rt.delete(c, paths[i], f"grow{i}").rc == 0


def test_released_ip_is_reused_last(node: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    c = conf(node)
    _, a = netns()
    _, b = netns()
    first = rt.add(c, a, "fifo1").out["ips"][0]["address"]
    assert rt.delete(c, a, "fifo1").rc == 0
    second = rt.add(c, b, "fifo2").out["ips"][0]["address"]
    assert second != first
    assert node.status()["subnets"][0]["cooling"] == 1
    assert rt.delete(c, b, "fifo2").rc == 0


def test_restart_keeps_subnet_and_allocations(node: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    c = conf(node)
    ns, path = netns()
    ip = rt.add(c, path, "keep1").out["ips"][0]["address"]
    before = node.status()
    node.stop()
    node.start()
    after = node.status()
    assert [s["subnet"] for s in after["subnets"]] == [s["subnet"] for s in before["subnets"]]
    assert [a["ip"] for a in after["allocations"] if a["containerID"] == "keep1"] == [ip]
    assert rt.check(c, path, "keep1").rc == 0
    assert rt.delete(c, path, "keep1").rc == 0


def test_network_mismatch_refuses_to_start(node: Daemon) -> None:
    node.stop()
    argv = node.argv()
    argv[argv.index("--network") + 1] = "10.242.0.0/16"
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "the store holds network 10.243.0.0/16" in proc.stderr


def test_bad_flags_are_one_clear_line(tmp_path: Path) -> None:
    for args, needle in (
        (["--network", "10.0.0.0/33"], "not a CIDR"),
        (["--network", "10.0.0.0/16", "--subnet-len", "8"], "--subnet-len 8"),
        (["--network", "10.0.0.0/16", "--subnet-len", "31"], "at most /30"),
        (["--network", "fd00:10::/48"], "IPv6 pod networks are not supported yet"),
        (["--store", "redis://x"], "store"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ipamd",
                "--cni-socket",
                str(tmp_path / "c.sock"),
                "--grpc-socket",
                str(tmp_path / "g.sock"),
                "--state-dir",
                str(tmp_path),
                "--spool-dir",
                str(tmp_path / "s"),
                *args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


def test_yaml_config_file_and_flag_precedence(tmp_path: Path) -> None:
    from ipamd.config import load_config

    path = tmp_path / "ipamd.yaml"
    path.write_text("network: 10.99.0.0/16\nsubnet-len: 26\ncooldown: 5\n")
    cfg = load_config(["--config", str(path), "--cooldown", "7"])
    assert (cfg.network, cfg.subnet_len, cfg.cooldown) == ("10.99.0.0/16", 26, 7.0)
    path.write_text("nonsense_key: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(["--config", str(path)])


def test_only_root_may_use_the_sockets(node: Daemon, netns: NetnsFactory) -> None:
    for sock in (node.cni_socket, node.grpc_socket):
        assert os.stat(sock).st_mode & 0o077 == 0
    assert os.stat(os.path.dirname(node.cni_socket)).st_mode & 0o077 == 0
    _, path = netns()
    refused = add_as_nobody(conf(node), path, "nobody1")
    out = refused.out
    assert refused.rc == 1 and out["code"] == 11 and "EACCES" in out["msg"]
    assert all(a["containerID"] != "nobody1" for a in node.status()["allocations"])


def test_grpc_health_serving(node: Daemon) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{node.grpc_socket}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "moor.ipam.v1.Ipam"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_daemon_repairs_bridge_gateway_and_masquerade(node: Daemon, netns: NetnsFactory) -> None:
    """The masquerade rule set and the bridge gateway are kept by the daemon, not just installed."""
    rt = ExecRuntime()
    c = conf(node)
    _, path = netns()
    add = rt.add(c, path, "repair1")
    gateway = f"{add.out['ips'][0]['gateway']}/24"
    subprocess.run(["ip", "addr", "del", gateway, "dev", node.bridge], check=True)
    subprocess.run(["iptables", "-w", "-t", "nat", "-F", node.masq_chain], check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rules = subprocess.run(
            ["iptables", "-w", "-t", "nat", "-S", node.masq_chain], capture_output=True, text=True
        ).stdout
        if gateway in oracle.addresses(node.bridge) and "MASQUERADE" in rules:
            break
        time.sleep(0.5)
    assert gateway in oracle.addresses(node.bridge)
    assert "MASQUERADE" in rules
    assert rt.delete(c, path, "repair1").rc == 0
