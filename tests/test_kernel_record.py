"""The attachment record ADD writes into the host veth's alias (cni_plugin/kernel_record.py):
it reads back what was written, always fits the kernel's 255 bytes, keeps the address and the
handle when the pod fields do not fit, and reads anything else as no record, never raising."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from cni_plugin import kernel_record
from cni_plugin.ipam import AttachmentOwner
from cni_plugin.kernel_record import ALIAS_MAX, AttachmentRecord

NAME = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,40}", fullmatch=True)
POD = st.one_of(st.just(""), st.from_regex(r"[a-z0-9]([-a-z0-9]{0,60}[a-z0-9])?", fullmatch=True))
OWNERS = st.builds(
    AttachmentOwner,
    network=NAME,
    container_id=st.one_of(NAME, st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
    ifname=st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True),
    pod_namespace=POD,
    pod_name=POD,
    pod_uid=st.one_of(st.just(""), st.uuids().map(str)),
)
RECORDS = st.builds(
    AttachmentRecord,
    node_tag=st.text("0123456789abcdef", min_size=8, max_size=8),
    interface=st.builds(
        lambda ip, plen: ipaddress.ip_interface(f"{ipaddress.IPv4Address(ip)}/{plen}"),
        st.integers(0, 2**32 - 1),
        st.integers(8, 30),
    ),
    owner=OWNERS,
)


@given(RECORDS)
def test_a_record_reads_back_and_fits_the_alias(record: AttachmentRecord) -> None:
    alias = kernel_record.encode(record)
    assert alias is not None and len(alias.encode()) <= ALIAS_MAX
    back = kernel_record.decode(alias)
    assert back is not None
    assert (back.node_tag, back.interface, back.owner.handle) == (
        record.node_tag,
        record.interface,
        record.owner.handle,
    )
    if back.owner.pod_name or back.owner.pod_namespace or back.owner.pod_uid:  # kept if they fit
        assert back == record


def test_pod_fields_go_first_when_the_whole_does_not_fit() -> None:
    tag = kernel_record.node_tag("node-1")
    ip = ipaddress.ip_interface("10.244.3.7/24")
    owner = AttachmentOwner("n" * 100, "c" * 64, "eth0", "ns", "p" * 120, "u")
    alias = kernel_record.encode(AttachmentRecord(tag, ip, owner))
    assert alias == f"moor1 {tag} 10.244.3.7/24 {'n' * 100} {'c' * 64} eth0"
    bare = AttachmentOwner("n" * 100, "c" * 64, "eth0")
    assert kernel_record.decode(alias) == AttachmentRecord(tag, ip, bare)
    too_long = AttachmentOwner("n" * 300, "c", "eth0")
    assert kernel_record.encode(AttachmentRecord(tag, ip, too_long)) is None


@given(st.one_of(st.text(), st.binary(), st.none(), st.integers()))
def test_anything_else_is_no_record(alias: object) -> None:
    decoded = kernel_record.decode(alias)
    assert decoded is None or isinstance(decoded, AttachmentRecord)


def test_foreign_or_broken_aliases_are_not_records() -> None:
    for alias in (
        "uplink to the core switch",
        "moor1",
        "moor1 0a1b2c3d 10.0.0.1/24 net cid",  # too few fields
        "moor1 0a1b2c3d 10.0.0.1/33 net cid eth0",
        "moor1 0a1b2c3d 10.0.0.1/24 net/x cid eth0",
        "moor1 0a1b2c3d 10.0.0.1/24 net cid eth0 ns",  # pod fields come as three
        "moor1 node-1xx 10.0.0.1/24 net cid eth0",  # not a node tag
        "moor2 0a1b2c3d 10.0.0.1/24 net cid eth0",
    ):
        assert kernel_record.decode(alias) is None, alias
