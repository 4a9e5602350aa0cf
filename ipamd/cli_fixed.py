"""moorctl's fixed-IP commands: reserve, unreserve, reservations, sticky add|list|remove, and the
fixed parts of `ips --fixed` and `status`. Registered by ipamd/cli.py's parser.

Calls that change something send the actor as gRPC metadata `moor-actor`: `user@host`, the user
being $SUDO_USER (who ran sudo) or the user moorctl runs as. The daemon records and audits it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import re
import socket
from collections.abc import Callable
from typing import Any

from ipamd.cli_output import CliError, table, when

ACTOR_KEY = "moor-actor"
_DURATION = re.compile(r"(?:\d+[smhd])+", re.ASCII)
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


# ---- actor and durations ---------------------------------------------------------------------
def actor() -> str:
    """`user@host`: printable ASCII only (gRPC metadata), at most 128 characters."""
    user = os.environ.get("SUDO_USER", "")
    if not user:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = f"uid{os.getuid()}"
    text = f"{user}@{socket.gethostname()}"
    return "".join(c if "\x21" <= c <= "\x7e" else "?" for c in text)[:128]


def metadata() -> list[tuple[str, str]]:
    return [(ACTOR_KEY, actor())]


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d`, or a sum like `1h30m`, in seconds."""
    if len(text) > 32 or not _DURATION.fullmatch(text):
        raise CliError(f"--retain {text!r} must be a duration like 90s, 30m, 24h or 7d")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    if seconds <= 0:
        raise CliError(f"--retain {text!r} must be more than 0")
    return float(seconds)


