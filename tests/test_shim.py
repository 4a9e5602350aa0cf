"""The CNI shim on its own: what it imports, and how it answers when no daemon is there.

Every behaviour test runs against both builds of the shim (tests/helpers/shims.py): bin/moor,
the real executable with its shebang (/usr/bin/python3 -SE), and build/moor, the static Go binary
that hosts without Python get; the two must answer alike. No daemon is behind the socket here;
where a test needs a listener, it is a scripted fake (tests/helpers/fake_daemon.py), and
tests/test_shim_static.py compares the two shims' bytes on random inputs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_plugin.netconf import SUPPORTED_VERSIONS
from cni_plugin.wire import MAX_REQUEST, decode_request
from tests.conftest import require
from tests.helpers import shims
from tests.helpers.fake_daemon import HOLD, FakeDaemon

SHIM = shims.PYTHON_SHIM


@pytest.fixture(params=shims.KINDS)
def shim(request: pytest.FixtureRequest) -> Path:
    """Each behaviour test runs against the Python shim and the static one."""
    if request.param == "static":
        ok, why = shims.available()
        require(ok, why)
    return shims.path(request.param)


def run_shim(shim: Path, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(shim)], input=stdin, env=env, capture_output=True, timeout=10)


def netconf(tmp_path: Path, version: str = "1.0.0", nested: bool = False) -> bytes:
    sock = str(tmp_path / "nobody-home.sock")
    spool = str(tmp_path / "spool")
    if nested:
        return json.dumps(
            {
                "cniVersion": version,
                "name": "n",
                "type": "bridge",
                "ipam": {"type": "moor", "daemonSocket": sock, "spoolDir": spool},
            }
        ).encode()
    return json.dumps(
        {
            "cniVersion": version,
            "name": "n",
            "type": "moor",
            "daemonSocket": sock,
            "spoolDir": spool,
        }
    ).encode()


def cni_env(command: str, **extra: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "abc",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/x",
        **extra,
    }


def test_shebang_is_a_real_interpreter_with_one_flag_argument() -> None:
    first = SHIM.read_text().splitlines()[0]
    assert first == "#!/usr/bin/python3 -SE"
    assert os.access(SHIM, os.X_OK)


def _imports(*args: str, env: dict[str, str]) -> set[str]:
    proc = subprocess.run(
        ["/usr/bin/python3", "-SE", "-X", "importtime", *args],
        env=env,
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.decode().splitlines()
    return {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")} - {
        "imported package"
    }


def test_imports_only_interpreter_builtins() -> None:
    """Beyond what the interpreter loads to start, the shim loads only compiled-in modules."""
    import sys

    env = {"CNI_COMMAND": "VERSION"}
    extra = _imports(str(SHIM), env=env) - _imports("-c", "pass", env=env)
    assert extra <= set(sys.builtin_module_names) | {"_socket", "errno", "time", "posix"}, extra
    assert not extra & {"socket", "os", "json", "cni_plugin", "ipamd", "pyroute2", "grpc"}


def test_version_answered_locally(shim: Path) -> None:
    proc = run_shim(shim, {"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def test_about_text_without_command(shim: Path) -> None:
    for env in ({}, {"CNI_COMMAND": ""}):
        proc = run_shim(shim, env)
        assert (
            proc.returncode == 0
            and proc.stdout == b""
            and b"CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n"
            in proc.stderr
        )


@pytest.mark.parametrize("nested", [False, True], ids=["main", "ipam-section"])
def test_add_and_check_answer_11_fast_when_daemon_down(
    shim: Path, tmp_path: Path, nested: bool
) -> None:
    for command in ("ADD", "CHECK", "GC"):
        started = time.monotonic()
        proc = run_shim(
            shim, cni_env(command, CNI_NETNS="/proc/self/ns/net"), netconf(tmp_path, nested=nested)
        )
        assert time.monotonic() - started < 1.0
        err = json.loads(proc.stdout)
        assert proc.returncode == 1 and err["code"] == 11 and err["cniVersion"] == "1.0.0"
        assert "nobody-home.sock" in err["msg"]


def test_status_answers_50_when_daemon_down(shim: Path, tmp_path: Path) -> None:
    proc = run_shim(shim, {"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, netconf(tmp_path, "1.1.0"))
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 50


def test_del_is_spooled_root_only_and_replayable(shim: Path, tmp_path: Path) -> None:
    config = netconf(tmp_path)
    env = cni_env("DEL", CNI_NETNS="/does/not/exist", CNI_ARGS="IgnoreUnknown=1")
    proc = run_shim(shim, env, config)
    assert proc.returncode == 0 and proc.stdout == b""
    assert b"nobody-home.sock: ENOENT; DEL spooled for replay" in proc.stderr
    spool = tmp_path / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    (entry,) = list(spool.iterdir())
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    stamp, pid = entry.name.split("-")  # the replay runs entries in name order: the time first
    assert len(stamp) == 20 and abs(int(stamp) - time.time_ns()) < 60e9 and int(pid) > 0
    request = decode_request(entry.read_bytes())
    assert request.env["CNI_COMMAND"] == "DEL" and request.env["CNI_CONTAINERID"] == "abc"
    assert request.stdin == config
    assert request.netns_errno == 2  # the netns could not be opened; DEL carries on without it


def test_full_spool_answers_11(shim: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    for i in range(255):
        (spool / f"{i:020d}-1").write_bytes(b"x")
    proc = run_shim(shim, cni_env("DEL"), netconf(tmp_path))  # the 256th entry still fits
    assert proc.returncode == 0 and len(list(spool.iterdir())) == 256
    proc = run_shim(shim, cni_env("DEL"), netconf(tmp_path))
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 11 and "spool is full" in err["msg"]
    assert len(list(spool.iterdir())) == 256


def test_a_spool_that_cannot_be_written_answers_11(shim: Path, tmp_path: Path) -> None:
    """A file where the spool directory should be: DEL fails retryably, naming the error."""
    (tmp_path / "spool").write_bytes(b"")
    proc = run_shim(shim, cni_env("DEL"), netconf(tmp_path))
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 11
    assert err["msg"].endswith(
        f"cannot spool DEL: [Errno 20] Not a directory: b'{tmp_path / 'spool'}'"
    )


# ---- never hangs, always one valid JSON (issue 12 §2) ---------------------------------------


def load_shim() -> ModuleType:
    """bin/moor as a module (its main() runs only as __main__), to test its pieces directly."""
    loader = importlib.machinery.SourceFileLoader("moor_shim", str(SHIM))
    spec = importlib.util.spec_from_loader("moor_shim", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_request_limit_is_the_same_in_the_shim_and_the_daemon() -> None:
    assert load_shim().MAX_REQUEST == MAX_REQUEST == 4 << 20


_shim_module: list[ModuleType] = []


def load_shim_once() -> ModuleType:
    if not _shim_module:
        _shim_module.append(load_shim())
    return _shim_module[0]


# Arbitrary text; undecodable bytes as the daemon and Python see them (lone surrogates); and
# strings dense in what JSON must escape.
texts = st.one_of(
    st.text(),
    st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.lists(st.sampled_from('\x00\x1f\x7f"\\\n\u2028\udcff\U0001f600a')).map("".join),
)


@settings(max_examples=500)
@given(texts)
def test_error_strings_are_valid_json_for_any_text(text: str) -> None:
    literal = load_shim_once().json_string(text)
    literal.encode("utf-8")  # printable as UTF-8: no lone surrogate survives
    assert json.loads(literal) == text


def test_an_unexpected_exception_is_code_999_json(capfd: pytest.CaptureFixture[str]) -> None:
    shim = load_shim()

    def broken() -> int:
        raise RuntimeError("a bug \x01 in the shim")

    shim.main = broken
    with pytest.raises(SystemExit) as exit_:
        shim.run()
    out, err = capfd.readouterr()
    assert exit_.value.code == 1
    reply = json.loads(out)
    assert reply["code"] == 999 and "RuntimeError: a bug \x01 in the shim" in reply["msg"]
    assert "Traceback" not in err and "moor shim bug" in err


def test_oversized_stdin_is_code_7_without_reading_it_all_or_connecting(
    shim: Path, tmp_path: Path
) -> None:
    """Over the limit the shim answers at once; a socket is listening, and nobody connected."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "nobody-home.sock"))
    listener.listen(1)
    listener.setblocking(False)
    started = time.monotonic()
    proc = run_shim(
        shim,
        cni_env("ADD", CNI_NETNS="/proc/self/ns/net"),
        netconf(tmp_path) + b" " * (5 << 20),
    )
    assert time.monotonic() - started < 5.0
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 7 and str(MAX_REQUEST) in err["msg"]
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


