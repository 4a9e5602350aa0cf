"""The whole key schema of the IPAM state, in one place.

With the default prefix `/moor`:

==========================================  ==================================================
key                                         value / meaning
==========================================  ==================================================
``/moor/config``                            cluster IPAM config (pools, block size)
``/moor/subnets/10.244.3.0-24``             lease of a node subnet (``fd00:1::-64`` for v6)
``/moor/ips/10.244.3.5``                    one allocated pod IP (owner handle)
``/moor/handles/<network>/<cid>/<ifname>``  index: attachment -> its IPs
``/moor/released/10.244.3.5``               cooldown record of a released IP (FIFO by
                                            create_revision)
``/moor/removed/<node>``                    removal record: ``moorctl node remove`` removed
                                            the node's subnets on purpose
``/moor/conflicts/10.244.3.5``              address conflict: another host answered the ARP
                                            probe for this IP (MAC, node, time); never handed
                                            out until ``moorctl conflicts clear``
``/moor/fixed/10.244.250.7``                fixed-IP binding: identity, source, holder
                                            generation and node (ipamd/fixed/model.py)
``/moor/fixed-ids/<namespace|->/<pod>``     index: named identity -> its fixed IP
``/moor/sticky/<rule>``                     a sticky rule (namespace, pod regex, retention)
==========================================  ==================================================

Addresses are written in one canonical text form (IPv4 dotted quad; IPv6 RFC 5952 lower-case
hex with the longest zero run compressed, never the mixed ``::ffff:1.2.3.4`` form, so the text
does not change with the Python version). Networks are ``<network address>-<prefix length>``
because ``/`` separates key segments.

Every ``parse_*`` returns None for anything its ``make`` could not have produced, and never
raises: keys come from a shared store that other versions and humans can write to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from cni_plugin.iptypes import IPAddress, IPNetwork

# The handle's parts follow the CNI side's rules exactly (one home: cni_plugin/naming.py), so a
# request the plugin accepted always makes a key, and a key parses back only if it could.
from cni_plugin.naming import (
    pod_name_problem,
    pod_namespace_problem,
    valid_container_id,
    valid_ifname,
    valid_network_name,
    valid_node_name,
)

_PREFIX_SEGMENT_RE = re.compile(r"[a-zA-Z0-9_.\-]+", re.ASCII)
_DIGITS_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)


def format_address(addr: IPAddress) -> str:
    """Canonical key text of an address (see module docstring). Rejects scoped IPv6."""
    if isinstance(addr, IPv4Address):
        return str(addr)
    if not isinstance(addr, IPv6Address):
        raise TypeError(f"expected an IPv4Address or IPv6Address, not {type(addr).__name__}")
    if addr.scope_id is not None:
        raise ValueError(f"scoped IPv6 address cannot be a key: {addr}")
    n = int(addr)
    hextets = [(n >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_len, i = -1, 0, 0
    while i < 8:
        if hextets[i] != 0:
            i += 1
            continue
        j = i
        while j < 8 and hextets[j] == 0:
            j += 1
        if j - i > best_len:
            best_start, best_len = i, j - i
        i = j
    parts = [f"{h:x}" for h in hextets]
    if best_len < 2:
        return ":".join(parts)
    return ":".join(parts[:best_start]) + "::" + ":".join(parts[best_start + best_len :])


def _common_text(subnet: IPNetwork) -> str:
    """The longest text every address of an IPv4 subnet starts with ("" for IPv6: not positional)."""
    if subnet.version != 4:
        return ""
    first = format_address(subnet.network_address)
    last = format_address(subnet.broadcast_address)
    common = 0
    while common < min(len(first), len(last)) and first[common] == last[common]:
        common += 1
    return first[:common]


def covering_prefixes(prefixes: Iterable[str]) -> list[str]:
    """The prefixes without those another one already covers, so no key is listed twice."""
    out: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not out or not prefix.startswith(out[-1]):
            out.append(prefix)
    return out


class Keys:
    """Builds and parses every key under one prefix (so two clusters can share an etcd)."""

    def __init__(self, prefix: str = "/moor") -> None:
        if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"key prefix must start with '/' and not end with '/': {prefix!r}")
        for seg in prefix[1:].split("/"):
            if _PREFIX_SEGMENT_RE.fullmatch(seg) is None or seg in (".", ".."):
                raise ValueError(f"invalid key prefix segment {seg!r} in {prefix!r}")
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    def _tail(self, key: object, prefix: str) -> str | None:
        """The single segment after `prefix`, or None."""
        if not isinstance(key, str) or not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        return rest if rest and "/" not in rest else None

    # -- config ------------------------------------------------------------------------------

    def config(self) -> str:
        return f"{self.prefix}/config"

    # -- node subnets ------------------------------------------------------------------------

    def subnet(self, net: IPNetwork) -> str:
        if not isinstance(net, IPv4Network | IPv6Network):
            raise TypeError(f"expected an IPv4Network or IPv6Network, not {type(net).__name__}")
        return f"{self.subnets_prefix()}{format_address(net.network_address)}-{net.prefixlen}"

    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    def parse_subnet(self, key: str) -> IPNetwork | None:
        tail = self._tail(key, self.subnets_prefix())
        if tail is None:
            return None
        addr, sep, plen = tail.rpartition("-")
        if not sep or _DIGITS_RE.fullmatch(plen) is None:
            return None
        try:
            net = ip_network(f"{addr}/{plen}", strict=True)
            return net if self.subnet(net) == key else None
        except (ValueError, TypeError):
            return None

    # -- pod IPs -----------------------------------------------------------------------------

    def ip(self, addr: IPAddress) -> str:
        return f"{self.ips_prefix()}{format_address(addr)}"

    def ips_prefix(self) -> str:
        return f"{self.prefix}/ips/"

    def ips_prefix_for(self, subnet: IPNetwork) -> str:
        """A key prefix covering every IP key of `subnet`, so one subnet's records are listed
        without reading the whole cluster's (a /24 gives `<prefix>/ips/10.244.3.`).

        It may cover more than the subnet (`10.244.1` for 10.244.10.0/23): filter the listing by
        membership. IPv6 text is not positional, so there it is the whole `ips/` prefix.
        """
        return self.ips_prefix() + _common_text(subnet)

    def parse_ip(self, key: str) -> IPAddress | None:
        return self._parse_addr(key, self.ips_prefix())

    def _parse_addr(self, key: str, prefix: str) -> IPAddress | None:
        tail = self._tail(key, prefix)
        if tail is None:
            return None
        try:
            addr = ip_address(tail)
            return addr if format_address(addr) == tail else None
        except (ValueError, TypeError):
            return None

    # -- handles -----------------------------------------------------------------------------

    def handle(self, network: str, container_id: str, ifname: str) -> str:
        if not valid_network_name(network):
            raise ValueError(f"invalid CNI network name {network!r}")
        if not valid_container_id(container_id):
            raise ValueError(f"invalid container ID {container_id!r}")
        if not valid_ifname(ifname):
            raise ValueError(f"invalid interface name {ifname!r}")
        return f"{self.handles_prefix(network)}{container_id}/{ifname}"

    def handles_prefix(self, network: str | None = None) -> str:
        """All handles, or those of one network (the trailing '/' keeps `net` off `net2`)."""
        if network is None:
            return f"{self.prefix}/handles/"
        if not valid_network_name(network):
            raise ValueError(f"invalid CNI network name {network!r}")
        return f"{self.prefix}/handles/{network}/"

    def parse_handle(self, key: str) -> tuple[str, str, str] | None:
        prefix = self.handles_prefix()
        if not isinstance(key, str) or not key.startswith(prefix):
            return None
        parts = key[len(prefix) :].split("/")
        if len(parts) != 3:
            return None
        network, cid, ifname = parts
        if not (valid_network_name(network) and valid_container_id(cid) and valid_ifname(ifname)):
            return None
        return network, cid, ifname

    # -- node removals ----------------------------------------------------------------------

    def removal(self, node: str) -> str:
        """Written by `moorctl node remove` before it deletes anything of `node`: its subnets
        vanished on purpose, not because the store lost them."""
        if not valid_node_name(node):
            raise ValueError(f"invalid node name {node!r}")
        return f"{self.prefix}/removed/{node}"

    # -- released-IP cooldown ----------------------------------------------------------------

    def released(self, addr: IPAddress) -> str:
        return f"{self.released_prefix()}{format_address(addr)}"

    def released_prefix(self) -> str:
        return f"{self.prefix}/released/"

    def released_prefix_for(self, subnet: IPNetwork) -> str:
        """Like `ips_prefix_for`, for the cooldown records."""
        return self.released_prefix() + _common_text(subnet)

    def parse_released(self, key: str) -> IPAddress | None:
        return self._parse_addr(key, self.released_prefix())

    # -- address conflicts (the ARP probe, `arpProbe`) ------------------------------------

    def conflict(self, addr: IPAddress) -> str:
        return f"{self.conflicts_prefix()}{format_address(addr)}"

    def conflicts_prefix(self) -> str:
        return f"{self.prefix}/conflicts/"

    def conflicts_prefix_for(self, subnet: IPNetwork) -> str:
        """Like `ips_prefix_for`, for the conflict records (the store follower watches them)."""
        return self.conflicts_prefix() + _common_text(subnet)

    def parse_conflict(self, key: str) -> IPAddress | None:
        return self._parse_addr(key, self.conflicts_prefix())

    # -- fixed IPs -----------------------------------------------------------------------

    def fixed(self, addr: IPAddress) -> str:
        return f"{self.fixed_prefix()}{format_address(addr)}"

    def fixed_prefix(self) -> str:
        return f"{self.prefix}/fixed/"

    def parse_fixed(self, key: str) -> IPAddress | None:
        return self._parse_addr(key, self.fixed_prefix())

    def fixed_identity(self, namespace: str, name: str) -> str:
        """The index key of a named identity; a pod without a namespace (podman) is under `-`,
        which no Kubernetes namespace can be."""
        if namespace and (problem := pod_namespace_problem(namespace)):
            raise ValueError(problem)
        if problem := pod_name_problem(name, namespaced=bool(namespace)):
            raise ValueError(problem)
        return f"{self.prefix}/fixed-ids/{namespace or '-'}/{name}"

    def sticky(self, rule: str) -> str:
        if problem := pod_namespace_problem(rule):  # a rule name is a DNS-1123 label too
            raise ValueError(problem.replace("pod namespace", "sticky rule name"))
        return f"{self.sticky_prefix()}{rule}"

    def sticky_prefix(self) -> str:
        return f"{self.prefix}/sticky/"

    def parse_sticky(self, key: str) -> str | None:
        tail = self._tail(key, self.sticky_prefix())
        return tail if tail is not None and pod_namespace_problem(tail) is None else None
