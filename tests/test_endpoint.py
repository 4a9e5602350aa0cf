"""The CNI endpoint is never starved and never waits forever (issue 12 §2), against real daemons.

Silent and trickling clients, more connections than the bound, a full work queue, a SQLite store
another process keeps locked, a handler slower than the deadline, unusable CNI_NETNS paths,
oversized and malformed requests, and callers that are not root behind loosened file modes. Each
test has a daemon of its own (deadline and workers vary); ADD/CHECK/DEL go through bin/moor.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from cni_plugin.wire import MAX_REQUEST
from ipamd.cni_server import READ_LIMIT, READING_LIMIT
from tests.conftest import start_daemon
from tests.helpers import oracle
from tests.helpers.moor import (
    REPO,
    Daemon,
    ExecRuntime,
    add_as_nobody,
    delete_netns,
    make_netns,
    plugin_config,
    run_cmd,
)
from tests.helpers.wire_client import decode_reply, encode_request

pytestmark = pytest.mark.netns
NetnsFactory = Callable[[], str]
NETWORK = "mepnet"
_ids = itertools.count()
_run = secrets.token_hex(3)


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    marker = request.node.get_closest_marker("daemon")
    kw = dict(marker.kwargs) if marker else {}
    workdir = kw.pop("workdir", tmp_path / "node")
    d = start_daemon(workdir, "mep", "10.228.0.0/16", "mepbr1", **kw)
    yield d
    d.cleanup_host()


@pytest.fixture
def netns() -> Iterator[NetnsFactory]:
    """Fresh netns `mep-<run>-N`, all deleted after the test; returns the path."""
    made: list[str] = []

    def factory() -> str:
        name = f"mep-{_run}-{next(_ids)}"
        made.append(name)
        return make_netns(name)

    yield factory
    for name in made:
        delete_netns(name)


def conf(d: Daemon) -> dict:
    return plugin_config(NETWORK, "1.1.0", d.plugin())


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def read_reply(s: socket.socket, timeout: float = 10.0) -> tuple[int, dict]:
    """The daemon's reply as (exit code, error JSON or {}); raises on a reset or a hang."""
    s.settimeout(timeout)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    code, stdout, _ = decode_reply(b"".join(chunks))
    return code, json.loads(stdout) if stdout.strip() else {}


def del_request(d: Daemon, container_id: str) -> bytes:
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": container_id, "CNI_IFNAME": "eth0"}
    return encode_request(env, json.dumps(conf(d)).encode())


def send_request(path: str, payload: bytes) -> socket.socket:
    s = connect(path)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    return s


def log(d: Daemon) -> str:
    return d.log_path.read_text(errors="replace")


def handled(d: Daemon, container_id: str) -> bool:
    """Whether the daemon ran the handler for `container_id` (its debug line per request)."""
    return f" {container_id}/eth0 -> " in log(d)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def allocated(d: Daemon) -> set[str]:
    return {a["containerID"] for a in d.status()["allocations"]}


def test_silent_and_trickling_clients_do_not_delay_an_add(
    node: Daemon, netns: NetnsFactory
) -> None:
    silent = [connect(node.cni_socket) for _ in range(64)]
    tricklers = [connect(node.cni_socket) for _ in range(16)]
    stop = threading.Event()
    cut_after: dict[int, float] = {}

    def trickle(i: int, s: socket.socket) -> None:
        started = time.monotonic()
        while not stop.is_set():
            try:
                s.send(b"M")  # a byte now and then, never the whole request
            except OSError:
                cut_after[i] = time.monotonic() - started
                return
            stop.wait(0.3)

    threads = [threading.Thread(target=trickle, args=(i, s)) for i, s in enumerate(tricklers)]
    for t in threads:
        t.start()
    try:
        rt = ExecRuntime()
        c = conf(node)
        path = netns()
        started = time.monotonic()
        add = rt.add(c, path, "quiet1")
        assert add.rc == 0, add
        assert time.monotonic() - started < 2.0  # the deadline is 5 s: "well within" it
        wait_for("the tricklers to be cut off", lambda: len(cut_after) == 16, READ_LIMIT + 5)
        assert all(READ_LIMIT - 0.5 < t < READ_LIMIT + 3 for t in cut_after.values()), cut_after
        for s in silent:  # cut off too, with a reply saying why
            code, err = read_reply(s)
            assert code == 1 and err["code"] == 11 and "did not send its request" in err["msg"]
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in silent + tricklers:
            s.close()
    assert rt.delete(c, path, "quiet1").rc == 0
    assert allocated(node) == set()
    assert oracle.gone(host_veth_name("quiet1", "eth0"))


