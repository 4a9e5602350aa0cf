"""The static shim (build/moor, from shim/) against the Python one (bin/moor): the same bytes out.

For the same env and stdin, both must exit alike, print the same stdout and stderr, send the
daemon the same request with the same netns fd, and spool the same DEL. Random inputs
(hypothesis) run through both with no daemon and against a scripted fake daemon
(tests/helpers/fake_daemon.py) that replies well, badly or not at all. The fixed tests cover
what random inputs do not reach: repeated env names, a full listen backlog, the 30 s reply
timeout, a bug (a test-only build that panics), and that the binary needs nothing from the host.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require
from tests.helpers import shims
from tests.helpers.fake_daemon import HOLD, FakeDaemon

EXAMPLES = int(os.environ.get("MOOR_SHIM_EXAMPLES", "150"))
GENERATOR = shims.REPO / "shim" / "gen_errno.py"


@pytest.fixture(scope="module")
def static() -> Path:
    ok, why = shims.available()
    require(ok, why)
    return shims.static_shim()


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with one of each kind of CNI_NETNS the shims tell apart."""
    where = tmp_path_factory.mktemp("shims")
    os.mkfifo(where / "fifo")
    (where / "dir").mkdir()
    (where / "regular").write_bytes(b"")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(where / "sock"))
    yield where
    sock.close()


def run(shim: Path, env: dict[bytes, bytes], stdin: bytes, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [str(shim)], input=stdin, env=env, capture_output=True, timeout=60, cwd=cwd
    )


def outcome(proc: subprocess.CompletedProcess) -> tuple[int, bytes, bytes]:
    return proc.returncode, proc.stdout, proc.stderr


def take_spool(spool: Path) -> list[bytes]:
    """The spooled entries' bytes (names hold the time and pid, so only contents compare)."""
    if not spool.is_dir():
        return []
    entries = sorted(spool.iterdir())
    data = [e.read_bytes() for e in entries]
    for e in entries:
        e.unlink()
    return data


# ---- inputs -----------------------------------------------------------------------------------

NETNS_KINDS = ["absent", "missing", "regular", "nsfs", "fifo", "dir", "chardev", "sock", "empty"]
no_nul = st.binary(max_size=24).filter(lambda b: b"\0" not in b)
# Path pieces dense in what Python's "replace" decoding and JSON escaping treat specially:
# truncated and overlong sequences, surrogates, controls, quotes.
pieces = st.sampled_from(
    [b"a", b"\xe2\x82", b"\xe2\x82\xac", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80",
     b"\xc0\xaf", b"\xe0\x80", b"\xf4\x90\x80", b"\xff", b"\x80", b"\x01", b"\x7f", b"'", b"\n"]
)  # fmt: skip
name_bytes = st.one_of(
    st.binary(min_size=1, max_size=130), st.lists(pieces, min_size=1, max_size=24).map(b"".join)
).map(lambda b: bytes(c for c in b if c not in b'"\\\0/') or b"x")
env_keys = st.one_of(
    st.from_regex(rb"\ACNI_[A-Z_]{0,10}\Z"),
    st.sampled_from([b"PATH", b"CNI", b"XCNI_A", b"LC_CTYPE", b"cni_x"]),
)


def netns_path(kind: str, place: Path) -> bytes | None:
    return {
        "absent": None,
        "missing": os.fsencode(place / "no-such-netns"),
        "regular": os.fsencode(place / "regular"),
        "nsfs": b"/proc/self/ns/net",
        "fifo": os.fsencode(place / "fifo"),
        "dir": os.fsencode(place / "dir"),
        "chardev": b"/dev/null",
        "sock": os.fsencode(place / "sock"),
        "empty": b"",
    }[kind]


