"""Issue 14 under a real runtime: Debian's podman 4.3 (CNI backend, runc) runs containers on a moor
network, one of them with `--ip` from the fixed range.

One moor-ipamd (SQLite, bridge mpdbr0, network 10.209.0.0/16 with the fixed range
10.209.250.0/24, no cooldown) and a private podman (tests/helpers/podman.py) whose only network is
a conflist naming plugin type `moor`. What is checked is what the containers themselves see (their
own `ip addr`/`ip route`, and who connected to them, from busybox `netstat` inside the server
container), moor's state (`moorctl ips --json`), the host's routes, and what podman sent to the
plugin (a recorder in front of bin/moor): podman 4.3 passes one `--ip` as `CNI_ARGS IP=`, and
only two or more as `runtimeConfig.ips`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers import oracle
from tests.helpers import podman as pm
from tests.helpers.moor import Daemon

pytestmark = [pytest.mark.root, pytest.mark.netns]

NETWORK, FIXED_RANGE, NET_NAME = "10.209.0.0/16", "10.209.250.0/24", "mpdnet"
FIXED_IP, OTHER_IP = "10.209.250.20", "10.209.250.21"
PORT = 7777
# A server that first prints what the container sees, then answers each TCP connection with
# busybox netstat's line for it: "tcp 0 0 <local ip>:7777 <peer ip>:<port> <state>".
SERVE = (
    "ip -4 -o addr show eth0; ip route; echo serving; "
    rf"""printf '#!/bin/sh\nnetstat -tn | grep ":{PORT} "\n' > /tmp/peer; chmod +x /tmp/peer; """
    f"exec nc -ll -p {PORT} -e /tmp/peer"
)
SHOW = "ip -4 -o addr show eth0; ip route"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
            "needs root")  # fmt: skip
    d = Daemon(workdir=tmp_path_factory.mktemp("mpd"), name="mpd", network="", bridge="mpdbr0",
               cooldown=0)  # fmt: skip
    try:
        d.start()
        init = d.moorctl("network", "init", "--network", NETWORK, "--subnet-len", "24",
                         "--fixed-range", FIXED_RANGE)  # fmt: skip
        assert init.returncode == 0, init.stderr
        deadline = time.monotonic() + 10
        while not d.status()["ready"]:
            assert time.monotonic() < deadline, d.log_path.read_text()[-2000:]
            time.sleep(0.1)
        yield d
    finally:
        d.cleanup_host()


@pytest.fixture(scope="module")
def podman(node: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pm.Podman]:
    ok, why = pm.available()
    require(ok, why)
    plugin = {**node.plugin(), "capabilities": {"ips": True}}
    p = pm.Podman(tmp_path_factory.mktemp("mpd-podman"), NET_NAME, plugin)
    try:
        p.import_image()
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def containers(podman: pm.Podman, node: Daemon) -> Iterator[pm.Podman]:
    """The module's podman; every container a test made is removed after it, and the test
    must leave moor with no allocation."""
    yield podman
    podman("rm", "--all", "--force", "--time", "0", timeout=120)
    assert allocations(node) == [], "a container's IP outlived it"


def allocations(node: Daemon) -> list[dict[str, Any]]:
    proc = node.moorctl("ips", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def held(node: Daemon, ip: str) -> dict[str, Any] | None:
    return next((a for a in allocations(node) if a["ip"] == ip), None)


def seen(output: str) -> tuple[str, str]:
    """(eth0's address, the default gateway) from a container's `ip addr` + `ip route`."""
    addr = re.search(r"inet (\S+)", output)
    gateway = re.search(r"^default via (\S+)", output, re.M)
    assert addr and gateway, output
    return addr.group(1), gateway.group(1)


def started(p: pm.Podman, *run_args: str) -> tuple[str, str]:
    """`podman run -d RUN_ARGS` a server; (its container ID, what it printed about its network)."""
    cid = p.ok("run", "-d", *run_args, pm.IMAGE, "sh", "-c", SERVE).strip()
    deadline = time.monotonic() + 10
    while "serving" not in (logs := p.ok("logs", cid)):
        assert time.monotonic() < deadline, logs
        time.sleep(0.05)
    return cid, logs


def connect(p: pm.Podman, client: str, ip: str) -> tuple[str, str]:
    """From inside container `client`, a TCP connection to the server at `ip`: (the server's
    local address, the peer address it saw)."""
    script = (f"for i in 1 2 3 4 5 6 7 8 9 10; do echo hi | nc -w 2 {ip} {PORT} && exit 0; "
              "sleep 0.2; done; exit 1")  # fmt: skip
    out = p.ok("exec", client, "sh", "-c", script)
    match = re.search(r"(\d+\.\d+\.\d+\.\d+):\d+\s+(?:::ffff:)?(\d+\.\d+\.\d+\.\d+):\d+", out)
    assert match, out
    return match.group(1), match.group(2)


def calls_of(p: pm.Podman, cid: str, command: str) -> list[tuple[dict[str, str], dict]]:
    return [
        (env, stdin)
        for env, stdin in p.calls()
        if env.get("CNI_CONTAINERID") == cid and env.get("CNI_COMMAND") == command
    ]


def test_run_with_ip_gets_the_fixed_ip_and_talks_to_a_plain_container_both_ways(
    containers: pm.Podman, node: Daemon
) -> None:
    p = containers
    db_id, db_saw = started(p, "--name", "mpd-db", "--network", NET_NAME, "--ip", FIXED_IP)
    assert seen(db_saw) == (f"{FIXED_IP}/32", "169.254.1.1"), db_saw
    assert re.search(r"^169\.254\.1\.1 dev eth0 scope link", db_saw, re.M), db_saw

    # No --name: podman generates one such as "elegant_hopper" and sends it as K8S_POD_NAME.
    web_id, web_saw = started(p, "--network", NET_NAME)
    web_name = p.inspect(web_id)["Name"]
    web_cidr, web_gw = seen(web_saw)
    subnet = node.status()["subnets"][0]
    assert web_cidr.endswith("/24") and web_gw == subnet["gateway"], web_saw
    web_ip = web_cidr.split("/")[0]
    assert web_ip.startswith(subnet["subnet"].rsplit(".", 1)[0] + "."), (web_ip, subnet)

    # Both ways, unNATed: each server sees the other container's own address.
    assert connect(p, web_id, FIXED_IP) == (FIXED_IP, web_ip)
    assert connect(p, "mpd-db", web_ip) == (web_ip, FIXED_IP)

    # moor's view and the host's: db holds the fixed IP under its podman identity, routed as a
    # /32 to its host veth; the plain container holds an ordinary IP of the node's subnet.
    db = held(node, FIXED_IP)
    assert db and db["containerID"] == db_id and db["pod"] == "mpd-db", db
    assert db["netns"] == p.inspect("mpd-db")["NetworkSettings"]["SandboxKey"]
    (route,) = oracle.ip_json("route", "show", f"{FIXED_IP}/32")
    assert (route["dev"], route["protocol"]) == (db["hostVeth"], "109"), route
    web = held(node, web_ip)
    assert web and web["containerID"] == web_id and web["pod"] == web_name, web

    # What podman 4.3 sent: the one --ip as CNI_ARGS IP=, the container name as K8S_POD_NAME, no
    # runtimeConfig (despite the declared capability); DEL later carries the ADD's result.
    ((env, stdin),) = calls_of(p, db_id, "ADD")
    assert env["CNI_ARGS"] == f"IgnoreUnknown=1;K8S_POD_NAME=mpd-db;IP={FIXED_IP}", env
    assert "runtimeConfig" not in stdin and stdin["capabilities"] == {"ips": True}, stdin
    ((env, _),) = calls_of(p, web_id, "ADD")
    assert env["CNI_ARGS"] == f"IgnoreUnknown=1;K8S_POD_NAME={web_name}", env

    p.ok("rm", "--force", "--time", "0", "mpd-db", web_id)
    ((_, del_stdin),) = calls_of(p, db_id, "DEL")
    assert del_stdin["prevResult"]["ips"][0]["address"] == f"{FIXED_IP}/32", del_stdin


def test_a_held_ip_is_refused_to_a_second_container_and_freed_by_rm(
    containers: pm.Podman, node: Daemon
) -> None:
    p = containers
    db_id, _ = started(p, "--name", "mpd-db", "--network", NET_NAME, "--ip", FIXED_IP)
    db = held(node, FIXED_IP)
    assert db and db["containerID"] == db_id, db
    db_netns = p.inspect("mpd-db")["NetworkSettings"]["SandboxKey"]

    # A second container asking for it: podman fails with moor's message (code 105's text; libcni
    # passes the message on, not the code), and nothing of it stays.
    second = p("run", "--rm", "--network", NET_NAME, "--ip", FIXED_IP, "--name", "mpd-second",
               pm.IMAGE, "true")  # fmt: skip
    assert second.returncode != 0
    assert re.search(
        rf"cni plugin moor failed: fixed IP unavailable: {re.escape(FIXED_IP)} is held by mpd-db",
        second.stderr,
    ), second.stderr
    assert p.ok("ps", "--all", "--format", "{{.Names}}").split() == ["mpd-db"]
    # podman ran DEL for the failed container: it freed nothing of db's.
    assert [e["CNI_ARGS"] for e, _ in p.calls() if e["CNI_COMMAND"] == "DEL"][-1:] == [
        f"IgnoreUnknown=1;K8S_POD_NAME=mpd-second;IP={FIXED_IP}"
    ]
    assert held(node, FIXED_IP) == db
    (route,) = oracle.ip_json("route", "show", f"{FIXED_IP}/32")
    assert route["dev"] == db["hostVeth"], route

    # rm -f runs DEL: the IP, its route and the netns are gone, and a new container takes the IP.
    p.ok("rm", "--force", "--time", "0", "mpd-db")
    assert held(node, FIXED_IP) is None
    assert oracle.ip_json("route", "show", f"{FIXED_IP}/32") == []
    assert oracle.gone(db["hostVeth"]) and not Path(db_netns).exists()
    again = p.ok("run", "--rm", "--network", NET_NAME, "--ip", FIXED_IP, "--name", "mpd-again",
                 pm.IMAGE, "sh", "-c", SHOW)  # fmt: skip
    assert seen(again) == (f"{FIXED_IP}/32", "169.254.1.1"), again


def test_a_container_that_exits_on_its_own_frees_its_ip_before_rm(
    containers: pm.Podman, node: Daemon
) -> None:
    """No `podman rm`: the `podman container cleanup` that conmon runs at exit does the DEL."""
    p = containers
    cid = p.ok("run", "-d", "--network", NET_NAME, "--ip", FIXED_IP, "--name", "mpd-brief",
               pm.IMAGE, "sleep", "1").strip()  # fmt: skip
    deadline = time.monotonic() + 15
    while held(node, FIXED_IP) is not None or not calls_of(p, cid, "DEL"):
        assert time.monotonic() < deadline, (held(node, FIXED_IP), p.calls()[-2:])
        time.sleep(0.1)
    assert p.inspect(cid)["State"]["Status"] == "exited"
    assert oracle.ip_json("route", "show", f"{FIXED_IP}/32") == []


def test_two_ips_arrive_as_runtime_config_and_are_refused(
    containers: pm.Podman, node: Daemon
) -> None:
    """podman puts two or more static IPs of one network into runtimeConfig.ips; moor takes one."""
    p = containers
    proc = p("run", "--rm", "--network", f"{NET_NAME}:ip={FIXED_IP},ip={OTHER_IP}",
             "--name", "mpd-two", pm.IMAGE, "true")  # fmt: skip
    assert proc.returncode != 0
    assert "moor takes exactly one requested IP" in proc.stderr, proc.stderr
    add = [s for e, s in p.calls() if e["CNI_COMMAND"] == "ADD" and "mpd-two" in e["CNI_ARGS"]]
    assert [s.get("runtimeConfig") for s in add] == [{"ips": [FIXED_IP, OTHER_IP]}], add
    assert p.ok("ps", "--all", "--quiet") == ""
