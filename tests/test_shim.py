"""bin/moor on its own: what it imports, and how it answers when no daemon is there.

These run the real executable (its shebang, /usr/bin/python3 -SE), with no daemon behind the socket.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cni_plugin.netconf import SUPPORTED_VERSIONS
from cni_plugin.wire import decode_request

SHIM = Path(__file__).resolve().parent.parent / "bin" / "moor"


def run_shim(env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(SHIM)], input=stdin, env=env, capture_output=True, timeout=10)


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


def test_version_answered_locally() -> None:
    proc = run_shim({"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def test_about_text_without_command() -> None:
    proc = run_shim({})
    assert (
        proc.returncode == 0
        and proc.stdout == b""
        and b"CNI protocol versions supported" in proc.stderr
    )


@pytest.mark.parametrize("nested", [False, True], ids=["main", "ipam-section"])
def test_add_and_check_answer_11_fast_when_daemon_down(tmp_path: Path, nested: bool) -> None:
    for command in ("ADD", "CHECK"):
        started = time.monotonic()
        proc = run_shim(
            cni_env(command, CNI_NETNS="/proc/self/ns/net"), netconf(tmp_path, nested=nested)
        )
        assert time.monotonic() - started < 1.0
        err = json.loads(proc.stdout)
        assert proc.returncode == 1 and err["code"] == 11 and err["cniVersion"] == "1.0.0"
        assert "nobody-home.sock" in err["msg"]


def test_status_answers_50_when_daemon_down(tmp_path: Path) -> None:
    proc = run_shim({"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, netconf(tmp_path, "1.1.0"))
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 50


def test_del_is_spooled_root_only_and_replayable(tmp_path: Path) -> None:
    config = netconf(tmp_path)
    proc = run_shim(cni_env("DEL", CNI_NETNS="/does/not/exist", CNI_ARGS="IgnoreUnknown=1"), config)
    assert proc.returncode == 0 and proc.stdout == b""
    spool = tmp_path / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    (entry,) = list(spool.iterdir())
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    request = decode_request(entry.read_bytes())
    assert request.env["CNI_COMMAND"] == "DEL" and request.env["CNI_CONTAINERID"] == "abc"
    assert request.stdin == config
    assert request.netns_errno == 2  # the netns could not be opened; DEL carries on without it


def test_full_spool_answers_11(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    for i in range(256):
        (spool / f"{i:020d}-1").write_bytes(b"x")
    proc = run_shim(cni_env("DEL"), netconf(tmp_path))
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 11
    assert len(list(spool.iterdir())) == 256
