"""Plumbing for the CNI benchmark: exec a plugin and meter it, run moor-ipamd, own the host state.

Everything the bench creates on the host carries the `mbn` prefix (netns `mbn-m-N`/`mbn-r-N`,
bridges `mbnbr0`/`mbnref0`, moor's nat chain `MBN-MASQ`, the reference's per-container `CNI-*`
chains commented with network `benchref`), so `Host.cleanup()` can find and remove all of it,
including what a killed earlier run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import shims
from tests.helpers.moor import Daemon, plugin_config

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path("/usr/lib/cni")
REFERENCE_BRIDGE_PLUGIN = REFERENCE_DIR / "bridge"
PLUGIN_PATH_ENV = "/usr/sbin:/usr/bin:/sbin:/bin"  # the reference bridge execs iptables from PATH

PREFIX = "mbn-"
MOOR_NAME, MOOR_BRIDGE, MOOR_NETWORK, MOOR_NETNS = "benchmoor", "mbnbr0", "10.248.0.0/16", "mbn-m-"
REF_NAME, REF_BRIDGE, REF_SUBNET, REF_NETNS = "benchref", "mbnref0", "10.247.0.0/16", "mbn-r-"
MASQ_CHAIN = "MBN-MASQ"
CNI_VERSION = "1.0.0"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
PLUGIN_TIMEOUT = 120.0
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def reference_chain(container_id: str) -> str:
    """The nat chain name the reference bridge plugin (utils.FormatChainName) gives a container."""
    return "CNI-" + hashlib.sha512(f"{REF_NAME}{container_id}".encode()).hexdigest()[:24]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a host tool (ip, iptables); not timed, so plain subprocess is fine."""
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


# -- exec and meter one plugin call ----------------------------------------------------------


@dataclass(frozen=True)
class Exec:
    """One finished plugin process."""

    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float  # wall time from spawn to reap
    cpu: float  # user + system seconds of the process and every descendant it waited for

    def json(self) -> dict[str, Any]:
        try:
            out = json.loads(self.stdout) if self.stdout.strip() else {}
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}

    def error(self) -> str:
        """A one-line reason, for failure reports."""
        out = self.json()
        msg = out.get("msg") or self.stdout.decode(errors="replace").strip()
        detail = out.get("details") or self.stderr.decode(errors="replace").strip()
        return f"rc={self.rc} code={out.get('code')} {msg} {detail}".strip()[:400]


def _wait(pid: int, timeout: float) -> tuple[int, Any]:
    """wait4() the child, so its rusage (incl. reaped grandchildren) comes with its status.

    A pidfd gives the timeout; on timeout or interruption the child is still reaped (killed if
    it will not finish), so no zombie or half-done plugin is left behind.
    """
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        return status, usage
    except BaseException:
        ready, _, _ = select.select([pidfd], [], [], 30.0)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.wait4(pid, 0)
        raise
    finally:
        os.close(pidfd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def run_plugin(path: Path, env: dict[str, str], stdin: bytes) -> Exec:
    """Exec a CNI plugin with `env` and `stdin`; return its output, wall time and CPU.

    stdin/stdout/stderr are memfds rather than pipes: no pump thread or select loop runs while
    the plugin does, so the harness adds nothing but a posix_spawn and a wait4 to either plugin.
    """
    fds = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("stdin", "stdout", "stderr")]
    try:
        view = memoryview(stdin)
        while view:
            view = view[os.write(fds[0], view) :]
        os.lseek(fds[0], 0, os.SEEK_SET)
        actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
        started = time.perf_counter()
        pid = os.posix_spawn(str(path), [str(path)], env, file_actions=actions)
        status, usage = _wait(pid, PLUGIN_TIMEOUT)
        seconds = time.perf_counter() - started
        return Exec(
            rc=os.waitstatus_to_exitcode(status),
            stdout=_read_all(fds[1]),
            stderr=_read_all(fds[2]),
            seconds=seconds,
            cpu=usage.ru_utime + usage.ru_stime,
        )
    finally:
        for fd in fds:
            os.close(fd)


