"""The network configuration on stdin, parsed once into a dataclass with every check in one place.

moor runs in one of two modes, chosen by the config:
- main plugin: `"type": "moor"`; bridge datapath plus IPAM from the node daemon (`ipam` absent or
  `{"type": "moor"}`), or L2 only (`"ipam": {}`);
- IPAM plugin: another plugin's config (bridge, macvlan, ipvlan...) with `"ipam": {"type": "moor"}`.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_NETWORK_CONFIG,
    CNIError,
    brief,
)
from cni_plugin.naming import ifname_problem, mac_problem, network_name_problem
from cni_plugin.result import DNS, Result, Route

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# SPEC upgrade notes: a config without cniVersion is spec 0.2.0, which moor does not speak.
IMPLIED_VERSION = "0.2.0"
DEFAULT_BRIDGE = "moor0"
DEFAULT_DAEMON_SOCKET = "/run/moor/cni.sock"


def version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CNIError(INCOMPATIBLE_VERSION, f"invalid cniVersion {brief(version)}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def ci_get(data: Any, key: str, default: Any = None) -> Any:
    """Case-insensitive dict lookup: containerd sends capability keys Go-cased, CRI-O camelCased."""
    if not isinstance(data, dict):
        return default
    if key in data:
        return data[key]
    lowered = key.lower()
    for k, v in data.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return default


@dataclass
class IpamConf:
    routes: list[Route] = field(default_factory=list)


@dataclass(frozen=True)
class ArpProbe:
    """`arpProbe: true`: probe the address (RFC 5227) before ADD completes; `count` probes spread
    over `count` x `interval_ms` (SPEC-NOTES, address conflict probe)."""

    count: int = 3
    interval_ms: int = 33


ARP_PROBE_COUNT = (1, 10)
ARP_PROBE_INTERVAL_MS = (1, 200)  # at most 10 x 200 ms = 2 s of the request's 5 s deadline


@dataclass
class NetConf:
    cni_version: str
    name: str
    type: str
    mode: str  # "main" or "ipam"
    bridge: str = DEFAULT_BRIDGE
    mtu: int = 0
    is_gateway: bool = False
    is_default_gateway: bool = False
    ip_masq: bool = False
    hairpin_mode: bool = False
    promisc_mode: bool = False
    ipam: IpamConf | None = None  # None: L2 only
    dns: DNS = field(default_factory=DNS)
    mac: str = ""  # from runtimeConfig or args; CNI_ARGS MAC is applied later, lowest precedence
    arp_probe: ArpProbe | None = None  # None: no probe (the default, and the hot path)
    prev_result: Result | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> tuple[int, int, int]:
        return version_tuple(self.cni_version)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} does not fit a double")
    return value


def decode_config(stdin: bytes) -> dict[str, Any]:
    """stdin as a JSON object: UTF-8 only (RFC 8259), no NaN/Infinity, no number beyond a double.

    Code 6 for anything json refuses, including nesting too deep to parse (RecursionError) and
    digit strings too long for int().
    """
    try:
        data = json.loads(
            stdin.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CNIError(DECODING_FAILURE, f"failed to decode network config: {exc}") from exc
    if not isinstance(data, dict):
        raise CNIError(DECODING_FAILURE, "network config is not a JSON object")
    return data


def check_unicode(data: dict[str, Any]) -> None:
    """Code 7 for a config holding a string that is not Unicode text (a lone surrogate escape
    such as "\\udcff"): such a value could be neither stored nor printed as UTF-8."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid("network config holds a string that is not valid Unicode") from exc
    except RecursionError as exc:
        raise CNIError(DECODING_FAILURE, "network config is nested too deeply") from exc


def config_version(data: dict[str, Any]) -> str:
    """The config's cniVersion, checked against what moor supports (code 1 otherwise)."""
    version = data.get("cniVersion", IMPLIED_VERSION)
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f'config is "{version}", plugin supports {list(SUPPORTED_VERSIONS)}',
        )
    return version


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise CNIError(INVALID_NETWORK_CONFIG, f"{key} must be a boolean, got {brief(value)}")
    return value


