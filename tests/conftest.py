"""Shared pytest policy: tests that need root or network namespaces skip on a laptop but FAIL in CI.

CI sets CI=true. There, a missing capability is a broken machine, not a reason to pass quietly.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import etcd
from tests.helpers.moor import Daemon, ExecRuntime, LibcniRuntime, delete_netns, make_netns

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip the calling test when `condition` is false, or fail it under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {why}")
    pytest.skip(why)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") or item.get_closest_marker("netns"):
        require(os.geteuid() == 0, "needs root (network namespaces, netlink, iptables)")


# ---- end-to-end fixtures: a real daemon, real netns, two runtimes --------------------------------


_netns_ids = itertools.count()
_run_id = secrets.token_hex(3)  # unique per pytest run, so concurrent sessions never share a name


@pytest.fixture(scope="session", autouse=True)
def restore_ip_forward() -> Iterator[None]:
    """The bridge datapath turns on forwarding; put the machine back as it was."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text().strip() if path.exists() else None
    yield
    if before is not None and os.geteuid() == 0:
        path.write_text(before)


def start_daemon(workdir: Path, name: str, network: str, bridge: str, **kw: object) -> Daemon:
    require(os.geteuid() == 0, "needs root to run moor-ipamd's datapath")
    daemon = Daemon(workdir=workdir, name=name, network=network, bridge=bridge, **kw)  # type: ignore[arg-type]
    try:
        daemon.start()
    except BaseException:
        daemon.cleanup_host()
        raise
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One node: moor-ipamd on 10.250.0.0/16 with bridge mtebr0, for a whole test module."""
    d = start_daemon(tmp_path_factory.mktemp("ipamd"), "mte", "10.250.0.0/16", "mtebr0")
    yield d
    d.cleanup_host()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[etcd.EtcdServer]:
    """One real etcd for the session, on random loopback ports; tests use distinct key prefixes."""
    ok, why = etcd.available()
    require(ok, why)
    server = etcd.EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_alone(tmp_path: Path) -> Iterator[etcd.EtcdServer]:
    """An etcd of the test's own, for tests that stop, wipe or restore it."""
    ok, why = etcd.available()
    require(ok, why)
    server = etcd.EtcdServer(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def netns() -> Iterator[Callable[[], tuple[str, str]]]:
    """Factory of fresh netns `mte-N`; returns (name, path). All are deleted after the test."""
    made: list[str] = []

    def factory() -> tuple[str, str]:
        name = f"mte-{_run_id}-{next(_netns_ids)}"
        path = make_netns(name)
        made.append(name)
        return name, path

    yield factory
    for name in made:
        delete_netns(name)


@pytest.fixture(params=["exec", "libcni"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> ExecRuntime | LibcniRuntime:
    """Each test body runs through direct exec and through real libcni."""
    if request.param == "exec":
        return ExecRuntime()
    from tests.helpers import cnidrv

    ok, why = cnidrv.available()
    require(ok, why)
    return LibcniRuntime(tmp_path)


def host_links_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [
        line.split(":")[1].strip().split("@")[0]
        for line in out.splitlines()
        if f": {prefix}" in line
    ]