def test_closed_stdin_is_code_5(shim: Path) -> None:
    proc = subprocess.run(
        ["/bin/sh", "-c", 'exec "$0" <&-', str(shim)],
        env=cni_env("ADD", CNI_NETNS="/proc/self/ns/net"),
        capture_output=True,
        timeout=10,
    )
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 5
    assert err["msg"] == "cannot read the network config from stdin: Bad file descriptor (EBADF)"
    assert b"Traceback" not in proc.stderr and b"goroutine" not in proc.stderr


def unusable_netns(kind: str, where: Path) -> bytes:
    """A CNI_NETNS path that is no regular file: the shim must not open it (a FIFO would hang)."""
    if kind == "fifo":
        path = where / "ns-fifo"
        os.mkfifo(path)
    elif kind == "chardev":
        return b"/dev/null"
    elif kind == "directory":
        path = where / "ns-dir"
        path.mkdir()
    else:
        path = where / "ns.sock"
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(str(path))
    return os.fsencode(path)


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory", "socket"])
def test_a_netns_that_is_no_regular_file_is_code_4_at_once(
    shim: Path, tmp_path: Path, kind: str
) -> None:
    path = unusable_netns(kind, tmp_path)
    for command in ("ADD", "CHECK"):
        started = time.monotonic()
        proc = run_shim(shim, cni_env(command, CNI_NETNS=os.fsdecode(path)), netconf(tmp_path))
        assert time.monotonic() - started < 2.0
        err = json.loads(proc.stdout)
        assert proc.returncode == 1 and err["code"] == 4, err
        assert "not a network namespace" in err["msg"]
    # DEL carries on without the netns (here: the daemon is down, so it is spooled, with no fd).
    proc = run_shim(shim, cni_env("DEL", CNI_NETNS=os.fsdecode(path)), netconf(tmp_path))
    assert proc.returncode == 0 and proc.stdout == b""
    (entry,) = list((tmp_path / "spool").iterdir())
    assert decode_request(entry.read_bytes()).netns_errno == 0