def test_connections_past_the_bound_evict_the_oldest_unfinished(
    node: Daemon, netns: NetnsFactory
) -> None:
    extra = 16
    conns = [connect(node.cni_socket) for _ in range(READING_LIMIT + extra)]
    try:
        rt = ExecRuntime()
        c = conf(node)
        path = netns()
        add = rt.add(c, path, "evict1")  # its connection evicts one more of the silent ones
        assert add.rc == 0, add
        for s in conns[: extra + 1]:
            code, err = read_reply(s)
            assert code == 1 and err["code"] == 11 and "evicted" in err["msg"], err
        assert rt.delete(c, path, "evict1").rc == 0
    finally:
        for s in conns:
            s.close()
    assert allocated(node) == set()


@pytest.mark.daemon(extra_args=["--workers", "1", "--request-deadline", "2"])
def test_a_full_work_queue_answers_11_at_once(node: Daemon) -> None:
    """One worker, a queue of 8: the 10th request is refused at once. The first keeps the worker
    for 2.3 s, so the other eight wait past their 2 s deadline (but not past the watchdog's 2.5 s):
    the worker answers them 11 without running them."""
    first = send_request(node.cni_socket, del_request(node, "delay-handle-2300-0"))
    wait_for("the worker to be on it", lambda: "test delay: delay-handle-2300-0 " in log(node))
    queued = [
        send_request(node.cni_socket, del_request(node, f"delay-handle-2300-{i}"))
        for i in range(1, 9)
    ]
    time.sleep(0.1)  # read and queued: the queue is full
    started = time.monotonic()
    code, err = read_reply(send_request(node.cni_socket, del_request(node, "busy1")))
    assert time.monotonic() - started < 1.0
    assert code == 1 and err["code"] == 11 and "work queue is full" in err["msg"], err
    assert read_reply(first) == (0, {})  # done by 2.3 s, before the watchdog's 2.5 s
    for s in queued:
        code, err = read_reply(s)
        assert code == 1 and err["code"] == 11 and "waited past its 2 s deadline" in err["msg"]
    assert handled(node, "delay-handle-2300-0")
    assert not any(handled(node, f"delay-handle-2300-{i}") for i in range(1, 9))
    assert not handled(node, "busy1")


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


