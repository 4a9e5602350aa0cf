"""`make demo [STORE=etcd]`: one node end to end, then everything torn down.
(`make demo CLUSTER=3 [BACKEND=vxlan]` runs a simulated multi-node cluster instead: demo/cluster.py.)

moor-ipamd on the embedded store (or, with `--store etcd`, on a local etcd started in the demo's
temp dir on random loopback ports); three pod netns networked through bin/moor by the real libcni
(tests/cnidrv); each pod's IP; a connectivity matrix (UDP echo, since the machine has no ping);
`moorctl status`; with etcd, the keys the cluster state is made of and one IP record; teardown
(etcd included, by PID). Traffic stays inside the demo's own netns and bridge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PODS = ("moor-demo-1", "moor-demo-2", "moor-demo-3")
BRIDGE = "moordemo0"
NETWORK = "10.244.0.0/16"
CHAIN = "MOOR-DEMO-MASQ"
ECHO_PORT = 7777
ECHO_SERVER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"s.bind(('0.0.0.0', {ECHO_PORT}))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(64)\n"
    "    s.sendto(data, peer)\n"
)
PROBE = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(1.0)\n"
    "for target in sys.argv[1:]:\n"
    "    t = time.perf_counter()\n"
    "    try:\n"
    f"        s.sendto(b'ping', (target, {ECHO_PORT}))\n"
    "        s.recvfrom(64)\n"
    "        print(f'{(time.perf_counter() - t) * 1000:.2f}')\n"
    "    except OSError:\n"
    "        print('-')\n"
)


def sh(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def main() -> int:
    parser = argparse.ArgumentParser(prog="make demo")
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "etcd"])
    parser.add_argument(
        "--cluster", type=int, default=0, metavar="N", help="N simulated nodes (always on etcd)"
    )
    parser.add_argument("--backend", default="host-gw", choices=["host-gw", "vxlan"])
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, a bridge, iptables)")
        return 1
    sys.path.insert(0, str(REPO))
    if opts.cluster:
        if not 2 <= opts.cluster <= 9:
            print("make demo CLUSTER=N: N from 2 to 9")
            return 1
        from demo.cluster import run

        return run(opts.cluster, opts.backend)
    from tests.helpers import cnidrv, etcd

    if opts.store == "etcd":
        ok, why = etcd.available()
        if not ok:
            print(f"make demo STORE=etcd: {why}")
            return 1

    work = Path(tempfile.mkdtemp(prefix="moor-demo-"))
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    daemon: subprocess.Popen | None = None
    etcd_server: etcd.EtcdServer | None = None
    echoes: list[subprocess.Popen] = []
    netconf_dir, bin_dir = work / "net.d", work / "cni-bin"
    netconf_dir.mkdir()
    bin_dir.mkdir()
    (bin_dir / "moor").symlink_to(REPO / "bin" / "moor")
    cni_socket, grpc_socket = work / "run" / "cni.sock", work / "run" / "ipamd.sock"
    conflist = {
        "cniVersion": "1.0.0",
        "name": "demo",
        "plugins": [
            {
                "type": "moor",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,
                "ipMasq": True,
                "daemonSocket": str(cni_socket),
                "spoolDir": str(work / "spool"),
            }
        ],
    }
    (netconf_dir / "10-demo.conflist").write_text(json.dumps(conflist, indent=2))
    driver = cnidrv.build()

    def cni(verb: str, pod: str) -> subprocess.CompletedProcess:
        return cnidrv.run(
            verb,
            "demo",
            f"/run/netns/{pod}",
            netconf_dir=netconf_dir,
            cni_path=[str(bin_dir), "/usr/lib/cni"],
            cache_dir=work / "cache",
            cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={pod}",
        )

    try:
        if opts.store == "etcd":
            etcd_server = etcd.EtcdServer(work / "etcd", name="moor-demo")
            print(f"== starting etcd on {etcd_server.endpoint} (data in {etcd_server.workdir})")
            etcd_server.start()
            store, where = etcd_server.url, f"etcd {etcd_server.endpoint}"
        else:
            store, where = f"sqlite://{work}/store.db", f"embedded store {work}/store.db"
        print(f"== starting moor-ipamd ({where}, network {NETWORK})")
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ipamd",
                "--node-name",
                "demo-node",
                "--store",
                store,
                "--network",
                NETWORK,
                "--cni-socket",
                str(cni_socket),
                "--grpc-socket",
                str(grpc_socket),
                "--spool-dir",
                str(work / "spool"),
                "--state-dir",
                str(work / "state"),
                "--masq-chain",
                CHAIN,
                "--log-level",
                "warning",
            ],
            cwd=REPO,
        )
        deadline = time.monotonic() + 15
        while not (cni_socket.exists() and grpc_socket.exists()):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moor-ipamd did not start")
            time.sleep(0.05)

        print(f"== creating {len(PODS)} pods through libcni ({driver.name}) -> bin/moor")
        ips: dict[str, str] = {}
        for pod in PODS:
            sh("ip", "netns", "add", pod)
            added = cni("add", pod)
            if added.returncode != 0:
                raise RuntimeError(f"ADD {pod} failed: {added.stderr.strip()}")
            ips[pod] = json.loads(added.stdout)["ips"][0]["address"]
            print(f"   {pod}: {ips[pod]}")
        first = json.loads(
            sh(
                sys.executable,
                "-m",
                "ipamd.cli",
                "--socket",
                str(grpc_socket),
                "status",
                "--json",
                cwd=REPO,
            ).stdout
        )
        gw = first["subnets"][0]["gateway"]

        for pod in PODS:
            echoes.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", pod, "/usr/bin/python3", "-c", ECHO_SERVER]
                )
            )
        echoes.append(
            subprocess.Popen(["/usr/bin/python3", "-c", ECHO_SERVER.replace("0.0.0.0", gw)])
        )
        time.sleep(0.5)

        targets = [ips[p].split("/")[0] for p in PODS] + [gw]
        print("\n== connectivity (UDP echo round trip, ms; '-' = no answer)")
        header = ["from \\ to"] + list(PODS) + [f"host {gw}"]
        rows = []
        for pod in PODS:
            probe = sh(
                "ip", "netns", "exec", pod, "/usr/bin/python3", "-c", PROBE, *targets, timeout=30
            )
            rows.append([pod] + probe.stdout.split())
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))

        print("\n== moorctl status")
        print(
            sh(
                sys.executable, "-m", "ipamd.cli", "--socket", str(grpc_socket), "status", cwd=REPO
            ).stdout
        )
        if etcd_server is not None:
            print(f"== the cluster state in etcd ({etcd_server.endpoint})")
            print("$ etcdctl get /moor --prefix --keys-only")
            for key in etcd_server.etcdctl("get", "/moor", "--prefix", "--keys-only").split():
                print(f"   {key}")
            first_ip = f"/moor/ips/{ips[PODS[0]].split('/')[0]}"
            print(f"$ etcdctl get {first_ip} --print-value-only")
            record = etcd_server.etcdctl("get", first_ip, "--print-value-only")
            print(json.dumps(json.loads(record), indent=2))
            print()
        ok = all(c != "-" for r in rows for c in r[1:])
        print("all pods reach each other and the host" if ok else "SOME PATHS FAILED")
        return 0 if ok else 1
    finally:
        print("== tearing down")
        try:
            for p in echoes:
                p.kill()
                p.wait()
            for pod in PODS:
                if Path(f"/run/netns/{pod}").exists():
                    cni("del", pod)
                    sh("ip", "netns", "del", pod, check=False)
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            sh("ip", "link", "del", BRIDGE, check=False)
            from cni_plugin.datapath.masq import MasqueradeRules

            MasqueradeRules(CHAIN).remove()
            Path("/proc/sys/net/ipv4/ip_forward").write_text(forward_before)
        finally:
            if etcd_server is not None:
                etcd_server.stop()  # its own process only, by PID (SIGTERM, then SIGKILL)
            sh("rm", "-rf", str(work))


if __name__ == "__main__":
    sys.exit(main())
