"""CNI_ARGS parsing with the reference library's strictness, plus the keys Kubernetes runtimes send.

`K=V;K=V`: a pair without exactly one `=` is an error, and so is a key we do not know unless
`IgnoreUnknown` is 1/true. containerd sends the K8S_POD_* keys from a Go map, so their order is
never relied on.
"""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin.errors import INVALID_NETWORK_CONFIG, CNIError

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
    return CniArgs(
        pod_namespace=pairs.get("K8S_POD_NAMESPACE", ""),
        pod_name=pairs.get("K8S_POD_NAME", ""),
        pod_uid=pairs.get("K8S_POD_UID", ""),
        infra_container_id=pairs.get("K8S_POD_INFRA_CONTAINER_ID", ""),
        ip=pairs.get("IP", ""),
        mac=pairs.get("MAC", ""),
    )
