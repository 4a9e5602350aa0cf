"""The churn property test's invariants, each a function returning one line per violation (empty:
it holds), so a failure names everything wrong at once.

  * `store_problems`: the records agree with each other: every handle key and its IP record name
    each other; a held fixed binding is its IP record's owner, on the same node; an unheld one has
    no IP record; no IP of a fixed range is held outside a binding; one binding per identity, and
    the identity index points at it; no pod identity holds two IPs.
  * `model_problems`: the records agree with what the runtime did: exactly the attachments
    `holders` names hold IPs, each the one its ADD returned; every sticky identity keeps the IP
    it first got (held by its newest generation, else retained); a per-request binding lives
    only while held; a held binding names its holder's node and host veth.
  * `route_problems` (kernel): each node's protocol-109 /32s of the fixed range are exactly the
    held bindings': to the holder's host veth on its node (none once that veth is gone with a
    vanished pod), toward its node everywhere else.
  * `memory_problems`: each daemon's allocations (`moorctl status`) are the store's of its node.
  * `address_problems` (kernel): each live pod netns holds its IP, and no IP is in two of them.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import subprocess
from typing import Any

from ipamd.fixed.model import REQUEST, STICKY
from ipamd.model import IPNetwork
from tests.helpers.churn_run import ChurnRunner
from tests.helpers.cluster import Cluster
from tests.helpers.fixed_store import StoreView


def store_problems(view: StoreView, fixed: IPNetwork) -> list[str]:
    return record_problems(view, fixed) + identity_problems(view)


def record_problems(view: StoreView, fixed: IPNetwork) -> list[str]:
    """Handle keys, IP records and bindings name each other; no fixed IP outside a binding."""
    out = []
    for handle, ip in view.handles.items():
        record = view.ips.get(ip)
        if record is None or record.owner.handle != handle:
            owner = record.owner.handle if record else None
            out.append(f"handle {'/'.join(handle)} -> {ip}, whose record names {owner}")
    for ip, record in view.ips.items():
        if (points := view.handles.get(record.owner.handle)) != ip:
            out.append(f"{ip} is held by {record.owner.handle}, whose handle key says {points}")
        if ip in fixed and ip not in view.bindings:
            out.append(f"fixed IP {ip} is held outside any binding")
    for ip, b in view.bindings.items():
        record = view.ips.get(ip)
        says = (record.owner.handle, record.node) if record else None
        if b.held and says != (b.handle, b.node):
            out.append(f"binding {ip} is held by {b.handle} on {b.node}, its record says {says}")
        if not b.held and record is not None:
            out.append(f"binding {ip} is {b.state}, yet {record.owner.handle} holds it")
    return out


def identity_problems(view: StoreView) -> list[str]:
    """One binding per identity, the index pointing at it; one IP record per pod identity."""
    out = []
    bound = collections.defaultdict(list)
    for b in view.bindings.values():
        if b.identity.named:
            bound[b.identity].append(b.ip)
            if (index := view.index.get(b.identity)) != b.ip:
                out.append(f"index of {b.identity.text} says {index}, its binding is {b.ip}")
    out += [f"{i.text} is bound to {ips}" for i, ips in bound.items() if len(ips) > 1]
    for identity, ip in view.index.items():
        if identity not in bound:
            out.append(f"index of {identity.text} -> {ip}, which is not bound to it")
    held = collections.defaultdict(list)
    for ip, record in view.ips.items():
        if record.owner.pod_name:
            held[record.owner.pod].append(ip)
    out += [f"pod {pod} holds {ips}" for pod, ips in held.items() if len(ips) > 1]
    return out


def holders(runner: ChurnRunner, *, gc_done: bool) -> tuple[dict[str, str], dict[str, str]]:
    """The attachments (container ID -> IP) that must hold their IP now, and those that may.

    Every pod the runtime still has holds its IP, and one it lost track of (vanished) until the
    GC; but of a fixed identity only its newest generation does. When that newest ADD failed
    (e.g. its daemon was killed in the middle), the claim may or may not have happened before,
    so an older generation still there may or may not hold the IP."""
    newest: dict[str, int] = {}
    for number, outcome in runner.outcomes.items():
        gen = runner.plan.gens[number]
        if outcome.code is not None and gen.kind in (STICKY, REQUEST):
            newest[gen.identity] = max(number, newest.get(gen.identity, -1))
    must, may = {}, {}
    for number, o in runner.outcomes.items():
        gen = runner.plan.gens[number]
        if o.code != 0 or (o.gone and not o.vanished) or (o.vanished and gc_done):
            continue
        cid = runner.container_id(gen)
        if gen.kind in (STICKY, REQUEST) and newest[gen.identity] != number:
            if runner.outcomes[newest[gen.identity]].code != 0:
                may[cid] = o.ip
            continue
        must[cid] = o.ip
    return must, may


def model_problems(view: StoreView, runner: ChurnRunner, *, gc_done: bool) -> list[str]:
    out = []
    must, may = holders(runner, gc_done=gc_done)
    held = {h[1]: str(ip) for h, ip in view.handles.items()}
    gens = {runner.container_id(g): g for g in runner.plan.gens.values()}
    for cid, ip in must.items():
        if held.get(cid) != ip:
            out.append(f"{gens[cid]} holds {held.get(cid)}, its ADD got {ip}")
    for cid, ip in held.items():
        if cid not in must and may.get(cid) != ip:
            out.append(f"{gens.get(cid, cid)} holds {ip}, which it must not")
    by_identity = {b.identity.text: b for b in view.bindings.values()}
    for identity, first in runner.first_ip.items():
        b = by_identity.get(identity)
        if b is None or str(b.ip) != first or b.source != STICKY:
            now = f"{b.ip} ({b.source})" if b else "nothing"
            out.append(f"sticky {identity} first got {first}, now it is bound to {now}")
    for b in view.bindings.values():
        if b.source == REQUEST and not b.held:
            out.append(f"per-request binding {b.ip} of {b.identity.text} outlived its pod")
        holder = gens.get(b.handle[1]) if b.handle else None
        if b.held and (
            holder is None
            or (holder.identity, holder.node) != (b.identity.text, b.node)
            or runner.outcomes[holder.number].host_veth != b.host_veth
        ):
            out.append(f"binding {b.ip} of {b.identity.text} names {b.handle} on {b.node} "
                       f"({b.host_veth}): not that pod's")  # fmt: skip
    return out


def ip_json(netns: str, *args: str) -> Any:
    proc = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True)
    return json.loads(proc.stdout or "[]") if proc.returncode == 0 else None


def route_problems(c: Cluster, view: StoreView, fixed: IPNetwork) -> list[str]:
    out = []
    subnets = {n: c.subnet_of(n).split("/")[0] for n in c.nodes}
    for name, node in c.nodes.items():
        links = {link["ifname"] for link in ip_json(node.netns, "link", "show") or []}
        want: dict[str, tuple[str, str]] = {}
        for ip, b in view.bindings.items():
            if not b.held:
                continue
            if b.node == name:
                if b.host_veth in links:  # a pod that vanished took its veth and route along
                    want[str(ip)] = ("dev", b.host_veth)
            elif c.backend == "vxlan":
                want[str(ip)] = ("via", subnets[b.node])
            else:
                want[str(ip)] = ("via", c.nodes[b.node].public_ip)
        have: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for r in ip_json(node.netns, "route", "show", "proto", "109") or []:
            dst = r["dst"].removesuffix("/32")
            if "/" not in dst and ipaddress.ip_address(dst) in fixed:
                have[dst].append(("via", r["gateway"]) if "gateway" in r else ("dev", r["dev"]))
        for ip in sorted(want.keys() | have.keys()):
            if have.get(ip, []) != ([want[ip]] if ip in want else []):
                out.append(f"{name}: /32 {ip} routed {have.get(ip, 'nowhere')}, "
                           f"bindings say {want.get(ip, 'not at all')}")  # fmt: skip
    return out


def memory_problems(c: Cluster, view: StoreView, conflicts: bool = False) -> list[str]:
    """Each daemon's allocations are the store's of its node; with `conflicts`, no daemon
    reports a store conflict either (churn is no store loss)."""
    out = []
    for name in c.nodes:
        status = c.status(name)
        if status is None:
            out.append(f"{name}'s daemon does not answer")
            continue
        if conflicts:
            out += [f"{name} reports a store conflict: {x}" for x in status["conflicts"]]
        memory = {(a["ip"].split("/")[0], a["containerID"]) for a in status["allocations"]}
        store = {(str(ip), r.owner.container_id) for ip, r in view.ips.items() if r.node == name}
        if memory != store:
            out.append(f"{name} remembers {sorted(memory - store)} the store does not hold, and "
                       f"forgets {sorted(store - memory)}")  # fmt: skip
    return out


def address_problems(runner: ChurnRunner) -> list[str]:
    out, seen = [], collections.defaultdict(list)
    for gen in runner.live():
        addrs = ip_json(runner.netns(gen), "addr", "show", "dev", "eth0") or [{}]
        ips = [a["local"] for a in addrs[0].get("addr_info", []) if a["family"] == "inet"]
        if ips != [runner.outcomes[gen.number].ip]:
            out.append(f"{gen} has {ips} on eth0, its ADD got {runner.outcomes[gen.number].ip}")
        for ip in ips:
            seen[ip].append(gen.identity)
    out += [f"{ip} is in {len(pods)} live pods: {pods}" for ip, pods in seen.items() if pods[1:]]
    return out
