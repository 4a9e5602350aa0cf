"""moorctl: the admin CLI over moor-ipamd's gRPC API. Tables for people, `--json` for scripts.

`status` asks the node's Ipam service; everything else asks its Admin service, which works on the
cluster-wide store (any node's daemon answers for the whole cluster). Errors are one clear line,
`moorctl: <message>`, on stderr with exit 1. grpc and the stubs are imported only once the
arguments are good, so `--help` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ipamd import cli_fixed, cli_health
from ipamd.cli_cluster import (
    _clear_conflict,
    _conflicts,
    _ips,
    _network_init,
    _network_show,
    _node_remove,
    _release,
    _subnets,
    _utilization,
    render_clear_conflict,
    render_config,
    render_conflicts,
    render_ips,
    render_network_init,
    render_node_remove,
    render_release,
    render_subnets,
    render_utilization,
)
from ipamd.cli_output import CliError, pod_text, table

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
        "conflicts": list(r.conflicts),
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
                "pod": pod_text(a.owner.pod_namespace, a.owner.pod_name),
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


def render_status(data: dict[str, Any]) -> str:
    state = "ready" if data["ready"] else f"NOT READY ({data['reason']})"
    out = [f"node {data['node']}  network {data['network'] or '-'}  {state}", ""]
    if data["conflicts"]:
        out += ["CONFLICTS after the store lost data (an operator must look):"]
        out += [f"  {c}" for c in data["conflicts"]] + [""]
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
    out += cli_fixed.render_node_fixed(data)
    return "\n".join(out)


def _status_command(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2_grpc

    data = _status(ipam_pb2_grpc.IpamStub(channel))
    return {**data, **cli_fixed.node_fixed(channel, data["node"])}


# ---- the command line ------------------------------------------------------------------------
Runner = Callable[[Any, argparse.Namespace], Any]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moorctl", description="moor admin CLI")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="moor-ipamd gRPC socket")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        parent: Any, name: str, run: Runner, render: Callable[[Any], str], summary: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[out], help=summary, description=summary)
        p.set_defaults(run=run, render=render)
        return p

    command(
        sub, "status", _status_command, render_status, "this node: subnets, allocations, fixed IPs"
    )
    p = command(sub, "subnets", _subnets, render_subnets, "node subnet leases and their use")
    p.add_argument("--node", default="", help="only this node's subnets")
    command(sub, "utilization", _utilization, render_utilization, "cluster-wide subnet and IP use")
    p = command(sub, "ips", _ips, render_ips, "pod IP allocations of the cluster")
    p.add_argument("--node", default="", help="only allocations in this node's subnets")
    p.add_argument("--namespace", default="", help="only pods of this namespace")
    p.add_argument("--pod", default="", help="only pods of this name")
    p.add_argument(
        "--fixed",
        action="store_true",
        help="the fixed IPs instead: state, source, node, generation, retention",
    )
    cli_fixed.add_commands(sub, command)
    cli_health.add_commands(sub, command)
    p = command(sub, "release", _release, render_release, "free an IP (owner-checked)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ip", help="the IP to free")
    target.add_argument("--handle", help="NETWORK/CONTAINER-ID/IFNAME of the attachment")

    p = command(
        sub,
        "conflicts",
        _conflicts,
        render_conflicts,
        "IPs another host answered the ARP probe for",
    )
    clear = p.add_subparsers(dest="conflicts_command", metavar="{clear}")
    p = command(clear, "clear", _clear_conflict, render_clear_conflict, "make an IP allocatable")
    p.add_argument("ip", help="the IP whose conflict record to remove")

    node = sub.add_parser("node", help="node operations").add_subparsers(
        dest="node_command", required=True
    )
    p = command(node, "remove", _node_remove, render_node_remove, "free a gone node's subnets")
    p.add_argument("name", help="node name")

    network = sub.add_parser("network", help="the cluster network config").add_subparsers(
        dest="network_command", required=True
    )
    command(network, "show", _network_show, render_config, "print the network config")
    p = command(network, "init", _network_init, render_network_init, "write the network config")
    p.add_argument("--network", required=True, help="cluster pod network, e.g. 10.244.0.0/16")
    p.add_argument("--subnet-len", type=int, default=24, help="node subnet prefix length")
    p.add_argument("--subnet-min", default="", help="lowest subnet nodes may lease")
    p.add_argument("--subnet-max", default="", help="highest subnet nodes may lease")
    p.add_argument(
        "--fixed-range",
        action="append",
        default=[],
        metavar="CIDR",
        help="never leased to nodes (kept for fixed pod IPs); repeatable",
    )
    p.add_argument("--backend", choices=["host-gw", "vxlan"], default="host-gw")
    p.add_argument("--vni", type=int, default=1, help="vxlan: VXLAN network identifier")
    p.add_argument("--vxlan-port", type=int, default=8472, help="vxlan: UDP port (NSX: not 8472)")
    return parser


def error_line(exc: Any, socket: str) -> str:
    """One sentence for a failed RPC: the daemon's own message, or why it could not be asked."""
    import grpc

    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "Connection refused" in details
    ):
        return f"cannot reach moor-ipamd at {socket}: is it running?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"moor-ipamd at {socket} did not answer in time"
    if code == grpc.StatusCode.PERMISSION_DENIED:  # the daemon's peer-uid check
        return f"permission denied: {details or 'only root may use moor-ipamd'}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"moor-ipamd at {socket} does not serve this call (an older version?)"
    return details or code.name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import grpc

    try:
        with grpc.insecure_channel(f"unix:{args.socket}") as channel:
            data = args.run(channel, args)
    except grpc.RpcError as exc:
        print(f"moorctl: {error_line(exc, args.socket)}", file=sys.stderr)
        return 1  # also `health` against a daemon that does not answer
    except CliError as exc:
        print(f"moorctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else args.render(data))
    return getattr(args, "exit_code", 0)  # `health`: 1 when not serving


if __name__ == "__main__":
    sys.exit(main())
