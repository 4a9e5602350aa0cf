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

from ipamd import cli_fixed
from ipamd.cli_output import CliError, pod_text, table, when

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


# ---- Admin: network config -------------------------------------------------------------------
def _config_dict(c: Any) -> dict[str, Any]:
    return {
        "network": c.network,
        "subnetLen": c.subnet_len,
        "subnetMin": c.subnet_min,
        "subnetMax": c.subnet_max,
        "fixedRanges": list(c.fixed_ranges),
        "backend": c.backend,
        **({"vni": c.vni, "vxlanPort": c.vxlan_port} if c.backend == "vxlan" else {}),
        "clusterID": c.cluster_id,
    }


def _network_show(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).NetworkShow(ipam_pb2.NetworkShowRequest(), timeout=30)
    return _config_dict(r.config)


def _network_init(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    config = ipam_pb2.NetworkConfig(
        network=args.network,
        subnet_len=args.subnet_len,
        subnet_min=args.subnet_min,
        subnet_max=args.subnet_max,
        fixed_ranges=args.fixed_range,
        backend=args.backend,
        vni=args.vni,
        vxlan_port=args.vxlan_port,
    )
    r = ipam_pb2_grpc.AdminStub(channel).NetworkInit(
        ipam_pb2.NetworkInitRequest(config=config), timeout=30
    )
    return {"created": r.created, "config": _config_dict(r.config)}


def render_config(c: dict[str, Any]) -> str:
    rows = [
        ["network", c["network"]],
        ["subnet-len", str(c["subnetLen"])],
        ["subnet-min", c["subnetMin"] or "-"],
        ["subnet-max", c["subnetMax"] or "-"],
        ["fixed-ranges", ", ".join(c["fixedRanges"]) or "-"],
        ["backend", c["backend"]],
        *(
            [["vni", str(c["vni"])], ["vxlan-port", str(c["vxlanPort"])]]
            if c["backend"] == "vxlan"
            else []
        ),
        ["cluster-id", c["clusterID"] or "-"],
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def render_network_init(data: dict[str, Any]) -> str:
    first = "network config written" if data["created"] else "network config already present"
    return f"{first}:\n{render_config(data['config'])}"


# ---- Admin: subnets and utilization ----------------------------------------------------------
def _usage_dict(u: Any) -> dict[str, Any]:
    return {
        "subnet": u.subnet,
        "node": u.node,
        "publicIP": u.public_ip,
        "since": u.since,
        "backend": json.loads(u.backend_json or "{}"),
        "total": u.total,
        "reserved": u.reserved,
        "allocated": u.allocated,
        "cooling": u.cooling,
        "free": u.free,
        "route": {"state": u.route_state, "reason": u.route_reason},
    }


def _subnets(channel: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).ListSubnets(
        ipam_pb2.ListSubnetsRequest(node=args.node), timeout=60
    )
    return [_usage_dict(u) for u in r.subnets]


def render_subnets(subnets: list[dict[str, Any]], *, reserved: bool = False) -> str:
    headers = ["SUBNET", "NODE", "PUBLIC IP", "SINCE", "USED", "FREE", "COOLING", "ROUTE"]
    if reserved:
        headers.append("RESERVED")
    rows = []
    for s in subnets:
        row = [
            s["subnet"],
            s["node"],
            s["publicIP"] or "-",
            when(s["since"]),
            str(s["allocated"]),
            str(s["free"]),
            str(s["cooling"]),
            s["route"]["state"] or "-",
        ]
        rows.append([*row, str(s["reserved"])] if reserved else row)
    notes = [
        f"{s['subnet']} {s['route']['state']}: {s['route']['reason']}"
        for s in subnets
        if s["route"]["reason"]
    ]
    return "\n".join([table(headers, rows), *notes])


def _utilization(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).Utilization(ipam_pb2.UtilizationRequest(), timeout=60)
    return {
        "config": _config_dict(r.config),
        "subnetsLeased": r.subnets_leased,
        "subnetsFree": r.subnets_free,
        "addressesAllocated": r.addresses_allocated,
        "cooldownSeconds": r.cooldown_seconds,
        "subnets": [_usage_dict(u) for u in r.subnets],
    }


def render_utilization(data: dict[str, Any]) -> str:
    c = data["config"]
    head = (
        f"network {c['network']} /{c['subnetLen']}: subnets leased {data['subnetsLeased']}, "
        f"free {data['subnetsFree']}; addresses allocated {data['addressesAllocated']}"
    )
    return f"{head}\n\n{render_subnets(data['subnets'], reserved=True)}"


# ---- Admin: allocations ----------------------------------------------------------------------
def _ips(channel: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    if args.fixed:  # the fixed bindings, with their own columns
        args.render = cli_fixed.render_fixed
        return cli_fixed.list_fixed(channel, args)
    request = ipam_pb2.ListAllocationsRequest(
        node=args.node, pod_namespace=args.namespace, pod_name=args.pod
    )
    pages = ipam_pb2_grpc.AdminStub(channel).ListAllocations(request, timeout=300)
    return [_allocation_dict(a) for page in pages for a in page.allocations]


def _allocation_dict(a: Any) -> dict[str, Any]:
    o = a.owner
    return {
        "ip": a.ip.partition("/")[0],
        "subnet": a.subnet,
        "node": a.node,
        "pod": pod_text(o.pod_namespace, o.pod_name),
        "podUID": o.pod_uid,
        "handle": f"{o.network}/{o.container_id}/{o.ifname}",
        "network": o.network,
        "containerID": o.container_id,
        "ifname": o.ifname,
        "since": a.since,
        "netns": a.netns,
        "hostVeth": a.host_veth,
    }


def render_ips(allocs: list[dict[str, Any]]) -> str:
    return table(
        ["IP", "NODE", "POD", "HANDLE", "SINCE"],
        [[a["ip"], a["node"], a["pod"] or "-", a["handle"], when(a["since"])] for a in allocs],
    )


def parse_handle(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise CliError(f"--handle {text!r} must be NETWORK/CONTAINER-ID/IFNAME")
    return parts[0], parts[1], parts[2]


def _release(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    if args.handle:
        network, cid, ifname = parse_handle(args.handle)
        request = ipam_pb2.AdminReleaseRequest(
            handle=ipam_pb2.Handle(network=network, container_id=cid, ifname=ifname)
        )
    else:
        request = ipam_pb2.AdminReleaseRequest(ip=args.ip)
    r = ipam_pb2_grpc.AdminStub(channel).Release(request, timeout=30)
    return {"released": _allocation_dict(r.allocation)}


def render_release(data: dict[str, Any]) -> str:
    a = data["released"]
    pod = f"pod {a['pod']}, " if a["pod"] else ""
    return f"released {a['ip']} ({pod}handle {a['handle']}, node {a['node']})"


# ---- Admin: nodes ----------------------------------------------------------------------------
def _node_remove(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).NodeRemove(
        ipam_pb2.NodeRemoveRequest(node=args.name), timeout=300
    )
    return {
        "node": args.name,
        "subnets": list(r.subnets),
        "ipsFreed": r.ips_freed,
        "releasedCleared": r.released_cleared,
    }


def render_node_remove(data: dict[str, Any]) -> str:
    return (
        f"removed node {data['node']}: subnets {', '.join(data['subnets'])}; "
        f"{data['ipsFreed']} IPs freed, {data['releasedCleared']} cooldown records cleared"
    )


# ---- Admin: address conflicts (the ARP probe) ------------------------------------------------
def _conflict_dict(c: Any) -> dict[str, Any]:
    return {"ip": c.ip, "mac": c.mac, "node": c.node, "since": c.since, "network": c.network}


def _conflicts(channel: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).ListConflicts(ipam_pb2.ListConflictsRequest(), timeout=30)
    return [_conflict_dict(c) for c in r.conflicts]


def render_conflicts(conflicts: list[dict[str, Any]]) -> str:
    return table(
        ["IP", "MAC", "NODE", "NETWORK", "SINCE"],
        [
            [c["ip"], c["mac"] or "-", c["node"] or "-", c["network"] or "-", when(c["since"])]
            for c in conflicts
        ],
    )


def _clear_conflict(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).ClearConflict(
        ipam_pb2.ClearConflictRequest(ip=args.ip), timeout=30
    )
    return {"cleared": _conflict_dict(r.conflict)}


def render_clear_conflict(data: dict[str, Any]) -> str:
    c = data["cleared"]
    return (
        f"cleared the address conflict of {c['ip']} (MAC {c['mac'] or '-'}, found by node "
        f"{c['node'] or '-'} at {when(c['since'])}): it can be allocated again"
    )


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
        return 1
    except CliError as exc:
        print(f"moorctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else args.render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