@pytest.mark.daemon(extra_args=["--request-deadline", "2"])
def test_a_locked_sqlite_store_cannot_hold_a_request_past_its_deadline(
    node: Daemon, netns: NetnsFactory
) -> None:
    """ADD answers 11 in time and leaves nothing; DEL succeeds in time with its release
    journaled (a DEL must not fail: the pod would stay Terminating), applied once unlocked."""
    rt = ExecRuntime()
    c = conf(node)
    before, during = netns(), netns()
    assert rt.add(c, before, "locked1").rc == 0
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(node.workdir / "store.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        started = time.monotonic()
        add = rt.add(c, during, "locked2")
        assert time.monotonic() - started < 2.0 + 1.0
        assert add.failed_with(11, "database is locked"), add
        assert oracle.gone(host_veth_name("locked2", "eth0"))
        started = time.monotonic()
        dele = rt.delete(c, before, "locked1")
        assert time.monotonic() - started < 2.0 + 0.5
        assert dele.rc == 0, dele
        assert oracle.gone(host_veth_name("locked1", "eth0"))
        assert "journaled" in log(node)
    finally:
        assert locker.stdin is not None
        locker.stdin.close()
        locker.wait(10)
    wait_for("the journaled release to be applied", lambda: allocated(node) == set())


@pytest.mark.daemon(extra_args=["--request-deadline", "2"])
def test_the_watchdog_answers_a_handler_slower_than_the_deadline(
    node: Daemon, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    cid = "delay-after-veth-3500-wd1"  # sleeps 3.5 s with its veth made and its IP allocated
    started = time.monotonic()
    add = rt.add(conf(node), netns(), cid)
    elapsed = time.monotonic() - started
    assert add.failed_with(11, "deadline"), add
    assert 2.0 <= elapsed < 2.0 + 1.5, elapsed
    # The handler wakes at 3.5 s, finds its deadline passed before committing, and rolls back.
    wait_for(
        "the late ADD to roll back",
        lambda: oracle.link(host_veth_name(cid, "eth0")) is None and allocated(node) == set(),
    )
    wait_for("its late reply to be dropped", lambda: "finished after its deadline" in log(node))


def unusable_netns(kind: str, where: Path) -> tuple[str, Callable[[], None]]:
    """A CNI_NETNS path of `kind` and how to remove it."""
    path = where / f"ns-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        return "/dev/null", lambda: None
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(str(path))
    elif kind == "regular":
        path.write_text("not a namespace\n")
    else:  # what the runtime leaves when it unmounts a netns mid-delete: the empty mount point
        name = f"mep-{_run}-um{next(_ids)}"
        mounted = make_netns(name)
        run_cmd("umount", mounted)
        assert os.stat(mounted).st_size == 0 and stat.S_ISREG(os.stat(mounted).st_mode)
        return mounted, lambda: (delete_netns(name), Path(mounted).unlink(missing_ok=True))
    return str(path), lambda: None


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory", "socket", "regular", "unmounted"])
def test_an_unusable_netns_is_code_4_fast_and_del_still_works(
    node: Daemon, netns: NetnsFactory, tmp_path: Path, kind: str
) -> None:
    rt = ExecRuntime()
    c = conf(node)
    cid = f"ns-{kind}"
    assert rt.add(c, netns(), cid).rc == 0
    bad, remove = unusable_netns(kind, tmp_path)
    try:
        for verb in ("ADD", "CHECK"):
            started = time.monotonic()
            if verb == "ADD":
                outcome = rt.add(c, bad, f"{cid}-new")
            else:  # CHECK of the live pod, its netns path now unusable
                outcome = rt.check(c, bad, cid)
            assert time.monotonic() - started < 2.0
            assert outcome.failed_with(4, "not a network namespace"), (verb, outcome)
        dele = rt.delete(c, bad, cid)
        assert dele.rc == 0, dele
    finally:
        remove()
    assert oracle.gone(host_veth_name(cid, "eth0"))
    assert allocated(node) == set()


def test_oversized_and_malformed_requests_get_a_reply(node: Daemon) -> None:
    payload = del_request(node, "big1") + b" " * (MAX_REQUEST + (1 << 20))
    code, err = read_reply(send_request(node.cni_socket, payload))  # no ECONNRESET
    assert code == 1 and err["code"] == 7, err
    assert f"{len(payload)} bytes" in err["msg"] and str(MAX_REQUEST) in err["msg"]
    code, err = read_reply(send_request(node.cni_socket, b"NOT-MOOR\0CNI_COMMAND=DEL\0\0{}"))
    assert code == 1 and err["code"] == 6 and "failed to decode content" in err["msg"], err
    assert not handled(node, "big1")


@pytest.fixture
def open_node() -> Iterator[Daemon]:
    """A daemon whose socket directory others may traverse (the tests loosen it further)."""
    workdir = Path(tempfile.mkdtemp(prefix="mep-open-"))
    workdir.chmod(0o711)
    d = start_daemon(workdir, "mep", "10.228.0.0/16", "mepbr2")
    yield d
    d.cleanup_host()
    shutil.rmtree(workdir, ignore_errors=True)


def test_the_uid_is_checked_even_with_loosened_file_modes(
    open_node: Daemon, netns: NetnsFactory
) -> None:
    node = open_node
    run_dir = os.path.dirname(node.cni_socket)
    paths = (run_dir, node.cni_socket, node.grpc_socket)
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    path = netns()
    try:
        for p in paths:
            os.chmod(p, 0o777)
        refused = add_as_nobody(conf(node), path, "nobody2")
        err = refused.out
        assert refused.rc == 1 and err["code"] == 11, err
        assert "only root may use the moor CNI endpoint" in err["msg"], err
        ctl = subprocess.run(
            [sys.executable, "-m", "ipamd.cli", "--socket", node.grpc_socket, "status"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            user=65534,
            group=65534,
        )
        assert ctl.returncode == 1 and ctl.stderr.startswith("moorctl: permission denied"), ctl
        assert len(ctl.stderr.strip().splitlines()) == 1
        assert node.status()["ready"]  # root still gets through, over the same socket
        rt = ExecRuntime()
        assert rt.add(conf(node), path, "root2").rc == 0
        assert rt.delete(conf(node), path, "root2").rc == 0
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert allocated(node) == set()
