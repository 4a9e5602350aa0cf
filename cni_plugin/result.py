"""The CNI Result: built once as dataclasses, rendered in whichever cniVersion the caller asked for.

0.3.x and 0.4.0 carry `ips[].version`; 1.x do not (the 1.0.0 upgrade notes call it the "interfaces"
version field, which is a documentation slip: it is `ips[].version`). A `prevResult` from any
supported version parses back into the same dataclasses, so CHECK and DEL never care which version
the runtime cached.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.errors import DECODING_FAILURE, CNIError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int = 0


@dataclass
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> DNS:
        if not isinstance(data, dict):
            return cls()
        return cls(
            nameservers=[str(x) for x in data.get("nameservers") or []],
            domain=str(data.get("domain") or ""),
            search=[str(x) for x in data.get("search") or []],
            options=[str(x) for x in data.get("options") or []],
        )


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)

    def render(self, cni_version: str, *, abbreviated: bool = False) -> dict[str, Any]:
        """The result as the JSON object of `cni_version`.

        `abbreviated` is the IPAM-plugin shape: no interfaces and no `ips[].interface`.
        """
        with_ip_version = not cni_version.startswith("1.")
        out: dict[str, Any] = {"cniVersion": cni_version}
        if not abbreviated and self.interfaces:
            out["interfaces"] = [_render_interface(i, cni_version) for i in self.interfaces]
        if self.ips:
            ips = []
            for ip in self.ips:
                item: dict[str, Any] = {}
                if with_ip_version:
                    item["version"] = str(ip.address.version)
                item["address"] = str(ip.address)
                if ip.gateway is not None:
                    item["gateway"] = str(ip.gateway)
                if ip.interface is not None and not abbreviated:
                    item["interface"] = ip.interface
                ips.append(item)
            out["ips"] = ips
        if self.routes:
            out["routes"] = [_render_route(r) for r in self.routes]
        if not self.dns.is_empty():
            out["dns"] = self.dns.to_dict()
        return out

    @classmethod
    def parse(cls, data: Any) -> Result:
        """Parse a 0.3.0+ result (a prevResult); raises CNIError(6) on a malformed one."""
        if not isinstance(data, dict):
            raise CNIError(DECODING_FAILURE, "prevResult is not a JSON object")
        try:
            interfaces = [
                Interface(
                    name=str(i["name"]),
                    mac=str(i.get("mac", "")),
                    sandbox=str(i.get("sandbox", "")),
                    mtu=int(i.get("mtu", 0) or 0),
                )
                for i in data.get("interfaces") or []
            ]
            ips = [
                IPConfig(
                    address=ipaddress.ip_interface(i["address"]),
                    gateway=ipaddress.ip_address(i["gateway"]) if i.get("gateway") else None,
                    interface=int(i["interface"]) if i.get("interface") is not None else None,
                )
                for i in data.get("ips") or []
            ]
            routes = [
                Route(
                    dst=ipaddress.ip_network(r["dst"], strict=False),
                    gw=ipaddress.ip_address(r["gw"]) if r.get("gw") else None,
                )
                for r in data.get("routes") or []
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise CNIError(DECODING_FAILURE, f"malformed prevResult: {exc}") from exc
        return cls(interfaces, ips, routes, DNS.from_dict(data.get("dns")))

    def merged_after(self, prev: Result | None) -> Result:
        """This plugin's result appended to a chained prevResult, as the spec asks of ADD."""
        if prev is None:
            return self
        offset = len(prev.interfaces)
        ips = list(prev.ips) + [
            IPConfig(
                ip.address, ip.gateway, None if ip.interface is None else ip.interface + offset
            )
            for ip in self.ips
        ]
        dns = self.dns if not self.dns.is_empty() else prev.dns
        return Result(prev.interfaces + self.interfaces, ips, prev.routes + self.routes, dns)


def _render_interface(iface: Interface, cni_version: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if iface.mtu and cni_version == "1.1.0":
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    return out


def _render_route(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    return out
