"""The protocol layer (cni_plugin.skel) driven with env and stdin as values: checklist §8 'Protocol'.

The handlers here are a recording fake: these tests are about what the protocol layer accepts,
rejects and prints, not about the datapath (the netns suite covers that through the real daemon).
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from cni_plugin import skel
from cni_plugin.args import parse_cni_args
from cni_plugin.datapath.errors import (
    DatapathError,
    InvalidSetting,
    IptablesError,
    LinkNotFound,
    NetnsError,
    NotPermitted,
)
from cni_plugin.datapath.netns import netns_inode
from cni_plugin.errors import CNIError, to_cni_error
from cni_plugin.netconf import SUPPORTED_VERSIONS
from cni_plugin.result import DNS, Interface, IPConfig, Result, Route
from cni_plugin.wire import decode_request
from tests.helpers.wire_client import encode_request


class Recorder:
    def __init__(self) -> None:
        self.calls: list[skel.Request] = []

    def add(self, req: skel.Request) -> Result:
        self.calls.append(req)
        return Result(
            interfaces=[
                Interface("moor0", "aa:aa:aa:aa:aa:01"),
                Interface("veth1", "aa:aa:aa:aa:aa:02"),
                Interface("eth0", "aa:aa:aa:aa:aa:03", sandbox=req.netns),
            ],
            ips=[
                IPConfig(
                    ipaddress.ip_interface("10.244.1.2/24"), ipaddress.ip_address("10.244.1.1"), 2
                )
            ],
            routes=[Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.244.1.1"))],
        )

    def delete(self, req: skel.Request) -> None:
        self.calls.append(req)

    check = status = gc = delete


def conf(version: str | None = "1.0.0", **extra: object) -> bytes:
    data: dict[str, object] = {"name": "podnet", "type": "moor", **extra}
    if version is not None:
        data["cniVersion"] = version
    return json.dumps(data).encode()


def env(command: str, **extra: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    base.update(extra)
    return base


def run(e: dict[str, str], stdin: bytes) -> tuple[int, dict]:
    reply = skel.run(e, stdin, Recorder())
    return reply.code, json.loads(reply.stdout) if reply.stdout else {}


def test_version_ignores_stdin_and_lists_versions() -> None:
    code, out = run({"CNI_COMMAND": "VERSION"}, b"not json")
    assert code == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_unset_command_prints_about_to_stderr() -> None:
    reply = skel.run({}, b"", Recorder())
    assert reply.code == 0 and reply.stdout == b""
    assert b"CNI protocol versions supported" in reply.stderr


def test_unknown_command_is_code_4_naming_it() -> None:
    code, out = run(env("FROB"), conf())
    assert code == 1 and out["code"] == 4 and "FROB" in out["msg"]


def test_all_missing_vars_reported_together() -> None:
    code, out = run({"CNI_COMMAND": "ADD"}, conf())
    assert out["code"] == 4
    for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
        assert var in out["msg"]


def test_del_without_netns_is_accepted() -> None:
    e = env("DEL")
    del e["CNI_NETNS"]
    assert run(e, conf())[0] == 0


@pytest.mark.parametrize("ifname", ["a" * 16, ".", "..", "a/b", "a:b", "a b", ""])
def test_bad_ifname_is_code_4(ifname: str) -> None:
    code, out = run(env("ADD", CNI_IFNAME=ifname), conf())
    assert code == 1 and out["code"] == 4


@pytest.mark.parametrize("cid", ["a/b", "-leading", "a b"])
def test_bad_container_id_is_code_4(cid: str) -> None:
    assert run(env("ADD", CNI_CONTAINERID=cid), conf())[1]["code"] == 4


def test_non_json_is_code_6_and_bad_name_is_code_7() -> None:
    assert run(env("ADD"), b"{nope")[1]["code"] == 6
    assert (
        run(env("ADD"), json.dumps({"cniVersion": "1.0.0", "type": "moor"}).encode())[1]["code"]
        == 7
    )
    bad = json.dumps({"cniVersion": "1.0.0", "name": "-x!", "type": "moor"}).encode()
    assert run(env("ADD"), bad)[1]["code"] == 7


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "2.0.0", "banana"])
def test_unsupported_version_is_code_1(version: str) -> None:
    code, out = run(env("ADD"), conf(version))
    assert code == 1 and out["code"] == 1


def test_missing_cni_version_is_treated_as_020_and_refused() -> None:
    code, out = run(env("ADD"), conf(None))
    assert out["code"] == 1 and '"0.2.0"' in out["details"]


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "1.0.0")]
)
def test_version_gates(command: str, version: str) -> None:
    assert run(env(command), conf(version))[1]["code"] == 1


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_result_shape_per_version(version: str) -> None:
    code, out = run(env("ADD"), conf(version))
    assert code == 0 and out["cniVersion"] == version
    for ip in out["ips"]:
        assert ("version" in ip) == (not version.startswith("1."))
        assert ip["interface"] == 2
    assert out["interfaces"][2]["sandbox"] == "/run/netns/x"


def test_ipam_mode_result_is_abbreviated() -> None:
    stdin = json.dumps(
        {"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {"type": "moor"}}
    ).encode()
    code, out = run(env("ADD"), stdin)
    assert code == 0 and "interfaces" not in out and "interface" not in out["ips"][0]


def test_unknown_top_level_keys_are_tolerated() -> None:
    stdin = conf(capabilities={"portMappings": True}, args={"foo": 1}, **{"cni.dev/whatever": 1})
    assert run(env("ADD"), stdin)[0] == 0


def test_containerd_args_any_order_and_strictness() -> None:
    a = parse_cni_args(
        "K8S_POD_UID=u;IgnoreUnknown=1;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_NAMESPACE=ns"
    )
    assert (a.pod_namespace, a.pod_name, a.pod_uid, a.infra_container_id) == ("ns", "p", "u", "c")
    assert parse_cni_args("FOO=1;IgnoreUnknown=true").ip == ""
    for bad in ("FOO=1", "K8S_POD_NAME", "A=b=c", "IgnoreUnknown=maybe"):
        with pytest.raises(CNIError) as err:
            parse_cni_args(bad)
        assert err.value.code == 7
    assert run(env("ADD", CNI_ARGS="K8S_POD_NAME=x;BOGUS=1"), conf())[1]["code"] == 7


def test_runtime_config_mac_is_case_insensitive_and_wins() -> None:
    rec = Recorder()
    stdin = conf(
        runtimeConfig={"MAC": "0A:58:0A:F4:01:02"}, args={"cni": {"mac": "0a:58:00:00:00:01"}}
    )
    assert skel.run(env("ADD"), stdin, rec).code == 0
    assert rec.calls[0].conf.mac == "0a:58:0a:f4:01:02"


def test_gc_attachments_keys() -> None:
    rec = Recorder()
    valid = [{"containerID": "a", "ifname": "eth0"}]
    skel.run(env("GC"), conf("1.1.0", **{"cni.dev/valid-attachments": valid}), rec)
    skel.run(env("GC"), conf("1.1.0", **{"cni.dev/attachments": valid}), rec)
    skel.run(env("GC"), conf("1.1.0"), rec)
    assert [c.valid_attachments for c in rec.calls] == [
        frozenset({skel.Attachment("a", "eth0")}),
        frozenset({skel.Attachment("a", "eth0")}),
        None,
    ]


def test_handler_bug_becomes_code_999_with_traceback_on_stderr() -> None:
    class Broken(Recorder):
        def add(self, req: skel.Request) -> Result:
            raise KeyError("boom")

    reply = skel.run(env("ADD"), conf(), Broken())
    assert reply.code == 1 and json.loads(reply.stdout)["code"] == 999
    assert b"Traceback" in reply.stderr


def test_error_carries_request_version() -> None:
    code, out = run(env("FROB"), conf("0.4.0"))
    assert out["cniVersion"] == "0.4.0"


def test_chained_prev_result_is_merged() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "tap0"}],
        "ips": [{"address": "192.0.2.9/24", "interface": 0}],
    }
    code, out = run(env("ADD"), conf(prevResult=prev))
    assert [i["name"] for i in out["interfaces"]] == ["tap0", "moor0", "veth1", "eth0"]
    assert [ip["interface"] for ip in out["ips"]] == [0, 3]


def test_result_roundtrip_all_versions() -> None:
    r = Result(
        [Interface("eth0", "aa:bb:cc:dd:ee:ff", "/x")],
        [IPConfig(ipaddress.ip_interface("10.0.0.2/24"), ipaddress.ip_address("10.0.0.1"), 0)],
        [Route(ipaddress.ip_network("0.0.0.0/0"))],
        DNS(nameservers=["10.0.0.10"]),
    )
    for version in SUPPORTED_VERSIONS:
        assert Result.parse(r.render(version)) == r


# ---- issue 12: every bad input gets its documented code ------------------------------------------
# One regression per class the fuzz test (tests/test_fuzz.py) found on the landed code.


def strict(reply: skel.Reply) -> dict:
    """The reply's stdout as a strict JSON object: UTF-8, and every string encodable as UTF-8."""
    text = reply.stdout.decode("utf-8")
    doc = json.loads(text)
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return doc


DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"cniVersion": "0.4.0", "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001


@pytest.mark.parametrize("stdin", [DEEP_LIST, DEEP_OBJECT], ids=["list", "object"])
def test_config_nested_too_deep_is_code_6(stdin: bytes) -> None:
    reply = skel.run(env("ADD"), stdin, Recorder())  # landed: RecursionError escaped run()
    assert reply.code == 1 and strict(reply)["code"] == 6
    reply = skel.run(env("FROB"), stdin, Recorder())  # the env error wins, stamped 1.1.0
    assert strict(reply)["code"] == 4 and strict(reply)["cniVersion"] == "1.1.0"


def test_stdin_is_parsed_once_even_on_the_error_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    reply = skel.run(env("ADD"), conf("0.4.0", bridge="a b"), Recorder())
    monkeypatch.undo()
    assert strict(reply) == {
        "cniVersion": "0.4.0",
        "code": 7,
        "msg": "bridge name 'a b' contains '/', ':', '%', whitespace or a control character",
    }
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("extra_env", "stdin", "code"),
    [
        ({"CNI_CONTAINERID": "c1\n"}, conf(), 4),
        ({"CNI_IFNAME": "eth0\n"}, conf(), 4),
        ({}, json.dumps({"cniVersion": "1.0.0", "name": "podnet\n", "type": "moor"}).encode(), 7),
        ({"CNI_ARGS": "MAC=0a:58:0a:f4:01:02\n"}, conf(), 7),
        ({}, conf(runtimeConfig={"mac": "0a:58:0a:f4:01:02\n"}), 7),
    ],
    ids=["container-id", "ifname", "network-name", "args-mac", "runtime-mac"],
)
def test_a_trailing_newline_is_refused(extra_env: dict, stdin: bytes, code: int) -> None:
    """`re.match` with `$` accepted "x\\n"; every rule now uses fullmatch."""
    assert strict(skel.run(env("ADD", **extra_env), stdin, Recorder()))["code"] == code


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CNI_CONTAINERID", "c\udcff"),
        ("CNI_IFNAME", "e\udcff"),
        ("CNI_NETNS", "/run/netns/\udcff"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=\udcff"),
        ("CNI_COMMAND", "\udcffADD"),
    ],
)
def test_env_values_that_are_not_utf8_are_code_4(key: str, value: str) -> None:
    """The wire decodes env with surrogateescape; such a value is refused, never encoded later."""
    rec = Recorder()
    reply = skel.run(env("ADD", **{key: value}), conf(), rec)
    assert reply.code == 1 and strict(reply)["code"] == 4 and not rec.calls


