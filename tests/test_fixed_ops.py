"""Issue 14, the operator's surface of fixed IPs: reservations, sticky rules, `ips --fixed`,
`status`, the audit trail, the `moor_fixed_ips` gauge and the daemon's retention sweep.

Pure logic (audit lines, durations, the actor) runs in process; `FixedOps` runs on a real store,
SQLite and etcd (two sweepers forced to decide on the same read end a retention once). The
end-to-end tests drive real moor-ipamd processes (nodes `mfo1`, `mfo2`, bridges `mfobr0`,
`mfobr1`, netns `mfo-*`, started with `--network ""` and given 10.206.0.0/16 with the fixed range
10.206.250.0/24 by `moorctl network init`) with moorctl as a subprocess and pods through the exec
path: a reserved IP and a sticky pod's retention go through real CNI ADD and DEL.
`test_ips_fixed_status_and_the_gauge` writes bindings through `FixedBindings` on the daemon's
SQLite file instead, to have every state at once (one last held on a node that does not run).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipamd.audit import line
from ipamd.cli_fixed import actor, duration, parse_duration
from ipamd.cli_output import CliError
from ipamd.errors import NotFound
from ipamd.fixed.bindings import FixedBindings, FixedIPUnavailable
from ipamd.fixed.model import REQUEST, STICKY, Identity
from ipamd.fixed_ops import Actor, FixedOps
from ipamd.metrics import Metrics
from ipamd.model import Owner
from ipamd.network_config import NetworkConfig
from ipamd.ops import ClusterOps
from ipamd.store.base import Store
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from ipamd.store.sqlite import SqliteStore
from tests.conftest import start_daemon
from tests.helpers.clock import FakeClock
from tests.helpers.moor import REPO, Daemon, ExecRuntime, delete_netns, make_netns, plugin_config

NETWORK = "10.206.0.0/16"
FIXED = "10.206.250.0/24"
IP7, IP8, IP9 = "10.206.250.7", "10.206.250.8", "10.206.250.9"
HOST = socket.gethostname()
ALICE = f"alice@{HOST}"
_run = secrets.token_hex(3)


# ---- pure logic -----------------------------------------------------------------------------
def test_an_audit_record_is_one_line_whatever_the_input() -> None:
    assert line("reserve", ip=ipaddress.ip_address(IP7), pod="prod/db-0", by=ALICE, uid=0) == (
        f"AUDIT reserve ip={IP7} pod=prod/db-0 by={ALICE} uid=0"
    )
    hostile = line("sticky-add", regex='db-[0-9]+ "x"\nAUDIT fake=1', by="", uid=None)
    assert "\n" not in hostile and hostile.count("AUDIT") == 2  # the forged one is inside a string
    assert hostile == 'AUDIT sticky-add regex="db-[0-9]+ \\"x\\"\\nAUDIT fake=1" by=""'
    assert line("x", v="a=b", w="ü") == 'AUDIT x v="a=b" w="\\u00fc"'
    with pytest.raises(ValueError, match="lower-case words"):
        line("Reserve now")


def test_the_audit_trail_survives_a_quiet_log_level() -> None:
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)  # what `--log-level warning` does
    try:
        assert logging.getLogger("moor.audit").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before)


def test_durations() -> None:
    for text, seconds, shown in (("90s", 90, "1m30s"), ("30m", 1800, "30m"),
                                 ("24h", 86400, "24h"), ("7d", 604800, "7d")):  # fmt: skip
        assert parse_duration(text) == seconds
        assert duration(seconds) == shown
    assert parse_duration("1h30m") == 5400 and duration(5400) == "1h30m"
    assert duration(90000) == "25h" and duration(3 * 86400 + 60) == "3d1m"
    for bad in ("", "5", "1w", "-3h", "1.5h", "h", "0s", "9" * 40 + "s", "24 h"):
        with pytest.raises(CliError, match="--retain"):
            parse_duration(bad)


def test_the_actor_is_the_sudo_user_at_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert actor() == ALICE
    monkeypatch.setenv("SUDO_USER", "mal ory\n")
    assert actor() == f"mal?ory?@{HOST}"
    monkeypatch.delenv("SUDO_USER")
    assert actor().endswith(f"@{HOST}") and "@" not in actor()[: -len(HOST) - 1]
    assert Actor.claimed("x" * 300 + "\n").name == "x" * 128
    assert Actor.claimed("\tevil\nAUDIT", 0) == Actor("?evil?AUDIT", 0)
    assert Actor.claimed(None).name == "unknown"


# ---- FixedOps on a real store ---------------------------------------------------------------
@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = open_store(f"sqlite://{tmp_path}/fixed.db")
    else:
        s = open_store(request.getfixturevalue("etcd_server").url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys() -> Keys:
    return Keys(f"/mfo-{secrets.token_hex(4)}")


def ops_on(store: Store, keys: Keys, clock: FakeClock, node: str = "mfo1") -> FixedOps:
    cluster = ClusterOps(store, keys)
    return FixedOps(store, keys, network=cluster.network, node=node, cooldown=60, clock=clock)


def init_network(store: Store, keys: Keys, *fixed: str) -> None:
    config = NetworkConfig.parse(NETWORK, 24, fixed_ranges=list(fixed))
    assert ClusterOps(store, keys).init_network(config)


def audited(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "moor.audit"]


def owner(name: str, uid: str, cid: str, namespace: str = "prod") -> Owner:
    return Owner("mfonet", cid, "eth0", namespace, name, uid)


ALICE_0 = Actor(ALICE, 0)


def test_reservations_in_process(
    store: Store, keys: Keys, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moor.audit")
    ops = ops_on(store, keys, clock)
    with pytest.raises(NotFound, match="moorctl network init"):
        ops.reserve("prod/db-0", IP7, ALICE_0)
    init_network(store, keys)  # without a fixed range
    with pytest.raises(FixedIPUnavailable, match="the network has no fixed ranges"):
        ops.reserve("prod/db-0", IP7, ALICE_0)

    store2, keys2 = store, Keys(keys.prefix + "b")
    init_network(store2, keys2, FIXED)
    ops = ops_on(store2, keys2, clock)
    reserved = ops.reserve(" prod/db-0 ", IP7, ALICE_0)
    assert (reserved.state, reserved.reserved_by, reserved.reserved_at) == (
        "reserved",
        ALICE,
        clock(),
    )
    assert audited(caplog) == [
        f"AUDIT reserve ip={IP7} pod=prod/db-0 state=reserved by={ALICE} uid=0"
    ]
    with pytest.raises(FixedIPUnavailable, match=f"{IP7} is reserved by prod/db-0"):
        ops.reserve("prod/db-1", IP7, ALICE_0)
    with pytest.raises(FixedIPUnavailable, match="not in a fixed range"):
        ops.reserve("prod/db-1", "10.206.1.7", ALICE_0)
    for bad_pod, needle in (("Prod/db-1", "pod namespace 'Prod'"), ("prod/", "NAMESPACE/POD"),
                            ("prod/db_1", "pod name 'db_1'")):  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            ops.reserve(bad_pod, IP8, ALICE_0)
    with pytest.raises(ValueError, match="'10.206.250.x' is not an IP address"):
        ops.reserve("prod/db-1", "10.206.250.x", ALICE_0)

    # A pod takes its reserved IP; unreserving it then leaves the pod its IP until its DEL.
    ops.bindings.claim(ipaddress.ip_address(IP7), owner("db-0", "u1", "c1"), "mfo2",
                       source="reservation")  # fmt: skip
    listed = ops.list(source="reservation")
    assert [(str(b.ip), b.identity.text, b.state, b.node) for b in listed] == [
        (IP7, "prod/db-0", "held", "mfo2")
    ]
    with pytest.raises(NotFound, match="prod/db-1 has no reservation"):
        ops.unreserve(ALICE_0, pod="prod/db-1")
    with pytest.raises(NotFound, match=f"{IP8} is not reserved"):
        ops.unreserve(ALICE_0, ip=IP8)
    done = ops.unreserve(Actor("bob@x", 0), pod="prod/db-0")
    assert (done.binding.state, done.cooldown) == ("held", 0.0)
    assert ops.bindings.get(ipaddress.ip_address(IP7)).source == REQUEST  # type: ignore[union-attr]
    assert (
        audited(caplog)[-1] == f"AUDIT unreserve ip={IP7} pod=prod/db-0 state=held by=bob@x uid=0"
    )
    with pytest.raises(NotFound, match=r"its fixed IP 10.206.250.7 is request, held"):
        ops.unreserve(ALICE_0, pod="prod/db-0")

    # A reservation nobody holds ends at once; the IP cools down.
    ops.reserve("prod/web-0", IP8, ALICE_0)
    done = ops.unreserve(ALICE_0, ip=IP8)
    assert (done.binding.state, done.cooldown) == ("reserved", 60)
    with pytest.raises(FixedIPUnavailable, match="cools down"):
        ops.reserve("prod/web-0", IP8, ALICE_0)
    with pytest.raises(ValueError, match="give the IP or the NAMESPACE/POD"):
        ops.unreserve(ALICE_0)


def test_sticky_rules_in_process(
    store: Store, keys: Keys, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moor.audit")
    ops = ops_on(store, keys, clock)  # rules need no network config
    added = ops.sticky_add("prod", "db-[0-9]+", 0, ALICE_0)
    assert (added.created, added.outcome, added.rule.retain) == (True, "created", 86400)
    name = added.rule.name
    assert re.fullmatch(r"prod-[0-9a-f]{8}", name)
    again = ops.sticky_add("prod", "db-[0-9]+", 0, Actor("bob@x", 0))
    assert (again.created, again.outcome, again.rule.created_by) == (False, "unchanged", ALICE)
    longer = ops.sticky_add("prod", "db-[0-9]+", 7 * 86400, ALICE_0)
    assert (longer.outcome, longer.rule.retain) == ("updated", 604800)
    ops.sticky_add("web", "", 90, ALICE_0)
    assert [(r.namespace, r.pod_regex, r.retain) for r in ops.sticky_list()] == [
        ("prod", "db-[0-9]+", 604800),
        ("web", "", 90),
    ]
    for args, needle in (
        (("prod", "db-(", 0), "--pod-regex 'db-\\(' is not a valid regex"),
        (("prod", "x" * 300, 0), "longer than 256"),
        (("Prod", "", 0), "pod namespace 'Prod'"),
        (("prod", "", -5), "--retain must be more than 0"),
        (("prod", "", 400 * 86400), "at most 31622400 seconds"),
    ):
        with pytest.raises(ValueError, match=needle):
            ops.sticky_add(*args, ALICE_0)  # type: ignore[arg-type]
    removed = ops.sticky_remove(name, ALICE_0)
    assert removed is not None and removed.pod_regex == "db-[0-9]+"
    with pytest.raises(NotFound, match=f"no sticky rule {name}"):
        ops.sticky_remove(name, ALICE_0)
    with pytest.raises(ValueError, match="sticky rule name"):
        ops.sticky_remove("Bad Name", ALICE_0)
    assert [r.namespace for r in ops.sticky_list()] == ["web"]
    assert audited(caplog) == [
        f"AUDIT sticky-add rule={name} namespace=prod regex=db-[0-9]+ retain=86400s "
        f"outcome=created by={ALICE} uid=0",
        f"AUDIT sticky-add rule={name} namespace=prod regex=db-[0-9]+ retain=86400s "
        "outcome=unchanged by=bob@x uid=0",
        f"AUDIT sticky-add rule={name} namespace=prod regex=db-[0-9]+ retain=604800s "
        f"outcome=updated by={ALICE} uid=0",
        f'AUDIT sticky-add rule={ops.sticky_list()[0].name} namespace=web regex="" retain=90s '
        f"outcome=created by={ALICE} uid=0",
        f"AUDIT sticky-remove rule={name} namespace=prod regex=db-[0-9]+ by={ALICE} uid=0",
    ]


class Rendezvous:
    """A store whose transactions wait for each other: both sweepers decide on the same read."""

    def __init__(self, store: Store, barrier: threading.Barrier) -> None:
        self.store = store
        self.barrier = barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def txn(self, compares: Any, ops: Any) -> Any:
        self.barrier.wait(10)
        return self.store.txn(compares, ops)


def test_two_sweepers_end_a_retention_once(
    store: Store, keys: Keys, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moor.audit")
    init_network(store, keys, FIXED)
    ops = ops_on(store, keys, clock)
    ip = ipaddress.ip_address(IP9)
    ops.bindings.claim(ip, owner("db-0", "u1", "c1"), "mfo1", source=STICKY, retain=100)
    ops.bindings.release(("mfonet", "c1", "eth0"), "mfo1")
    store.put(keys.fixed(ipaddress.ip_address(IP8)), b"{not json")  # a hand-edited record
    clock.advance(99)
    assert ops.expire_retained() == [] and [b.state for b in ops.list()] == ["retained"]
    clock.advance(2)

    barrier = threading.Barrier(2)
    sweepers = [
        ops_on(Rendezvous(store, barrier), keys, clock, node)  # type: ignore[arg-type]
        for node in ("mfo1", "mfo2")
    ]
    ended: list[list] = []
    threads = [threading.Thread(target=lambda s=s: ended.append(s.expire_retained()))
               for s in sweepers]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(len(e) for e in ended) == [0, 1]
    assert ops.list() == [] and ops.bindings.of_identity(Identity("prod", "db-0")) is None
    (record,) = audited(caplog)
    assert re.fullmatch(
        rf"AUDIT retention-ended ip={IP9} pod=prod/db-0 node=mfo1 retain=100s "
        r"released=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ by=moor-ipamd@mfo[12]",
        record,
    )
    assert json.loads(store.get(keys.released(ip)).value)["node"] in ("mfo1", "mfo2")  # type: ignore[union-attr]


def samples_of(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: list, name: str, **labels: str) -> float | None:
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) <= 1, (name, found)
    return found[0] if found else None


def make_states(bindings: FixedBindings) -> None:
    """One fixed IP in each state: held (on mfo1), retained (sticky, released), reserved."""
    ip7, ip8, ip9 = map(ipaddress.ip_address, (IP7, IP8, IP9))
    bindings.claim(ip7, owner("db-0", "uid-a", "cid-a"), "mfo1", source=STICKY, retain=3600,
                   host_veth="mfoveth0")  # fmt: skip
    bindings.claim(ip8, owner("db-1", "uid-b", "cid-b"), "mfo2", source=STICKY, retain=3600)
    bindings.release(("mfonet", "cid-b", "eth0"), "mfo2")
    bindings.reserve(Identity("prod", "web-0"), ip9, ALICE)


def test_metrics_in_process(tmp_path: Path) -> None:
    metrics = Metrics()
    store = metrics.count_store_errors(SqliteStore(str(tmp_path / "store.db")))
    keys = Keys("/mfo")
    init_network(store, keys, FIXED)
    ops = FixedOps(store, keys, network=ClusterOps(store, keys).network)
    samples = samples_of(generate_latest(metrics.registry).decode())
    assert value(samples, "moor_fixed_ips", state="held") is None  # not tracked: not reported
    metrics.track_fixed(ops.bindings.all)
    samples = samples_of(generate_latest(metrics.registry).decode())
    assert [value(samples, "moor_fixed_ips", state=s) for s in ("held", "reserved", "retained")] \
        == [0, 0, 0]  # fmt: skip
    make_states(ops.bindings)
    metrics.count_fixed_move()
    metrics.observe_fixed_move(0.3)
    samples = samples_of(generate_latest(metrics.registry).decode())
    assert [value(samples, "moor_fixed_ips", state=s) for s in ("held", "reserved", "retained")] \
        == [1, 1, 1]  # fmt: skip
    assert value(samples, "moor_fixed_ip_moves_total") == 1
    assert value(samples, "moor_fixed_ip_move_seconds_count") == 1
    assert value(samples, "moor_fixed_ip_move_seconds_bucket", le="0.25") == 0
    assert value(samples, "moor_fixed_ip_move_seconds_bucket", le="0.5") == 1
    store.close()
    samples = samples_of(generate_latest(metrics.registry).decode())
    assert value(samples, "moor_fixed_ips", state="held") is None  # left out, not zero
    assert value(samples, "moor_store_errors_total", op="list_prefix") == 1
    assert value(samples, "moor_fixed_ip_moves_total") == 1


# ---- end to end: moorctl against real daemons -----------------------------------------------
def ctl(d: Daemon, *args: str, user: str = "alice") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ipamd.cli", "--socket", d.grpc_socket, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SUDO_USER": user},
    )


def ctl_json(d: Daemon, *args: str, user: str = "alice") -> Any:
    proc = ctl(d, *args, "--json", user=user)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.strip()


def fails(proc: subprocess.CompletedProcess, needle: str) -> bool:
    """moorctl's error contract: exit 1, nothing on stdout, one line `moorctl: ...` on stderr."""
    lines = proc.stderr.strip().splitlines()
    return (
        proc.returncode == 1
        and proc.stdout == ""
        and len(lines) == 1
        and lines[0].startswith("moorctl: ")
        and needle in lines[0]
    )


