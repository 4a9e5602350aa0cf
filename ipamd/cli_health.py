"""moorctl health and moorctl version: for probes and for people checking what runs.

`health` asks the daemon's standard gRPC health service: exit 0 when it is SERVING (the node can
serve ADD), 1 otherwise or when the daemon does not answer, so a Kubernetes exec probe can run it
as it is. `version` shows the daemon's release, the store's schema version and the newest the
daemon supports, and the installed shim's release (it runs the shim with no CNI_COMMAND, which
prints `moor <version>: ...`; `--shim` says where it is).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Callable
from typing import Any

from ipamd.cli_output import CliError

DEFAULT_SHIM = "/opt/cni/bin/moor"


def _health(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
    )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    args.exit_code = 0 if status == "SERVING" else 1
    return {"status": status}


def _version(channel: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    reply = ipam_pb2_grpc.AdminStub(channel).Version(ipam_pb2.VersionRequest(), timeout=30)
    return {
        "daemon": reply.daemon_version,
        "schema": reply.schema_version,
        "schemaSupported": reply.schema_supported,
        "shim": shim_version(args.shim),
        "shimPath": args.shim,
    }


def shim_version(path: str) -> str:
    """The release the shim at `path` reports ("" when it is not there)."""
    if not os.access(path, os.X_OK):
        return ""
    try:
        proc = subprocess.run([path], env={}, capture_output=True, timeout=10, check=False)
    except OSError as exc:
        raise CliError(f"cannot run the shim {path}: {exc.strerror or exc}") from exc
    first = proc.stderr.decode(errors="replace").splitlines()[:1]
    words = first[0].split() if first else []
    return words[1].rstrip(":") if len(words) > 1 and words[0] == "moor" else "unknown"


def render_version(data: dict[str, Any]) -> str:
    shim = data["shim"] or f"not found at {data['shimPath']}"
    schema = data["schema"] or "no network config yet"
    return "\n".join(
        [
            f"daemon  {data['daemon']}",
            f"shim    {shim}",
            f"schema  {schema} (this daemon supports up to {data['schemaSupported']})",
        ]
    )


def add_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(sub, "health", _health, lambda d: d["status"], "exit 0 when the node is ready")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    p = command(sub, "version", _version, render_version, "daemon, shim and schema versions")
    p.add_argument("--shim", default=DEFAULT_SHIM, help="the installed CNI executable")
