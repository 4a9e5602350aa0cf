"""Prometheus metrics (issue 8): a real moor-ipamd scraped over HTTP, and the store error counter.

The e2e tests each get their own daemon (node `mmx`, bridge `mmxbr0`, network 10.242.0.0/16) with
its metrics on a free loopback port; netns are `mmx-*`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipamd.allocator import NodeAllocator
from ipamd.config import load_config
from ipamd.errors import NoLease
from ipamd.journal import ReleaseJournal
from ipamd.leases import SubnetLeaseManager
from ipamd.metrics import Metrics
from ipamd.model import Owner
from ipamd.network_config import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.store.base import Store, StoreUnavailable
from ipamd.store.counting import CountingStore
from ipamd.store.keys import Keys
from ipamd.store.sqlite import SqliteStore
from tests.conftest import start_daemon
from tests.helpers.moor import REPO, SHIM, Daemon, ExecRuntime
from tests.helpers.moor import plugin_config as make_conf

NetnsFactory = Callable[[], tuple[str, str]]
Samples = list[tuple[str, dict[str, str], float]]


# ---- helpers ------------------------------------------------------------------------------------
def parse(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def scrape(d: Daemon) -> Samples:
    with urllib.request.urlopen(d.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels`; 0 when the series does not exist."""
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def conf(d: Daemon, version: str = "1.1.0") -> dict:
    return make_conf("mmxnet", version, d.plugin())