def duration(seconds: float) -> str:
    """86400 -> `24h`, 5400 -> `1h30m`, 604800 -> `7d` (days from two on); `-` for 0."""
    left, parts = round(seconds), []
    for unit, size in _UNITS.items():
        if unit == "d" and left < 2 * size:
            continue
        n, left = divmod(left, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "-"


# ---- bindings ---------------------------------------------------------------------------------
def binding_dict(b: Any) -> dict[str, Any]:
    h = b.handle
    return {
        "ip": b.ip,
        "pod": b.pod,
        "namespace": b.pod_namespace,
        "name": b.pod_name,
        "state": b.state,
        "source": b.source,
        "node": b.node,
        "generation": (
            {"uid": b.pod_uid, "containerID": b.container_id} if b.container_id else None
        ),
        "handle": f"{h.network}/{h.container_id}/{h.ifname}" if b.HasField("handle") else "",
        "hostVeth": b.host_veth,
        "since": b.since,
        "releasedAt": b.released_at,
        "retainSeconds": b.retain_seconds,
        "retainedUntil": b.retained_until,
        "reservedBy": b.reserved_by,
        "reservedAt": b.reserved_at,
    }


def generation(b: dict[str, Any]) -> str:
    g = b["generation"]
    return f"{g['uid'][:8] or '-'}/{g['containerID'][:12]}" if g else "-"


def list_fixed(channel: Any, args: argparse.Namespace, **filters: str) -> list[dict[str, Any]]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    request = ipam_pb2.ListFixedRequest(
        node=getattr(args, "node", ""),
        pod_namespace=getattr(args, "namespace", ""),
        pod_name=getattr(args, "pod", ""),
        **filters,
    )
    pages = ipam_pb2_grpc.AdminStub(channel).ListFixed(request, timeout=300)
    return [binding_dict(b) for page in pages for b in page.bindings]


def render_fixed(bindings: list[dict[str, Any]]) -> str:
    return table(
        ["IP", "POD", "STATE", "SOURCE", "NODE", "GENERATION", "SINCE", "RETAINED UNTIL"],
        [
            [
                b["ip"],
                b["pod"],
                b["state"],
                b["source"],
                b["node"] or "-",
                generation(b),
                when(b["since"]),
                when(b["retainedUntil"]),
            ]
            for b in bindings
        ],
    )


def node_fixed(channel: Any, node: str) -> dict[str, Any]:
    """For `status`: the fixed IPs held on `node`, or why they could not be listed (the node's
    status is still shown: an older daemon, or the store unreachable)."""
    import grpc

    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    try:
        pages = ipam_pb2_grpc.AdminStub(channel).ListFixed(
            ipam_pb2.ListFixedRequest(node=node, state="held"), timeout=30
        )
        return {"fixed": [binding_dict(b) for page in pages for b in page.bindings]}
    except grpc.RpcError as exc:
        return {"fixed": [], "fixedError": exc.details() or exc.code().name}


def render_node_fixed(data: dict[str, Any]) -> list[str]:
    if data.get("fixedError"):
        return ["", f"fixed IPs: cannot list them: {data['fixedError']}"]
    if not data.get("fixed"):
        return []
    rows = [[b["ip"], b["pod"], b["source"], generation(b), b["handle"], when(b["since"])]
            for b in data["fixed"]]  # fmt: skip
    return ["", "FIXED IPS held on this node",
            table(["IP", "POD", "SOURCE", "GENERATION", "HANDLE", "SINCE"], rows)]  # fmt: skip


# ---- reservations -----------------------------------------------------------------------------
def _reserve(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).Reserve(
        ipam_pb2.ReserveRequest(pod=args.pod, ip=args.ip), timeout=30, metadata=metadata()
    )
    return {"reserved": binding_dict(r.binding)}


def render_reserve(data: dict[str, Any]) -> str:
    b = data["reserved"]
    held = f"; held now on node {b['node']} ({generation(b)})" if b["state"] == "held" else ""
    return f"reserved {b['ip']} for {b['pod']} (by {b['reservedBy']}){held}"


def _unreserve(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    try:
        ipaddress.ip_address(args.target)
        request = ipam_pb2.UnreserveRequest(ip=args.target)
    except ValueError:
        request = ipam_pb2.UnreserveRequest(pod=args.target)
    r = ipam_pb2_grpc.AdminStub(channel).Unreserve(request, timeout=30, metadata=metadata())
    return {"unreserved": binding_dict(r.binding), "cooldownSeconds": r.cooldown_seconds}


def render_unreserve(data: dict[str, Any]) -> str:
    b = data["unreserved"]
    if b["state"] == "held":
        then = f"its pod on node {b['node']} keeps it until its DEL"
    else:
        then = f"free again after the {duration(data['cooldownSeconds'])} cooldown"
    return f"unreserved {b['ip']} ({b['pod']}): {then}"


def _reservations(channel: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    return list_fixed(channel, args, source="reservation")


def render_reservations(bindings: list[dict[str, Any]]) -> str:
    return table(
        ["IP", "POD", "STATE", "NODE", "RESERVED BY", "RESERVED AT"],
        [[b["ip"], b["pod"], b["state"], b["node"] or "-", b["reservedBy"] or "-",
          when(b["reservedAt"])] for b in bindings],
    )  # fmt: skip


# ---- sticky rules -----------------------------------------------------------------------------
def rule_dict(r: Any) -> dict[str, Any]:
    return {
        "name": r.name,
        "namespace": r.namespace,
        "podRegex": r.pod_regex,
        "retainSeconds": r.retain_seconds,
        "createdBy": r.created_by,
        "createdAt": r.created_at,
    }


def _describe(r: dict[str, Any]) -> str:
    pods = f"pods matching {r['podRegex']}" if r["podRegex"] else "every pod"
    return f"namespace {r['namespace']}, {pods}, retain {duration(r['retainSeconds'])}"


def _sticky_add(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    request = ipam_pb2.StickyAddRequest(
        namespace=args.namespace,
        pod_regex=args.pod_regex,
        retain_seconds=parse_duration(args.retain),
    )
    r = ipam_pb2_grpc.AdminStub(channel).StickyAdd(request, timeout=30, metadata=metadata())
    return {"created": r.created, "rule": rule_dict(r.rule)}


def render_sticky_add(data: dict[str, Any]) -> str:
    r = data["rule"]
    verb = "added" if data["created"] else "already present, now"
    return f"sticky rule {r['name']} {verb}: {_describe(r)}"


def _sticky_list(channel: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).StickyList(ipam_pb2.StickyListRequest(), timeout=30)
    return [rule_dict(x) for x in r.rules]


def render_sticky_list(rules: list[dict[str, Any]]) -> str:
    return table(
        ["NAME", "NAMESPACE", "POD REGEX", "RETAIN", "CREATED BY", "CREATED"],
        [[r["name"], r["namespace"], r["podRegex"] or "(every pod)",
          duration(r["retainSeconds"]), r["createdBy"] or "-", when(r["createdAt"])]
         for r in rules],
    )  # fmt: skip


def _sticky_remove(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    r = ipam_pb2_grpc.AdminStub(channel).StickyRemove(
        ipam_pb2.StickyRemoveRequest(name=args.name), timeout=30, metadata=metadata()
    )
    return {"removed": rule_dict(r.rule) if r.HasField("rule") else {"name": args.name}}


def render_sticky_remove(data: dict[str, Any]) -> str:
    r = data["removed"]
    what = f" ({_describe(r)})" if "namespace" in r else ""
    return (
        f"removed sticky rule {r['name']}{what}; the IPs it keeps stay bound until their "
        "retention ends"
    )


# ---- the parser -------------------------------------------------------------------------------
Command = Callable[..., argparse.ArgumentParser]


def add_commands(sub: Any, command: Command) -> None:
    """`command(parent, name, run, render, summary)` is cli.py's: one subcommand with --json."""
    p = command(sub, "reserve", _reserve, render_reserve, "pin a fixed IP to a pod")
    p.add_argument("pod", metavar="NAMESPACE/POD", help="the pod (POD alone: no namespace)")
    p.add_argument("ip", metavar="IP", help="an IP in a fixed range of the network")
    p = command(sub, "unreserve", _unreserve, render_unreserve, "end a reservation")
    p.add_argument("target", metavar="IP|NAMESPACE/POD", help="the IP, or the pod, reserved")
    command(sub, "reservations", _reservations, render_reservations,
            "reservations: pod, state, node, who made them and when")  # fmt: skip

    sticky = sub.add_parser("sticky", help="pods that keep their IP across restarts and moves")
    rules = sticky.add_subparsers(dest="sticky_command", required=True)
    p = command(rules, "add", _sticky_add, render_sticky_add, "add a sticky rule (idempotent)")
    p.add_argument("--namespace", required=True, help="the pods' namespace")
    p.add_argument("--pod-regex", default="", help="matches the whole pod name (default: all)")
    p.add_argument("--retain", default="24h", metavar="DURATION",
                   help="how long the IP stays bound after the pod's last DEL: 90s, 30m, 24h, 7d "
                   "(default 24h)")  # fmt: skip
    command(rules, "list", _sticky_list, render_sticky_list, "the sticky rules")
    p = command(rules, "remove", _sticky_remove, render_sticky_remove, "remove a sticky rule")
    p.add_argument("name", help="the rule's name, as `sticky list` shows it")
