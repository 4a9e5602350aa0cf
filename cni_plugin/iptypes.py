"""The IP type aliases every module shares (CNI results, the IPAM model, the store keys).

One definition, so an annotation means the same thing on both sides of the plugin/daemon line.
`cni_plugin` owns it because `ipamd` may import `cni_plugin`, never the other way round.
"""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

__all__ = ["IPAddress", "IPInterface", "IPNetwork"]
