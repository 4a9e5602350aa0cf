"""CNI CHECK of moor's datapath: the pod's interface, addresses and routes, its host veth and the
bridge, compared with what ADD returned (`prevResult`). Every difference is code 103.

One look into the pod's netns and two on the host (`datapath/inventory.py`): CRI-O calls CHECK
after every ADD, so it stays a handful of netlink requests and no store round trip.
"""

from __future__ import annotations

from cni_plugin.datapath import inventory, veth
from cni_plugin.errors import CHECK_FAILED, CNIError
from cni_plugin.iptypes import IPAddress
from cni_plugin.result import Result
from cni_plugin.skel import Request


def check_datapath(
    req: Request, prev: Result, netns_fd: int, gateway: IPAddress | None, *, fixed: bool = False
) -> None:
    """Raise CNIError(103) at the first difference; `gateway` fills routes without one. A fixed
    IP's host veth is on no bridge (`fixed_pod.py`)."""
    pod = inventory.inspect_pod_interface(netns_fd, req.ifname)
    if pod is None:
        raise CNIError(CHECK_FAILED, f"interface {req.ifname} is missing in {req.netns}")
    want = next((i for i in prev.interfaces if i.name == req.ifname and i.sandbox), None)
    if want is None:
        raise CNIError(CHECK_FAILED, f"prevResult has no interface {req.ifname} in a sandbox")
    if pod.kind != "veth":
        raise CNIError(CHECK_FAILED, f"{req.ifname} is a {pod.kind}, not a veth")
    if want.mac and pod.mac.lower() != want.mac.lower():
        raise CNIError(CHECK_FAILED, f"{req.ifname} has MAC {pod.mac}, prevResult says {want.mac}")
    index = prev.interfaces.index(want)
    for ip in prev.ips:
        if ip.interface == index and ip.address not in pod.addresses:
            raise CNIError(CHECK_FAILED, f"{req.ifname} lacks address {ip.address}")
    for route in prev.routes:
        gw = route.gw or gateway
        if not any(r.dst == route.dst and (gw is None or r.gw == gw) for r in pod.routes):
            raise CNIError(CHECK_FAILED, f"route to {route.dst} via {gw} is missing in {req.netns}")
    host_name = veth.host_veth_name(req.container_id, req.ifname)
    host = inventory.inspect_host_veth(host_name)
    if host is None:
        raise CNIError(CHECK_FAILED, f"host veth {host_name} is missing")
    if host.peer_index != pod.index or pod.peer_index != host.index:
        raise CNIError(CHECK_FAILED, f"host veth {host_name} is not the peer of {req.ifname}")
    if fixed:
        return
    bridge = inventory.lookup_bridge(req.conf.bridge)
    if bridge is None:
        raise CNIError(CHECK_FAILED, f"bridge {req.conf.bridge} is missing")
    if host.master_index != bridge.index:
        raise CNIError(CHECK_FAILED, f"host veth {host_name} is not attached to {req.conf.bridge}")