@pytest.mark.parametrize("ifname", ["e%d", "e%", "eà", "e\x01", "e\u00a0", "eth0\x00"])
def test_ifname_the_kernel_would_refuse_or_rename_is_code_4(ifname: str) -> None:
    """'%' is a kernel name template; "à" is C3 A0 in UTF-8 and the kernel's isspace(0xA0)."""
    assert strict(skel.run(env("ADD", CNI_IFNAME=ifname), conf(), Recorder()))["code"] == 4


@pytest.mark.parametrize(
    "args",
    [
        "MAC=zz",
        "MAC=01:00:5e:00:00:01",
        "MAC=00:00:00:00:00:00",
        "IP=foo",
        "IP=1.2.3.4\n",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=Bad_Name",
        "IgnoreUnknown=1;K8S_POD_NAME=" + "a" * 254,
        "IgnoreUnknown=1;K8S_POD_NAME=_podman",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + "a" * 64,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=Up",
        "IgnoreUnknown=1;K8S_POD_UID=has space",
        "IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=-bad",
    ],
)
def test_cni_args_values_are_validated_like_the_same_keys_elsewhere(args: str) -> None:
    rec = Recorder()
    assert strict(skel.run(env("ADD", CNI_ARGS=args), conf(), rec))["code"] == 7
    assert not rec.calls


