"""Every input gets its documented code: hostile env and stdin through the REAL shim.

Each example execs `bin/moor` (as a runtime does) against one running moor-ipamd, with env and
stdin from tests/helpers/fuzzgen.py. Properties of every call:
- stdout is exactly one strict JSON document (UTF-8, no NaN, no lone surrogates) or empty;
- a success exits 0 (ADD prints a result; DEL/CHECK/GC/STATUS print nothing), an error exits 1
  with an integer `code` from SPEC-NOTES.md's error table (parsed from the file, so docs and code
  cannot drift), never 999 (a bug) and never 11 (the daemon is up and its store is local: an 11
  here would be a permanent error called retryable, or the daemon failing to reply);
- it answers within 2 s, the daemon stays up, and a failed ADD leaves no host veth behind.
Afterwards every successful ADD is DELeted, and the daemon must hold no allocation and the host
no veth of any container ID the run used.

CI runs a fixed, derandomized sample; MOOR_FUZZ_EXAMPLES=5000 explores further.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings

from cni_plugin.datapath.veth import host_veth_name
from cni_plugin.naming import valid_container_id, valid_ifname
from tests.conftest import _run_id, host_links_with_prefix, start_daemon
from tests.helpers import oracle
from tests.helpers.fuzzgen import OTHER_BRIDGE, POD_NETNS, SUPPORTED, Call, calls, mutate
from tests.helpers.moor import REPO, SHIM, Daemon, delete_netns, make_netns, run_cmd

pytestmark = pytest.mark.netns
EXAMPLES = int(os.environ.get("MOOR_FUZZ_EXAMPLES", "500"))
CALL_TIMEOUT = 2.0


def documented_codes() -> frozenset[int]:
    """The codes of SPEC-NOTES.md's "Error codes" table."""
    text = (REPO / "SPEC-NOTES.md").read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    codes = frozenset(int(c) for c in re.findall(r"^\| (\d+) \|", section, re.MULTILINE))
    assert {1, 4, 6, 7, 104, 999} <= codes, f"error table not found or incomplete: {codes}"
    return codes


CODES = documented_codes()


@dataclass
class Target:
    daemon: Daemon
    paths: dict[str, str | None]
    added: list[tuple[dict, bytes]] = field(default_factory=list)  # every successful ADD
    history: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # for failure reports
    results: dict[tuple[str, str], dict] = field(default_factory=dict)  # cached prevResults
    ever_added: set[tuple[str, str]] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    codes: dict[int, int] = field(default_factory=dict)  # what the run saw, for the log

    def env(self, call: Call) -> dict[str, str | bytes]:
        env: dict[str, str | bytes] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        values = {
            "CNI_COMMAND": call.command,
            "CNI_CONTAINERID": call.container_id,
            "CNI_IFNAME": call.ifname,
            "CNI_ARGS": call.cni_args,
            "CNI_NETNS": self.paths[call.netns],
            "CNI_PATH": str(SHIM.parent),
        }
        env.update({k: v for k, v in values.items() if v is not None})
        return env

    def stdin(self, call: Call) -> bytes:
        if call.config is None:
            return call.raw
        config = json.loads(json.dumps(call.config))  # a private copy
        prev = self.results.get((_text(call.container_id), _text(call.ifname)))
        if call.with_prev and prev is not None:
            config["prevResult"] = prev
        for path, value in call.mutations:
            mutate(config, path, value)
        return json.dumps(config).encode()


