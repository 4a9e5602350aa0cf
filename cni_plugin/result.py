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

from cni_plugin.errors import DECODING_FAILURE, CNIError, brief
from cni_plugin.iptypes import IPAddress, IPInterface, IPNetwork


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
        """The spec's DNS object; absent or null is empty. Raises ValueError on a wrong type
        (the caller picks the code: 7 in a config, 6 in a prevResult)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"dns must be an object, not {type(data).__name__}")
        domain = _optional(data, "domain", str, "")
        return cls(
            nameservers=_strings(data, "nameservers"),
            domain=domain,
            search=_strings(data, "search"),
            options=_strings(data, "options"),
        )


def _optional(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """`data[key]` when it is a `kind` (never a bool for int), `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be {kind.__name__}, not {brief(value)}")
    return value


def _strings(data: dict[str, Any], key: str) -> list[str]:
    items = _optional(data, key, list, [])
    if not all(isinstance(x, str) for x in items):
        raise ValueError(f"{key} must be a list of strings")
    return list(items)


def _objects(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = _optional(data, key, list, [])
    if not all(isinstance(x, dict) for x in items):
        raise ValueError(f"{key} must be a list of objects")
    return items


def _required_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {brief(value)}")
    return value


def _address(text: str | None) -> IPAddress | None:
    return ipaddress.ip_address(text) if text else None


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
                    name=_required_str(i, "name"),
                    mac=_optional(i, "mac", str, ""),
                    sandbox=_optional(i, "sandbox", str, ""),
                    mtu=_optional(i, "mtu", int, 0),
                )
                for i in _objects(data, "interfaces")
            ]
            ips = [
                IPConfig(
                    address=ipaddress.ip_interface(_required_str(i, "address")),
                    gateway=_address(_optional(i, "gateway", str, "")),
                    interface=_optional(i, "interface", int, None),
                )
                for i in _objects(data, "ips")
            ]
            routes = [
                Route(
                    dst=ipaddress.ip_network(_required_str(r, "dst"), strict=False),
                    gw=_address(_optional(r, "gw", str, "")),
                )
                for r in _objects(data, "routes")
            ]
            dns = DNS.from_dict(data.get("dns"))
        except ValueError as exc:
            raise CNIError(DECODING_FAILURE, f"malformed prevResult: {exc}") from exc
        if any(ip.interface is not None and ip.interface < 0 for ip in ips):
            raise CNIError(DECODING_FAILURE, "malformed prevResult: negative ips[].interface")
        return cls(interfaces, ips, routes, dns)

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