def _invalid(msg: str) -> CNIError:
    return CNIError(INVALID_NETWORK_CONFIG, msg)


def _object(value: Any, what: str) -> dict[str, Any]:
    """An optional JSON object field: absent or null is {}, anything else but an object is 7."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be an object, not {type(value).__name__}")
    return value


def _route(item: Any) -> Route:
    """One `ipam.routes` entry: {"dst": IPv4 CIDR, "gw"?: IPv4 address} (moor is IPv4 only)."""
    if not isinstance(item, dict):
        raise _invalid(f"ipam.routes entries must be objects, not {brief(item)}")
    dst, gw = item.get("dst"), item.get("gw")
    if not isinstance(dst, str) or (gw not in (None, "") and not isinstance(gw, str)):
        raise _invalid(f"invalid route {brief(item)}: dst and gw must be strings")
    try:
        route = Route(
            ipaddress.ip_network(dst, strict=True), ipaddress.ip_address(gw) if gw else None
        )
    except ValueError as exc:
        raise _invalid(f"invalid route {brief(item)}: {exc}") from exc
    if route.dst.version != 4 or (route.gw is not None and route.gw.version != 4):
        raise _invalid(f"invalid route {brief(item)}: moor supports IPv4 routes only")
    return route


def _routes(items: Any) -> list[Route]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise _invalid("ipam.routes must be a list")
    return [_route(item) for item in items]


def _capability(data: dict[str, Any], key: str) -> Any:
    """runtimeConfig.<key> beats args.cni.<key> (the CONVENTIONS precedence); keys are read
    case-insensitively. null, "" and [] are absent; any other value is the caller's to check."""
    runtime = _object(data.get("runtimeConfig"), "runtimeConfig")
    cni_args = _object(ci_get(_object(data.get("args"), "args"), "cni"), "args.cni")
    value = ci_get(runtime, key)
    return value if value not in (None, "", []) else ci_get(cni_args, key)


def _mac(data: dict[str, Any]) -> str:
    """runtimeConfig.mac beats args.cni.mac (the reference bridge's precedence)."""
    mac = _capability(data, "mac")
    if mac in (None, ""):
        return ""
    if problem := mac_problem(mac):
        raise _invalid(problem)
    return mac.lower()


def _check_requested_ips(data: dict[str, Any]) -> None:
    """runtimeConfig.ips / args.cni.ips: a list of IP addresses (a prefix is allowed, ignored).
    The plugin takes exactly one; here only the types and the syntax are checked."""
    ips = _capability(data, "ips")
    if ips in (None, "", []):
        return
    if not isinstance(ips, list):
        raise _invalid(f"ips must be a list of IP addresses, not {type(ips).__name__}")
    for ip in ips:
        if not isinstance(ip, str):
            raise _invalid(f"ips entries must be strings, not {brief(ip)}")
        try:
            ipaddress.ip_interface(ip)
        except ValueError as exc:
            raise _invalid(f"invalid requested IP {ip!r}") from exc


def _check_paths(section: dict[str, Any], where: str) -> None:
    """daemonSocket/spoolDir are read by the shim; one of another type is a config error too."""
    for key in ("daemonSocket", "spoolDir"):
        value = section.get(key)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"{where}{key} must be a string")


def _dns(data: dict[str, Any]) -> DNS:
    try:
        return DNS.from_dict(data.get("dns"))
    except (TypeError, ValueError) as exc:
        raise _invalid(f"invalid dns: {exc}") from exc


def _bounded_int(section: dict[str, Any], key: str, default: int, bounds: tuple[int, int]) -> int:
    value = section.get(key, default)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (bounds[0] <= value <= bounds[1])
    ):
        raise _invalid(
            f"{key} must be an integer from {bounds[0]} to {bounds[1]}, not {brief(value)}"
        )
    return value