def test_good_cni_args_values_pass() -> None:
    a = parse_cni_args(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=web-0.a;K8S_POD_UID=1-2"
        ";MAC=0A:58:0A:F4:01:02;IP=10.244.1.9/24;K8S_POD_INFRA_CONTAINER_ID=abc"
    )
    assert (a.pod_namespace, a.pod_name, a.mac, a.ip) == (
        "kube-system",
        "web-0.a",
        "0a:58:0a:f4:01:02",
        "10.244.1.9/24",
    )


def test_a_pod_name_without_namespace_is_a_podman_container_name() -> None:
    """podman sends only K8S_POD_NAME, its container name; its generated names hold '_' (and a
    user's may hold capitals and dots), which a Kubernetes pod name may not: without a namespace
    the CNI name rule applies, with one the DNS-1123 rule does."""
    a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=elegant_Hopper.1;IP=10.209.250.20")
    assert (a.pod_namespace, a.pod_name, a.ip) == ("", "elegant_Hopper.1", "10.209.250.20")
    with pytest.raises(CNIError, match="DNS-1123") as err:
        parse_cni_args("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=elegant_Hopper")
    assert err.value.code == 7
    rec = Recorder()
    assert skel.run(env("ADD", CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=a_B"), conf(), rec).code == 0
    assert rec.calls[0].args.pod_name == "a_B"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"dns": {"nameservers": 5}}, 7),
        ({"dns": {"search": [None]}}, 7),
        ({"dns": "x"}, 7),
        ({"bridge": "a b"}, 7),
        ({"bridge": "br%d"}, 7),
        ({"ipam": {"type": 5}}, 7),
        ({"ipam": {"type": "moor", "routes": ["x"]}}, 7),
        ({"ipam": {"type": "moor", "routes": [{"dst": 5}]}}, 7),
        ({"ipam": {"type": "moor", "routes": [{"dst": "::/0"}]}}, 7),
        ({"ipam": {"type": "moor", "routes": [{"dst": "0.0.0.0/0", "gw": 5}]}}, 7),
        ({"runtimeConfig": "x"}, 7),
        ({"runtimeConfig": {"mac": 5}}, 7),
        ({"runtimeConfig": {"ips": [5]}}, 7),
        ({"runtimeConfig": {"ips": ["bogus"]}}, 7),
        ({"args": "x"}, 7),
        ({"args": {"cni": {"ips": "10.0.0.1"}}}, 7),
        ({"daemonSocket": 5}, 7),
        ({"prevResult": "x"}, 6),
        ({"prevResult": [1]}, 6),
        ({"prevResult": {"interfaces": {"name": "eth0"}}}, 6),
        ({"prevResult": {"interfaces": [{"name": 5}]}}, 6),
        ({"prevResult": {"interfaces": [{"name": "eth0", "mtu": 1e300}]}}, 6),
        ({"prevResult": {"ips": [{"address": "10.0.0.2/24", "interface": "0"}]}}, 6),
        ({"prevResult": {"ips": [{"address": "10.0.0.2/24", "interface": -1}]}}, 6),
        ({"prevResult": {"routes": [{"dst": "0.0.0.0/0", "gw": 5}]}}, 6),
        ({"prevResult": {"dns": {"nameservers": 5}}}, 6),
    ],
)
def test_every_config_field_is_type_checked(extra: dict, code: int) -> None:
    """A wrong type is 7 in the config and 6 in a prevResult, never a TypeError (999)."""
    rec = Recorder()
    assert strict(skel.run(env("ADD"), conf(**extra), rec))["code"] == code
    assert not rec.calls


