"""Issue 15's node image: built by `make image`'s own code (cached), then run as a node runs it.

The image is built with image/build.py's `ensure_image`, the function behind `make image`: the
first run on a machine makes the Debian base with mmdebstrap and installs the Python packages
from the index (a minute or two); later runs reuse the cached image while Dockerfile, setup.cfg
and the sources are unchanged. Then moor-ipamd runs from it in a podman container
(tests/helpers/image_node.py): host network, NET_ADMIN and SYS_ADMIN, the host's `run/` and
`state/` dirs mounted at /run/moor and /var/lib/moor, a local etcd on loopback. moorctl of this
checkout, on the host, answers through the mounted socket, and the CNI payload copied out of the
image gives a pod its address through the containerised daemon.

Names: containers `mim-*`, node `mim`, bridge `mimbr0`, chain MIM-MASQ, netns `mim-*`, network
10.212.0.0/16, etcd keys under /mim-<run>.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from image import base, build
from tests.conftest import require
from tests.helpers import oracle
from tests.helpers.etcd import EtcdServer
from tests.helpers.image_node import ImageNode
from tests.helpers.moor import REPO, ExecRuntime, delete_netns, make_netns, plugin_config, run_cmd

pytestmark = [pytest.mark.root, pytest.mark.netns]

NETWORK, BRIDGE, CHAIN = "10.212.0.0/16", "mimbr0", "MIM-MASQ"
RUN = secrets.token_hex(3)
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def cap_bits(status: str) -> int:
    """CapEff from a /proc/PID/status text."""
    line = next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
    return int(line.split()[1], 16)


@pytest.fixture(scope="module")
def built() -> build.Built:
    ok, why = base.available()
    require(ok, why)
    return build.ensure_image()


@pytest.fixture(scope="module")
def node(
    built: build.Built, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageNode]:
    n = ImageNode(
        workdir=tmp_path_factory.mktemp("mim"),
        image=built.tag,
        image_store=built.store,
        container=f"mim-ipamd-{RUN}",
        node_name="mim",
        store_url=etcd_server.url,
        key_prefix=f"/mim-{RUN}",
        network=NETWORK,
        masq_chain=CHAIN,
    )
    try:
        n.start()
        n.wait_ready()
        yield n
    finally:
        n.cleanup()
        run_cmd("ip", "link", "del", BRIDGE, check=False)
        etcd_server.etcdctl("del", "--prefix", f"/mim-{RUN}")


@pytest.fixture
def pod_netns() -> Iterator[str]:
    name = f"mim-{RUN}"
    path = make_netns(name)
    yield path
    delete_netns(name)


def test_the_image_is_this_checkout(built: build.Built, node: ImageNode) -> None:
    """The image carries this checkout's shim as the CNI payload and its sample conflist, runs
    moor-ipamd, and is labelled with the key of exactly these sources."""
    assert node.image_file("/opt/moor/cni/moor") == (REPO / "build" / "moor").read_bytes()
    conflist = node.image_file("/etc/moor/10-moor.conflist")
    assert conflist == (REPO / "conf" / "10-moor.conflist").read_bytes()
    config = json.loads(node.engine.ok("image", "inspect", built.tag))[0]["Config"]
    assert config["Entrypoint"] == ["/opt/moor/venv/bin/moor-ipamd"]
    assert config["Labels"][build.KEY_LABEL] == build.context_key()
    assert built.key == build.context_key()


def test_moorctl_answers_through_the_mounted_socket(node: ImageNode) -> None:
    """The containerised daemon is ready on etcd, seen from the host through /run/moor."""
    status = node.status()
    assert status is not None and status["ready"], node.logs()
    assert status["node"] == "mim"
    subnets = [ipaddress.ip_network(s["subnet"]) for s in status["subnets"]]
    assert subnets and all(s.subnet_of(ipaddress.ip_network(NETWORK)) for s in subnets)
    keys = node.moorctl("subnets", "--json")
    assert keys.returncode == 0, keys.stderr
    assert Path(node.grpc_socket).is_socket() and Path(node.cni_socket).is_socket()


def test_the_daemon_holds_the_capabilities_it_was_given(node: ImageNode) -> None:
    """NET_ADMIN and SYS_ADMIN come from --cap-add: podman's rootful defaults lack both."""
    pid = node.inspect()["State"]["Pid"]
    given = cap_bits(Path(f"/proc/{pid}/status").read_text())
    assert given & (1 << CAP_NET_ADMIN) and given & (1 << CAP_SYS_ADMIN)
    default = node.engine("run", "--rm", "--pull=never", "--network", "none",
                          "--entrypoint", "cat", node.image, "/proc/self/status")  # fmt: skip
    assert default.returncode == 0, default.stderr
    bits = cap_bits(default.stdout)
    assert not bits & (1 << CAP_NET_ADMIN) and not bits & (1 << CAP_SYS_ADMIN)


def test_a_pod_gets_its_address_through_the_image_payload(
    node: ImageNode, pod_netns: str, tmp_path: Path
) -> None:
    """The shim copied out of the image, run on the host like a runtime does, reaches the daemon
    in the container: ADD wires the pod (bridge, veth, address in the node's subnet, masquerade
    chain on the host), CHECK passes, DEL releases the address."""
    shim = tmp_path / "moor"
    shim.write_bytes(node.image_file("/opt/moor/cni/moor"))
    shim.chmod(0o755)
    conf = plugin_config("mimnet", "1.0.0", {
        "type": "moor", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": True,
        "ipMasq": True, "daemonSocket": node.cni_socket, "spoolDir": node.spool_dir,
    })  # fmt: skip
    runtime = ExecRuntime(plugin_path=shim)
    cid = f"mim-{RUN}-pod"
    added = runtime.add(conf, pod_netns, cid)
    assert added.rc == 0, (added.out, node.logs())
    ip = ipaddress.ip_interface(added.out["ips"][0]["address"])
    status = node.status()
    assert status is not None
    assert any(ip.ip in ipaddress.ip_network(s["subnet"]) for s in status["subnets"])
    assert str(ip.ip) in json.dumps(status["allocations"])
    assert oracle.addresses("eth0", netns=pod_netns.rsplit("/", 1)[1]) == [str(ip)]
    assert oracle.link(BRIDGE) is not None
    assert oracle.nat_chain(CHAIN) is not None
    checked = runtime.check(conf, pod_netns, cid)
    assert checked.rc == 0, checked.out
    deleted = runtime.delete(conf, pod_netns, cid)
    assert deleted.rc == 0, deleted.out
    after = node.status()
    assert after is not None
    assert str(ip.ip) not in json.dumps(after.get("allocations", []))
