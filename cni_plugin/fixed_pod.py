"""The datapath of a pod with a fixed IP: a point-to-point veth instead of a bridge port.

A fixed IP is in no node's subnet, so it cannot sit on the node's bridge. The pod gets the IP as a
/32, the link-local gateway FIXED_GATEWAY (169.254.1.1) as a link-scope route, a default route via
it, and a permanent neighbour entry mapping the gateway to the host end's MAC (so it never needs
an ARP answer: proxy ARP only answers for targets the node routes out of another interface, which
a node without a default route does not). The host end is on no bridge; the node routes the /32
to it (scope link, protocol 109, so the route reconcile owns it) and holds a permanent neighbour
entry for the pod (its MAC, known at ADD), and proxy ARP is on there too, for a pod that flushed
its neighbour table. This is Calico's proven form, with the neighbours made explicit both ways.
The IP can then live on any node: the other nodes route the /32 toward whichever node holds it
(SPEC-NOTES, fixed IPs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from cni_plugin.datapath import bridge as br
from cni_plugin.datapath import routes, veth, vxlan
from cni_plugin.datapath.errors import DatapathError
from cni_plugin.datapath.netns import run_in_netns
from cni_plugin.datapath.rtnl_codec import NUD_PERMANENT, RT_SCOPE_LINK, NeighMsg, RouteMsg
from cni_plugin.ipam import FIXED_GATEWAY, AssignedAddress
from cni_plugin.iptypes import IPAddress

GATEWAY_NET = ipaddress.ip_network(f"{FIXED_GATEWAY}/32")
DEFAULT_V4 = ipaddress.ip_network("0.0.0.0/0")


def pod_routes() -> list[veth.Route]:
    """The link-scope route to the gateway first, then the default route through it."""
    return [veth.Route(GATEWAY_NET), veth.Route(DEFAULT_V4, FIXED_GATEWAY)]


def configure(netns_fd: int, ifname: str, alloc: AssignedAddress, host_mac: str) -> None:
    """The pod's side: its /32, the gateway as a permanent neighbour, the two routes; and
    arp_notify, so the interface announces the IP (gratuitous ARP) when it comes up: after a
    move, whatever on its link still knew the IP learns where it is now."""
    run_in_netns(netns_fd, lambda: _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/arp_notify"))
    veth.configure_pod_interface(
        netns_fd, ifname, [alloc.interface], pod_routes(), [(FIXED_GATEWAY, host_mac)]
    )


def _write_sysctl(path: str, value: str = "1") -> None:
    with contextlib.suppress(OSError):  # a kernel without the knob: nothing to announce with
        with open(path, "w") as f:
            f.write(value)


def attach_host(host_name: str, ip: IPAddress, pod_mac: str) -> None:
    """The node's side: forwarding, proxy ARP on the host end, a permanent neighbour entry for
    the pod (its MAC is known: the node never ARPs for it), and the /32 route to it.

    The neighbour entry matters after a move: the other nodes route the IP here as soon as the
    claim is in the store, so traffic arrives while the pod's end is still coming up. The node's
    first ARP request for the pod then sometimes gets no answer (most likely it goes out before
    the host end transmits: the kernel's link watch activates it a moment after the pod's end
    comes up), and the next one goes out only a second later (retrans_time); the pod's
    gratuitous ARP does not help when it came before the first packet did. With the entry,
    nothing waits on ARP: without it, about 1 move in 20 of the move bench (bench/fixed_move.py)
    took 0.7-0.8 s instead of tens of ms. An entry made meanwhile (INCOMPLETE) is replaced."""
    br.enable_ip_forward()
    index = veth.host_veth_index(host_name)
    if index is None:
        raise DatapathError(f"host veth {host_name} vanished before its route was added")
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{host_name}/proxy_arp")
    _write_sysctl(f"/proc/sys/net/ipv4/neigh/{host_name}/proxy_delay", "0")
    vxlan.replace_entry(NeighMsg(socket.AF_INET, index, pod_mac, str(ip), NUD_PERMANENT))
    routes.replace_route(RouteMsg(str(ip), ip.max_prefixlen, oif=index, scope=RT_SCOPE_LINK))


def detach_host(host_name: str, ip: IPAddress) -> None:
    """The fixed IP moved to another node while this pod is still here (its DEL not run yet):
    forget the neighbour entry toward it, so nothing on this node points at the old pod. The
    route was changed by the reconcile; the veth goes with the DEL."""
    index = veth.host_veth_index(host_name)
    if index is not None:
        vxlan.delete_entry(NeighMsg(socket.AF_INET, index, "", str(ip), 0))