def audit_lines(*daemons: Daemon) -> list[str]:
    return [
        ln.partition("moor.audit: ")[2]
        for d in daemons
        for ln in d.log_path.read_text().splitlines()
        if " moor.audit: AUDIT " in ln
    ]


@pytest.fixture(params=["sqlite", "etcd"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store URL, key prefix) that several daemons share."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/shared.db", "/mfo"
    return request.getfixturevalue("etcd_server").url, f"/mfo-{secrets.token_hex(4)}"


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.cleanup_host()


def start(daemons: list[Daemon], tmp_path: Path, n: int, **kw: Any) -> Daemon:
    d = start_daemon(tmp_path / f"mfo{n}", f"mfo{n}", "", f"mfobr{n - 1}", **kw)
    daemons.append(d)
    return d


def network_init(d: Daemon) -> None:
    out = ok(ctl(d, "network", "init", "--network", NETWORK, "--fixed-range", FIXED))
    assert out.startswith("network config written")


@pytest.mark.root
def test_reservations_and_sticky_rules_through_moorctl(
    tmp_path: Path, shared_store: tuple[str, str], daemons: list[Daemon]
) -> None:
    url, prefix = shared_store
    one = start(daemons, tmp_path, 1, store_url=url, key_prefix=prefix)
    two = start(daemons, tmp_path, 2, store_url=url, key_prefix=prefix)
    assert fails(ctl(one, "reserve", "prod/db-0", IP7), "no network config in the store")
    network_init(one)

    before = time.time()
    assert ok(ctl(one, "reserve", "prod/db-0", IP7)) == f"reserved {IP7} for prod/db-0 (by {ALICE})"
    # Another pod, through the other node's daemon: FAILED_PRECONDITION, one clear line.
    assert fails(ctl(two, "reserve", "prod/db-1", IP7, user="bob"),
                 f"moorctl: {IP7} is reserved by prod/db-0 (reservation)")  # fmt: skip
    assert fails(ctl(two, "reserve", "prod/db-0", IP8), f"prod/db-0 is bound to {IP7} already")
    assert fails(ctl(one, "reserve", "prod/db-1", "10.206.3.3"), "not in a fixed range")
    assert fails(ctl(one, "reserve", "prod/DB-1", IP8), "pod name 'DB-1' is not a DNS-1123")
    assert fails(ctl(one, "reserve", "prod/db-1", "10.206.250.300"), "is not an IP address")

    # Two pods race for one IP through the two daemons: exactly one gets it.
    racers = [subprocess.Popen(
        [sys.executable, "-m", "ipamd.cli", "--socket", d.grpc_socket, "reserve", pod, IP9],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SUDO_USER": "carol"},
    ) for d, pod in ((one, "prod/race-a"), (two, "prod/race-b"))]  # fmt: skip
    results = [(p.wait(30), *p.communicate()) for p in racers]
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    loser = next(err for rc, _, err in results if rc == 1)
    assert re.fullmatch(rf"moorctl: {IP9} is reserved by prod/race-[ab] \(reservation\)\n", loser)

    listed = ctl_json(two, "reservations")
    assert [(r["ip"], r["state"], r["reservedBy"]) for r in listed] == [
        (IP7, "reserved", ALICE),
        (IP9, "reserved", f"carol@{HOST}"),
    ]
    assert before <= listed[0]["reservedAt"] <= time.time()
    table = ok(ctl(two, "reservations")).splitlines()
    assert table[0].split() == ["IP", "POD", "STATE", "NODE", "RESERVED", "BY", "RESERVED", "AT"]
    assert table[1].split()[:5] == [IP7, "prod/db-0", "reserved", "-", ALICE]
    assert (
        table[1].split()[5:]
        == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(listed[0]["reservedAt"])).split()
    )

    # unreserve: by pod through one node, by IP through the other; then nothing is left.
    assert fails(ctl(one, "unreserve", "prod/db-1"), "prod/db-1 has no reservation")
    assert ok(ctl(two, "unreserve", "prod/db-0", user="bob")) == (
        f"unreserved {IP7} (prod/db-0): free again after the 1m cooldown"
    )
    winner = next(r["pod"] for r in listed if r["ip"] == IP9)
    assert ok(ctl(one, "unreserve", IP9)).startswith(f"unreserved {IP9} ({winner})")
    assert fails(ctl(one, "unreserve", IP9), f"{IP9} is not reserved")
    assert ctl_json(one, "reservations") == []
    assert fails(ctl(one, "reserve", "prod/db-0", IP7), "cools down")

    # sticky rules.
    added = ctl(one, "sticky", "add", "--namespace", "prod", "--pod-regex", "db-[0-9]+")
    name = re.fullmatch(r"sticky rule (prod-[0-9a-f]{8}) added: namespace prod, pods matching "
                        r"db-\[0-9\]\+, retain 24h", ok(added))  # fmt: skip
    assert name, added.stdout
    rule = name.group(1)
    again = ctl_json(two, "sticky", "add", "--namespace", "prod", "--pod-regex", "db-[0-9]+",
                     "--retain", "7d", user="bob")  # fmt: skip
    assert (again["created"], again["rule"]["name"], again["rule"]["retainSeconds"]) == (
        False, rule, 604800,
    )  # fmt: skip
    assert again["rule"]["createdBy"] == ALICE  # the rule's creator stays
    assert fails(ctl(one, "sticky", "add", "--namespace", "prod", "--pod-regex", "db-("),
                 "--pod-regex 'db-(' is not a valid regex")  # fmt: skip
    for bad in ("2w", "10", "0s"):
        assert fails(ctl(one, "sticky", "add", "--namespace", "prod", "--retain", bad), "--retain")
    assert fails(ctl(one, "sticky", "add", "--namespace", "Prod"), "pod namespace 'Prod'")
    assert fails(ctl(one, "sticky", "add", "--namespace", "prod", "--retain", "400d"), "at most")
    ok(ctl(two, "sticky", "add", "--namespace", "web", "--retain", "90s"))
    rules = ctl_json(one, "sticky", "list")
    assert [(r["namespace"], r["podRegex"], r["retainSeconds"], r["createdBy"]) for r in rules] \
        == [("prod", "db-[0-9]+", 604800, ALICE), ("web", "", 90, ALICE)]  # fmt: skip
    rows = ok(ctl(one, "sticky", "list")).splitlines()
    assert rows[1].split()[:4] == [rule, "prod", "db-[0-9]+", "7d"]
    assert rows[2].split()[1:5] == ["web", "(every", "pod)", "1m30s"]
    assert ok(ctl(two, "sticky", "remove", rule)) == (
        f"removed sticky rule {rule} (namespace prod, pods matching db-[0-9]+, retain 7d); "
        "the IPs it keeps stay bound until their retention ends"
    )
    assert fails(ctl(one, "sticky", "remove", rule), f"no sticky rule {rule}")
    assert fails(ctl(one, "sticky", "remove", "Not_A_Name"), "sticky rule name")
    assert [r["namespace"] for r in ctl_json(two, "sticky", "list")] == ["web"]

    # The audit trail: each change once, in the log of the daemon that made it.
    assert audit_lines(one)[:1] == [
        f"AUDIT reserve ip={IP7} pod=prod/db-0 state=reserved by={ALICE} uid=0"
    ]
    assert f"AUDIT unreserve ip={IP7} pod=prod/db-0 state=reserved by=bob@{HOST} uid=0" in \
        audit_lines(two)  # fmt: skip
    every = audit_lines(one, two)
    assert sorted(a.split()[1] for a in every if "race-" in a) == ["reserve", "unreserve"]
    assert (
        f"AUDIT sticky-add rule={rule} namespace=prod regex=db-[0-9]+ retain=604800s "
        f"outcome=updated by=bob@{HOST} uid=0"
    ) in audit_lines(two)
    assert f"AUDIT sticky-remove rule={rule} namespace=prod regex=db-[0-9]+ by={ALICE} uid=0" \
        in audit_lines(two)  # fmt: skip
    assert [a.split()[1] for a in every].count("sticky-add") == 3  # failed ones are not audited


