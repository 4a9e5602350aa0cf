"""Prove tests/cnidrv (cnitool-compatible driver on Debian's libcni 1.1.2) before moor relies on it.

Against the reference plugins (/usr/lib/cni bridge + host-local) it must ADD/CHECK/DEL/GC real
attachments; against a tiny logging shell-script plugin it must send exactly the environment and
stdin that libcni sends, and implement GC/STATUS the way libcni >= 1.2 does.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers import cnidrv, oracle

pytestmark = pytest.mark.libcni

REFERENCE = Path("/usr/lib/cni")
BRIDGE = "mdrvbr0"
NET = "drvtest"

LOGGER = r"""#!/bin/sh
# Test CNI plugin: records CNI_* env and stdin of each call, answers ADD with a fixed result.
log='@LOG@'
n=$(ls "$log" | wc -l)
{
  echo "PLUGIN=$(basename "$0")"
  env | grep '^CNI_' | sort
  echo ---
  cat
} > "$log/$(printf %03d "$n")"
case " @FAIL@ " in
  *" $CNI_COMMAND "*)
    printf '{"cniVersion":"1.0.0","code":999,"msg":"logger refuses %s"}' "$CNI_COMMAND"
    exit 1 ;;
esac
case "$CNI_COMMAND" in
  ADD) printf '{"cniVersion":"@RV@","ips":[{"address":"10.252.0.9/24"}],"dns":{}}' ;;
  VERSION) printf '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}' ;;