@st.composite
def calls(draw: st.DrawFn, place: Path, socket_path: bytes) -> tuple[dict, bytes]:
    """Env and stdin of one call; the config always names its socket and spool first, so
    nothing ever reaches a real daemon at the default path."""
    command = draw(
        st.sampled_from([b"ADD", b"CHECK", b"DEL", b"GC", b"STATUS", b"VERSION", b"", b"FOO\xff"])
    )
    env: dict[bytes, bytes] = {b"CNI_COMMAND": command}
    env.update(draw(st.dictionaries(env_keys, no_nul, max_size=4)))
    env[b"CNI_COMMAND"] = command
    netns = netns_path(draw(st.sampled_from(NETNS_KINDS)), place)
    if netns is not None:
        env[b"CNI_NETNS"] = netns
    space = draw(st.sampled_from([b"", b" ", b"\t\r\n ", b" x"]))
    version = draw(st.sampled_from([b"1.0.0", b"0.4.0", b"1.1.0", b"9.9", b"1.0.0\xff", b""]))
    head = b'{"daemonSocket"' + space + b": " + b'"' + socket_path + b'", '
    head += b'"spoolDir": "' + os.fsencode(place / "spool") + b'", '
    if version:
        head += b'"cniVersion": "' + version + b'", '
    tail = draw(st.one_of(st.binary(max_size=64), st.just(b'"name": "n"}')))
    return env, head + tail


# ---- no daemon --------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(data=st.data())
def test_without_a_daemon_both_answer_the_same(static: Path, place: Path, data: Any) -> None:
    down = data.draw(name_bytes, "socket name")
    env, stdin = data.draw(calls(place, os.fsencode(place / "down-") + down), "call")
    spool = place / "spool"
    python = run(shims.PYTHON_SHIM, env, stdin)
    python_spool = take_spool(spool)
    go = run(static, env, stdin)
    assert outcome(go) == outcome(python)
    assert take_spool(spool) == python_spool
    if python.stdout:
        json.loads(python.stdout)


# ---- a scripted daemon ------------------------------------------------------------------------


@st.composite
def replies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(reply bytes, sent before reading the request): well-formed, oddly written numbers
    Python's int() still takes, malformed, torn, or none at all."""
    stdout, stderr = draw(st.binary(max_size=300)), draw(st.binary(max_size=80))
    code = draw(st.sampled_from([b"0", b"1", b"2", b"255", b"256", b"-1", b"+1", b"1_0"]))
    length = str(len(stdout)).encode()
    kind = draw(st.sampled_from(["ok", "spaced", "negative", "torn", "garbage", "none", "early"]))
    if kind == "spaced":
        head = draw(st.sampled_from([b" ", b"\t", b"\x0b"])) + code + b" " + length + b" "
    elif kind == "negative":
        head = code + b" -" + draw(st.sampled_from([b"1", b"3", b"999"]))
    elif kind == "torn":
        head = code + b" " + str(len(stdout) + 1 + len(stderr)).encode()
    elif kind == "garbage":
        head = draw(st.binary(max_size=20).filter(lambda b: b"\n" not in b))
    elif kind == "none":
        return b"", False
    else:
        head = code + b" " + length
    return head + b"\n" + stdout + stderr, kind == "early"


def served(shim: Path, daemon: FakeDaemon, reply: tuple[bytes, bool], env: dict, stdin: bytes):
    daemon.serve(reply[0], before_reading=reply[1])
    proc = run(shim, env, stdin)
    return proc, daemon.join()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(data=st.data())
def test_against_a_daemon_both_send_and_print_the_same(
    static: Path, place: Path, data: Any
) -> None:
    sock = place / "daemon.sock"
    sock.unlink(missing_ok=True)
    daemon = FakeDaemon(sock)
    try:
        env, stdin = data.draw(calls(place, os.fsencode(sock)), "call")
        reply = data.draw(replies(), "reply")
        python, python_got = served(shims.PYTHON_SHIM, daemon, reply, env, stdin)
        go, go_got = served(static, daemon, reply, env, stdin)
    finally:
        daemon.stop()
    assert outcome(go) == outcome(python)
    if reply[1]:  # a refusal sent before reading: how much of the request got in is a race
        return
    assert go_got == python_got
    netns = env.get(b"CNI_NETNS", b"")
    if python_got.fds and netns:
        st_ = os.stat(netns)
        assert python_got.fd_identity == (st_.st_dev, st_.st_ino)  # the pod netns itself