def _arp_probe(sections: list[dict[str, Any]]) -> ArpProbe | None:
    """`arpProbe` (with `arpProbeCount`, `arpProbeIntervalMs`) from the first of `sections` that
    has any of them: the top level, then `ipam`, for the main plugin; `ipam` for the IPAM plugin.
    Every section that has them is checked."""
    found: list[ArpProbe | None] = []
    for section in sections:
        if not any(k in section for k in ("arpProbe", "arpProbeCount", "arpProbeIntervalMs")):
            continue
        on = _bool(section, "arpProbe")
        count = _bounded_int(section, "arpProbeCount", ArpProbe.count, ARP_PROBE_COUNT)
        interval = _bounded_int(
            section, "arpProbeIntervalMs", ArpProbe.interval_ms, ARP_PROBE_INTERVAL_MS
        )
        found.append(ArpProbe(count, interval) if on else None)
    return found[0] if found else None


def parse_netconf(data: dict[str, Any], cni_version: str) -> NetConf:
    """Validate a decoded config (name, mode, options); raises CNIError(7) on anything wrong."""
    check_unicode(data)
    name = data.get("name")
    if name is None or name == "":
        raise _invalid("missing network name")
    if problem := network_name_problem(name):
        raise _invalid(problem)
    plugin_type = data.get("type")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise _invalid("missing plugin type")
    ipam_raw = data.get("ipam")
    if ipam_raw is not None and not isinstance(ipam_raw, dict):
        raise _invalid("ipam must be an object")
    ipam_type = (ipam_raw or {}).get("type")
    if ipam_type is not None and not isinstance(ipam_type, str):
        raise _invalid(f"ipam.type must be a string, not {type(ipam_type).__name__}")
    _check_paths(data, "")
    _check_paths(ipam_raw or {}, "ipam.")
    _check_requested_ips(data)

    if plugin_type == "moor":
        mode = "main"
        if ipam_raw is not None and ipam_type not in (None, "moor"):
            raise CNIError(
                INVALID_NETWORK_CONFIG,
                f"unsupported ipam type {ipam_type!r}: moor uses its own IPAM "
                '("ipam": {"type": "moor"}) or none ("ipam": {})',
            )
        ipam = None if ipam_raw == {} else IpamConf(_routes((ipam_raw or {}).get("routes")))
    elif ipam_type == "moor":
        mode = "ipam"
        ipam = IpamConf(_routes(ipam_raw.get("routes")))  # type: ignore[union-attr]
    else:
        raise CNIError(
            INVALID_NETWORK_CONFIG,
            f"config is neither for moor nor for its IPAM: type {plugin_type!r}",
        )

    conf = NetConf(
        cni_version=cni_version, name=name, type=plugin_type, mode=mode, ipam=ipam, raw=data
    )
    conf.arp_probe = _arp_probe(([data] if mode == "main" else []) + [ipam_raw or {}])
    if conf.arp_probe is not None and ipam is None:
        raise _invalid('arpProbe needs an IP to probe; this config is L2 only ("ipam": {})')
    if mode == "main":
        bridge = data.get("bridge", DEFAULT_BRIDGE)
        if problem := ifname_problem(bridge, "bridge name"):
            raise _invalid(problem)
        mtu = data.get("mtu", 0)
        if (
            not isinstance(mtu, int)
            or isinstance(mtu, bool)
            or not (mtu == 0 or 68 <= mtu <= 65535)
        ):
            raise CNIError(INVALID_NETWORK_CONFIG, f"invalid mtu {brief(mtu)}")
        conf.bridge = bridge
        conf.mtu = mtu
        conf.is_default_gateway = _bool(data, "isDefaultGateway")
        conf.is_gateway = _bool(data, "isGateway") or conf.is_default_gateway
        conf.ip_masq = _bool(data, "ipMasq")
        conf.hairpin_mode = _bool(data, "hairpinMode")
        conf.promisc_mode = _bool(data, "promiscMode")
        if conf.hairpin_mode and conf.promisc_mode:
            raise CNIError(
                INVALID_NETWORK_CONFIG,
                "cannot set hairpin mode and promiscuous mode at the same time",
            )
        conf.dns = _dns(data)
        conf.mac = _mac(data)
    prev = data.get("prevResult")
    if prev is not None and prev != {}:
        conf.prev_result = Result.parse(prev)
    return conf