esac
"""


@pytest.fixture(scope="session")
def driver() -> Path:
    ok, why = cnidrv.available()
    require(ok, why)
    return cnidrv.build()


class Env:
    """A private NETCONFPATH, CNI_PATH (logger dir first) and cache dir, plus the logger's calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.netconf = root / "net.d"
        self.bin = root / "bin"
        self.cache = root / "cache"
        self.log = root / "log"
        for d in (self.netconf, self.bin, self.cache, self.log):
            d.mkdir()

    def conflist(
        self, name: str, version: str, plugins: list[dict[str, Any]], **extra: Any
    ) -> None:
        conf = {"cniVersion": version, "name": name, **extra, "plugins": plugins}
        (self.netconf / f"{name}.conflist").write_text(json.dumps(conf))

    def logger(self, type_: str = "logger", result_version: str = "1.0.0", fail: str = "") -> None:
        script = LOGGER.replace("@LOG@", str(self.log)).replace("@RV@", result_version)
        path = self.bin / type_
        path.write_text(script.replace("@FAIL@", fail))
        path.chmod(0o755)

    def calls(self) -> list[dict[str, Any]]:
        """Logged plugin calls in order: {"plugin", "env": {CNI_*: value}, "stdin": parsed JSON}."""
        out = []
        for f in sorted(self.log.iterdir()):
            head, _, stdin = f.read_text().partition("\n---\n")
            lines = head.splitlines()
            env = dict(line.split("=", 1) for line in lines[1:])
            out.append(
                {"plugin": lines[0].split("=", 1)[1], "env": env, "stdin": json.loads(stdin)}
            )
        return out

    def run(self, verb: str, net: str, netns: str | Path, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("cni_path", [self.bin, REFERENCE])
        return cnidrv.run(verb, net, netns, netconf_dir=self.netconf, cache_dir=self.cache, **kw)

    def cache_file(self, net: str, container_id: str, ifname: str = "eth0") -> Path:
        return self.cache / "results" / f"{net}-{container_id}-{ifname}"


@pytest.fixture
def env(driver: Path, tmp_path: Path) -> Env:
    return Env(tmp_path)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


# ---------------------------------------------------------------- reference bridge + host-local


@pytest.fixture
def ip_forward() -> Any:
    """The reference bridge plugin (isGateway) turns on IPv4 forwarding: put it back."""
    knob = Path("/proc/sys/net/ipv4/ip_forward")
    before = knob.read_text()
    yield
    knob.write_text(before)


@pytest.fixture
def bridge_net(env: Env, ip_forward: Any) -> Any:
    """The drvtest conflist (reference bridge + host-local); deletes mdrvbr0 afterwards."""
    ipam = {
        "type": "host-local",
        "dataDir": str(env.root / "ipam"),
        "ranges": [[{"subnet": "10.252.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    bridge = {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "ipam": ipam}
    env.conflist(NET, "1.0.0", [bridge])
    yield env
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.fixture
def netns() -> Any:
    """A fresh named netns `mdrv-...`; yields (name, path). Deleting it also kills its veths."""
    name = f"mdrv-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name, f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def leases(env: Env) -> list[str]:
    d = env.root / "ipam" / NET
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []


@pytest.mark.netns
def test_add_check_del_with_reference_bridge(bridge_net: Env, netns: tuple[str, str]) -> None:
    env, (name, path) = bridge_net, netns
    proc = env.run("add", NET, path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cniVersion"] == "1.0.0"
    assert [ip["address"] for ip in result["ips"]] == ["10.252.0.2/24"]
    assert oracle.addresses("eth0", netns=name) == ["10.252.0.2/24"]
    assert leases(env) == ["10.252.0.2"]

    cid = cnidrv.cnitool_container_id(path)
    cached = json.loads(env.cache_file(NET, cid).read_text())
    assert (cached["kind"], cached["containerId"], cached["ifName"]) == ("cniCacheV1", cid, "eth0")
    assert cached["netns"] == path  # recorded like libcni >= 1.2 does
    assert cached["result"]["ips"][0]["address"] == "10.252.0.2/24"

    proc = env.run("check", NET, path)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr

    proc = env.run("del", NET, path)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    assert not env.cache_file(NET, cid).exists()
    assert oracle.gone("eth0", netns=name)
    assert leases(env) == []

    # After DEL, CHECK fails (host-local no longer holds the address), as one stderr line.
    assert "Failed to find address" in one_line_error(env.run("check", NET, path))
    # DEL is idempotent.
    assert env.run("del", NET, path).returncode == 0


@pytest.mark.netns
def test_cni_args_reach_host_local(bridge_net: Env, netns: tuple[str, str]) -> None:
    env, (name, path) = bridge_net, netns
    # host-local rejects unknown CNI_ARGS keys unless IgnoreUnknown is set...
    err = one_line_error(env.run("add", NET, path, cni_args="K8S_POD_NAME=p"))
    assert "K8S_POD_NAME" in err
    assert env.run("del", NET, path, cni_args="K8S_POD_NAME=p;IgnoreUnknown=1").returncode == 0
    assert leases(env) == []
    # ...and honours IP= when it is.
    args = {"IgnoreUnknown": "1", "K8S_POD_NAME": "p", "IP": "10.252.0.50"}
    proc = env.run("add", NET, path, cni_args=args)
    assert proc.returncode == 0, proc.stderr
    assert [ip["address"] for ip in json.loads(proc.stdout)["ips"]] == ["10.252.0.50/24"]
    assert oracle.addresses("eth0", netns=name) == ["10.252.0.50/24"]
    assert env.run("del", NET, path, cni_args=args).returncode == 0
    assert leases(env) == []


@pytest.mark.netns
def test_container_id_override_and_gc_on_1_0_0_list(
    bridge_net: Env, netns: tuple[str, str]
) -> None:
    env, (name, path) = bridge_net, netns
    assert env.run("add", NET, path).returncode == 0
    proc = env.run("add", NET, path, container_id="moor-second", ifname="eth1")
    assert proc.returncode == 0, proc.stderr
    assert oracle.addresses("eth1", netns=name) == ["10.252.0.3/24"]
    first = cnidrv.cnitool_container_id(path)
    assert env.cache_file(NET, "moor-second", "eth1").exists()

    # STATUS is a no-op below spec 1.1.0.
    assert env.run("status", NET, path).returncode == 0

    # GC with a valid list (extension) DELs only the unlisted cached attachment.
    keep = [{"containerID": "moor-second", "ifname": "eth1"}]
    proc = env.run("gc", NET, path, valid_attachments=keep)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    assert not env.cache_file(NET, first).exists()
    assert oracle.gone("eth0", netns=name)
    assert oracle.addresses("eth1", netns=name) == ["10.252.0.3/24"]
    assert leases(env) == ["10.252.0.3"]

    # Plain gc (cnitool semantics): every cached attachment of the network is DELeted.
    assert env.run("gc", NET, path).returncode == 0
    assert oracle.gone("eth1", netns=name)
    assert leases(env) == []
    assert list((env.cache / "results").iterdir()) == []


# ---------------------------------------------------------------------- logger plugin


def test_env_and_stdin_like_libcni(env: Env, tmp_path: Path, monkeypatch: Any) -> None:
    env.logger()
    env.conflist("lg", "1.0.0", [{"type": "logger", "foo": "bar"}])
    monkeypatch.chdir(tmp_path)
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
    proc = env.run("add", "lg", "some/ns", cni_args=args, ifname="net1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ips"] == [{"address": "10.252.0.9/24"}]
    assert env.run("del", "lg", "some/ns", cni_args=args, ifname="net1").returncode == 0

    add, delete = env.calls()
    netns = str(tmp_path / "some/ns")  # made absolute, as cnitool does
    assert add["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": cnidrv.cnitool_container_id(netns),
        "CNI_NETNS": netns,
        "CNI_IFNAME": "net1",
        "CNI_ARGS": args,
        "CNI_PATH": f"{env.bin}:{REFERENCE}",
        "CNI_CACHE_DIR": str(env.cache),  # the driver's own environment is inherited
    }
    assert add["stdin"] == {"cniVersion": "1.0.0", "name": "lg", "type": "logger", "foo": "bar"}
    assert delete["env"]["CNI_COMMAND"] == "DEL"
    assert delete["stdin"]["prevResult"] == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.252.0.9/24"}],
        "dns": {},
    }


@pytest.mark.parametrize("bad", ["A=", "=1", "A=1=2", "A=1;", "A"])
def test_invalid_cni_args_rejected(env: Env, bad: str) -> None:
    env.logger()
    env.conflist("lg", "1.0.0", [{"type": "logger"}])
    assert "invalid CNI_ARGS pair" in one_line_error(env.run("add", "lg", "/x", cni_args=bad))
    assert env.calls() == []


def test_cap_args_only_for_declared_capabilities(env: Env) -> None:
    env.logger()
    env.logger("logger2")
    caps = {"portMappings": True, "bandwidth": False}
    env.conflist("lg", "1.0.0", [{"type": "logger", "capabilities": caps}, {"type": "logger2"}])
    cap_args = {
        "portMappings": [{"hostPort": 8080, "containerPort": 80}],
        "bandwidth": {},
        "ips": [],
    }
    assert env.run("add", "lg", "/x", cap_args=cap_args).returncode == 0
    first, second = env.calls()
    assert first["stdin"]["runtimeConfig"] == {"portMappings": cap_args["portMappings"]}
    assert "runtimeConfig" not in second["stdin"]
    assert second["stdin"]["prevResult"]["ips"] == [{"address": "10.252.0.9/24"}]
    assert "CAP_ARGS" in one_line_error(env.run("add", "lg", "/x", cap_args="[1]"))


def test_cli_errors(env: Env) -> None:
    env.conflist("lg", "1.0.0", [{"type": "logger"}])
    assert "usage" in one_line_error(env.run("frob", "lg", "/x"))
    assert "no net configuration" in one_line_error(env.run("add", "nope", "/x"))
    assert "failed to find plugin" in one_line_error(env.run("add", "lg", "/x"))
    proc = subprocess.run([str(cnidrv.build()), "add", "lg"], capture_output=True, text=True)
    assert "usage" in one_line_error(proc)


def test_gc_and_status_on_1_0_0_list_call_no_plugin(env: Env) -> None:
    env.logger()
    env.conflist("lg", "1.0.0", [{"type": "logger"}])
    assert env.run("status", "lg", "/x").returncode == 0
    assert env.run("gc", "lg", "/x").returncode == 0
    assert env.calls() == []


NO_CONTAINER = {"CNI_CONTAINERID": "", "CNI_NETNS": "", "CNI_IFNAME": "", "CNI_ARGS": ""}


def test_gc_on_1_1_0_list(env: Env) -> None:
    env.logger()
    env.conflist("lg", "1.1.0", [{"type": "logger", "x": 1}])
    proc = env.run("gc", "lg", "/x", cni_args="IgnoreUnknown=1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    (gc,) = env.calls()
    assert gc["env"] | NO_CONTAINER == gc["env"]
    assert (gc["env"]["CNI_COMMAND"], gc["env"]["CNI_PATH"]) == ("GC", f"{env.bin}:{REFERENCE}")
    # cnitool sends no attachments key at all: everything not cached-and-DELeted is garbage.
    assert gc["stdin"] == {"cniVersion": "1.1.0", "name": "lg", "type": "logger", "x": 1}

    keep = [{"containerID": "c1", "ifname": "eth0"}]
    assert env.run("gc", "lg", "/x", valid_attachments=keep).returncode == 0
    stdin = env.calls()[1]["stdin"]
    assert stdin["cni.dev/valid-attachments"] == keep == stdin["cni.dev/attachments"]


def test_gc_dels_cached_attachments(env: Env) -> None:
    env.logger()
    env.conflist("lg", "1.0.0", [{"type": "logger"}])
    assert env.run("add", "lg", "/x", cni_args="K=V", container_id="c1").returncode == 0
    assert env.run("gc", "lg", "/elsewhere").returncode == 0
    add, delete = env.calls()  # a 1.0.0 list gets the DEL but no GC call
    assert delete["env"]["CNI_COMMAND"] == "DEL"
    assert delete["env"]["CNI_CONTAINERID"] == "c1"
    assert delete["env"]["CNI_NETNS"] == "/x"  # from the cache entry, not the command line
    assert delete["env"]["CNI_ARGS"] == "K=V"
    assert delete["stdin"]["prevResult"]["ips"] == [{"address": "10.252.0.9/24"}]
    assert list((env.cache / "results").iterdir()) == []


def test_gc_on_1_1_0_list_with_stale_attachment(env: Env) -> None:
    env.logger()  # answers 1.0.0, which libcni 1.1.2 accepts and caches for a 1.1.0 list
    env.conflist("lg", "1.1.0", [{"type": "logger"}])
    assert env.run("add", "lg", "/x", container_id="c1").returncode == 0
    # libcni 1.1.2 cannot DEL it (cached 1.0.0 result -> 1.1.0), GC is still sent; exit 1.
    err = one_line_error(env.run("gc", "lg", "/x"))
    assert "failed to delete stale attachment c1 eth0" in err
    assert "no converter for CNI result version 1.0.0 to 1.1.0" in err
    assert [c["env"]["CNI_COMMAND"] for c in env.calls()] == ["ADD", "GC"]


def test_disable_gc(env: Env) -> None:
    env.logger()
    env.conflist("lg", "1.1.0", [{"type": "logger"}], disableGC=True)
    assert env.run("add", "lg", "/x", container_id="c1").returncode == 0
    assert env.run("gc", "lg", "/x").returncode == 0
    assert [c["env"]["CNI_COMMAND"] for c in env.calls()] == ["ADD"]
    assert env.cache_file("lg", "c1").exists()


def test_gc_and_status_errors(env: Env) -> None:
    env.logger("bad", fail="GC STATUS")
    env.logger("good")
    env.conflist("lg", "1.1.0", [{"type": "bad"}, {"type": "good"}])
    err = one_line_error(env.run("gc", "lg", "/x"))
    assert "failed to GC plugin bad: logger refuses GC" in err
    assert [c["plugin"] for c in env.calls()] == ["bad", "good"]  # GC goes on after a failure

    err = one_line_error(env.run("status", "lg", "/x"))
    assert "logger refuses STATUS" in err
    assert [c["plugin"] for c in env.calls()][2:] == ["bad"]  # STATUS stops at the first failure


def test_status_on_1_1_0_list(env: Env) -> None:
    env.logger()
    env.logger("logger2")
    env.conflist("lg", "1.1.0", [{"type": "logger"}, {"type": "logger2", "y": True}])
    proc = env.run("status", "lg", "/x", cni_args="A=b", container_id="c1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    first, second = env.calls()
    assert first["env"] | NO_CONTAINER == first["env"]
    assert first["env"]["CNI_COMMAND"] == "STATUS"
    assert first["stdin"] == {"cniVersion": "1.1.0", "name": "lg", "type": "logger"}
    assert second["stdin"] == {"cniVersion": "1.1.0", "name": "lg", "type": "logger2", "y": True}


def test_libcni_1_1_2_with_1_1_0_configs(env: Env) -> None:
    """What libcni 1.1.2 does with a spec-1.1.0 list; documented at the top of main.go."""
    env.conflist("lg", "1.1.0", [{"type": "logger"}])

    # ADD: the plugin runs, but a 1.1.0 result cannot be parsed; nothing is cached.
    env.logger(result_version="1.1.0")
    err = one_line_error(env.run("add", "lg", "/x"))
    assert 'unsupported CNI result version "1.1.0"' in err
    assert [c["env"]["CNI_COMMAND"] for c in env.calls()] == ["ADD"]
    assert not (env.cache / "results").exists()
    # CHECK and DEL run the plugin without prevResult.
    assert env.run("check", "lg", "/x").returncode == 0
    assert env.run("del", "lg", "/x").returncode == 0
    assert [("prevResult" in c["stdin"]) for c in env.calls()] == [False, False, False]

    # A 1.0.0 result to a 1.1.0 config is accepted and cached...
    env.logger(result_version="1.0.0")
    assert env.run("add", "lg", "/x").returncode == 0
    cache = env.cache_file("lg", cnidrv.cnitool_container_id("/x"))
    assert cache.exists()
    # ...but then CHECK and DEL fail before any plugin runs: 1.0.0 -> 1.1.0 has no converter.
    for verb in ("check", "del"):
        assert "no converter for CNI result version 1.0.0 to 1.1.0" in one_line_error(
            env.run(verb, "lg", "/x")
        )
    assert len(env.calls()) == 4
    assert cache.exists()


def test_build_is_idempotent(driver: Path) -> None:
    mtime = driver.stat().st_mtime_ns
    assert cnidrv.DRIVER_DIR.joinpath("build.sh").exists()
    subprocess.run([str(cnidrv.DRIVER_DIR / "build.sh")], check=True)
    assert driver.stat().st_mtime_ns == mtime
    assert os.access(driver, os.X_OK)