def test_a_repeated_env_name_sends_its_first_value(static: Path, tmp_path: Path) -> None:
    """A runtime never sends one twice, but both shims read the environment alike: the first of
    a repeated name wins (getenv's rule), and an entry without "=" is skipped."""
    launcher = (
        "import ctypes, sys\n"
        "env = [e.encode() for e in sys.argv[2:]] + [None]\n"
        "argv = [sys.argv[1].encode(), None]\n"
        "ctypes.CDLL(None).execve(argv[0], (ctypes.c_char_p * 2)(*argv),"
        " (ctypes.c_char_p * len(env))(*env))\n"
    )
    envp = ["CNI_COMMAND=GC", "CNI_X=first", "NOEQUALS", "CNI_X=second", "CNI_Y=a=b"]
    daemon = FakeDaemon(tmp_path / "d.sock")
    config = json.dumps({"cniVersion": "1.1.0", "daemonSocket": str(tmp_path / "d.sock")})
    got = []
    try:
        for shim in (shims.PYTHON_SHIM, static):
            daemon.serve(b"0 0\n")
            proc = subprocess.run(
                [sys.executable, "-c", launcher, str(shim), *envp],
                input=config.encode(),
                capture_output=True,
                timeout=30,
            )
            assert proc.returncode == 0, proc
            got.append(daemon.join().data)
    finally:
        daemon.stop()
    assert got[0] == got[1]
    assert got[0].startswith(b"MOOR1\0CNI_COMMAND=GC\0CNI_X=first\0CNI_Y=a=b\0\0")


def test_an_at_sign_socket_path_is_a_file_not_an_abstract_socket(
    static: Path, tmp_path: Path
) -> None:
    """Go's syscall.Connect would read "@x" as an abstract address; Python reads a file name."""
    daemon = FakeDaemon(tmp_path / "@moor.sock")
    config = b'{"cniVersion": "1.1.0", "daemonSocket": "@moor.sock"}'
    env = {b"CNI_COMMAND": b"STATUS"}
    try:
        for shim in (shims.PYTHON_SHIM, static):
            daemon.serve(b"0 0\n")
            proc = run(shim, env, config, cwd=tmp_path)
            assert outcome(proc) == (0, b"", b"") and daemon.join().connected
    finally:
        daemon.stop()