def _text(value: str | bytes | None) -> str:
    """An env value as the daemon reads it (the wire decodes with surrogateescape)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value or ""


def exec_shim(env: dict[str, str | bytes], stdin: bytes) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [str(SHIM)], input=stdin, env=env, capture_output=True, timeout=CALL_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {CALL_TIMEOUT} s: env={env!r} stdin={stdin[:300]!r}")


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _unicode_only(value: Any) -> None:
    """Every string of a parsed document encodes as UTF-8 (no "\\udcxx" lone surrogates)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, list):
        for item in value:
            _unicode_only(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _unicode_only(key)
            _unicode_only(item)


def strict_json(stdout: bytes) -> Any:
    doc = json.loads(stdout.decode("utf-8"), parse_constant=_refuse)
    _unicode_only(doc)
    return doc


def check_reply(call: Call, proc: subprocess.CompletedProcess) -> int:
    """The properties of one call (module docstring); returns the CNI code (0: success)."""
    where = f"call={call!r}\nrc={proc.returncode}\nstdout={proc.stdout[:2000]!r}\n"
    where += f"stderr={proc.stderr[-3000:]!r}"
    command = _text(call.command)
    if not command:  # no CNI_COMMAND: the about text on stderr, as the reference skel does
        assert proc.returncode == 0 and proc.stdout == b"", where
        return 0
    if proc.returncode == 0 and command in ("DEL", "CHECK", "GC", "STATUS"):
        assert proc.stdout == b"", where
        return 0
    try:
        doc = strict_json(proc.stdout)
    except (ValueError, UnicodeError) as exc:
        pytest.fail(f"stdout is not one strict JSON document ({exc}):\n{where}")
    assert isinstance(doc, dict), where
    assert doc.get("cniVersion") in SUPPORTED, where
    if proc.returncode == 0:
        assert command in ("ADD", "VERSION") and "code" not in doc, where
        assert ("supportedVersions" in doc) == (command == "VERSION"), where
        return 0
    assert proc.returncode == 1, where
    code = doc.get("code")
    assert isinstance(code, int) and not isinstance(code, bool), where
    assert isinstance(doc.get("msg"), str), where
    assert code in CODES, f"code {code} is not in SPEC-NOTES' error table:\n{where}"
    assert code != 999, f"999 is a bug in moor:\n{where}"
    if call.stdin_kind != "empty":  # empty stdin cannot name our daemon: the shim answers alone
        assert code != 11, f"11 from a reachable daemon with a local store:\n{where}"
    return code


def run_one(target: Target, call: Call) -> None:
    # An empty stdin cannot name our daemon: as a DEL the shim would spool it to /var/lib/moor.
    assume(not (call.stdin_kind == "empty" and _text(call.command) == "DEL"))
    env, stdin = target.env(call), target.stdin(call)
    proc = exec_shim(env, stdin)
    code = check_reply(call, proc)
    target.codes[code] = target.codes.get(code, 0) + 1
    assert target.daemon.proc is not None and target.daemon.proc.poll() is None, "daemon died"
    pair = (_text(call.container_id), _text(call.ifname))
    if valid_container_id(pair[0]) and valid_ifname(pair[1]):  # else the daemon refused it
        target.pairs.add(pair)
        target.history.setdefault(pair, []).append(f"{call.command} -> {code}: {stdin[:400]!r}")
    if _text(call.command) != "ADD":
        return
    if code == 0:
        target.added.append((env, stdin))
        target.ever_added.add(pair)
        target.results[pair] = json.loads(proc.stdout)
    elif pair in target.pairs and pair not in target.ever_added:
        veth = host_veth_name(*pair)
        assert oracle.link(veth) is None, f"failed ADD left host veth {veth}: {call!r}"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("fuzz")
    daemon = start_daemon(work / "node", "mfz", "10.226.0.0/16", "mfzbr0", fault_injection=False)
    names = [f"mfz-{_run_id}-{i}" for i in range(len(POD_NETNS))]
    regular = work / "not-a-netns"
    regular.write_text("x")
    fifo = work / "fifo-netns"
    os.mkfifo(fifo)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(work / "socket-netns"))
    try:
        paths: dict[str, str | None] = {
            "missing": None,
            "empty": "",
            **{kind: make_netns(name) for kind, name in zip(POD_NETNS, names, strict=True)},
            "nonexistent": f"/run/netns/mfz-{_run_id}-absent",
            "file": str(regular),
            "host": "/proc/self/ns/net",
            "fifo": str(fifo),  # opening it would block: the shim must never
            "device": "/dev/null",
            "directory": str(work),
            "socket": str(work / "socket-netns"),
        }
        yield Target(daemon, paths)
    finally:
        listening.close()
        for name in names:
            delete_netns(name)
        daemon.cleanup_host()
        run_cmd("ip", "link", "del", OTHER_BRIDGE, check=False)


def test_every_input_gets_its_documented_code(target: Target) -> None:
    daemon = target.daemon
    socket, spool = daemon.cni_socket, daemon.spool_dir

    @settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=EXAMPLES,
        suppress_health_check=list(HealthCheck),
    )
    @given(call=calls(socket, spool))
    def one(call: Call) -> None:
        run_one(target, call)

    try:
        one()
    finally:
        for env, stdin in reversed(target.added):
            proc = exec_shim({**env, "CNI_COMMAND": "DEL"}, stdin)
            assert proc.returncode == 0, f"DEL failed: {proc.stdout!r} {env!r} {stdin!r}"
    print(f"codes seen: {dict(sorted(target.codes.items()))}; successful ADDs: {len(target.added)}")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.status()["allocations"] == [], "allocations left after DEL of every ADD"
    deadline = time.monotonic() + 5  # DEL leaves the host veth's deletion to the background
    while True:
        veths = set(host_links_with_prefix("veth"))
        leftover = {str(p): target.history[p] for p in target.pairs if host_veth_name(*p) in veths}
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leftover, f"host veths left: {json.dumps(leftover, indent=1)}"
    assert not os.path.exists(spool) or not os.listdir(spool), "a DEL was spooled"
