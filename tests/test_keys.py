"""Key schema: every key round-trips, and parsing anything else yields None, never an exception.

Parse functions read keys written by other daemons, other versions and humans; a raise there
would take the daemon's start-up or its store follower down on one bad key.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni_plugin.naming import container_id_problem, ifname_problem, network_name_problem
from ipamd.store.keys import Keys, format_address, valid_ifname

K = Keys()

prefixes = st.sampled_from(["/moor", "/a", "/cluster-1/moor", "/x.y/z_1"])

v4_nets = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_nets = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
# Sparse v6 values exercise the zero-run compression far better than uniform integers do.
v6_sparse = st.lists(
    st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABC, 0x10]), min_size=8, max_size=8
).map(lambda hs: IPv6Address(sum(h << (112 - 16 * i) for i, h in enumerate(hs))))
addrs = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6), v6_sparse)

name_chars = "abcXYZ019_.-"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("aZ09"),
    st.text(alphabet=name_chars, max_size=70),
)
ifnames = st.text(min_size=1, max_size=15).filter(valid_ifname)


@given(prefixes, st.one_of(v4_nets, v6_nets))
def test_subnet_roundtrip(prefix: str, net: IPv4Network | IPv6Network) -> None:
    keys = Keys(prefix)
    key = keys.subnet(net)
    assert key.startswith(keys.subnets_prefix())
    assert keys.parse_subnet(key) == net


@given(prefixes, addrs)
def test_ip_roundtrip(prefix: str, addr: IPv4Address | IPv6Address) -> None:
    keys = Keys(prefix)
    assert keys.parse_ip(keys.ip(addr)) == addr
    assert keys.parse_released(keys.released(addr)) == addr
    # Each kind parses only its own keys.
    assert keys.parse_released(keys.ip(addr)) is None
    assert keys.parse_subnet(keys.ip(addr)) is None


@given(addrs)
def test_address_text_matches_python_where_python_is_stable(
    addr: IPv4Address | IPv6Address,
) -> None:
    # Python >= 3.13 prints IPv4-mapped IPv6 as ::ffff:a.b.c.d; we never do (stable keys).
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        assert "." not in format_address(addr)
    else:
        assert format_address(addr) == str(addr)


@given(prefixes, names, names, ifnames)
def test_handle_roundtrip(prefix: str, network: str, cid: str, ifname: str) -> None:
    keys = Keys(prefix)
    key = keys.handle(network, cid, ifname)
    assert key.startswith(keys.handles_prefix(network))
    assert key.startswith(keys.handles_prefix())
    assert keys.parse_handle(key) == (network, cid, ifname)


def _all_parsers(keys: Keys, key: str) -> None:
    for parse in (keys.parse_subnet, keys.parse_ip, keys.parse_handle, keys.parse_released):
        parse(key)  # must not raise


@given(st.text())
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    _all_parsers(K, text)


@given(
    st.sampled_from(["", "/", "subnets/", "ips/", "handles/", "released/", "handles/n/"]),
    st.text(),
)
def test_parse_never_raises_after_a_valid_prefix(middle: str, text: str) -> None:
    _all_parsers(K, f"/moor/{middle}{text}")


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parse_never_raises_on_non_str(junk: object) -> None:
    _all_parsers(K, junk)  # type: ignore[arg-type]


def test_examples() -> None:
    assert K.config() == "/moor/config"
    assert K.subnet(ip_network("10.244.3.0/24")) == "/moor/subnets/10.244.3.0-24"
    assert K.subnet(ip_network("fd00:1::/64")) == "/moor/subnets/fd00:1::-64"
    assert K.ip(ip_address("10.244.3.5")) == "/moor/ips/10.244.3.5"
    assert K.released(ip_address("fd00::5")) == "/moor/released/fd00::5"
    assert (
        K.handle("k8s-pod-network", "abc123", "eth0") == "/moor/handles/k8s-pod-network/abc123/eth0"
    )
    assert K.handles_prefix("net") == "/moor/handles/net/"
    assert K.ip(ip_address("::ffff:1.2.3.4")) == "/moor/ips/::ffff:102:304"


def test_fixed_identity_takes_podman_names_only_without_a_namespace() -> None:
    assert K.fixed_identity("", "elegant_Hopper") == "/moor/fixed-ids/-/elegant_Hopper"
    assert K.fixed_identity("prod", "db-0") == "/moor/fixed-ids/prod/db-0"
    for namespace, name in (("prod", "elegant_Hopper"), ("", "_x"), ("", "a/b"), ("", "")):
        with pytest.raises(ValueError):
            K.fixed_identity(namespace, name)


@pytest.mark.parametrize(
    "key",
    [
        "/moor/ips/010.1.1.1",  # leading zero: not canonical
        "/moor/ips/10.1.1.1/",
        "/moor/ips/10.1.1.1/x",
        "/moor/ips/",
        "/moor/ips/ 10.1.1.1",
        "/moor/ips/10.1.1.1\n",
        "/moor/ips/FD00::1",  # upper case
        "/moor/ips/fd00:0::1",  # uncompressed zero
        "/moor/ips/fd00::1%eth0",  # scoped
        "/moor/ips/::ffff:1.2.3.4",  # mixed notation
        "/other/ips/10.1.1.1",
        "/moorx/ips/10.1.1.1",
        "/moor/released/10.1.1.1.",
        "/moor/subnets/10.244.3.1-24",  # host bits set
        "/moor/subnets/10.244.3.0-024",
        "/moor/subnets/10.244.3.0-33",
        "/moor/subnets/10.244.3.0-+24",
        "/moor/subnets/10.244.3.0/24",
        "/moor/subnets/10.244.3.0",
        "/moor/subnets/-24",
        "/moor/subnets/fd00:1:0::-64",
        "/moor/handles/net/cid",
        "/moor/handles/net/cid/eth0/extra",
        "/moor/handles/net//eth0",
        "/moor/handles//cid/eth0",
        "/moor/handles/-net/cid/eth0",
        "/moor/handles/net/cid/..",
        "/moor/handles/net/cid/eth:0",
        "/moor/handles/net/cid/a234567890123456",  # 16 bytes
        "/moor/handles/net/cid/eth 0",
        "/moor/handles/net\n/cid/eth0",
        "/moor/handles/nét/cid/eth0",
    ],
)
def test_rejects(key: str) -> None:
    assert K.parse_ip(key) is None
    assert K.parse_released(key) is None
    assert K.parse_subnet(key) is None
    assert K.parse_handle(key) is None


@pytest.mark.parametrize(
    "args",
    [
        ("", "cid", "eth0"),
        ("net/x", "cid", "eth0"),
        ("net", "_cid", "eth0"),
        ("net", "cid\n", "eth0"),
        ("net", "cid", ""),
        ("net", "cid", "."),
        ("net", "cid", "a" * 16),
        ("net", "cid", "é" * 8),  # 16 bytes in UTF-8
        ("net", "cid", "a/b"),
    ],
)
def test_handle_rejects_invalid_parts(args: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError):
        K.handle(*args)


@pytest.mark.parametrize("prefix", ["", "moor", "/moor/", "/", "//moor", "/moor//x", "/a/../b"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        Keys(prefix)


def test_scoped_address_is_not_a_key() -> None:
    with pytest.raises(ValueError):
        K.ip(IPv6Address("fe80::1%eth0"))


@given(prefixes, v4_nets, st.integers(min_value=0, max_value=2**32 - 1))
def test_ips_prefix_for_covers_the_subnet(prefix: str, net: IPv4Network, raw: int) -> None:
    """Every IP key of the subnet starts with the prefix (keys outside may too: callers filter)."""
    keys = Keys(prefix)
    sub_prefix = keys.ips_prefix_for(net)
    assert sub_prefix.startswith(keys.ips_prefix())
    inside = net.network_address + raw % net.num_addresses
    for addr in (net.network_address, net.broadcast_address, inside):
        assert keys.ip(addr).startswith(sub_prefix)


def test_ips_prefix_for_examples() -> None:
    keys = Keys("/moor")
    assert keys.ips_prefix_for(ip_network("10.244.3.0/24")) == "/moor/ips/10.244.3."
    assert keys.ips_prefix_for(ip_network("10.244.0.0/16")) == "/moor/ips/10.244."
    assert keys.ips_prefix_for(ip_network("10.244.10.0/23")) == "/moor/ips/10.244.1"
    assert keys.ips_prefix_for(ip_network("fd00::/64")) == "/moor/ips/"


any_text = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates included
cni_names = st.one_of(names, any_text, st.sampled_from(["cid\n", "net\r\n", "\udcff", "a" * 1025]))
cni_ifnames = st.one_of(ifnames, any_text, st.sampled_from(["eth0\n", "e%d", "eà", "\udcff"]))


@given(cni_names, cni_names, cni_ifnames)
def test_handle_parts_follow_the_cni_rules_exactly(network: str, cid: str, ifname: str) -> None:
    """One home for the rules (cni_plugin/naming.py): a handle can be made exactly when the CNI
    side accepts its parts, it then parses back, and no rule raises on any text."""
    ok = (
        network_name_problem(network) is None
        and container_id_problem(cid) is None
        and ifname_problem(ifname) is None
    )
    if ok:
        assert K.parse_handle(K.handle(network, cid, ifname)) == (network, cid, ifname)
    else:
        with pytest.raises(ValueError):
            K.handle(network, cid, ifname)
