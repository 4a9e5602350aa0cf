"""Hypothesis generators of hostile CNI calls for tests/test_fuzz.py: env and stdin.

A `Call` is data only; the test turns it into an exec of bin/moor. Every generator is one entry
in a list (the hostile halves of `COMMANDS`, `CONTAINER_IDS`, `IFNAMES`, `CNI_ARGS`, and
`NETNS_KINDS`, `stdins()` with `STDIN_WEIGHTS`, `FIELDS` for config mutations), so a new class of
input is one more line there (a netns kind also needs its path in the test's fixture).

Every stdin carries the test daemon's `daemonSocket` and `spoolDir` as its first keys (garbage
gets them appended as text): the shim finds them by a byte search, so no generated call can reach
another daemon or spool into /var/lib/moor. Only the empty stdin cannot, so it is never a DEL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
NET = "mfznet"
BRIDGE = "mfzbr0"
OTHER_BRIDGE = "mfzbr1"  # the only other bridge a generated config may create
MISSING = None  # an env variable that is not set at all
DELETE = object()  # a mutation that removes the key
VALID_IFNAMES = [f"eth{i}" for i in range(6)] + ["net1"]
POD_NETNS = ["pod0", "pod1", "pod2", "pod3"]


@dataclass
class Call:
    command: str | bytes | None
    container_id: str | bytes | None
    ifname: str | bytes | None
    cni_args: str | bytes | None
    netns: str  # a kind: the test maps it to a path
    stdin_kind: str
    config: dict[str, Any] | None = None  # for "config": mutated by `mutations` at exec time
    raw: bytes = b""  # for every other stdin kind
    mutations: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list)
    with_prev: bool = False  # insert the cached ADD result as prevResult before mutating


def _env_text(max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=max_size
    )


_env_bytes = st.binary(min_size=1, max_size=24).filter(lambda b: b"\x00" not in b)


def mostly(
    valid: st.SearchStrategy[Any], hostile: list[st.SearchStrategy[Any]], tenths: int = 8
) -> st.SearchStrategy[Any]:
    """`valid` in `tenths` of the calls, so most get far enough to reach the datapath; else one
    of `hostile`. (st.one_of drops repeated branches, so repetition cannot weight it.)"""
    return st.sampled_from([True] * tenths + [False] * (10 - tenths)).flatmap(
        lambda ok: valid if ok else st.one_of(hostile)
    )


COMMANDS = mostly(
    st.sampled_from(["ADD", "ADD", "ADD", "DEL", "DEL", "CHECK", "CHECK", "GC", "STATUS"]),
    [st.sampled_from(["VERSION", "add", "FROB", "ADD\n", "", MISSING]), _env_text(8), _env_bytes],
)
CONTAINER_IDS = mostly(
    st.integers(0, 99).map(lambda i: f"mfz{i}"),  # small ones repeat: duplicates, DEL of ADDs
    [
        st.sampled_from(["mfz1\n", "-mfz", "mfz 1", "mfz/1", "mfzé", "", MISSING]),
        st.sampled_from(["m" * 1025, "m" * 100_000]),  # past moor's bound; huge
        _env_text(),
        _env_bytes,
    ],
)
IFNAMES = mostly(
    st.sampled_from(VALID_IFNAMES),
    [
        st.sampled_from(["eth0\n", "a" * 16, ".", "..", "a/b", "a:b", "a b", "eà", "e%d", "e%"]),
        st.sampled_from(["e\x01", "e\u00a0", "lo", "", MISSING]),
        _env_text(17),
        _env_bytes,
    ],
)
_MACS = ["0a:58:0a:e2:00:99", "01:00:5e:00:00:01", "00:00:00:00:00:00", "zz", "0A:58:0A:E2:00:9A"]
_ARG_VALUES = {
    "IgnoreUnknown": ["1", "true", "0", "maybe"],
    "K8S_POD_NAMESPACE": ["default", "a" * 64, "Up", "ns\n"],
    "K8S_POD_NAME": ["web-0", "Web_0", "a" * 254, "pod.x"],
    "K8S_POD_UID": ["u-1", "has space", "x" * 129],
    "K8S_POD_INFRA_CONTAINER_ID": ["mfz1", "-bad"],
    "IP": ["10.226.0.77", "10.226.0.78/24", "192.0.2.1", "::1", "999.1.1.1", "1.2.3.4\n"],
    "MAC": [*_MACS, "0a:58:0a:e2:00:99\n"],
    "FOO": ["bar"],
}
_arg_pair = st.sampled_from(sorted(_ARG_VALUES)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(_ARG_VALUES[k]) | _env_text(6))
)
_VALID_ARGS = ["", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u"]
CNI_ARGS = mostly(
    st.sampled_from(_VALID_ARGS),
    [
        st.lists(_arg_pair, max_size=4).map(lambda ps: ";".join(f"{k}={v}" for k, v in ps)),
        st.sampled_from(["", MISSING, "K8S_POD_NAME", "A=b=c", ";;", "=x", "IgnoreUnknown=1;FOO"]),
        _env_text(30),
        _env_bytes,
    ],
)
NETNS_KINDS = POD_NETNS * 3 + [
    "missing",
    "empty",
    "nonexistent",
    "file",
    "host",
    "fifo",
    "device",
    "directory",
    "socket",
]

# ---- stdin -------------------------------------------------------------------------------------


def base_config(version: str, mode: str, socket: str, spool: str) -> dict[str, Any]:
    """A valid config of `mode` (main, l2, ipam); daemonSocket/spoolDir first for the shim."""
    conf: dict[str, Any] = {"daemonSocket": socket, "spoolDir": spool, "cniVersion": version}
    conf["name"] = NET
    if mode == "ipam":
        conf.update(type="bridge", bridge=OTHER_BRIDGE, ipam={"type": "moor"})
        return conf
    conf.update(type="moor", bridge=BRIDGE, isGateway=True, isDefaultGateway=True, ipMasq=True)
    conf["ipam"] = {} if mode == "l2" else {"type": "moor"}
    return conf


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and +-Infinity included: json.dumps writes them as non-JSON tokens
    | _env_text(10)
    | st.sampled_from(["\udcff", "a\ud800b"])  # lone surrogates: JSON "\\udcff" escapes
)
json_values = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_env_text(6), kids, max_size=3),
    max_leaves=8,
)
_ROUTES = [
    [{"dst": "0.0.0.0/0"}],
    [{"dst": "192.168.0.0/16", "gw": "10.226.0.1"}],
    [{"dst": "192.168.0.0/16", "gw": "192.168.99.1"}],  # a gateway the pod cannot reach
    [{"dst": "::/0"}],
    [{"dst": "10.0.0.1/8"}],
    [{"dst": 5}],
    ["x"],
]
_PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:e2:00:99", "sandbox": "/x"}],
    "ips": [{"address": "10.226.0.9/24", "gateway": "10.226.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
}
_IPS = [["10.226.0.60"], ["10.226.0.61/24"], ["10.226.0.62", "10.226.0.63"], ["bogus"], [5], []]
# path -> plausible and hostile values; every path also gets generic JSON values.
FIELDS: dict[tuple[Any, ...], list[Any]] = {
    ("name",): [NET, "mfz-other", "-bad", "bad\n", "a" * 300, ""],
    ("type",): ["moor", "bridge", "macvlan", ""],
    ("cniVersion",): [*SUPPORTED, "0.2.0", "1.1", "banana", ""],
    ("bridge",): [
        BRIDGE,
        OTHER_BRIDGE,
        "lo",
        "",
        "mfz br",
        "mfzbr/1",
        "x" * 16,
        "mfzbr%d",
        "mfzbà",
    ],
    ("mtu",): [0, 68, 1400, 9000, 65535, 65536, 67, -1, "1500", 1500.0, True],
    ("isGateway",): [True, False, "yes"],
    ("isDefaultGateway",): [True, False, 1],
    ("ipMasq",): [True, False],
    ("hairpinMode",): [True, False],
    ("promiscMode",): [True, False],
    ("ipam",): [{"type": "moor"}, {}, {"type": "host-local"}, "moor", []],
    ("ipam", "type"): ["moor", "host-local", ""],
    ("ipam", "routes"): _ROUTES,
    ("ipam", "routes", 0, "gw"): ["10.226.0.1", "fe80::1", ""],
    ("dns",): [{"nameservers": ["10.0.0.10"], "domain": "c.local", "search": ["a"]}, "x"],
    ("dns", "nameservers"): [["10.0.0.10"], 5, [5], "x"],
    ("dns", "search"): [["a"], "a", [None]],
    ("runtimeConfig",): [{"mac": _MACS[0]}, {"ips": ["10.226.0.60"]}, "x", []],
    ("runtimeConfig", "mac"): _MACS,
    ("runtimeConfig", "MAC"): _MACS,
    ("runtimeConfig", "ips"): _IPS,
    ("args",): [{"cni": {"mac": _MACS[0]}}, "x"],
    ("args", "cni", "mac"): _MACS,
    ("args", "cni", "ips"): _IPS,
    ("prevResult",): [_PREV, {}, "x", [], {"interfaces": 5}, {"ips": [{"address": "bogus"}]}],
    ("prevResult", "interfaces", 0, "mtu"): [1500, 1e300, "9000", -1],
    ("prevResult", "ips", 0, "interface"): [0, -1, True, "0", 10**30],
    ("prevResult", "routes"): _ROUTES,
    ("prevResult", "dns"): [{"nameservers": ["10.0.0.10"]}, {"nameservers": 5}],
    ("cni.dev/valid-attachments",): [
        [],
        None,
        [{"containerID": "mfz1", "ifname": "eth0"}],
        [5],
        "x",
        [{"containerID": 5, "ifname": "eth0"}],
    ],
    ("capabilities",): [{"mac": True, "ips": True}],
    ("arpProbe",): [True, False, "yes"],
    ("arpProbeCount",): [1, 0, 11, "3", True],
    ("arpProbeIntervalMs",): [1, 0, 201, 2.5],
    ("ipam", "arpProbe"): [True, False, 1],
}
# A generated string could be a valid new bridge name: only the listed names (and non-strings)
# may reach the bridge field, so no test creates a bridge outside mfzbr0/mfzbr1 on the host.
_SAFE_FOR = {("bridge",): json_values.filter(lambda v: not isinstance(v, str))}


def _values(path: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    if path in _SAFE_FOR:  # never deleted either: the default bridge is moor0, not ours
        return st.sampled_from(FIELDS[path]) | _SAFE_FOR[path]
    return st.sampled_from(FIELDS[path]) | json_values | st.just(DELETE)


_mutation = st.sampled_from(sorted(FIELDS, key=repr)).flatmap(
    lambda path: st.tuples(st.just(path), _values(path))
)


def mutate(config: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set (or delete) `path` in `config`, making intermediate objects or lists as needed."""
    node: Any = config
    for key, nxt in zip(path, path[1:], strict=False):
        if isinstance(node, list):
            if not node:
                node.append({})
            key = 0
        child = node.get(key) if isinstance(node, dict) else node[key]
        if not isinstance(child, dict | list):
            child = [] if isinstance(nxt, int) else {}
            node[key] = child
        node = child
    last = path[-1]
    if isinstance(node, list):
        if value is DELETE:
            node.clear()
        elif node:
            node[0] = value
        else:
            node.append(value)
    elif value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value