# -- the two plugins under test --------------------------------------------------------------


@dataclass
class Plugin:
    """One CNI network as a runtime sees it: executable, netconf, and libcni's result cache."""

    key: str  # "moor" or "reference", the table's column
    path: Path
    conf: dict[str, Any]
    cni_path: str
    netns_prefix: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def netns(self, index: int) -> str:
        return f"{self.netns_prefix}{index}"

    def call(self, command: str, container_id: str, netns_index: int) -> Exec:
        """One CNI call; CHECK and DEL carry the ADD result as prevResult, as libcni does."""
        conf = dict(self.conf)
        prev = self.results.get(container_id)
        if command in ("CHECK", "DEL") and prev is not None:
            conf["prevResult"] = prev
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{self.netns(netns_index)}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.cni_path,
            "PATH": PLUGIN_PATH_ENV,
        }
        done = run_plugin(self.path, env, json.dumps(conf).encode())
        if done.rc == 0 and command == "ADD":
            self.results[container_id] = done.json()
        elif done.rc == 0 and command == "DEL":
            self.results.pop(container_id, None)
        return done


def moor_plugin(daemon: MoorDaemon, shim: Path = shims.STATIC_SHIM) -> Plugin:
    """moor through `shim`: build/moor (the static one the image installs) or bin/moor."""
    conf = plugin_config(MOOR_NAME, CNI_VERSION, daemon.plugin())
    return Plugin("moor", shim, conf, f"{shim.parent}:{REFERENCE_DIR}", MOOR_NETNS)


