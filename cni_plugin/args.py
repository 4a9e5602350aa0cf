"""CNI_ARGS parsing with the reference library's strictness, plus the keys Kubernetes runtimes send.

`K=V;K=V`: a pair without exactly one `=` is an error, and so is a key we do not know unless
`IgnoreUnknown` is 1/true. containerd sends the K8S_POD_* keys from a Go map, so their order is
never relied on. A known key's value is checked like the same value anywhere else (the MAC and IP
as in runtimeConfig, the pod fields by Kubernetes' own rules): all code 7. An empty value is
absent. A K8S_POD_NAME without K8S_POD_NAMESPACE is podman's container name, checked by its
own rule (naming.pod_name_problem).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from cni_plugin.errors import INVALID_NETWORK_CONFIG, CNIError
from cni_plugin.naming import (
    container_id_problem,
    mac_problem,
    pod_name_problem,
    pod_namespace_problem,
    token_problem,
)

KNOWN_KEYS = frozenset(
    {
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "IP",
        "MAC",
    }
)


@dataclass(frozen=True)
class CniArgs:
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    infra_container_id: str = ""
    ip: str = ""
    mac: str = ""


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true"):
        return True
    if lowered in ("0", "false"):
        return False
    raise CNIError(
        INVALID_NETWORK_CONFIG, f"ARGS: IgnoreUnknown must be 1/true/0/false, not {value!r}"
    )


def _ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        return f"invalid IP address {value!r}"
    return None


CHECKS: dict[str, Callable[[str], str | None]] = {
    "K8S_POD_NAMESPACE": pod_namespace_problem,
    "K8S_POD_UID": lambda v: token_problem("pod UID", v),
    "K8S_POD_INFRA_CONTAINER_ID": container_id_problem,
    "IP": _ip_problem,
    "MAC": mac_problem,
}


def parse_cni_args(raw: str) -> CniArgs:
    """Parse CNI_ARGS; raises CNIError(7) on a malformed pair or an unknown key."""
    pairs: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        pieces = part.split("=")
        if len(pieces) != 2 or not pieces[0]:
            raise CNIError(INVALID_NETWORK_CONFIG, f"ARGS: invalid pair {part!r}")
        pairs[pieces[0]] = pieces[1]
    ignore_unknown = _parse_bool(pairs["IgnoreUnknown"]) if "IgnoreUnknown" in pairs else False
    unknown = sorted(k for k in pairs if k not in KNOWN_KEYS)
    if unknown and not ignore_unknown:
        raise CNIError(INVALID_NETWORK_CONFIG, f"ARGS: unknown args {unknown}")
    for key, check in CHECKS.items():
        if pairs.get(key) and (problem := check(pairs[key])):
            raise CNIError(INVALID_NETWORK_CONFIG, f"ARGS: {key}: {problem}")
    name = pairs.get("K8S_POD_NAME", "")
    if name and (
        problem := pod_name_problem(name, namespaced=bool(pairs.get("K8S_POD_NAMESPACE")))
    ):
        raise CNIError(INVALID_NETWORK_CONFIG, f"ARGS: K8S_POD_NAME: {problem}")
    return CniArgs(
        pod_namespace=pairs.get("K8S_POD_NAMESPACE", ""),
        pod_name=pairs.get("K8S_POD_NAME", ""),
        pod_uid=pairs.get("K8S_POD_UID", ""),
        infra_container_id=pairs.get("K8S_POD_INFRA_CONTAINER_ID", ""),
        ip=pairs.get("IP", ""),
        mac=pairs.get("MAC", "").lower(),
    )
