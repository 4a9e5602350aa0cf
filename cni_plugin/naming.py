"""Every name and identifier rule of moor, in one place: the CNI side and the store keys share it.

Each rule has a `*_problem(value) -> str | None` form (the reason, for an error message) and a
`valid_*` form (a bool, for parsers that must never raise). Three things are true of all of them:
- `re.fullmatch`, never `re.match` with `$` (which accepts a trailing newline);
- any value is accepted as input: a non-string, or a string with lone surrogates (what the wire's
  surrogateescape makes of invalid UTF-8) is refused with a reason, never a UnicodeError;
- the reason quotes the value with `repr`, so it is printable ASCII-safe text in the error JSON.
Callers pick the CNI code: 4 for env values, 7 for config values.
"""

from __future__ import annotations

import re

# CNI spec: network name and container ID start alphanumeric, then alnum, '_', '.', '-'. The spec
# sets no length limit; moor bounds both so one request cannot make a store key of megabytes.
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*", re.ASCII)
MAX_NETWORK_NAME = 256
MAX_CONTAINER_ID = 1024
MAX_POD_NAME = 253  # Kubernetes' bound; podman container names get it too
IFNAMSIZ = 16  # Linux, including the trailing NUL
# The kernel's isspace() (lib/ctype.c) on the name's bytes: \t\n\v\f\r, space, and 0xA0, which a
# UTF-8 name carries as a continuation byte (e.g. "à" is C3 A0): dev_valid_name refuses those.
_KERNEL_SPACE = frozenset(b"\t\n\v\f\r \xa0")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}", re.ASCII)
# Kubernetes: a pod name is a DNS-1123 subdomain (<= 253), a namespace a DNS-1123 label (<= 63).
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL, re.ASCII)
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*", re.ASCII)
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,128}", re.ASCII)  # printable ASCII, no space
# A node name is a key segment of the store: hostnames and Kubernetes node names fit.
_NODE_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,252}", re.ASCII)


def is_unicode_text(value: str) -> bool:
    """False for a string holding lone surrogates (invalid UTF-8 decoded with surrogateescape, or
    a JSON `\\udcxx` escape): such text cannot be encoded, stored or printed as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(what: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string, not {type(value).__name__}"
    if not value:
        return f"{what} is empty"
    if not is_unicode_text(value):
        return f"{what} {value!r} is not valid UTF-8"
    return None


def _cni_name_problem(what: str, value: object, limit: int) -> str | None:
    if problem := _text_problem(what, value):
        return problem
    assert isinstance(value, str)
    if len(value) > limit:
        return f"{what} is longer than {limit} characters"
    if _NAME_RE.fullmatch(value) is None:
        return (
            f"{what} {value!r} is invalid: it must start with a letter or digit and contain "
            "only letters, digits, '_', '.' and '-'"
        )
    return None


def network_name_problem(name: object) -> str | None:
    """The CNI network-name rule (plus moor's length bound)."""
    return _cni_name_problem("network name", name, MAX_NETWORK_NAME)


def container_id_problem(cid: object) -> str | None:
    """The CNI container-ID rule (the same charset as network names, plus a length bound)."""
    return _cni_name_problem("container ID", cid, MAX_CONTAINER_ID)


def ifname_problem(name: object, what: str = "interface name") -> str | None:
    """The kernel's dev_valid_name(): 1..15 bytes of UTF-8, not '.'/'..', no '/', ':', NUL or
    whitespace (Python's or the kernel's: the 0xA0 byte counts). moor also refuses '%': the kernel
    reads it as a name template ("eth%d"), so the link would not get the name asked for."""
    if problem := _text_problem(what, name):
        return problem
    assert isinstance(name, str)
    raw = name.encode("utf-8")
    if len(raw) >= IFNAMSIZ:
        return f"{what} {name!r} is longer than {IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return f"{what} {name!r} is not allowed"
    if (
        any(c in "/:%\x00" or c.isspace() for c in name)
        or not _KERNEL_SPACE.isdisjoint(raw)
        or not name.isprintable()
    ):
        return f"{what} {name!r} contains '/', ':', '%', whitespace or a control character"
    return None


def mac_problem(mac: object) -> str | None:
    """Six colon-separated hex octets of a unicast, non-zero MAC: the kernel refuses a multicast or
    all-zero address on a veth, so it is refused here before anything is created."""
    if problem := _text_problem("MAC address", mac):
        return problem
    assert isinstance(mac, str)
    if _MAC_RE.fullmatch(mac) is None:
        return f"invalid MAC address {mac!r}"
    octets = bytes(int(x, 16) for x in mac.split(":"))
    if octets[0] & 1:
        return f"MAC address {mac!r} is a multicast address"
    if not any(octets):
        return f"MAC address {mac!r} is all zeros"
    return None


def pod_name_problem(name: object, *, namespaced: bool = True) -> str | None:
    """A Kubernetes pod name: a DNS-1123 subdomain of at most 253 characters. A name without a
    namespace is podman's: it sends only K8S_POD_NAME, the container name, whose rule is the CNI
    name rule (its generated names, e.g. "elegant_hopper", hold '_'), so that rule applies."""
    if not namespaced:
        return _cni_name_problem("pod name", name, MAX_POD_NAME)
    if problem := _text_problem("pod name", name):
        return problem
    assert isinstance(name, str)
    if len(name) > MAX_POD_NAME or _DNS_SUBDOMAIN_RE.fullmatch(name) is None:
        return f"pod name {name!r} is not a DNS-1123 subdomain of at most 253 characters"
    return None


def pod_namespace_problem(name: object) -> str | None:
    """A Kubernetes namespace: a DNS-1123 label of at most 63 characters."""
    if problem := _text_problem("pod namespace", name):
        return problem
    assert isinstance(name, str)
    if len(name) > 63 or _DNS_LABEL_RE.fullmatch(name) is None:
        return f"pod namespace {name!r} is not a DNS-1123 label of at most 63 characters"
    return None


def token_problem(what: str, value: object) -> str | None:
    """An opaque identifier such as a pod UID: 1..128 printable ASCII characters, no spaces."""
    if problem := _text_problem(what, value):
        return problem
    assert isinstance(value, str)
    if _TOKEN_RE.fullmatch(value) is None:
        return f"{what} {value!r} must be 1..128 printable ASCII characters without spaces"
    return None


def valid_network_name(name: object) -> bool:
    return network_name_problem(name) is None


def valid_container_id(cid: object) -> bool:
    return container_id_problem(cid) is None


def valid_ifname(name: object) -> bool:
    return ifname_problem(name) is None


def valid_mac(mac: object) -> bool:
    return mac_problem(mac) is None


def valid_node_name(name: object) -> bool:
    """A node name that can be a store key segment (`--node-name`, leases, removal records)."""
    return isinstance(name, str) and _NODE_RE.fullmatch(name) is not None