def raw_call(d: Daemon, command: str, stdin: bytes, **env: str) -> dict:
    """bin/moor with stdin as given (not necessarily JSON); returns its stdout parsed."""
    proc = subprocess.run(
        [str(SHIM)],
        input=stdin,
        env={"CNI_COMMAND": command, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 1, proc
    return json.loads(proc.stdout)


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    marker = request.node.get_closest_marker("daemon")
    kw = dict(marker.kwargs) if marker else {}
    d = start_daemon(tmp_path / "node", "mmx", kw.pop("network", "10.242.0.0/16"), "mmxbr0", **kw)
    yield d
    d.cleanup_host()


# ---- a real daemon ------------------------------------------------------------------------------
@pytest.mark.netns
def test_metrics_count_cni_requests_allocations_and_addresses(
    node: Daemon, netns: NetnsFactory
) -> None:
    before = scrape(node)
    (subnet,) = [s["subnet"] for s in node.status()["subnets"]]
    size = ipaddress.ip_network(subnet).num_addresses
    states = ("allocated", "free", "cooling", "reserved")
    start = {s: value(before, "moor_addresses", subnet=subnet, state=s) for s in states}
    assert start["allocated"] == 0 and start["reserved"] == 3 and sum(start.values()) == size
    assert value(before, "moor_node_subnets_held") == 1
    assert value(before, "moor_node_subnets", state="leased") == 1
    assert value(before, "moor_node_subnets", state="free") == 255  # a /16 holds 256 /24s
    assert has(before, "moor_cni_request_duration_seconds_count")
    for verb in ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"):  # initialised at zero
        assert value(before, "moor_cni_request_duration_seconds_count", verb=verb) == 0

    rt = ExecRuntime()
    c = conf(node)
    paths = [netns()[1] for _ in range(3)]
    for i, path in enumerate(paths):
        assert rt.add(c, path, f"mmx{i}").rc == 0
    assert rt.check(c, paths[0], "mmx0").rc == 0
    assert rt.delete(c, paths[2], "mmx2").rc == 0
    assert rt.call("STATUS", c).rc == 0
    # Failures: an unsupported version (1), stdin that is not JSON (6), an unknown verb (4).
    assert rt.add(make_conf("mmxnet", "0.2.0", node.plugin()), paths[2], "mmxold").code == 1
    cut = b'{"daemonSocket": "%s", "name": ' % node.cni_socket.encode()
    env = {"CNI_CONTAINERID": "mmxbad", "CNI_NETNS": paths[2], "CNI_IFNAME": "eth0"}
    assert raw_call(node, "ADD", cut, **env)["code"] == 6
    assert raw_call(node, "BOGUS", json.dumps(c).encode(), **env)["code"] == 4

    after = scrape(node)
    cni = "moor_cni_request_duration_seconds_count"
    assert value(after, cni, verb="ADD") == 5
    assert value(after, cni, verb="CHECK") == 1
    assert value(after, cni, verb="DEL") == 1
    assert value(after, cni, verb="STATUS") == 1
    assert value(after, cni, verb="other") == 1
    assert value(after, "moor_cni_request_duration_seconds_bucket", verb="ADD", le="+Inf") == 5
    assert value(after, "moor_cni_request_duration_seconds_sum", verb="ADD") > 0
    total = "moor_cni_requests_total"
    assert value(after, total, verb="ADD", code="0") == 3
    assert value(after, total, verb="ADD", code="1") == 1
    assert value(after, total, verb="ADD", code="6") == 1
    assert value(after, total, verb="other", code="4") == 1
    assert value(after, total, verb="DEL", code="0") == 1

    assert value(after, "moor_allocation_duration_seconds_count") == 3
    assert value(after, "moor_allocation_duration_seconds_sum") > 0
    for reason in ("exhausted", "unavailable", "other"):
        assert value(after, "moor_allocation_failures_total", reason=reason) == 0
    now = {s: value(after, "moor_addresses", subnet=subnet, state=s) for s in states}
    assert now["allocated"] == start["allocated"] + 2  # three ADDs, one DEL
    assert now["cooling"] == 1  # the DEL'd address waits out the 60 s cooldown
    assert sum(now.values()) == size and now["reserved"] == 3
    assert value(after, "moor_node_subnets", state="leased") >= 1
    assert value(after, "moor_store_errors_total", op="txn") == 0
    for i in range(2):
        assert rt.delete(c, paths[i], f"mmx{i}").rc == 0


@pytest.mark.netns
@pytest.mark.daemon(network="10.242.200.0/29", subnet_len=30)
def test_network_exhaustion_counts_in_metrics(node: Daemon, netns: NetnsFactory) -> None:
    """A /29 of /30s: two subnets of one pod IP each, so the third ADD finds the network full."""
    rt = ExecRuntime()
    c = conf(node)
    paths = [netns()[1] for _ in range(3)]
    assert value(scrape(node), "moor_node_subnets", state="free") == 1
    for i in range(2):
        assert rt.add(c, paths[i], f"mmxfull{i}").rc == 0
    full = rt.add(c, paths[2], "mmxfull2")
    assert full.rc == 1 and full.code == 100 and "no IP addresses available" in full.out["msg"]

    samples = scrape(node)
    assert value(samples, "moor_allocation_failures_total", reason="exhausted") == 1
    assert value(samples, "moor_allocation_failures_total", reason="other") == 0
    assert value(samples, "moor_allocation_duration_seconds_count") == 3
    assert value(samples, "moor_cni_requests_total", verb="ADD", code="100") == 1
    assert value(samples, "moor_node_subnets", state="leased") == 2
    assert value(samples, "moor_node_subnets", state="free") == 0
    assert value(samples, "moor_node_subnets_held") == 2
    for subnet in ("10.242.200.0/30", "10.242.200.4/30"):
        assert value(samples, "moor_addresses", subnet=subnet, state="allocated") == 1
        assert value(samples, "moor_addresses", subnet=subnet, state="free") == 0
        assert value(samples, "moor_addresses", subnet=subnet, state="reserved") == 3
    for i in range(2):
        assert rt.delete(c, paths[i], f"mmxfull{i}").rc == 0


@pytest.mark.root
def test_metrics_port_in_use_fails_startup_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(tmp_path / "node", "mmx", "10.242.0.0/16", "mmxbr0", metrics_port=port)
        try:
            with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                d.start()
            assert d.proc is not None and d.proc.returncode == 1
            assert not os.path.exists(d.cni_socket)
        finally:
            d.cleanup_host()


def test_bad_metrics_addr_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ipamd", "--state-dir", str(tmp_path), "--metrics-addr", "bad"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "moor-ipamd: --metrics-addr 'bad' must be HOST:PORT, e.g. 127.0.0.1:9617 or [::1]:9617"
    )
    for bad in (":9617", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "::1:9617", "[x]:1"):
        with pytest.raises(ValueError, match="--metrics-addr"):
            load_config(["--metrics-addr", bad])
    for good in ("0.0.0.0:9617", "localhost:9100", "[::1]:9617", ""):
        assert load_config(["--metrics-addr", good]).metrics_addr == good
    assert load_config([]).metrics_addr == "127.0.0.1:9617"


# ---- in process: the store wrapper and the scrape-time gauges -----------------------------------
def registry_samples(metrics: Metrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def test_counting_store_counts_errors_by_op_and_reraises(tmp_path: Path) -> None:
    metrics = Metrics()
    store = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    assert isinstance(store, Store)
    stop = threading.Event()
    events = store.watch("/mmx/", 0, stop)
    store.put("/mmx/a", b"1")
    assert next(events).key == "/mmx/a"
    assert store.get("/mmx/a") is not None
    assert value(registry_samples(metrics), "moor_store_errors_total", op="get") == 0

    store.close()
    for call in (
        lambda: store.get("/mmx/a"),
        lambda: store.get("/mmx/b"),
        lambda: store.list_prefix("/mmx/"),
        lambda: store.put("/mmx/b", b"2"),
        store.ping,
    ):
        with pytest.raises(StoreUnavailable):
            call()
    with pytest.raises(StoreUnavailable):  # raised while iterating an open watch
        next(events)
    with pytest.raises(StoreUnavailable):  # raised by the call itself
        store.watch("/mmx/", 0, stop)
    samples = registry_samples(metrics)
    assert value(samples, "moor_store_errors_total", op="get") == 2
    assert value(samples, "moor_store_errors_total", op="list_prefix") == 1
    assert value(samples, "moor_store_errors_total", op="put") == 1
    assert value(samples, "moor_store_errors_total", op="ping") == 1
    assert value(samples, "moor_store_errors_total", op="watch") == 2
    assert value(samples, "moor_store_errors_total", op="txn") == 0


def test_scrape_survives_an_unreachable_store(tmp_path: Path) -> None:
    """Allocation metrics in process; with the store gone the scrape skips only the subnet family."""
    metrics = Metrics()
    store: CountingStore = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    keys = Keys("/mmx")
    leases = SubnetLeaseManager(
        store, keys, "mmx", NetworkConfig(ipaddress.ip_network("10.242.0.0/16"), 24)
    )
    leases.ensure_network_config()
    leases.acquire()
    allocator = NodeAllocator(store, keys, "mmx", leases)
    allocator.load()
    ipam = NodeIpam(store, "mmx", leases, allocator, metrics)
    metrics.track(ipam)
    ipam.allocate(Owner("mmxnet", "mmx1", "eth0"))

    samples = registry_samples(metrics)
    assert value(samples, "moor_allocation_duration_seconds_count") == 1
    assert value(samples, "moor_addresses", subnet="10.242.0.0/24", state="allocated") == 1
    assert value(samples, "moor_node_subnets", state="leased") == 1
    assert value(samples, "moor_node_subnets", state="free") == 255

    store.close()
    with pytest.raises(StoreUnavailable):
        ipam.allocate(Owner("mmxnet", "mmx2", "eth0"))
    samples = registry_samples(metrics)
    assert value(samples, "moor_allocation_failures_total", reason="unavailable") == 1
    assert value(samples, "moor_allocation_duration_seconds_count") == 2
    assert value(samples, "moor_addresses", subnet="10.242.0.0/24", state="allocated") == 1
    assert value(samples, "moor_node_subnets_held") == 1
    assert not has(samples, "moor_node_subnets") and not has(samples, "moor_ip_conflicts")
    # this very scrape: the node subnets' listing and the address conflicts' listing
    assert value(samples, "moor_store_errors_total", op="list_prefix") == 2


@pytest.mark.skipif(
    not hasattr(NetworkConfig, "leaseable_count"), reason="no subnet min/max in NetworkConfig"
)
def test_node_subnets_free_honours_subnet_min_max_and_fixed_ranges(tmp_path: Path) -> None:
    metrics = Metrics()
    store = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    config = NetworkConfig.parse(  # type: ignore[attr-defined]
        "10.242.0.0/16",
        24,
        subnet_min="10.242.10.0/24",
        subnet_max="10.242.19.0/24",
        fixed_ranges=["10.242.12.0/23"],
    )
    keys = Keys("/mmx")
    leases = SubnetLeaseManager(store, keys, "mmx", config)
    leases.ensure_network_config()
    assert leases.acquire() == [ipaddress.ip_network("10.242.10.0/24")]
    allocator = NodeAllocator(store, keys, "mmx", leases)
    allocator.load()
    metrics.track(NodeIpam(store, "mmx", leases, allocator, metrics))
    samples = registry_samples(metrics)
    assert value(samples, "moor_node_subnets", state="leased") == 1
    assert value(samples, "moor_node_subnets", state="free") == 7  # 10..19 without 12, 13; one held
    store.close()


def test_allocation_without_a_subnet_lease_counts_as_unavailable(tmp_path: Path) -> None:
    metrics = Metrics()
    store = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    keys = Keys("/mmx")
    leases = SubnetLeaseManager(  # never acquired: the node holds no subnet
        store, keys, "mmx", NetworkConfig(ipaddress.ip_network("10.242.0.0/16"), 24)
    )
    ipam = NodeIpam(store, "mmx", leases, NodeAllocator(store, keys, "mmx", leases), metrics)
    with pytest.raises(NoLease):
        ipam.allocate(Owner("mmxnet", "mmx1", "eth0"))
    samples = registry_samples(metrics)
    assert value(samples, "moor_allocation_failures_total", reason="unavailable") == 1
    assert value(samples, "moor_allocation_duration_seconds_count") == 1
    store.close()


def test_the_del_spool_gauge_counts_pending_and_failed_entries(tmp_path: Path) -> None:
    """Entries the shim spooled (not its `.tmp-` files) and those a replay moved to failed/."""
    metrics = Metrics()
    spool = tmp_path / "spool"
    metrics.track_spool(str(spool))
    samples = registry_samples(metrics)  # nothing was ever spooled: no directory at all
    assert has(samples, "moor_del_spool_entries")
    assert value(samples, "moor_del_spool_entries", state="pending") == 0
    assert value(samples, "moor_del_spool_entries", state="failed") == 0
    (spool / "failed").mkdir(parents=True)
    for name in ("00000000000000000001-7", "00000000000000000002-8", ".tmp-00000000000000000003-9"):
        (spool / name).write_bytes(b"MOOR1\0")
    (spool / "failed" / "00000000000000000000-6").write_bytes(b"junk")
    samples = registry_samples(metrics)
    assert value(samples, "moor_del_spool_entries", state="pending") == 2
    assert value(samples, "moor_del_spool_entries", state="failed") == 1
    assert not has(samples, "moor_release_journal_entries")  # no node IPAM tracked yet


def test_the_release_journal_gauge_counts_releases_waiting_for_the_store(tmp_path: Path) -> None:
    """A release while the store is unreachable is journaled: the gauge shows it."""
    metrics = Metrics()
    store = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    keys = Keys("/mmx")
    leases = SubnetLeaseManager(
        store, keys, "mmx", NetworkConfig(ipaddress.ip_network("10.242.0.0/16"), 24)
    )
    leases.ensure_network_config()
    leases.acquire()
    allocator = NodeAllocator(store, keys, "mmx", leases)
    allocator.load()
    journal = ReleaseJournal(str(tmp_path / "releases-mmx.jsonl"))
    ipam = NodeIpam(store, "mmx", leases, allocator, metrics, journal=journal)
    metrics.track(ipam)
    for cid in ("mmx1", "mmx2"):
        ipam.allocate(Owner("mmxnet", cid, "eth0"))
    assert value(registry_samples(metrics), "moor_release_journal_entries") == 0
    assert has(registry_samples(metrics), "moor_release_journal_entries")
    store.close()
    for cid in ("mmx1", "mmx2"):
        ipam.release("mmxnet", cid, "eth0")
    assert len(journal) == 2
    assert value(registry_samples(metrics), "moor_release_journal_entries") == 2