def reference_plugin(data_dir: Path) -> Plugin:
    conf = {
        "cniVersion": CNI_VERSION,
        "name": REF_NAME,
        "type": "bridge",
        "bridge": REF_BRIDGE,
        "isGateway": True,
        "ipMasq": True,
        "ipam": {
            "type": "host-local",
            "dataDir": str(data_dir),
            "ranges": [[{"subnet": REF_SUBNET}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    }
    return Plugin("reference", REFERENCE_BRIDGE_PLUGIN, conf, str(REFERENCE_DIR), REF_NETNS)


# -- moor-ipamd ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Child side of Popen: get SIGTERM if the bench dies without cleaning up (e.g. SIGKILL)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ProcessCpu:
    """CPU seconds of a live process (all its threads) plus the children it has reaped.

    The process's own time comes from its CPU-time clock (clock_getcpuclockid), which has
    nanosecond resolution, rather than /proc/PID/stat's 10 ms ticks; the reaped children (the
    iptables execs of moor's masquerade check) only exist in /proc/PID/stat, in ticks.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        clock = ctypes.c_int()
        if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
            raise OSError(ctypes.get_errno(), f"clock_getcpuclockid({pid})")
        self.clock = clock.value
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        own = time.clock_gettime(self.clock)
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        children = int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16 and 17)
        return own + children / self.tick


class MoorDaemon(Daemon):
    """The tests' moor-ipamd, tuned for measuring: quiet logs, no fault hook, its own session."""

    def __init__(self, workdir: Path, log_level: str = "warning") -> None:
        super().__init__(
            workdir=workdir,
            name="mbn-node",
            network=MOOR_NETWORK,
            bridge=MOOR_BRIDGE,
            log_level=log_level,
            fault_injection=False,
        )

    @property
    def masq_chain(self) -> str:
        return MASQ_CHAIN

    def start(self, timeout: float = 30.0) -> ProcessCpu:
        """Start it in its own session (a Ctrl-C must not stop it before the bench's DELs)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moor-ipamd exited {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.cni_socket) and os.path.exists(self.grpc_socket):
                return ProcessCpu(self.proc.pid)
            time.sleep(0.05)
        raise RuntimeError(f"moor-ipamd not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# -- host state ------------------------------------------------------------------------------


def _netns_names() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _nat_rules() -> list[str]:
    return sh("iptables", "--wait=10", "-t", "nat", "-S", check=False).stdout.splitlines()


class Host:
    """What the bench changes on the host, and the undo of all of it."""

    def __init__(self) -> None:
        self.ip_forward = IP_FORWARD.read_text().strip()

    @staticmethod
    def make_netns(names: list[str]) -> None:
        """Create the pod netns (with lo up, as a runtime's loopback plugin would leave it)."""
        lines = [f"netns add {name}" for name in names]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
        for name in names:
            sh("ip", "-n", name, "link", "set", "lo", "up")

    @staticmethod
    def remove_reference_chains(container_ids: Iterable[str]) -> None:
        """The reference's per-container CNI-* nat chains of network `benchref` (DEL leftovers).

        Rules are found by their comment. A chain the plugin created but had not filled yet
        (it was killed mid-ADD) has no comment, so it is found by name: the plugin names it
        "CNI-" + the first 24 hex digits of sha512(network name + container ID).
        """
        needle = f'name: \\"{REF_NAME}\\"'
        rules = _nat_rules()
        chains = {reference_chain(cid) for cid in container_ids} & {
            line.split()[1] for line in rules if line.startswith("-N CNI-")
        }
        for line in rules:
            if needle not in line:
                continue
            parts = shlex.split(line)
            if parts[:2] == ["-A", "POSTROUTING"]:
                sh("iptables", "--wait=10", "-t", "nat", "-D", *parts[1:], check=False)
                if "-j" in parts:
                    chains.add(parts[parts.index("-j") + 1])
            elif parts[0] == "-A" and parts[1].startswith("CNI-"):
                chains.add(parts[1])
        for chain in sorted(chains):
            if chain.startswith("CNI-"):
                sh("iptables", "--wait=10", "-t", "nat", "-F", chain, check=False)
                sh("iptables", "--wait=10", "-t", "nat", "-X", chain, check=False)

    def cleanup(self, reference_ids: Iterable[str]) -> list[str]:
        """Remove everything the bench made; returns what could not be removed, as text.

        `reference_ids`: every container ID the reference plugin may have been called with."""
        problems: list[str] = []
        for name in _netns_names():
            if name.startswith(PREFIX):
                sh("ip", "netns", "del", name, check=False)
        for bridge in (MOOR_BRIDGE, REF_BRIDGE):
            if sh("ip", "link", "show", bridge, check=False).returncode == 0:
                sh("ip", "link", "del", bridge, check=False)
        self.remove_reference_chains(reference_ids)
        try:
            from cni_plugin.datapath.masq import MasqueradeRules

            MasqueradeRules(MASQ_CHAIN).remove()
        except Exception as exc:  # noqa: BLE001 - report, keep cleaning
            problems.append(f"removing nat chain {MASQ_CHAIN}: {exc}")
        try:
            IP_FORWARD.write_text(self.ip_forward + "\n")
        except OSError as exc:
            problems.append(f"restoring net.ipv4.ip_forward={self.ip_forward}: {exc}")
        return problems + self.leftovers(reference_ids)

    def leftovers(self, reference_ids: Iterable[str]) -> list[str]:
        """Anything of ours still on the host (before a run: a killed run's; after: a bug)."""
        found = [f"netns {n}" for n in _netns_names() if n.startswith(PREFIX)]
        links = sh("ip", "-o", "link", "show", check=False).stdout
        found += [f"link {b}" for b in (MOOR_BRIDGE, REF_BRIDGE) if f" {b}:" in links]
        chains = {reference_chain(cid) for cid in reference_ids} | {MASQ_CHAIN}
        found += [
            f"nat rule {line}"
            for line in _nat_rules()
            if f'\\"{REF_NAME}\\"' in line or set(line.split()) & chains
        ]
        if IP_FORWARD.read_text().strip() != self.ip_forward:
            found.append(f"net.ipv4.ip_forward is not back to {self.ip_forward}")
        return found


@contextlib.contextmanager
def sigterm_as_interrupt() -> Any:
    """SIGTERM takes the same clean-up path as Ctrl-C."""

    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def no_interrupts() -> Any:
    """Shield the clean-up itself from a second Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
