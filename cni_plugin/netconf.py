"""The network configuration on stdin, parsed once into a dataclass with every check in one place.

moor runs in one of two modes, chosen by the config:
- main plugin: `"type": "moor"`; bridge datapath plus IPAM from the node daemon (`ipam` absent or
  `{"type": "moor"}`), or L2 only (`"ipam": {}`);
- IPAM plugin: another plugin's config (bridge, macvlan, ipvlan...) with `"ipam": {"type": "moor"}`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_NETWORK_CONFIG,
    CNIError,
)
from cni_plugin.result import DNS, Result, Route

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# SPEC upgrade notes: a config without cniVersion is spec 0.2.0, which moor does not speak.
IMPLIED_VERSION = "0.2.0"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
DEFAULT_BRIDGE = "moor0"
DEFAULT_DAEMON_SOCKET = "/run/moor/cni.sock"
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CNIError(INCOMPATIBLE_VERSION, f"invalid cniVersion {version!r}")
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
    prev_result: Result | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> tuple[int, int, int]:
        return version_tuple(self.cni_version)


def decode_config(stdin: bytes) -> dict[str, Any]:
    try:
        data = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODING_FAILURE, f"failed to decode network config: {exc}") from exc
    if not isinstance(data, dict):
        raise CNIError(DECODING_FAILURE, "network config is not a JSON object")
    return data


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
        raise CNIError(INVALID_NETWORK_CONFIG, f"{key} must be a boolean, got {value!r}")
    return value


def _routes(items: Any) -> list[Route]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise CNIError(INVALID_NETWORK_CONFIG, "ipam.routes must be a list")
    routes = []
    for item in items:
        try:
            dst = ipaddress.ip_network(item["dst"], strict=True)
            gw = ipaddress.ip_address(item["gw"]) if item.get("gw") else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CNIError(INVALID_NETWORK_CONFIG, f"invalid route {item!r}: {exc}") from exc
        routes.append(Route(dst, gw))
    return routes


def _mac(data: dict[str, Any]) -> str:
    """runtimeConfig.mac beats args.cni.mac (the reference bridge's precedence)."""
    mac = ci_get(data.get("runtimeConfig"), "mac") or ci_get(ci_get(data.get("args"), "cni"), "mac")
    if not mac:
        return ""
    if not isinstance(mac, str) or not MAC_RE.match(mac):
        raise CNIError(INVALID_NETWORK_CONFIG, f"invalid MAC address {mac!r}")
    return mac.lower()


def parse_netconf(data: dict[str, Any], cni_version: str) -> NetConf:
    """Validate a decoded config (name, mode, options); raises CNIError(7) on anything wrong."""
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(INVALID_NETWORK_CONFIG, "missing network name")
    if not NAME_RE.match(name):
        raise CNIError(INVALID_NETWORK_CONFIG, f"invalid network name {name!r}")
    plugin_type = data.get("type")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise CNIError(INVALID_NETWORK_CONFIG, "missing plugin type")
    ipam_raw = data.get("ipam")
    if ipam_raw is not None and not isinstance(ipam_raw, dict):
        raise CNIError(INVALID_NETWORK_CONFIG, "ipam must be an object")
    ipam_type = (ipam_raw or {}).get("type")

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
    if mode == "main":
        bridge = data.get("bridge", DEFAULT_BRIDGE)
        if not isinstance(bridge, str) or not bridge or len(bridge) > 15 or "/" in bridge:
            raise CNIError(INVALID_NETWORK_CONFIG, f"invalid bridge name {bridge!r}")
        mtu = data.get("mtu", 0)
        if (
            not isinstance(mtu, int)
            or isinstance(mtu, bool)
            or not (mtu == 0 or 68 <= mtu <= 65535)
        ):
            raise CNIError(INVALID_NETWORK_CONFIG, f"invalid mtu {mtu!r}")
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
        conf.dns = DNS.from_dict(data.get("dns"))
        conf.mac = _mac(data)
    if "prevResult" in data and data["prevResult"]:
        conf.prev_result = Result.parse(data["prevResult"])
    return conf