@pytest.mark.parametrize("entry", [5, {"containerID": 5, "ifname": "eth0"}, {"ifname": "eth0"}])
def test_malformed_gc_attachment_entries_are_code_6(entry: object) -> None:
    stdin = conf("1.1.0", **{"cni.dev/valid-attachments": [entry]})
    assert strict(skel.run(env("GC"), stdin, Recorder()))["code"] == 6


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b'{"cniVersion": "1.0.0", "name": "n", "type": "moor", "mtu": NaN}', 6),
        (b'{"cniVersion": "1.0.0", "name": "n", "type": "moor", "mtu": -Infinity}', 6),
        (b'{"cniVersion": "1.0.0", "name": "n", "type": "moor", "mtu": 1e400}', 6),
        (b'{"cniVersion": "1.0.0", "name": "n", "type": "moor", "x": ' + b"9" * 5000 + b"}", 6),
        ("\ufeff" + conf().decode(), 6),
        (conf().decode().encode("utf-16"), 6),
        (b'{"cniVersion": "1.0.0", "name": "n\\udcff", "type": "moor"}', 7),
        (b'{"cniVersion": "1.0.0", "name": "n", "type": "moor", "\\ud800": 1}', 7),
    ],
    ids=["nan", "infinity", "1e400", "long-int", "bom", "utf-16", "surrogate", "surrogate-key"],
)
def test_stdin_that_is_not_strict_json_or_unicode(stdin: bytes | str, code: int) -> None:
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    rec = Recorder()
    assert strict(skel.run(env("ADD"), raw, rec))["code"] == code
    assert not rec.calls


class Raising(Recorder):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def add(self, req: skel.Request) -> Result:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (CNIError(11, "deadline"), 11),
        (NetnsError("fd 9 is not a network namespace"), 4),
        (InvalidSetting("create veth: Invalid argument", 22), 7),
        (DatapathError("'lo' already exists but is not a bridge", 17), 104),
        (NotPermitted("create veth: Operation not permitted", 1), 104),
        (IptablesError("iptables -t nat -N X", 4, "resource problem"), 104),
        (LinkNotFound("get pod link 'eth0': No such device", 19), 104),
    ],
)
def test_every_exception_maps_through_one_table(exc: BaseException, code: int) -> None:
    reply = skel.run(env("ADD"), conf(), Raising(exc))
    assert reply.code == 1 and strict(reply)["code"] == code and reply.stderr == b""
    assert to_cni_error(exc).code == code


def test_a_netns_that_is_a_regular_file_is_code_4(tmp_path: Path) -> None:
    """The shim could open CNI_NETNS but it is no netns: the real check raises NetnsError -> 4."""

    class Opens(Recorder):
        def add(self, req: skel.Request) -> Result:
            netns_inode(req.netns_fd)  # type: ignore[arg-type]
            return super().add(req)

    regular = tmp_path / "netns"
    regular.write_text("x")
    fd = os.open(regular, os.O_RDONLY)
    try:
        reply = skel.run(env("ADD", CNI_NETNS=str(regular)), conf(), Opens(), netns_fd=fd)
    finally:
        os.close(fd)
    assert strict(reply)["code"] == 4 and "not a network namespace" in strict(reply)["msg"]


def test_messages_quoting_hostile_input_stay_bounded() -> None:
    deep = json.loads("[" * 900 + "]" * 900)  # parses; repr() of it would recurse
    stdin = conf("1.1.0", **{"cni.dev/valid-attachments": [deep]})
    reply = skel.run(env("GC"), stdin, Recorder())
    assert strict(reply)["code"] == 6 and len(strict(reply)["msg"]) < 200
    reply = skel.run(env("ADD", CNI_CONTAINERID="a" * 100_000), conf(), Recorder())
    assert strict(reply)["code"] == 4 and len(strict(reply)["msg"]) <= 4096


@pytest.mark.parametrize(("value", "errno"), [("2", 2), ("²", 0), ("1" * 30, 0), ("-1", 0)])
def test_wire_netns_errno_takes_ascii_digits_only(value: str, errno: int) -> None:
    data = encode_request({"CNI_COMMAND": "ADD"}, b"{}").replace(
        b"\0\0", f"\0MOOR_NETNS_ERRNO={value}\0\0".encode(), 1
    )
    assert decode_request(data).netns_errno == errno