def fragment(socket: str, spool: str) -> bytes:
    """What the shim needs to find in any stdin, as JSON text."""
    return json.dumps({"daemonSocket": socket, "spoolDir": spool}).encode()


Stdin = tuple[str, "dict[str, Any] | None", bytes]


def stdins(socket: str, spool: str) -> dict[str, st.SearchStrategy[Stdin]]:
    """(kind, config, raw) generators by kind; a "config" is serialized after its mutations."""
    frag = fragment(socket, spool)
    versions = st.sampled_from([*SUPPORTED, "1.1.0", "1.1.0"])  # GC and STATUS need 1.1.0
    modes = st.sampled_from(["main", "main", "main", "l2", "ipam"])

    def deep(depth: int, kind: str) -> bytes:
        inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
        return frag[:-1] + b', "cniVersion": "0.4.0", "x": ' + inner.encode() + b"}"

    return {
        "config": st.builds(
            lambda v, m: ("config", base_config(v, m, socket, spool), b""), versions, modes
        ),
        # any JSON object carrying the shim's keys; any other JSON value in a list with them
        "json-object": st.dictionaries(_env_text(8), json_values, max_size=4).map(
            lambda d: (
                "json",
                None,
                json.dumps({**json.loads(frag), "bridge": OTHER_BRIDGE, **d}).encode(),
            )
        ),
        "json-other": json_values.map(
            lambda v: ("json", None, b"[" + frag + b", " + json.dumps(v).encode() + b"]")
        ),
        "deep": st.tuples(
            st.sampled_from([900, 1000, 5000, 100_000]), st.sampled_from(["list", "obj"])
        ).map(lambda t: ("deep", None, deep(*t))),
        "bytes": st.binary(max_size=64).map(lambda b: ("bytes", None, b + b"\n" + frag)),
        "bad-utf8": st.sampled_from(
            [b"\xef\xbb\xbf", b"\xff\xfe", b"\xc3\x28", b"\xed\xb3\xbf"]
        ).map(
            lambda b: ("bytes", None, b + frag)  # BOM, UTF-16 BOM, bad UTF-8, CESU surrogate
        ),
        "empty": st.just(("empty", None, b"")),
    }