def test_control_characters_and_invalid_utf8_in_paths_give_valid_json(
    shim: Path, tmp_path: Path
) -> None:
    weird = tmp_path / os.fsdecode(b'ns-\x01\x1b"\\\n\xff\xfe\xe2\x82')
    os.mkfifo(weird)
    env = {**cni_env("ADD"), "CNI_NETNS": os.fsencode(weird)}
    proc = run_shim(shim, env, netconf(tmp_path))  # type: ignore[arg-type]
    err = json.loads(proc.stdout)
    assert err["code"] == 4 and "\x01\x1b" in err["msg"] and '"\\\n' in err["msg"]
    assert "\ufffd\ufffd\ufffd is a FIFO" in err["msg"]  # one per ill-formed sequence, as Python
    config = b'{"cniVersion": "1.0.0", "name": "n", "daemonSocket": "/nowhere/\x01\x7f\xff.sock"}'
    proc = run_shim(shim, cni_env("ADD", CNI_NETNS="/proc/self/ns/net"), config)
    err = json.loads(proc.stdout)
    assert err["code"] == 11 and "/nowhere/\x01\x7f\ufffd.sock: ENOENT" in err["msg"]


def test_a_request_of_exactly_the_limit_is_sent_and_one_byte_more_is_code_7(
    shim: Path, tmp_path: Path
) -> None:
    """The limit counts header and stdin together, as the daemon does: at it the whole request
    reaches the socket; one byte over, the shim answers 7 without connecting."""
    daemon = FakeDaemon(tmp_path / "nobody-home.sock")
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/x"}
    header = b"MOOR1\0CNI_COMMAND=GC\0CNI_PATH=/x\0\0"
    config = netconf(tmp_path, "1.1.0")
    config += b" " * (MAX_REQUEST - len(header) - len(config))
    try:
        daemon.serve(b"0 0\n")
        proc = run_shim(shim, env, config)
        received = daemon.join()
        assert proc.returncode == 0 and proc.stdout == b"", proc
        assert received.data == header + config and len(received.data) == MAX_REQUEST
        proc = run_shim(shim, env, config + b" ")
        err = json.loads(proc.stdout)
        assert proc.returncode == 1 and err["code"] == 7
        assert err["msg"] == (
            f"the request is {MAX_REQUEST + 1} bytes, over moor's request limit of "
            f"{MAX_REQUEST} bytes"
        )
        daemon.listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            daemon.listener.accept()
    finally:
        daemon.stop()


@pytest.mark.parametrize("ignored", [False, True], ids=["default", "sigint-ignored"])
def test_ctrl_c_while_waiting_is_code_11_interrupted(
    shim: Path, tmp_path: Path, ignored: bool
) -> None:
    """SIGINT while the daemon thinks: one JSON document, 11 "interrupted" (never a traceback or
    a bare signal death); a shim started with SIGINT ignored keeps ignoring it, as Python does."""
    daemon = FakeDaemon(tmp_path / "nobody-home.sock")
    daemon.serve(HOLD)
    (tmp_path / "stdin").write_bytes(netconf(tmp_path))
    with open(tmp_path / "stdin", "rb") as stdin:
        proc = subprocess.Popen(
            [str(shim)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cni_env("CHECK", CNI_NETNS="/proc/self/ns/net"),
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None,
        )
    try:
        assert daemon.request_read.wait(10), "the shim never sent its request"
        proc.send_signal(signal.SIGINT)
        if ignored:  # the signal is discarded: the shim prints the answer that comes later
            daemon.release(b"0 0\n")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        daemon.stop()
    if ignored:
        assert proc.returncode == 0 and out == b"" and err == b""
        return
    reply = json.loads(out)
    assert proc.returncode == 1 and reply["code"] == 11 and reply["msg"] == "interrupted"
    assert b"Traceback" not in err and b"goroutine" not in err
