"""moorctl's cluster-wide commands over the Admin service: the network config, subnets and
utilization, IP allocations and releases, node removal, address conflicts. Each command is a
pair: `_<name>(channel, args)` fetches and returns plain data (what `--json` prints), `render_*`
turns it into a table. grpc stubs are imported inside, once the arguments are good.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ipamd import cli_fixed
from ipamd.cli_output import CliError, pod_text, table, when


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
