"""deploy/moor.yaml read as kubelet would run it: the DaemonSet's containers, their env and
`$(VAR)` references resolved, the daemon's effective config (the ConfigMap's ipamd.yaml under the
args, as `moor-ipamd --config` merges them), and where each container path lands on the host.

Pure reading: no cluster, no daemon. tests/test_deploy.py holds the checks.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipamd.config import DaemonConfig, build_parser

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "moor.yaml"
# What the downward API gives a pod on a node; any value of the right shape does.
FIELD_VALUES = {"spec.nodeName": "node-1", "status.hostIP": "192.0.2.10"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@dataclass
class Manifest:
    docs: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"{kind}: {len(found)} in the manifest"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("DaemonSet")["spec"]["template"]["spec"]

    def container(self, name: str) -> dict[str, Any]:
        every = self.pod.get("initContainers", []) + self.pod["containers"]
        return next(c for c in every if c["name"] == name)

    @property
    def daemon(self) -> dict[str, Any]:
        return self.container("moor-ipamd")

    def configmap_data(self, name: str) -> dict[str, str]:
        cms = [d for d in self.docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        assert cms, f"no ConfigMap {name} in the manifest"
        return cms[0]["data"]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's env as kubelet resolves it (downward API, ConfigMap keys, values)."""
        out: dict[str, str] = {}
        for var in container.get("env", []):
            if "value" in var:
                out[var["name"]] = var["value"]
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                out[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["configMapKeyRef"]
                out[var["name"]] = self.configmap_data(ref["name"])[ref["key"]]
        return out

    def args(self, container: dict[str, Any]) -> list[str]:
        """Its args with `$(VAR)` expanded; a reference to an undefined variable is an error
        here (kubelet would pass it on verbatim, and the daemon would get `$(NODE_NAME)`)."""
        env = self.env(container)

        def expand(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{m.group(0)} is not defined in {container['name']}'s env"
            return env[m.group(1)]

        return [VAR_REF.sub(expand, a) for a in container.get("args", [])]

    def configmap_file(self, container: dict[str, Any], path: str) -> str:
        """The text of `path` in the container, a file of a ConfigMap volume (AssertionError
        when it is not one, or the key behind it is missing)."""
        mount = self.mount_of(container, path)
        assert mount is not None, f"{path} is on no volume of {container['name']}"
        source = self.volume(mount["name"]).get("configMap")
        assert source is not None, f"{path} is not on a ConfigMap volume"
        rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        items = source.get("items")
        key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
        data = self.configmap_data(source["name"])
        assert key in data, f"{path}: no key {key!r} in ConfigMap {source['name']}"
        return data[key]

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def mount_of(self, container: dict[str, Any], path: str) -> dict[str, Any] | None:
        """The volume mount `path` lies under (the deepest one), or None."""
        under = [
            m
            for m in container.get("volumeMounts", [])
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        return max(under, key=lambda m: len(m["mountPath"]), default=None)

    def host_path(self, container: dict[str, Any], path: str) -> str | None:
        """Where `path` inside the container is on the host, if it is on a hostPath volume."""
        mount = self.mount_of(container, path)
        if mount is None:
            return None
        source = self.volume(mount["name"]).get("hostPath")
        if source is None:
            return None
        return source["path"].rstrip("/") + path[len(mount["mountPath"].rstrip("/")) :]


def unknown_flags(args: list[str]) -> set[str]:
    """The flags among `args` (`--flag=value` or `--flag`) that moor-ipamd does not have."""
    _, unknown = build_parser().parse_known_args(args)
    return {a.split("=", 1)[0] for a in unknown}


def effective_config(m: Manifest, drop: set[str] = frozenset()) -> DaemonConfig:  # type: ignore[assignment]
    """The daemon's config from the ConfigMap's ipamd.yaml and the DaemonSet's args, merged as
    `ipamd.config.load_config` merges them (flags win), without `validate()` (the etcd files are
    the cluster's). Flags in `drop` are left out (those the daemon does not know yet)."""
    args = [a for a in m.args(m.daemon) if a.split("=", 1)[0] not in drop]
    parsed = build_parser().parse_args(args)
    values: dict[str, Any] = {
        str(k).replace("-", "_"): v
        for k, v in yaml.safe_load(m.configmap_file(m.daemon, parsed.config)).items()
    }
    known = {f.name for f in dataclasses.fields(DaemonConfig)}
    assert set(values) <= known, f"unknown keys in ipamd.yaml: {set(values) - known}"
    for f in dataclasses.fields(DaemonConfig):
        if (value := getattr(parsed, f.name)) is not None:
            values[f.name] = value
    return DaemonConfig(**values)
