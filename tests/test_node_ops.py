"""Issue 15, the node's operations surface against a real daemon: `moorctl health` for probes,
`moorctl version`, JSON logs, the CNI conflist installed only once the node can serve ADD, and a
SIGTERM that finishes what is in flight and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ipamd.network_config import SCHEMA_VERSION
from tests.helpers.moor import SHIM, Daemon, ExecRuntime, delete_netns, make_netns

pytestmark = pytest.mark.netns

NETWORK = "10.216.0.0/16"


def conflist_source(tmp_path: Path) -> Path:
    src = tmp_path / "source.conflist"
    src.write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "mno", "plugins": [{"type": "moor"}]})
    )
    return src


def eventually(what: str, check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_health_version_json_logs_and_the_conflist_follow_readiness(tmp_path: Path) -> None:
    src = conflist_source(tmp_path)
    dest = tmp_path / "net.d" / "10-moor.conflist"
    dest.parent.mkdir()
    d = Daemon(workdir=tmp_path / "mno1", name="mno1", network="", bridge="mnobr1",
               extra_args=["--log-format", "json", "--cni-conflist", str(dest),
                           "--cni-conflist-source", str(src), "--remove-conflist-on-exit"])  # fmt: skip
    d.start()
    try:
        # No network config yet: not ready, health exits 1, no conflist for kubelet to see.
        health = d.moorctl("health")
        assert (health.returncode, health.stdout.strip()) == (1, "NOT_SERVING")
        assert not dest.exists()
        init = d.moorctl("network", "init", "--network", NETWORK)
        assert init.returncode == 0, init.stderr
        eventually("the node to be ready", lambda: d.moorctl("health").returncode == 0)
        eventually("the conflist", dest.exists)
        assert dest.read_bytes() == src.read_bytes()
        assert [p.name for p in dest.parent.iterdir()] == ["10-moor.conflist"]  # no temp left
        dest.unlink()  # someone removed it: it comes back
        eventually("the conflist to come back", dest.exists)

        version = json.loads(d.moorctl("version", "--shim", str(SHIM), "--json").stdout)
        setup = (Path(__file__).parents[1] / "setup.cfg").read_text()
        release = next(
            line.split("=")[1].strip() for line in setup.splitlines() if line.startswith("version")
        )
        assert version == {
            "daemon": release,
            "schema": SCHEMA_VERSION,
            "schemaSupported": SCHEMA_VERSION,
            "shim": release,
            "shimPath": str(SHIM),
        }
        missing = json.loads(d.moorctl("version", "--shim", "/nonexistent/moor", "--json").stdout)
        assert missing["shim"] == ""

        events = [json.loads(line) for line in d.log_path.read_text().splitlines() if line]
        assert all({"time", "level", "logger", "msg"} <= e.keys() for e in events)
        assert any("installed the CNI conflist" in e["msg"] for e in events)
    finally:
        d.stop()
        d.cleanup_host()
    assert d.proc is not None and d.proc.returncode == 0
    assert not dest.exists()  # --remove-conflist-on-exit
    assert (
        Daemon(workdir=tmp_path, name="x", network="", bridge="x")
        .moorctl("--socket", "/nonexistent.sock", "health")
        .returncode
        == 1
    )  # a daemon that does not answer is not healthy either


def test_sigterm_answers_the_request_in_flight_and_exits_0(tmp_path: Path) -> None:
    d = Daemon(workdir=tmp_path / "mno2", name="mno2", network=NETWORK, bridge="mnobr2")
    d.start()
    netns = "mno2-pod"
    path = make_netns(netns)
    try:
        conf = {"cniVersion": "1.0.0", "name": "mno", **d.plugin()}
        outcome: dict = {}
        slow = threading.Thread(
            target=lambda: outcome.update(r=ExecRuntime().add(conf, path, "delay-handle-1500-mno2"))
        )
        slow.start()
        time.sleep(0.7)  # the ADD is in the daemon now, sleeping before its work
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        eventually("the CNI socket to go", lambda: not os.path.exists(d.cni_socket), 5)
        late = ExecRuntime().add(conf, path, "mno2-late", ifname="eth1")
        assert late.code == 11, late.out  # no new request once stopping
        slow.join(30)
        assert outcome["r"].rc == 0, outcome["r"].out  # the one in flight got its real answer
        assert d.proc.wait(30) == 0
    finally:
        delete_netns(netns)
        d.cleanup_host()
    subprocess.run(["ip", "link", "del", "mnobr2"], capture_output=True)