def scrape(d: Daemon) -> list:
    with urllib.request.urlopen(d.metrics_url, timeout=10) as resp:
        return samples_of(resp.read().decode())


@pytest.mark.root
def test_ips_fixed_status_and_the_gauge(tmp_path: Path, daemons: list[Daemon]) -> None:
    one = start(daemons, tmp_path, 1)  # SQLite store of its own, opened below as well
    network_init(one)
    store = open_store(f"sqlite://{one.workdir}/store.db")
    try:
        keys = Keys(one.key_prefix)
        make_states(FixedBindings(store, keys, lambda: [ipaddress.ip_network(FIXED)]))
    finally:
        store.close()

    fixed = ctl_json(one, "ips", "--fixed")
    assert [(b["ip"], b["pod"], b["state"], b["source"], b["node"]) for b in fixed] == [
        (IP7, "prod/db-0", "held", "sticky", "mfo1"),
        (IP8, "prod/db-1", "retained", "sticky", "mfo2"),
        (IP9, "prod/web-0", "reserved", "reservation", ""),
    ]
    held, retained, reserved = fixed
    assert held["generation"] == {"uid": "uid-a", "containerID": "cid-a"}
    assert (held["handle"], held["hostVeth"], held["retainedUntil"]) == (
        "mfonet/cid-a/eth0", "mfoveth0", 0,
    )  # fmt: skip
    assert held["since"] > 0 and retained["since"] == 0 and retained["generation"] is None
    assert retained["retainedUntil"] == pytest.approx(retained["releasedAt"] + 3600)
    assert (reserved["reservedBy"], reserved["retainedUntil"]) == (ALICE, 0)
    rows = ok(ctl(one, "ips", "--fixed")).splitlines()
    assert rows[0].split() == ["IP", "POD", "STATE", "SOURCE", "NODE", "GENERATION", "SINCE",
                               "RETAINED", "UNTIL"]  # fmt: skip
    assert rows[1].split()[:6] == [IP7, "prod/db-0", "held", "sticky", "mfo1", "uid-a/cid-a"]
    assert rows[1].split()[-1] == "-"  # not retained: held
    assert rows[2].split()[:7] == [IP8, "prod/db-1", "retained", "sticky", "mfo2", "-", "-"]
    assert rows[3].split() == [IP9, "prod/web-0", "reserved", "reservation", "-", "-", "-", "-"]
    assert [b["ip"] for b in ctl_json(one, "ips", "--fixed", "--node", "mfo2")] == [IP8]
    assert [b["ip"] for b in ctl_json(one, "ips", "--fixed", "--pod", "web-0")] == [IP9]
    assert ctl_json(one, "ips", "--fixed", "--namespace", "dev") == []

    status = ctl_json(one, "status")
    assert [(b["ip"], b["pod"], b["state"]) for b in status["fixed"]] == [
        (IP7, "prod/db-0", "held")
    ]
    text = ok(ctl(one, "status")).splitlines()
    at = text.index("FIXED IPS held on this node")
    assert text[at + 1].split() == ["IP", "POD", "SOURCE", "GENERATION", "HANDLE", "SINCE"]
    assert text[at + 2].split()[:5] == [IP7, "prod/db-0", "sticky", "uid-a/cid-a",
                                        "mfonet/cid-a/eth0"]  # fmt: skip

    samples = scrape(one)
    assert [value(samples, "moor_fixed_ips", state=s) for s in ("held", "reserved", "retained")] \
        == [1, 1, 1]  # fmt: skip
    assert value(samples, "moor_fixed_ip_moves_total") == 0
    assert value(samples, "moor_fixed_ip_move_seconds_count") == 0