# How often each stdin kind is drawn, in twentieths.
STDIN_WEIGHTS = {
    "config": 12,
    "json-object": 2,
    "json-other": 1,
    "deep": 2,
    "bytes": 1,
    "bad-utf8": 1,
    "empty": 1,
}


def stdin_strategy(socket: str, spool: str) -> st.SearchStrategy[Stdin]:
    kinds = stdins(socket, spool)
    names = [name for name, weight in STDIN_WEIGHTS.items() for _ in range(weight)]
    return st.sampled_from(names).flatmap(kinds.__getitem__)


# Half the configs are mutated, in one to three fields.
MUTATIONS = st.sampled_from([False, True]).flatmap(
    lambda on: st.lists(_mutation, min_size=1, max_size=3) if on else st.just([])
)


def calls(socket: str, spool: str) -> st.SearchStrategy[Call]:
    def build(
        command: Any,
        cid: Any,
        ifname: Any,
        cni_args: Any,
        netns: str,
        stdin: tuple[str, dict | None, bytes],
        mutations: list[tuple[tuple[Any, ...], Any]],
        with_prev: bool,
    ) -> Call:
        kind, config, raw = stdin
        return Call(command, cid, ifname, cni_args, netns, kind, config, raw, mutations, with_prev)

    return st.builds(
        build,
        COMMANDS,
        CONTAINER_IDS,
        IFNAMES,
        CNI_ARGS,
        st.sampled_from(NETNS_KINDS),
        stdin_strategy(socket, spool),
        MUTATIONS,
        st.booleans(),
    )
