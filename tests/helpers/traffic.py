"""Traffic inside the simulated cluster's netns: an echo server that tells what it saw, a probe
client, and iperf3.

Everything runs as `ip netns exec NS /usr/bin/python3 -S -c SCRIPT` (Debian's interpreter, no site
packages: a few ms to start, no scapy). The server answers UDP and TCP on one port with
"<source ip> <source port> <bytes received>", so a test sees both reachability and whether the
packet was NATed on the way. Servers are long-lived and stopped by PID; probes are short-lived.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

PYTHON = "/usr/bin/python3"
ECHO_PORT = 7777

SERVER = r"""
import select, socket, sys
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen(64)
print("ready", flush=True)
while True:
    for s in select.select([u, t], [], [])[0]:
        if s is u:
            data, peer = u.recvfrom(65535)
            u.sendto(f"{peer[0]} {peer[1]} {len(data)}".encode(), peer)
            continue
        c, peer = t.accept()
        c.settimeout(3)
        n = 0
        try:
            while chunk := c.recv(65536):
                n += len(chunk)
            c.sendall(f"{peer[0]} {peer[1]} {n}".encode())
        except OSError:
            pass
        c.close()
"""

CLIENT = r"""
import json, socket, sys
out = []
for p in json.loads(sys.argv[1]):
    r = {"ok": False, "src": "", "length": 0, "error": ""}
    try:
        if p["proto"] == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if p["df"]:
                s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
            s.settimeout(p["timeout"])
            for _ in range(p["tries"]):
                s.sendto(b"x" * p["size"], (p["dst"], p["port"]))
                try:
                    reply = s.recv(256)
                    break
                except socket.timeout:
                    reply = b""
        else:
            s = socket.create_connection((p["dst"], p["port"]), timeout=p["timeout"] * p["tries"])
            s.sendall(b"x" * p["size"])
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(256)
        s.close()
        if reply:
            src, _port, n = reply.decode().split()
            r.update(ok=True, src=src, length=int(n))
        else:
            r["error"] = "timeout"
    except OSError as e:
        r["error"] = f"{type(e).__name__}: {e.strerror or e}"
    out.append(r)
print(json.dumps(out))
"""


def in_netns(netns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


@dataclass(frozen=True)
class Probe:
    """One message to an echo server: `size` payload bytes over UDP or TCP, optionally with DF."""

    dst: str
    proto: str = "udp"
    size: int = 32
    df: bool = False
    port: int = ECHO_PORT
    timeout: float = 1.0  # per try (UDP); TCP gets timeout * tries for the whole exchange
    tries: int = 2


@dataclass(frozen=True)
class Reply:
    ok: bool
    src: str = ""  # the source address the server saw
    length: int = 0  # the bytes it received
    error: str = ""  # "timeout", or the OSError (e.g. "OSError: Message too long")


class EchoServer:
    """The echo server in `netns` (started here; `wait_ready()` until it listens); `stop()` kills
    it by PID."""

    def __init__(self, netns: str, port: int = ECHO_PORT) -> None:
        self.netns = netns
        self.port = port
        self.proc = subprocess.Popen(
            in_netns(netns, PYTHON, "-S", "-c", SERVER, str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"echo server in {self.netns} did not start: {err.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def start_echo_servers(namespaces: list[str], port: int = ECHO_PORT) -> list[EchoServer]:
    """One server per netns, started side by side; all stopped again if one fails."""
    servers = [EchoServer(ns, port) for ns in namespaces]
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _spawn_probes(netns: str, probes: list[Probe]) -> subprocess.Popen:
    spec = json.dumps([p.__dict__ for p in probes])
    return subprocess.Popen(
        in_netns(netns, PYTHON, "-S", "-c", CLIENT, spec),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _collect(proc: subprocess.Popen, netns: str) -> list[Reply]:
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"probe client in {netns} failed: {err.strip()}")
    return [Reply(**r) for r in json.loads(out)]


def probe(netns: str, probes: list[Probe]) -> list[Reply]:
    """Send `probes` from `netns`, one after the other; a Reply per probe, in order."""
    return _collect(_spawn_probes(netns, probes), netns)


def probe_all(jobs: dict[str, list[Probe]]) -> dict[str, list[Reply]]:
    """`probe` from several netns at once (one client process each)."""
    procs = {ns: _spawn_probes(ns, probes) for ns, probes in jobs.items()}
    return {ns: _collect(proc, ns) for ns, proc in procs.items()}


def iperf3_throughput(
    client_ns: str, server_ns: str, server_ip: str, seconds: float = 3.0, port: int = 5201
) -> float:
    """TCP throughput from `client_ns` to an iperf3 server in `server_ns` at `server_ip`, in Gb/s
    (what the receiver got, from `iperf3 -J`). The server serves this one test and is killed by
    PID afterwards whatever happens."""
    server = subprocess.Popen(
        in_netns(server_ns, "iperf3", "-s", "-1", "-p", str(port), "-B", server_ip),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # the server listens a moment after it starts: retry a refused connect
            proc = subprocess.run(
                in_netns(
                    client_ns, "iperf3", "-J", "-c", server_ip, "-p", str(port), "-t", str(seconds)
                ),  # fmt: skip
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            result = json.loads(proc.stdout) if proc.stdout.strip() else {}
            if proc.returncode == 0 and "error" not in result:
                return result["end"]["sum_received"]["bits_per_second"] / 1e9
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 failed: {result.get('error') or proc.stderr.strip()}")
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)


def matrix(
    sources: list[tuple[str, str]], targets: list[tuple[str, str]], **probe: Any
) -> dict[tuple[str, str], Reply]:
    """Every (netns, ip) source probes every target but itself, all sources at once: the reply
    per (source netns, target netns). `probe` sets the Probe fields (proto, size, df ...)."""
    jobs = {src: [Probe(ip, **probe) for dst, ip in targets if dst != src] for src, _ in sources}
    replies = probe_all(jobs)
    out: dict[tuple[str, str], Reply] = {}
    for src, _ in sources:
        dsts = [dst for dst, _ in targets if dst != src]
        out.update({(src, dst): r for dst, r in zip(dsts, replies[src], strict=True)})
    return out


def unexpected(replies: dict[tuple[str, str], Reply], expected_src: dict[str, str]) -> list[str]:
    """The (source, target) pairs that got no answer, or whose answer saw another source address
    than `expected_src[source]`: one readable line each."""
    bad = []
    for (src, dst), r in sorted(replies.items()):
        if not r.ok:
            bad.append(f"{src} -> {dst}: {r.error}")
        elif r.src != expected_src[src]:
            bad.append(f"{src} -> {dst}: seen from {r.src}, expected {expected_src[src]}")
    return bad