def test_a_full_listen_backlog_answers_at_once(static: Path, tmp_path: Path) -> None:
    """A daemon that does not accept: connect() fails with EAGAIN at once (no wait), so ADD
    answers 11 and DEL is spooled, in both shims."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "busy.sock"))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the backlog (a backlog of 0 still admits one)
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(str(tmp_path / "busy.sock"))
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)
    config = json.dumps(
        {"cniVersion": "1.0.0", "daemonSocket": str(tmp_path / "busy.sock"),
         "spoolDir": str(tmp_path / "spool")}
    ).encode()  # fmt: skip
    try:
        for command in (b"ADD", b"DEL"):
            env = {b"CNI_COMMAND": command, b"CNI_CONTAINERID": b"c"}
            answers = [outcome(run(s, env, config)) for s in (shims.PYTHON_SHIM, static)]
            assert answers[0] == answers[1]
            if command == b"ADD":
                assert json.loads(answers[0][1])["msg"].endswith("busy.sock: EAGAIN")
            else:
                assert answers[0][0] == 0 and b"EAGAIN; DEL spooled" in answers[0][2]
        assert len(take_spool(tmp_path / "spool")) == 2
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_daemon_that_never_answers_is_code_11_after_30_s(static: Path, tmp_path: Path) -> None:
    """The last resort against a wedged daemon: both shims give up after 30 s, with one JSON
    document, never hanging (run side by side, so the test takes 30 s once)."""
    procs, daemons = [], []
    started = time.monotonic()
    try:
        for i, shim in enumerate((shims.PYTHON_SHIM, static)):
            daemon = FakeDaemon(tmp_path / f"wedged{i}.sock")
            daemons.append(daemon)
            daemon.serve(HOLD)
            config = json.dumps({"cniVersion": "1.0.0", "daemonSocket": daemon.path.name})
            (tmp_path / f"stdin{i}").write_text(config)
            with open(tmp_path / f"stdin{i}", "rb") as stdin:
                procs.append(
                    subprocess.Popen(
                        [str(shim)],
                        stdin=stdin,
                        stdout=subprocess.PIPE,
                        env={"CNI_COMMAND": "GC"},
                        cwd=tmp_path,
                    )
                )
        answers = [p.communicate(timeout=60)[0] for p in procs]
        waited = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for daemon in daemons:
            daemon.stop()
    for i, answer in enumerate(answers):
        assert json.loads(answer) == {
            "cniVersion": "1.0.0",
            "code": 11,
            "msg": f"moor-ipamd at wedged{i}.sock failed mid-request: no reply within 30 s",
        }
    assert 30 <= waited < 50


def test_a_bug_is_code_999_json_never_a_go_traceback(static: Path, tmp_path: Path) -> None:
    """A test build (tag shimfault) hits a real runtime error on request: the recover prints
    code 999 and one line on stderr, as bin/moor does for an exception."""
    faulty = shims.build(tmp_path / "moor-fault", "shimfault")
    env = {"CNI_COMMAND": "ADD", "MOOR_SHIM_FAULT": "panic"}
    proc = subprocess.run([str(faulty)], input=b"{}", env=env, capture_output=True, timeout=30)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 1 and reply["code"] == 999
    assert reply["msg"].startswith("internal error in the moor CNI executable: runtime error:")
    assert proc.stderr.startswith(b"moor shim bug: runtime error")
    assert b"goroutine" not in proc.stderr
    proc = run(static, {b"CNI_COMMAND": b"VERSION", b"MOOR_SHIM_FAULT": b"panic"}, b"")
    assert proc.returncode == 0  # the real build has no such hook


# ---- the binary itself ------------------------------------------------------------------------


def test_the_binary_is_static(static: Path) -> None:
    """No ELF interpreter and no dynamic section: it runs on a host without any C library."""
    data = static.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    kinds = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    assert not kinds & {2, 3}, kinds  # PT_DYNAMIC, PT_INTERP


def test_the_errno_table_is_what_python_says() -> None:
    """shim/errno_linux.go is generated from errno.errorcode and strerror(): regenerate it with
    `python shim/gen_errno.py > shim/errno_linux.go` when this fails."""
    proc = subprocess.run(
        [sys.executable, str(GENERATOR)], capture_output=True, text=True, check=True
    )
    assert (shims.REPO / "shim" / "errno_linux.go").read_text() == proc.stdout


def go_constant(source: str, name: str) -> str:
    match = re.search(rf"^\s*{name}\s*=\s*(.+?)\s*(//.*)?$", source, re.MULTILINE)
    assert match, f"{name} not found in shim/main.go"
    return match.group(1)


def test_the_constants_are_the_python_shims() -> None:
    """Limits, timeouts, paths and versions: one number in two languages, kept equal here."""
    py: dict[str, Any] = {}
    for node in ast.parse(shims.PYTHON_SHIM.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.BinOp) and isinstance(value.op, ast.LShift):  # 4 << 20
                py[node.targets[0].id] = ast.literal_eval(value.left) << ast.literal_eval(
                    value.right
                )
            elif isinstance(value, ast.Constant | ast.Tuple):
                py[node.targets[0].id] = ast.literal_eval(value)
    go = (shims.REPO / "shim" / "main.go").read_text()
    assert go_constant(go, "maxRequest") == "4 << 20" and py["MAX_REQUEST"] == 4 << 20
    assert int(go_constant(go, "spoolLimit")) == py["SPOOL_LIMIT"]
    assert go_constant(go, "connectTimeout") == "time.Second" and py["CONNECT_TIMEOUT"] == 1.0
    assert go_constant(go, "replyTimeout") == f"{py['REPLY_TIMEOUT']:g} * time.Second"
    assert go_constant(go, "defaultSocket") == json.dumps(py["DEFAULT_SOCKET"].decode())
    assert go_constant(go, "defaultSpool") == json.dumps(py["DEFAULT_SPOOL"].decode())
    assert go_constant(go, "moorVersion") == json.dumps(py["MOOR_VERSION"].decode())
    versions = go_constant(go, "var versions").removeprefix("[]string")
    assert json.loads("[" + versions.strip("{}") + "]") == list(py["VERSIONS"])


def test_the_build_is_idempotent(static: Path) -> None:
    """`make shim` / `make test` rebuild only when a source is newer than the binary."""
    before = static.stat().st_mtime_ns
    shims.build()
    assert static.stat().st_mtime_ns == before
