"""The kernel's own record of an attachment: ADD writes it into the host veth's alias.

The store is the truth about who holds which IP, but a store can lose it while the daemon is down
(a wiped etcd, a deleted SQLite file), and then the daemon's memory is gone too. The kernel still
has every running pod's host veth, and the veth's alias (IFLA_IFALIAS) says what it is for, so a
daemon that starts against a store that lost data puts those allocations back before it hands out
a single IP (`ipamd/guard.py`). The alias dies with the link: DEL needs no cleanup.

Format, one line of at most 255 bytes (the kernel's IFALIASZ, less its NUL):
    moor1 <node> <ip>/<prefix length> <network> <container ID> <ifname> <pod ns> <pod name> <uid>
with `-` for an empty pod field. `<node>` is 8 hex digits of sha256(node name): a node takes back
only its own veths (nodes simulated on one host share its links). None of the fields can hold a
space (naming.py), so parsing is a split. When the whole does not fit, the pod fields are left
out: the address and the handle are what protects the IP.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from cni_plugin.ipam import AttachmentOwner
from cni_plugin.iptypes import IPInterface
from cni_plugin.naming import valid_container_id, valid_ifname, valid_network_name

MAGIC = "moor1"
ALIAS_MAX = 255


def node_tag(node: str) -> str:
    """Which node wrote a record: short enough for the alias, distinct enough for one host."""
    return hashlib.sha256(node.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class AttachmentRecord:
    node_tag: str
    interface: IPInterface
    owner: AttachmentOwner


def encode(record: AttachmentRecord) -> str | None:
    """The alias for `record`; None when even its address and handle do not fit."""
    o = record.owner
    core = [MAGIC, record.node_tag, str(record.interface), o.network, o.container_id, o.ifname]
    pod = [o.pod_namespace or "-", o.pod_name or "-", o.pod_uid or "-"]
    for fields in (core + pod, core):
        text = " ".join(fields)
        if len(text.encode()) <= ALIAS_MAX and all(f and " " not in f for f in fields):
            return text
    return None


def decode(alias: object) -> AttachmentRecord | None:
    """The record in a link's alias; None for anything moor did not write. Never raises."""
    if not isinstance(alias, str):
        return None
    fields = alias.split(" ")
    if fields[0] != MAGIC or len(fields) not in (6, 9):
        return None
    _, tag, address, network, container_id, ifname, *pod = fields
    if len(tag) != 8 or any(c not in "0123456789abcdef" for c in tag):
        return None
    try:
        interface = ipaddress.ip_interface(address)
    except ValueError:
        return None
    if not (
        valid_network_name(network) and valid_container_id(container_id) and valid_ifname(ifname)
    ):
        return None
    namespace, name, uid = (("" if f == "-" else f) for f in (pod or ["-", "-", "-"]))
    owner = AttachmentOwner(network, container_id, ifname, namespace, name, uid)
    return AttachmentRecord(tag, interface, owner)
