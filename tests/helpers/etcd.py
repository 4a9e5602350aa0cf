"""A real etcd (Debian's etcd-server) on random loopback ports in a temp dir, for tests and bench.

Started and stopped by PID; `stop()` then `start()` again keeps the data dir, which is how the
outage tests take etcd away and bring it back. With `netns` set, etcd and every etcdctl run
inside that network namespace (`ip netns exec`, which execs, so the PID is still etcd's) and
listen on `host` there: the simulated cluster (tests/helpers/cluster.py) runs it that way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

ETCD_BINARY = "/usr/bin/etcd"


def available() -> tuple[bool, str]:
    if shutil.which(ETCD_BINARY) is None:
        return False, f"{ETCD_BINARY} missing (apt package etcd-server; `make apt` installs it)"
    return True, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=moor-test-ca",
        "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=moor-test-{name}",
            "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr")  # fmt: skip
        (directory / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{d}/{name}.ext", "-out", f"{d}/{name}.crt")  # fmt: skip
    return TlsFiles(
        f"{d}/ca.crt", f"{d}/server.crt", f"{d}/server.key", f"{d}/client.crt", f"{d}/client.key"
    )


@dataclass
class EtcdServer:
    workdir: Path
    name: str = "moor-test"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None  # serve clients over TLS, requiring client certificates
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"  # the address it listens on (inside `netns` when that is set)
    netns: str = ""  # run etcd and etcdctl inside this network namespace

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    @property
    def url(self) -> str:
        """The daemon's `--store` value."""
        return f"etcd://{self.endpoint}"

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        argv = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls:
            argv += [
                "--cert-file", self.tls.server_cert,
                "--key-file", self.tls.server_key,
                "--trusted-ca-file", self.tls.ca,
                "--client-cert-auth",
            ]  # fmt: skip
        with open(self.workdir / "etcd.log", "ab") as log:
            self.proc = self.spawn(self._in_netns(argv), log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {timeout} s: {self.log_tail()}")

    def spawn(self, argv: list[str], log: BinaryIO) -> subprocess.Popen:
        """Start the process (the bench overrides this so etcd dies with it)."""
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )

    def _etcdctl_argv(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        argv = ["etcdctl", f"--endpoints={scheme}://{self.endpoint}"]
        if self.tls:
            argv += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        return self._in_netns(argv)

    def healthy(self) -> bool:
        env = {**os.environ, "ETCDCTL_API": "3"}
        argv = [*self._etcdctl_argv(), "--command-timeout=1s", "endpoint", "health"]
        return subprocess.run(argv, capture_output=True, env=env).returncode == 0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; only our own process."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "etcd.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def etcdctl(self, *args: str) -> str:
        env = {**os.environ, "ETCDCTL_API": "3"}
        r = subprocess.run(
            [*self._etcdctl_argv(), *args],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return r.stdout

    def wipe_data_dir(self) -> None:
        """Stop, delete the data dir, start again on the same ports: an etcd that lost it all."""
        self.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)
        self.start()

    def snapshot(self, path: Path) -> None:
        self.etcdctl("snapshot", "save", str(path))

    def restore(self, path: Path) -> None:
        """Stop, restore `path` into a fresh data dir, start: an etcd rolled back to a backup."""
        self.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)
        env = {**os.environ, "ETCDCTL_API": "3"}
        peer = f"http://{self.host}:{self.peer_port}"
        subprocess.run(
            [
                "etcdctl",
                "snapshot",
                "restore",
                str(path),
                "--data-dir",
                str(self.workdir / "data"),
                "--name",
                self.name,
                "--initial-cluster",
                f"{self.name}={peer}",
                "--initial-advertise-peer-urls",
                peer,
            ],  # fmt: skip
            capture_output=True,
            env=env,
            check=True,
        )
        self.start()

    def wipe(self) -> None:
        """Delete every key and revoke every lease (tests that count revisions start clean)."""
        self.etcdctl("del", "", "--from-key")
        for line in self.etcdctl("lease", "list").splitlines()[1:]:
            if line.strip():
                self.etcdctl("lease", "revoke", line.strip())
