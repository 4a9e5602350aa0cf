"""Issue 8: several moor-ipamd nodes on one real etcd, correct under concurrency.

Five daemons (nodes `mcl1`..`mcl5`, each with its own sockets and state dir) share one etcd under a
key prefix of their own and each lease a distinct subnet. 500 allocations fired concurrently over
gRPC across them give 500 distinct IPs, each inside its node's subnet, and exactly 500 IP records
in etcd, each naming its node. A daemon killed and restarted keeps its subnet and its pods' IPs,
even when its store lease expired meanwhile (its local state file names the subnet). Release and
GC leave nothing allocated. A node that finds the cluster network full exits with one clear line.

Every test uses its own key prefix on the session's etcd; no test creates a netns or a bridge (the
daemons are driven over gRPC only), and every daemon is stopped and cleaned up even on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from tests.conftest import require
from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import Daemon

pytestmark = pytest.mark.root

NETWORK = "10.239.0.0/16"
NET = "mcl"  # the CNI network name of every allocation here
NODES = [f"mcl{i}" for i in range(1, 6)]
PER_NODE = 100
_run_id = secrets.token_hex(3)


def unique_prefix(tag: str) -> str:
    return f"/mcl-{_run_id}-{tag}"


def node_daemon(workdir: Path, name: str, etcd: EtcdServer, prefix: str, **kw: object) -> Daemon:
    bridge = f"mclbr{name.removeprefix('mcl')}"
    return Daemon(
        workdir=workdir / name,
        name=name,
        network=kw.pop("network", NETWORK),  # type: ignore[arg-type]
        bridge=bridge,
        store_url=etcd.url,
        key_prefix=prefix,
        **kw,  # type: ignore[arg-type]
    )


def start_all(daemons: list[Daemon]) -> dict[str, BaseException]:
    """Start the daemons in parallel; the start errors by node name (a failed one is stopped)."""
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(len(daemons)) as pool:
        futures = {d.name: pool.submit(d.start) for d in daemons}
    for name, fut in futures.items():
        if fut.exception() is not None:
            errors[name] = fut.exception()  # type: ignore[assignment]
    return errors


@contextlib.contextmanager
def cleanup(daemons: list[Daemon]) -> Iterator[list[Daemon]]:
    """Stop every daemon in `daemons` (the list may grow inside the block) and remove its traces."""
    try:
        yield daemons
    finally:
        with ThreadPoolExecutor(max(1, len(daemons))) as pool:
            list(pool.map(lambda d: d.cleanup_host(), daemons))


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    require(os.geteuid() == 0, "needs root to run moor-ipamd's datapath")
    return etcd_server


# ---- gRPC ---------------------------------------------------------------------------------------


def stub(d: Daemon) -> ipam_pb2_grpc.IpamStub:
    return ipam_pb2_grpc.IpamStub(grpc.insecure_channel(f"unix:{d.grpc_socket}"))


def wait_ready(d: Daemon, timeout: float = 15.0) -> ipam_pb2.StatusResponse:
    """Status once the daemon answers ready (a SIGKILLed daemon leaves stale socket files behind,
    so the harness's socket-exists check is not enough after a crash)."""
    deadline = time.monotonic() + timeout
    while True:
        assert d.proc is not None and d.proc.poll() is None, d.log_path.read_text()[-3000:]
        try:
            status = stub(d).Status(ipam_pb2.StatusRequest(), timeout=2)
            if status.ready:
                return status
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"{d.name} not ready: {d.log_path.read_text()[-3000:]}"
        time.sleep(0.1)


def owner(node: str, i: int) -> ipam_pb2.Owner:
    return ipam_pb2.Owner(
        network=NET,
        container_id=f"{node}-c{i:03d}",
        ifname="eth0",
        pod_namespace="mcl",
        pod_name=f"{node}-pod-{i:03d}",
        pod_uid=f"uid-{node}-{i:03d}",
    )


def handle(o: ipam_pb2.Owner) -> ipam_pb2.Handle:
    return ipam_pb2.Handle(network=o.network, container_id=o.container_id, ifname=o.ifname)


def subnet_of(status: ipam_pb2.StatusResponse) -> ipaddress.IPv4Network:
    assert len(status.subnets) == 1, status
    return ipaddress.IPv4Network(status.subnets[0].subnet)


# ---- the store, read directly -------------------------------------------------------------------


def records(etcd: EtcdServer, prefix: str, part: str) -> dict[str, dict]:
    """`<prefix>/<part>/...` keys and their JSON values (handles' values are plain IP strings)."""
    store = open_store(etcd.url)
    try:
        items, _ = store.list_prefix(f"{prefix}/{part}/")
    finally:
        store.close()
    out = {}
    for kv in items:
        try:
            out[kv.key] = json.loads(kv.value)
        except ValueError:
            out[kv.key] = {"raw": kv.value.decode()}
    return out


def etcdctl_keys(etcd: EtcdServer, key_prefix: str) -> list[str]:
    out = etcd.etcdctl("get", key_prefix, "--prefix", "--keys-only")
    return [line for line in out.splitlines() if line.strip()]


def subnet_leases(etcd: EtcdServer, prefix: str) -> dict[ipaddress.IPv4Network, str]:
    keys = Keys(prefix)
    out = {}
    for key, value in records(etcd, prefix, "subnets").items():
        subnet = keys.parse_subnet(key)
        assert subnet is not None, key
        out[subnet] = value["node"]
    return out


# ---- tests --------------------------------------------------------------------------------------


def test_five_nodes_500_concurrent_allocations_restart_release_gc(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    prefix = unique_prefix("five")
    keys = Keys(prefix)
    with cleanup([node_daemon(tmp_path, n, etcd, prefix) for n in NODES]) as daemons:
        assert start_all(daemons) == {}
        by_name = {d.name: d for d in daemons}
        statuses = {d.name: wait_ready(d) for d in daemons}
        subnets = {name: subnet_of(s) for name, s in statuses.items()}
        assert len(set(subnets.values())) == 5, subnets
        assert all(s.subnet_of(ipaddress.IPv4Network(NETWORK)) for s in subnets.values())
        assert subnet_leases(etcd, prefix) == {s: n for n, s in subnets.items()}

        # 500 allocations, 100 per node, from 50 threads interleaved across the five daemons.
        stubs = {d.name: stub(d) for d in daemons}
        jobs = [(n, i) for i in range(PER_NODE) for n in NODES]

        def allocate(job: tuple[str, int]) -> tuple[str, int, ipam_pb2.AllocateResponse]:
            n, i = job
            reply = stubs[n].Allocate(ipam_pb2.AllocateRequest(owner=owner(n, i)), timeout=30)
            return n, i, reply

        started = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(allocate, jobs))
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"500 allocations took {elapsed:.1f} s"

        ips: dict[tuple[str, int], ipaddress.IPv4Address] = {}
        for n, i, reply in replies:
            assert not reply.existed
            iface = ipaddress.IPv4Interface(reply.allocation.ip)
            assert iface.network == subnets[n], (n, reply.allocation)
            assert reply.allocation.node == n
            assert reply.allocation.owner.container_id == f"{n}-c{i:03d}"
            assert iface.ip not in (subnets[n].network_address + 1, subnets[n].broadcast_address)
            ips[(n, i)] = iface.ip
        assert len(set(ips.values())) == 500, "duplicate IPs handed out"

        # Every daemon's own view agrees.
        for d in daemons:
            status = stub(d).Status(ipam_pb2.StatusRequest(), timeout=5)
            assert status.subnets[0].used == PER_NODE
            assert {ipaddress.ip_interface(a.ip).ip for a in status.allocations} == {
                ips[(d.name, i)] for i in range(PER_NODE)
            }

        # So does etcd: exactly 500 IP records and 500 handles, each naming its node.
        ip_keys = etcdctl_keys(etcd, f"{prefix}/ips/")
        assert len(ip_keys) == 500
        stored = records(etcd, prefix, "ips")
        assert sorted(stored) == sorted(ip_keys)
        by_ip = {ip: key for key, ip in ((k, keys.parse_ip(k)) for k in stored)}
        for (n, i), ip in ips.items():
            rec = stored[by_ip[ip]]
            assert rec["node"] == n and rec["subnet"] == str(subnets[n])
            assert (rec["network"], rec["containerID"], rec["ifname"]) == (
                NET,
                f"{n}-c{i:03d}",
                "eth0",
            )
            assert rec["pod"] == {
                "namespace": "mcl",
                "name": f"{n}-pod-{i:03d}",
                "uid": f"uid-{n}-{i:03d}",
            }
        handles = records(etcd, prefix, "handles")
        assert len(handles) == 500
        assert {h["raw"] for h in handles.values()} == {str(ip) for ip in ips.values()}

        # A crash (SIGKILL: no clean shutdown, stale sockets) and a new daemon on the same state.
        crashed = by_name["mcl3"]
        assert crashed.proc is not None
        crashed.proc.kill()
        crashed.proc.wait(10)
        again = node_daemon(tmp_path, "mcl3", etcd, prefix)
        daemons.append(again)
        again.start()
        status = wait_ready(again)
        assert subnet_of(status) == subnets["mcl3"]
        assert {ipaddress.ip_interface(a.ip).ip for a in status.allocations} == {
            ips[("mcl3", i)] for i in range(PER_NODE)
        }
        s3 = stub(again)
        for i in range(PER_NODE):
            check = s3.Check(ipam_pb2.CheckRequest(handle=handle(owner("mcl3", i))), timeout=5)
            assert (
                check.found and ipaddress.ip_interface(check.allocation.ip).ip == ips[("mcl3", i)]
            )
        repeat = s3.Allocate(ipam_pb2.AllocateRequest(owner=owner("mcl3", 7)), timeout=5)
        assert (
            repeat.existed and ipaddress.ip_interface(repeat.allocation.ip).ip == ips[("mcl3", 7)]
        )
        # A new pod on the restarted node gets a fresh IP of its subnet, not one of the old ones.
        extra = s3.Allocate(ipam_pb2.AllocateRequest(owner=owner("mcl3", 500)), timeout=5)
        assert not extra.existed
        extra_ip = ipaddress.ip_interface(extra.allocation.ip).ip
        assert extra_ip in subnets["mcl3"] and extra_ip not in set(ips.values())
        ips[("mcl3", 500)] = extra_ip
        stubs["mcl3"] = s3
        by_name["mcl3"] = again
        assert subnet_leases(etcd, prefix) == {s: n for n, s in subnets.items()}

        # 20 concurrent Allocates of one new owner: one claim, 19 answers of the same IP.
        with ThreadPoolExecutor(20) as pool:
            same = list(pool.map(lambda _: allocate(("mcl1", 600))[2], range(20)))
        assert sum(not r.existed for r in same) == 1
        assert len({r.allocation.ip for r in same}) == 1
        ips[("mcl1", 600)] = ipaddress.ip_interface(same[0].allocation.ip).ip
        assert len(set(ips.values())) == len(ips) == 502

        # Release all but the last 4 of each node concurrently; GC (an empty valid set) takes
        # the rest. A second release and a second GC find nothing.
        leftover = {(n, i) for n in NODES for i in range(PER_NODE - 4, PER_NODE)}
        leftover |= {("mcl3", 500), ("mcl1", 600)}

        def release(job: tuple[str, int]) -> tuple[tuple[str, int], ipam_pb2.ReleaseResponse]:
            n, i = job
            h = handle(owner(n, i))
            return job, stubs[n].Release(ipam_pb2.ReleaseRequest(handle=h), timeout=30)

        with ThreadPoolExecutor(50) as pool:
            released = list(pool.map(release, [j for j in ips if j not in leftover]))
        for job, reply in released:
            assert reply.released and ipaddress.ip_address(reply.ip) == ips[job]
        gc_freed: set[ipaddress.IPv4Address] = set()
        for n in NODES:
            reply = stubs[n].GC(ipam_pb2.GCRequest(network=NET), timeout=30)
            freed = {ipaddress.ip_address(ip) for ip in reply.released}
            assert freed == {ips[j] for j in leftover if j[0] == n}
            gc_freed |= freed
        assert len(gc_freed) == len(leftover)
        _, again_reply = release(("mcl1", 0))
        assert not again_reply.released
        for n in NODES:
            assert stubs[n].GC(ipam_pb2.GCRequest(network=NET), timeout=30).released == []
            status = stubs[n].Status(ipam_pb2.StatusRequest(), timeout=5)
            assert list(status.allocations) == [] and status.subnets[0].used == 0

        # Nothing is left allocated in etcd; the cooldown records of all 502 IPs are.
        assert etcdctl_keys(etcd, f"{prefix}/ips/") == []
        assert etcdctl_keys(etcd, f"{prefix}/handles/") == []
        cooling = records(etcd, prefix, "released")
        assert {keys.parse_released(k) for k in cooling} == set(ips.values())
        assert subnet_leases(etcd, prefix) == {s: n for n, s in subnets.items()}


def test_node_whose_lease_expired_gets_its_subnet_back_from_its_state_file(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """mcl1 then mcl2 lease the first two subnets; both stop and their leases expire. mcl2 comes
    back first: the lowest free subnet is mcl1's, but mcl2's state file names its own."""
    prefix = unique_prefix("ttl")
    ttl = ["--lease-ttl", "2"]
    with cleanup([]) as daemons:
        first = {}
        for name in ("mcl1", "mcl2"):
            d = node_daemon(tmp_path, name, etcd, prefix, extra_args=ttl)
            daemons.append(d)
            d.start()
            first[name] = subnet_of(wait_ready(d))
            reply = stub(d).Allocate(ipam_pb2.AllocateRequest(owner=owner(name, 1)), timeout=5)
            first[f"{name}-ip"] = ipaddress.ip_interface(reply.allocation.ip).ip
        assert [first["mcl1"], first["mcl2"]] == [
            ipaddress.IPv4Network("10.239.0.0/24"),
            ipaddress.IPv4Network("10.239.1.0/24"),
        ]
        state = json.loads((tmp_path / "mcl2" / "state" / "lease-mcl2.json").read_text())
        assert state["subnets"] == ["10.239.1.0/24"]
        for d in daemons:
            d.stop()

        deadline = time.monotonic() + 10
        while subnet_leases(etcd, prefix):
            assert time.monotonic() < deadline, "the subnet leases did not expire"
            time.sleep(0.2)
        assert len(records(etcd, prefix, "ips")) == 2  # allocations are not on the lease

        for name in ("mcl2", "mcl1"):
            d = node_daemon(tmp_path, name, etcd, prefix, extra_args=ttl)
            daemons.append(d)
            d.start()
            status = wait_ready(d)
            assert subnet_of(status) == first[name], name
            check = stub(d).Check(ipam_pb2.CheckRequest(handle=handle(owner(name, 1))), timeout=5)
            assert check.found
            assert ipaddress.ip_interface(check.allocation.ip).ip == first[f"{name}-ip"]
        assert subnet_leases(etcd, prefix) == {first["mcl1"]: "mcl1", first["mcl2"]: "mcl2"}
        # The restarted node renews its new lease: the subnets outlive several TTLs.
        time.sleep(3)
        assert subnet_leases(etcd, prefix) == {first["mcl1"]: "mcl1", first["mcl2"]: "mcl2"}
        for d in daemons[2:]:
            release = ipam_pb2.ReleaseRequest(handle=handle(owner(d.name, 1)))
            assert stub(d).Release(release, timeout=5).released


def granted_leases(etcd: EtcdServer, ttl: int) -> int:
    """How many etcd leases were granted with this TTL (a TTL only this test uses)."""
    count = 0
    for line in etcd.etcdctl("lease", "list").splitlines()[1:]:
        lease = line.strip()
        if lease and f"granted with TTL({ttl}s)" in etcd.etcdctl("lease", "timetolive", lease):
            count += 1
    return count


def test_fifth_node_on_a_network_of_four_subnets_fails_clearly(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """10.239.240.0/22 in /24s is 4 subnets: of 5 nodes started at once, 4 get one each and the
    5th exits 1 with one clear line, without taking anything from the 4."""
    prefix = unique_prefix("full")
    small = "10.239.240.0/22"
    ttl = 7777  # marks this test's etcd leases
    extra = ["--lease-ttl", str(ttl)]
    with cleanup(
        [node_daemon(tmp_path, n, etcd, prefix, network=small, extra_args=extra) for n in NODES]
    ) as daemons:
        errors = start_all(daemons)
        assert len(errors) == 1, errors
        loser_name = next(iter(errors))
        loser = next(d for d in daemons if d.name == loser_name)
        assert loser.proc is not None and loser.proc.returncode == 1
        log = loser.log_path.read_text()
        assert re.search(r"start-up failed: no free /24 subnet left in 10\.239\.240\.0/22", log)
        assert not os.path.exists(loser.grpc_socket)

        winners = [d for d in daemons if d is not loser]
        subnets = {d.name: subnet_of(wait_ready(d)) for d in winners}
        assert sorted(subnets.values()) == list(ipaddress.IPv4Network(small).subnets(new_prefix=24))
        assert subnet_leases(etcd, prefix) == {s: n for n, s in subnets.items()}

        # The winners still serve; the loser, started again, fails the same way.
        for d in winners:
            reply = stub(d).Allocate(ipam_pb2.AllocateRequest(owner=owner(d.name, 1)), timeout=5)
            assert ipaddress.ip_interface(reply.allocation.ip).ip in subnets[d.name]
        with pytest.raises(RuntimeError, match="no free /24 subnet left in 10.239.240.0/22"):
            loser.start()
        assert loser.proc.returncode == 1
        assert subnet_leases(etcd, prefix) == {s: n for n, s in subnets.items()}


def test_a_node_that_fails_to_start_leaves_no_etcd_lease_behind(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """A node that cannot get a subnet (the network is full) exits; each attempt must not leave a
    granted etcd lease behind, or a crash-looping node piles up leases for a whole TTL."""
    prefix = unique_prefix("leak")
    ttl = 7778
    extra = ["--lease-ttl", str(ttl)]
    tiny = "10.239.250.0/24"  # two /25 subnets, both taken by mcl1 and mcl2
    with cleanup([]) as daemons:
        for name in ("mcl1", "mcl2"):
            holder = node_daemon(
                tmp_path, name, etcd, prefix, network=tiny, subnet_len=25, extra_args=extra
            )
            daemons.append(holder)
            holder.start()
            wait_ready(holder)
        assert granted_leases(etcd, ttl) == 2
        for _ in range(2):
            late = node_daemon(
                tmp_path, "mcl3", etcd, prefix, network=tiny, subnet_len=25, extra_args=extra
            )
            daemons.append(late)
            with pytest.raises(RuntimeError, match="no free /25 subnet"):
                late.start()
        assert granted_leases(etcd, ttl) == 2
