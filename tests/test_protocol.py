"""The protocol layer (cni_plugin.skel) driven with env and stdin as values: checklist §8 'Protocol'.

The handlers here are a recording fake: these tests are about what the protocol layer accepts,
rejects and prints, not about the datapath (the netns suite covers that through the real daemon).
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from cni_plugin import skel
from cni_plugin.args import parse_cni_args
from cni_plugin.errors import CNIError
from cni_plugin.netconf import SUPPORTED_VERSIONS
from cni_plugin.result import DNS, Interface, IPConfig, Result, Route


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