@pytest.fixture
def netns() -> Iterator[Any]:
    made: list[str] = []

    def factory() -> str:
        name = f"mfo-{_run}-{len(made)}"
        made.append(name)
        return make_netns(name)

    yield factory
    for name in made:
        delete_netns(name)


def wait_ready(d: Daemon) -> None:
    deadline = time.monotonic() + 10
    while not d.status()["ready"]:
        assert time.monotonic() < deadline, d.log_path.read_text()[-2000:]
        time.sleep(0.1)


def pod_args(name: str, uid: str, extra: str = "") -> str:
    return f"{extra}K8S_POD_NAMESPACE=prod;K8S_POD_NAME={name};K8S_POD_UID={uid}"


@pytest.mark.netns
def test_a_reserved_ip_through_cni(tmp_path: Path, daemons: list[Daemon], netns: Any) -> None:
    """Reserve, the pod's ADD gets the IP, another pod asking for it gets 105; unreserve while
    the pod runs: it keeps the IP until its DEL, which ends the binding."""
    one = start(daemons, tmp_path, 1)
    network_init(one)
    wait_ready(one)
    ok(ctl(one, "reserve", "prod/web-0", IP8))
    rt = ExecRuntime()
    conf = plugin_config("mfonet", "1.0.0", one.plugin())
    path = netns()
    add = rt.add(conf, path, "mfo-web0-a", cni_args=pod_args("web-0", "uid-w0"))
    assert add.rc == 0, add.out
    assert [ip["address"] for ip in add.out["ips"]] == [f"{IP8}/32"]

    (reservation,) = ctl_json(one, "reservations")
    assert (reservation["state"], reservation["node"], reservation["reservedBy"]) == (
        "held", "mfo1", ALICE,
    )  # fmt: skip
    assert reservation["generation"] == {"uid": "uid-w0", "containerID": "mfo-web0-a"}
    assert reservation["hostVeth"] == add.out["interfaces"][0]["name"]
    assert [(b["ip"], b["source"]) for b in ctl_json(one, "status")["fixed"]] == [
        (IP8, "reservation")
    ]
    assert value(scrape(one), "moor_fixed_ips", state="held") == 1
    intruder = rt.add(
        conf, netns(), "mfo-web1-a", cni_args=pod_args("web-1", "uid-w1", f"IP={IP8};")
    )
    assert intruder.code == 105 and IP8 in intruder.out["msg"], intruder.out

    assert ok(ctl(one, "unreserve", "prod/web-0")) == (
        f"unreserved {IP8} (prod/web-0): its pod on node mfo1 keeps it until its DEL"
    )
    assert [(b["ip"], b["state"], b["source"]) for b in ctl_json(one, "ips", "--fixed")] == [
        (IP8, "held", "request")
    ]
    assert rt.delete(conf, path, "mfo-web0-a", cni_args=pod_args("web-0", "uid-w0")).rc == 0
    assert ctl_json(one, "ips", "--fixed") == []  # a per-request binding ends with its pod
    assert [a.split()[1] for a in audit_lines(one)] == ["reserve", "unreserve"]


