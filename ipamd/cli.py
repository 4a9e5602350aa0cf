"""moorctl: the admin CLI over moor-ipamd's gRPC API. Tables for people, `--json` for scripts.

Errors are one clear line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

DEFAULT_SOCKET = "/run/moor/ipamd.sock"


def _status(stub: Any) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2

    r = stub.Status(ipam_pb2.StatusRequest(), timeout=10)
    return {
        "node": r.node,
        "ready": r.ready,
        "reason": r.reason,
        "network": r.network,
        "cooldownSeconds": r.cooldown_seconds,
        "subnets": [
            {
                "subnet": s.subnet,
                "gateway": s.gateway,
                "total": s.total,
                "used": s.used,
                "free": s.free,
                "cooling": s.cooling,
            }
            for s in r.subnets
        ],
        "allocations": [
            {
                "ip": a.ip,
                "pod": f"{a.owner.pod_namespace}/{a.owner.pod_name}" if a.owner.pod_name else "",
                "podUID": a.owner.pod_uid,
                "network": a.owner.network,
                "containerID": a.owner.container_id,
                "ifname": a.owner.ifname,
                "since": a.since,
                "netns": a.netns,
                "hostVeth": a.host_veth,
            }
            for a in r.allocations
        ],
    }


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render_status(data: dict[str, Any]) -> str:
    state = "ready" if data["ready"] else f"NOT READY ({data['reason']})"
    out = [f"node {data['node']}  network {data['network']}  {state}", ""]
    out.append(
        table(
            ["SUBNET", "GATEWAY", "USED", "FREE", "COOLING", "TOTAL"],
            [
                [
                    s["subnet"],
                    s["gateway"],
                    str(s["used"]),
                    str(s["free"]),
                    str(s["cooling"]),
                    str(s["total"]),
                ]
                for s in data["subnets"]
            ],
        )
    )
    out.append("")
    out.append(
        table(
            ["POD", "CONTAINER ID", "IFNAME", "IP", "NETWORK", "SINCE"],
            [
                [
                    a["pod"] or "-",
                    a["containerID"][:16],
                    a["ifname"],
                    a["ip"],
                    a["network"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["since"])),
                ]
                for a in data["allocations"]
            ],
        )
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moorctl", description="moor admin CLI")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="moor-ipamd gRPC socket")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="the node's subnets, address counts and allocations")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    import grpc

    from ipamd.api.v1 import ipam_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{args.socket}") as channel:
            data = _status(ipam_pb2_grpc.IpamStub(channel))
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
        print(f"moorctl: cannot reach moor-ipamd at {args.socket}: {detail}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render_status(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
