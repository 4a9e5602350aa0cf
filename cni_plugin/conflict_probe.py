"""The ADD step for `arpProbe`: probe the attachment's address on the wire before ADD completes,
and turn another host's answer into a recorded conflict and a failed ADD (code 107).

Kept out of plugin.py so that the verbs only call one hook, and only when the netconf asks for a
probe: an ADD without `arpProbe` never gets here (no socket, no syscall, no store write).
The caller holds the attachment's lock and rolls the ADD back when this raises.
"""

from __future__ import annotations

import ipaddress
import logging

from cni_plugin import deadline
from cni_plugin.datapath import arp_probe
from cni_plugin.datapath.errors import LinkNotFound
from cni_plugin.errors import ADDRESS_CONFLICT, INVALID_NETWORK_CONFIG, TRY_AGAIN_LATER, CNIError
from cni_plugin.ipam import AssignedAddress, IpamPort
from cni_plugin.netconf import ArpProbe

log = logging.getLogger(__name__)


def probe_address(
    ipam: IpamPort,
    settings: ArpProbe,
    network: str,
    netns_fd: int,
    ifname: str,
    alloc: AssignedAddress,
) -> None:
    """Probe `alloc`'s address from `ifname` in the pod netns; raise CNIError(107) if another
    host claims it, after recording the conflict through the IPAM port.

    IPv4 only (ARP): an IPv6 address is not probed. Code 7 when the interface is missing or not
    Ethernet (e.g. a delegating plugin that runs IPAM before it creates the interface, as ptp
    does): the probe was asked for and cannot be done, which the config has to change.
    """
    ip = alloc.interface.ip
    if not isinstance(ip, ipaddress.IPv4Address):
        return
    try:
        found = arp_probe.probe(
            netns_fd, ifname, ip, count=settings.count, interval=settings.interval_ms / 1000
        )
    except LinkNotFound as exc:
        raise CNIError(
            INVALID_NETWORK_CONFIG,
            f"arpProbe: interface {ifname!r} does not exist in the pod netns when moor allocates "
            "its IP; arpProbe needs a plugin that creates the interface before it calls IPAM "
            "(bridge, macvlan, ipvlan, vlan)",
        ) from exc
    except arp_probe.NotEthernet as exc:
        raise CNIError(INVALID_NETWORK_CONFIG, f"arpProbe: {exc}") from exc
    except arp_probe.NotRunning as exc:  # e.g. a macvlan whose parent is down: transient
        raise CNIError(TRY_AGAIN_LATER, f"arpProbe: {exc}; nothing can be probed") from exc
    if found is None:
        deadline.check("ADD")  # a probe that ran past the deadline proves nothing in time
        return
    recorded = "it is marked as a conflict and not handed out again until an operator runs "
    recorded += f"`moorctl conflicts clear {ip}`"
    try:
        ipam.mark_conflict(ip, found.mac, network)
    except Exception as exc:  # noqa: BLE001 - the conflict stands; the record is best-effort
        log.error("address conflict on %s (%s) could not be recorded: %s", ip, found.mac, exc)
        recorded = f"recording the conflict failed ({exc}); a later ADD probes it again"
    log.warning("address conflict: %s answered by %s (%s) on %s", ip, found.mac, found.how, ifname)
    raise CNIError(
        ADDRESS_CONFLICT,
        f"address conflict: {ip} is in use by another host, MAC {found.mac} (its ARP "
        f"{found.how} seen while moor probed from {ifname!r}); {recorded}",
    )
