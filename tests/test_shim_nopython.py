"""The CNI shims against a real moor-ipamd, and the static one on a host without Python.

CoreOS/Flatcar, Bottlerocket and Talos have no /usr/bin/python3, so the node image installs
build/moor, the static shim. Here every call of it runs in a mount namespace of its own where
/usr/bin (so /usr/bin/python3), /usr/local and /usr/lib/python3* are empty read-only tmpfs mounts:
ADD, CHECK, STATUS, GC, VERSION and DEL work there, and a DEL spooled while the daemon is down is
replayed by it. The daemon runs outside, as it runs in its own image. The hiding is proven first:
bin/moor and /usr/bin/python3 cannot start in there.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from cni_plugin.netconf import SUPPORTED_VERSIONS
from tests.conftest import _run_id, require, start_daemon
from tests.helpers import oracle, shims
from tests.helpers.moor import Daemon, ExecRuntime, delete_netns, make_netns, plugin_config

pytestmark = pytest.mark.netns

NETWORK = "10.214.0.0/16"
HIDE_PYTHON = """
for d in /usr/lib/python3*; do /usr/bin/mount -t tmpfs -o ro none "$d"; done
/usr/bin/mount -t tmpfs -o ro none /usr/local
/usr/bin/mount -t tmpfs -o ro none /usr/bin
exec "$@"
"""
_ids = itertools.count()


def without_python(executable: Path | str, where: Path) -> Path:
    """A wrapper that runs `executable` in a new mount namespace with the host's Python hidden
    (the wrapper itself runs on the host: it only calls unshare)."""
    wrapper = where / f"no-python-{Path(executable).name}-{next(_ids)}"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec /usr/bin/unshare --mount --propagation private /bin/sh -c '{HIDE_PYTHON}' sh "
        f'"{executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "node", "msh1", NETWORK, "mshbr0")
    yield d
    d.cleanup_host()


@pytest.fixture
def pod_netns() -> Iterator[Callable[[], tuple[str, str]]]:
    made: list[str] = []

    def factory() -> tuple[str, str]:
        name = f"msh-{_run_id}-{next(_ids)}"
        made.append(name)
        return name, make_netns(name)

    yield factory
    for name in made:
        delete_netns(name)


def static_shim() -> Path:
    ok, why = shims.available()
    require(ok, why)
    return shims.static_shim()


def conf(daemon: Daemon, version: str = "1.0.0") -> dict:
    return plugin_config("mshnet", version, daemon.plugin())


def allocations(daemon: Daemon, container_id: str) -> list[dict]:
    return [a for a in daemon.status()["allocations"] if a["containerID"] == container_id]


def add_check_del(rt: ExecRuntime, daemon: Daemon, ns: str, path: str, cid: str) -> None:
    """One pod's life through `rt`, checked in the kernel and in the daemon."""
    add = rt.add(conf(daemon), path, cid, cni_args=f"K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={cid}")
    assert add.rc == 0, add
    (ip,) = add.out["ips"]
    assert ip["address"].startswith("10.214.") and ip["address"] in oracle.addresses("eth0", ns)
    host = oracle.link(host_veth_name(cid, "eth0"))
    assert host is not None and host.get("master") == "mshbr0"
    assert [a["ip"] for a in allocations(daemon, cid)] == [ip["address"]]
    check = rt.check(conf(daemon), path, cid)
    assert check.rc == 0 and check.out == {}, check
    dele = rt.delete(conf(daemon), path, cid)
    assert dele.rc == 0 and dele.out == {}, dele
    assert oracle.gone(host_veth_name(cid, "eth0")) and oracle.gone("eth0", netns=ns)
    assert allocations(daemon, cid) == []


def test_the_host_python_is_hidden(tmp_path: Path) -> None:
    """In the namespace neither /usr/bin/python3 nor bin/moor (whose shebang names it) starts."""
    python = without_python("/usr/bin/python3", tmp_path)
    proc = ExecRuntime(python).call("VERSION", {})
    assert proc.rc == 127 and "not found" in proc.stderr, proc
    proc = ExecRuntime(without_python(shims.PYTHON_SHIM, tmp_path)).call("VERSION", {})
    assert proc.rc == 127 and proc.out == {}, proc
    assert ExecRuntime(shims.PYTHON_SHIM).call("VERSION", {}).rc == 0  # outside, it does


@pytest.mark.parametrize("kind", shims.KINDS)
def test_add_check_del_through_each_shim(
    kind: str, node: Daemon, pod_netns: Callable[[], tuple[str, str]]
) -> None:
    shim = static_shim() if kind == "static" else shims.PYTHON_SHIM
    ns, path = pod_netns()
    add_check_del(ExecRuntime(shim), node, ns, path, f"msh-{kind}")


def test_the_static_shim_works_without_python(
    tmp_path: Path, node: Daemon, pod_netns: Callable[[], tuple[str, str]]
) -> None:
    rt = ExecRuntime(without_python(static_shim(), tmp_path))
    version = rt.call("VERSION", {})
    assert version.rc == 0 and version.out == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }
    ns, path = pod_netns()
    add_check_del(rt, node, ns, path, "msh-nopy")
    status = rt.call("STATUS", conf(node, "1.1.0"))
    assert status.rc == 0 and status.out == {}, status
    gc = rt.call("GC", {**conf(node, "1.1.0"), "cni.dev/valid-attachments": []})
    assert gc.rc == 0 and gc.out == {}, gc


def test_a_del_the_static_shim_spools_without_python_is_replayed(
    tmp_path: Path, node: Daemon, pod_netns: Callable[[], tuple[str, str]]
) -> None:
    """The spool entry the Go shim writes is one the daemon replays: the DEL made while the
    daemon was down releases the pod's IP when it starts again."""
    rt = ExecRuntime(without_python(static_shim(), tmp_path))
    ns, path = pod_netns()
    add = rt.add(conf(node), path, "msh-spooled")
    assert add.rc == 0, add
    node.stop()
    down = rt.add(conf(node), pod_netns()[1], "msh-down")
    assert down.rc == 1 and down.code == 11 and node.cni_socket in down.out["msg"]
    dele = rt.delete(conf(node), path, "msh-spooled")
    assert dele.rc == 0 and dele.out == {} and "DEL spooled for replay" in dele.stderr
    (entry,) = os.listdir(node.spool_dir)
    node.start()
    assert os.listdir(node.spool_dir) == [], f"{entry} was not replayed"
    assert allocations(node, "msh-spooled") == []
    assert oracle.gone(host_veth_name("msh-spooled", "eth0"))
    ip = add.out["ips"][0]["address"]
    assert ip not in [a["ip"] for a in node.status()["allocations"]]