@pytest.mark.netns
def test_the_retention_sweep_ends_a_sticky_pods_ip(
    tmp_path: Path, shared_store: tuple[str, str], daemons: list[Daemon], netns: Any
) -> None:
    """A sticky pod (rule with `--retain 2s`) through CNI ADD and DEL on node 1; both daemons
    sweep every second; the binding ends once, after the retention, and the IP cools down."""
    url, prefix = shared_store
    fast = {"store_url": url, "key_prefix": prefix, "extra_args": ["--leak-gc-interval", "1"]}
    one = start(daemons, tmp_path, 1, **fast)
    two = start(daemons, tmp_path, 2, **fast)
    network_init(one)
    ok(ctl(two, "sticky", "add", "--namespace", "prod", "--pod-regex", "db-[0-9]+",
           "--retain", "2s"))  # fmt: skip
    wait_ready(one)
    rt = ExecRuntime()
    conf = plugin_config("mfonet", "1.0.0", one.plugin())
    path = netns()
    add = rt.add(conf, path, "mfo-db0-a", cni_args=pod_args("db-0", "uid-d0"))
    assert add.rc == 0, add.out
    ip = add.out["ips"][0]["address"].partition("/")[0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(FIXED)

    (held,) = ctl_json(two, "ips", "--fixed")
    assert (held["ip"], held["pod"], held["state"], held["source"], held["node"]) == (
        ip, "prod/db-0", "held", "sticky", "mfo1",
    )  # fmt: skip
    assert (held["retainSeconds"], held["generation"]["uid"]) == (2, "uid-d0")
    assert [b["ip"] for b in ctl_json(one, "status")["fixed"]] == [ip]
    assert ctl_json(two, "status")["fixed"] == []  # held on mfo1, not on mfo2
    time.sleep(3)  # longer than the retention: a held IP is not retained, nothing ends
    assert [b["state"] for b in ctl_json(one, "ips", "--fixed")] == ["held"]

    assert rt.delete(conf, path, "mfo-db0-a", cni_args=pod_args("db-0", "uid-d0")).rc == 0
    released_at = time.time()
    retained = ctl_json(two, "ips", "--fixed")
    assert [b["state"] for b in retained] in (["retained"], [])  # the sweep may be quick
    deadline = time.monotonic() + 20
    while ctl_json(one, "ips", "--fixed") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ctl_json(one, "ips", "--fixed") == []
    assert time.time() - released_at >= 2 - 0.5  # not before the retention is over
    ended = [a for a in audit_lines(one, two) if a.startswith("AUDIT retention-ended")]
    assert len(ended) == 1, ended  # both daemons sweep; one transaction ends it
    assert re.fullmatch(rf"AUDIT retention-ended ip={ip} pod=prod/db-0 node=mfo1 "
                        r"retain=2s released=\S+Z by=moor-ipamd@mfo[12]", ended[0])  # fmt: skip
    assert value(scrape(one), "moor_fixed_ips", state="retained") == 0
    store = open_store(url)
    try:
        assert store.get(Keys(prefix).released(ipaddress.ip_address(ip))) is not None  # cooling
    finally:
        store.close()
